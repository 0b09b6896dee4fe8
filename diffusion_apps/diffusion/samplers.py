"""Stateless samplers (k-diffusion style): DDPM ancestral, DDIM, DDIM inversion and
DPM-Solver++(2M).

Model contract: ``eps_fn(x_t, t, **cond) -> ε̂`` where ``t`` is an int64 tensor (B,) of ORIGINAL
schedule indices (respacing never renumbers t) and ``cond`` is passed through unchanged.

Convention: a subsequence t_0 < t_1 < … < t_{S−1} of [0, T) is walked from t_{S−1} down to t_0. The
level before t_0 is ᾱ_{−1} = 1 (clean data), so the last step returns x̂_0 and adds no noise.

Grad mode is left alone: callers wrap samplers in ``torch.no_grad()``, not
``torch.inference_mode()``, under which guidance wrappers cannot differentiate a classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion_apps.diffusion.schedule import NoiseSchedule, per_sample

EpsFn = Callable[..., Tensor]
Variance = Literal["beta", "beta_tilde"]
Spacing = Literal["uniform", "quad", "logsnr"]


def timestep_subsequence(
    num_timesteps: int,
    steps: int,
    kind: Spacing = "uniform",
    alphas_cumprod: Tensor | None = None,
) -> Tensor:
    """The S-step subsequences of [0, T) of DDIM (Song et al. 2021; official ermongroup/ddim) and
    DPM-Solver (Lu et al. 2022).

    ``uniform``: ``arange(0, T, T // S)[:S]``, i.e. t_i = i·⌊T/S⌋: it starts at 0 and ends at
    T − T/S when S divides T (the official DDIM code; latent-diffusion adds +1, we do not).
    ``quad``: t_i = ⌊(i·√(0.8 T)/(S − 1))²⌋, rounded like the official code's ``numpy.linspace``:
    the walk starts at t_{S−1} = 0.8·T, not near T (the official choice).
    Its repeats near 0 (from S ≈ √(0.8 T) on: 96 distinct of S = 100 at T = 1000) are dropped; the
    official sampler runs them as no-op steps t → t that still cost a model call.
    ``logsnr``: uniform in λ = log(√ᾱ/√(1 − ᾱ)) from λ_{T−1} to λ_0 (DPM-Solver's ``logSNR``
    skip type, its choice for low resolutions), each λ rounded to the nearest index, repeats
    dropped. It needs ``alphas_cumprod``, and unlike the others it ends at T − 1.

    Args:
        num_timesteps: T.
        steps: S, with 1 ≤ S ≤ T.
        kind: Spacing rule.
        alphas_cumprod: ᾱ_0 … ᾱ_{T−1}, for ``logsnr``.

    Returns:
        Strictly increasing int64 tensor, (S,) (``quad``, ``logsnr``: at most S).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, num_timesteps={num_timesteps}], got {steps}")
    if kind == "uniform":
        return torch.arange(0, num_timesteps, num_timesteps // steps)[:steps]
    if kind == "quad":
        stop = math.sqrt(0.8 * num_timesteps)  # numpy.linspace's rounding, as in the official code
        root = torch.arange(steps, dtype=torch.float64) * (stop / max(steps - 1, 1))
        if steps > 1:
            root[-1] = stop
        return (root**2).long().unique()
    if kind != "logsnr":
        raise ValueError(f"kind must be one of {get_args(Spacing)}, got {kind!r}")
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
        raise ValueError("kind='logsnr' needs the schedule's alphas_cumprod (T values)")
    alpha_bar = alphas_cumprod.detach().cpu().double()
    lam = 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())  # decreasing in t
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    wanted = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - wanted[:, None]).abs().argmin(1)
    return nearest.unique()


def subsequence_tables(
    schedule: NoiseSchedule, timesteps: Tensor | None
) -> tuple[list[int], Tensor, Tensor]:
    """Validated indices [t_0, …, t_{S−1}] and float64 (S,) tables ᾱ_{t_i} and ᾱ_{t_{i−1}}."""
    T = schedule.num_timesteps
    ts = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).cpu().long()
    if ts.ndim != 1 or len(ts) == 0 or ts[0] < 0 or ts[-1] >= T or (ts.diff() <= 0).any():
        raise ValueError(f"timesteps must be a non-empty increasing 1-D subset of [0, {T})")
    alpha_bar = schedule.alphas_cumprod.detach().cpu().double()[ts]
    return ts.tolist(), alpha_bar, torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])


