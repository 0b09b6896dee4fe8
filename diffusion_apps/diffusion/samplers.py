"""Stateless samplers (k-diffusion style): DDPM ancestral, DDIM and DDIM inversion
(DPM-Solver++ in :mod:`~diffusion_apps.diffusion.solvers`).

Model contract: ``eps_fn(x_t, t, **cond) -> ε̂`` where ``t`` is an int64 tensor (B,) of ORIGINAL
schedule indices (respacing never renumbers t) and ``cond`` is passed through unchanged. A model
with learned variance returns [ε̂, v] (2C channels, :mod:`~diffusion_apps.diffusion.variance`):
``ddpm_sample(variance="learned")`` draws with its Σ_θ, every other sampler uses the ε̂ half.

Convention: a subsequence t_0 < t_1 < … < t_{S−1} of [0, T) is walked from t_{S−1} down to t_0. The
level before t_0 is ᾱ_{−1} = 1 (clean data), so the last step returns x̂_0 and adds no noise.

Grad mode is left alone: callers wrap samplers in ``torch.no_grad()``, not
``torch.inference_mode()``, under which guidance wrappers cannot differentiate a classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion_apps import stop
from diffusion_apps.diffusion.schedule import NoiseSchedule, per_sample
from diffusion_apps.diffusion.timesteps import subsequence_tables
from diffusion_apps.diffusion.variance import join_output, log_variance_bounds, split_output

EpsFn = Callable[..., Tensor]
Variance = Literal["beta", "beta_tilde", "learned"]


def respaced_variance(
    alpha_bar: Tensor, alpha_bar_prev: Tensor, variance: Variance
) -> tuple[Tensor, Tensor]:
    """β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} (improved DDPM respacing) and Σ_i = β'_i or β̃'_i (a fixed
    variance; for "learned" see :func:`~diffusion_apps.diffusion.variance.log_variance_bounds`)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"a fixed variance is 'beta' or 'beta_tilde', got {variance!r}")
    beta = 1 - alpha_bar / alpha_bar_prev
    return beta, beta if variance == "beta" else beta * (1 - alpha_bar_prev) / (1 - alpha_bar)