def respaced_variance(
    alpha_bar: Tensor, alpha_bar_prev: Tensor, variance: Variance
) -> tuple[Tensor, Tensor]:
    """β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} (improved DDPM respacing) and Σ_i = β'_i or β̃'_i."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    beta = 1 - alpha_bar / alpha_bar_prev
    return beta, beta if variance == "beta" else beta * (1 - alpha_bar_prev) / (1 - alpha_bar)


def clip_denoised(eps_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """ε̃ = (x_t − √ᾱ_t x̂_0)/√(1 − ᾱ_t), x̂_0 = clamp((x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t, −1, 1): the
    model's ε with its x̂_0 clamped to the data range (guided-diffusion's ``clip_denoised``).

    This is what the samplers' ``clip_x0`` wraps around their ``eps_fn``. It is the one hook for
    the order of clamping and guidance: guided-diffusion clamps the model's x̂_0 first and
    shifts after, never clamping again, which is ``eps_shift_guidance(clip_denoised(eps, …), …)``
    given to a sampler with ``clip_x0=False``. Coefficients in float64, cast to x_t's dtype.
    """

    def clipped(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        alpha_bar = schedule.alpha_bar(t).double()
        signal, sigma = per_sample(alpha_bar.sqrt(), x_t), per_sample((1 - alpha_bar).sqrt(), x_t)
        x0 = ((x_t - sigma * eps_fn(x_t, t, **cond)) / signal).clamp_(-1, 1)
        return (x_t - signal * x0) / sigma

    return clipped


def _run(
    eps_fn: EpsFn,
    x: Tensor,
    ts: Sequence[int],
    table: Tensor,
    generator: torch.Generator | None,
    progress: bool,
    cond: dict[str, Any],
) -> Tensor:
    """Walk ``ts``: x ← c_x0·x̂_0 + c_x·x + c_ε·ε̂ + σ·z, z ~ N(0, I), x̂_0 = (x − √(1 − ᾱ)ε̂)/√ᾱ.

    ``table`` (S, 5) holds the rows (ᾱ_t, c_x0, c_x, c_ε, σ). They are folded once, in float64,
    into two coefficients on the network's output ε̂ and on x:
        x ← (c_ε − c_x0·√((1 − ᾱ)/ᾱ))·ε̂ + (c_x + c_x0/√ᾱ)·x + σz.
    The loop gets them as Python floats: a step is the network call plus two elementwise passes
    (a third for the noise), and nothing in it synchronises host and device.
    """
    alpha_bar, c_x0, c_x, c_eps, sigma = table.unbind(1)
    c_u = c_eps - c_x0 * ((1 - alpha_bar) / alpha_bar).sqrt()
    c_x = c_x + c_x0 / alpha_bar.sqrt()
    rows = torch.stack([c_u, c_x, sigma], 1).tolist()
    t_all = torch.tensor(list(ts), dtype=torch.long, device=x.device)
    for i, (c_u_t, c_x_t, sigma_t) in enumerate(tqdm(rows, disable=not progress)):
        u = eps_fn(x, t_all[i].expand(x.shape[0]), **cond)
        x_next = u.mul(c_u_t).add_(x, alpha=c_x_t)
        if sigma_t > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_next.add_(noise, alpha=sigma_t)
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
    fixed small); the last step (t_0 → x̂_0) adds no noise.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
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
    beta, sigma2 = respaced_variance(alpha_bar, alpha_bar_prev, variance)
    c_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    c_x = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    sigma = sigma2.sqrt()
    sigma[0] = 0.0
    table = torch.stack([alpha_bar, c_x0, c_x, torch.zeros_like(beta), sigma], dim=1)
    eps_fn = clip_denoised(eps_fn, schedule) if clip_x0 else eps_fn
    return _run(eps_fn, x_T, ts[::-1], table.flip(0), generator, progress, cond)


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


def dpm_solver_pp_2m(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    timesteps: Tensor | None = None,
    clip_x0: bool = False,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction;
    an ODE solver of the same probability-flow ODE as DDIM (η = 0), on the same contract.

    With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ), the data prediction x_θ = (x − σ ε̂)/α, and
    h_i = λ_{t_{i−1}} − λ_{t_i} for the step from t_i to t_{i−1}:
        x_{t_{i−1}} = (σ_{t_{i−1}}/σ_{t_i}) x_{t_i} − α_{t_{i−1}} (e^{−h_i} − 1) D_i,
        D_i = (1 + 1/(2 r_i)) x_θ(x_{t_i}) − 1/(2 r_i) x_θ(x_{t_{i+1}}),   r_i = h_{i+1}/h_i,
    and D = x_θ(x_{t_i}) (first order, which is DDIM with η = 0) for the first step, and for
    the last one, to ᾱ = 1 (h = ∞), which returns x_θ as DDIM does (diffusers'
    ``lower_order_final``). One network evaluation per step.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
        schedule: The noise schedule the model was trained with.
        x_T: Start noise at level t_{S−1}, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T.
        clip_x0: Clamp x_θ = x̂_0 to [−1, 1] and re-derive ε̂ from it (:func:`clip_denoised`
            around ``eps_fn``: after any guidance in it).
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.

    Returns:
        Samples shaped like x_T.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    # Per step, from t_{S−1} down: (α_s, σ_s, σ_t/σ_s, α_t, h), in float64, then Python floats.
    alpha_s, sigma_s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    alpha_t, sigma_t = alpha_bar_prev.sqrt(), (1 - alpha_bar_prev).sqrt()
    h = (alpha_t / sigma_t).log() - (alpha_s / sigma_s).log()  # +inf for the last step
    rows = torch.stack([alpha_s, sigma_s, sigma_t / sigma_s, alpha_t, h], 1).flip(0).tolist()
    t_all = torch.tensor(ts[::-1], dtype=torch.long, device=x_T.device)
    eps_fn = clip_denoised(eps_fn, schedule) if clip_x0 else eps_fn

    def data_prediction(x: Tensor, i: int, a_s: float, s_s: float) -> Tensor:
        # x_θ = (x − σ_s ε̂)/α_s
        return torch.add(x, eps_fn(x, t_all[i].expand(x.shape[0]), **cond), alpha=-s_s).div_(a_s)

    x, x0_prev, h_prev = x_T, None, None
    for i, (a_s, s_s, sigma_ratio, a_t, h_i) in enumerate(tqdm(rows[:-1], disable=not progress)):
        x0 = data_prediction(x, i, a_s, s_s)
        d = x0
        if x0_prev is not None:  # second order: extrapolate x_θ along λ
            half_inv_r = h_i / (2 * h_prev)
            d = x0.mul(1 + half_inv_r).add_(x0_prev, alpha=-half_inv_r)
        x = d.mul(-a_t * math.expm1(-h_i)).add_(x, alpha=sigma_ratio)
        x0_prev, h_prev = x0, h_i
    a_s, s_s = rows[-1][:2]  # the last step, to clean data (h = ∞): x_θ itself
    return data_prediction(x, len(rows) - 1, a_s, s_s)