def clip_denoised(eps_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """ε̃ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t), x̂_0 = clamp((x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t, −1, 1): the
    model's ε with its x̂_0 clamped to the data range (guided-diffusion's ``clip_denoised``).

    This is what the samplers' ``clip_x0`` wraps around their ``eps_fn``. It is the one hook for
    the order of clamping and guidance: guided-diffusion clamps the model's x̂_0 first and
    shifts after, never clamping again, which is ``eps_shift_guidance(clip_denoised(eps, …), …)``
    given to a sampler with ``clip_x0=False``. Coefficients in float64, cast to x_t's dtype.
    A learned-variance output [ε̂, v] keeps its v.
    """

    def clipped(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        alpha_bar = schedule.alpha_bar(t).double()
        signal, sigma = per_sample(alpha_bar.sqrt(), x_t), per_sample((1 - alpha_bar).sqrt(), x_t)
        eps, v = split_output(eps_fn(x_t, t, **cond), x_t)
        x0 = ((x_t - sigma * eps) / signal).clamp_(-1, 1)
        return join_output((x_t - signal * x0) / sigma, v)

    return clipped


def _run(
    eps_fn: EpsFn,
    x: Tensor,
    ts: Sequence[int],
    table: Tensor,
    generator: torch.Generator | None,
    progress: bool,
    cond: dict[str, Any],
    log_var_bounds: Tensor | None = None,
) -> Tensor:
    """Walk ``ts``: x ← c_x0·x̂_0 + c_x·x + c_ε·ε̂ + σ·z, z ~ N(0, I), x̂_0 = (x − √(1 − ᾱ)ε̂)/√ᾱ.

    ``table`` (S, 5) holds the rows (ᾱ_t, c_x0, c_x, c_ε, σ). They are folded once, in float64,
    into two coefficients on the network's output ε̂ and on x:
        x ← (c_ε − c_x0·√((1 − ᾱ)/ᾱ))·ε̂ + (c_x + c_x0/√ᾱ)·x + σz.
    The loop gets them as Python floats: a step is the network call plus two elementwise passes
    (a third for the noise), and nothing in it synchronises host and device. A 2C-channel output
    [ε̂, v] is read for its ε̂; with ``log_var_bounds`` (S, 2), rows (log β̃', log β'), σ is then
    only a flag (> 0: add noise) and the noise's scale is Σ_θ^½ from v, elementwise. A stop
    requested by a signal raises :class:`~diffusion_apps.stop.StopRequested` before a step.
    """
    alpha_bar, c_x0, c_x, c_eps, sigma = table.unbind(1)
    c_u = c_eps - c_x0 * ((1 - alpha_bar) / alpha_bar).sqrt()
    c_x = c_x + c_x0 / alpha_bar.sqrt()
    rows = torch.stack([c_u, c_x, sigma], 1).tolist()
    bounds = [None] * len(rows) if log_var_bounds is None else log_var_bounds.tolist()
    t_all = torch.tensor(list(ts), dtype=torch.long, device=x.device)
    for i, (c_u_t, c_x_t, sigma_t) in enumerate(tqdm(rows, disable=not progress)):
        stop.check()  # SIGTERM/Ctrl-C: stop within a step (a validation grid takes minutes)
        eps, v = split_output(eps_fn(x, t_all[i].expand(x.shape[0]), **cond), x)
        x_next = eps.mul(c_u_t).add_(x, alpha=c_x_t)
        if sigma_t > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if bounds[i] is None:
                x_next.add_(noise, alpha=sigma_t)
            elif v is None:
                raise ValueError("variance='learned' needs eps_fn to return [ε, v] (2C channels)")
            else:  # σ = exp(½ log Σ_θ), log Σ_θ = min + (v + 1)/2 · (max − min)
                min_log, max_log = bounds[i]
                std = v.add(1).mul_(0.25 * (max_log - min_log)).add_(0.5 * min_log).exp_()
                x_next.addcmul_(noise, std)
        x = x_next
    return x


def ddpm_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    timesteps: Tensor | None = None,
    variance: Variance = "beta",
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on any timestep subsequence.

    Respacing as in improved DDPM: α'_i = ᾱ_{t_i}/ᾱ_{t_{i−1}}, β'_i = 1 − α'_i. Each step draws
    x_{t_{i−1}} = μ̃_i + σ_i z with the posterior mean (DDPM eq. 7) taken at x̂_0:
    μ̃_i = √ᾱ_{t_{i−1}} β'_i/(1 − ᾱ_{t_i}) · x̂_0 + √α'_i (1 − ᾱ_{t_{i−1}})/(1 − ᾱ_{t_i}) · x_{t_i},
    σ_i² = β'_i ("beta", fixed large) or β̃'_i = β'_i (1 − ᾱ_{t_{i−1}})/(1 − ᾱ_{t_i}) ("beta_tilde",
    fixed small), or ("learned") the model's Σ_θ: ``eps_fn`` returns [ε̂, v] and
    log σ_i² = frac·log β'_i + (1 − frac)·log β̃'_i, frac = (v + 1)/2 elementwise (Nichol &
    Dhariwal 2021 eq. 15 on the respaced β', guided-diffusion's ``LEARNED_RANGE``). The last step
    (t_0 → x̂_0) adds no noise.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``; [ε̂, v] for ``learned``.
        schedule: The noise schedule the model was trained with.
        x_T: Start noise at level t_{S−1}, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T.
        variance: σ² choice, see above.
        clip_x0: Clamp x̂_0 to [−1, 1] and re-derive ε̂ from it (:func:`clip_denoised`
            around ``eps_fn``: after any guidance in it).
        generator: RNG for z, on x_T's device.
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.

    Returns:
        Samples shaped like x_T.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    learned = variance == "learned"
    beta, sigma2 = respaced_variance(alpha_bar, alpha_bar_prev, "beta" if learned else variance)
    c_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    c_x = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    sigma = sigma2.sqrt()
    sigma[0] = 0.0
    table = torch.stack([alpha_bar, c_x0, c_x, torch.zeros_like(beta), sigma], dim=1)
    bounds = torch.stack(log_variance_bounds(alpha_bar, alpha_bar_prev), 1) if learned else None
    eps_fn = clip_denoised(eps_fn, schedule) if clip_x0 else eps_fn
    return _run(eps_fn, x_T, ts[::-1], table.flip(0), generator, progress, cond,
                None if bounds is None else bounds.flip(0))  # fmt: skip


def ddim_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    timesteps: Tensor | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) from t = t_i to t' = t_{i−1}.

    x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z with
    σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}) (eq. 16). η = 0 is the deterministic sampler,
    η = 1 the DDPM posterior variance β̃.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
        schedule: The noise schedule the model was trained with.
        x_T: Start noise at level t_{S−1}, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T.
        eta: η ≥ 0.
        clip_x0: Clamp x̂_0 to [−1, 1] and re-derive ε̂ from it (:func:`clip_denoised`
            around ``eps_fn``: after any guidance in it).
        generator: RNG for z (used only when η > 0), on x_T's device.
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.

    Returns:
        Samples shaped like x_T.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    c_eps = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt()
    table = torch.stack(
        [alpha_bar, alpha_bar_prev.sqrt(), torch.zeros_like(sigma), c_eps, sigma], 1
    )
    eps_fn = clip_denoised(eps_fn, schedule) if clip_x0 else eps_fn
    return _run(eps_fn, x_T, ts[::-1], table.flip(0), generator, progress, cond)


def ddim_invert(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    timesteps: Tensor | None = None,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """Deterministic DDIM encoding x_0 → x_{t_{S−1}}, the inverse of ``ddim_sample`` with η = 0.

    Step i runs the η = 0 update of eq. 12 upwards, from level t_{i−1} (ᾱ_{t_{−1}} = 1: x_0 itself)
    to level t_i: x_{t_i} = √ᾱ_{t_i} x̂_0 + √(1 − ᾱ_{t_i}) ε̂, where x̂_0 and ε̂ come from the current
    point at its own index t_{i−1} (t_0 for the clean x_0). Every sampling step i thus has an
    inverse step i whose only approximation is evaluating ε̂ one level lower, so
    ``ddim_sample(ddim_invert(x_0))`` approaches x_0 as the steps get finer (S model calls each
    way).

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
        schedule: The noise schedule the model was trained with.
        x0: Clean data, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T. Give ``ddim_sample`` the same.
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.

    Returns:
        The latent x_{t_{S−1}}, shaped like x0.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    zeros = torch.zeros_like(alpha_bar)
    table = torch.stack([alpha_bar_prev, alpha_bar.sqrt(), zeros, (1 - alpha_bar).sqrt(), zeros], 1)
    return _run(eps_fn, x0, [ts[0], *ts[:-1]], table, None, progress, cond)
