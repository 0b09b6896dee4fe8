"""Guidance as model wrappers ``eps_fn -> eps_fn``: every sampler takes them unchanged.

A ``grad_fn(x_t, t, **cond)`` returns g = ∇_{x_t} log p(y | x_t), or a learned shift such as PDAE's
G_ψ. It receives the ORIGINAL timestep index t, as the samplers pass it.

Clipping: guided-diffusion clamps the model's x̂_0 to [−1, 1] before it shifts ε or the mean, and
never after. Wrap the model, not the guided ε, in
:func:`~diffusion_apps.diffusion.samplers.clip_denoised`:
``eps_shift_guidance(clip_denoised(eps, schedule), grad_fn, schedule, s)`` with ``clip_x0=False``.
Coefficients are computed in float64 from the schedule's tables, as the samplers do.

Learned variance: a model output [ε̂, v] (2C channels, :mod:`~diffusion_apps.diffusion.variance`)
is shifted on its ε̂ half and keeps its v; Algorithm 1's Σ is then Σ_θ, read from v.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_apps.diffusion.samplers import EpsFn, Variance, respaced_variance
from diffusion_apps.diffusion.schedule import NoiseSchedule, per_sample
from diffusion_apps.diffusion.timesteps import subsequence_tables
from diffusion_apps.diffusion.variance import (
    join_output,
    learned_log_variance,
    log_variance_bounds,
    split_output,
)

GradFn = Callable[..., Tensor]


def eps_shift_guidance(
    eps_fn: EpsFn, grad_fn: GradFn, schedule: NoiseSchedule, scale: float = 1.0
) -> EpsFn:
    """ε' = ε_θ(x_t, t) − s √(1 − ᾱ_t) g (Dhariwal & Nichol 2021, Algorithm 2).

    With g = ∇ log p(y | x_t), s = 1 gives the ε of p(x_t | y); PDAE samples with g = G_ψ(x_t,z,t).
    """

    def guided(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        sigma = per_sample((1 - schedule.alpha_bar(t).double()).sqrt(), x_t)
        eps, v = split_output(eps_fn(x_t, t, **cond), x_t)
        return join_output(eps - scale * sigma * grad_fn(x_t, t, **cond), v)

    return guided


def mean_shift_guidance(
    eps_fn: EpsFn,
    grad_fn: GradFn,
    schedule: NoiseSchedule,
    scale: float = 1.0,
    variance: Variance = "beta",
    *,
    timesteps: Tensor,
) -> EpsFn:
    """μ' = μ_θ + s Σ_t g (Dhariwal & Nichol 2021, Algorithm 1), as an ε shift for ``ddpm_sample``.

    ``ddpm_sample`` with the same ``variance`` and ``timesteps`` (required: the shift depends on
    the subsequence) has μ = (x_t − β'_t/√(1 − ᾱ_t) ε)/√α'_t and Σ_t = β'_t or β̃'_t, so the
    shift is Δε = −s Σ_t √α'_t √(1 − ᾱ_t)/β'_t · g. With Σ = β̃ this is s c_t g, PDAE's
    c_t = −√α_t (1 − ᾱ_{t−1})/√(1 − ᾱ_t). At t_0 the fixed-large Σ is β̃'_1, as in
    guided-diffusion (its log-variance table starts there). With ``variance="learned"`` Σ_t is
    the model's Σ_θ, elementwise, from the v of its [ε̂, v] output (guided-diffusion's
    ``condition_mean`` adds s·exp(log Σ_θ)·g). Indices outside ``timesteps`` give NaN, so a
    mismatched subsequence cannot pass silently.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    learned = variance == "learned"
    beta, sigma2 = respaced_variance(alpha_bar, alpha_bar_prev, "beta" if learned else variance)
    if variance == "beta" and len(ts) > 1:  # sigma2 is beta itself here: copy it first
        sigma2 = torch.cat([beta[1:2] * (1 - alpha_bar[:1]) / (1 - alpha_bar[1:2]), beta[1:]])
    k = (1 - beta).sqrt() * (1 - alpha_bar).sqrt() / beta  # Δε = −s Σ k g
    columns = [k, *log_variance_bounds(alpha_bar, alpha_bar_prev)] if learned else [sigma2 * k]
    table = torch.full((schedule.num_timesteps, len(columns)), float("nan"), dtype=torch.float64)
    table[ts] = torch.stack(columns, 1)
    table = table.to(schedule.alphas_cumprod.device)

    def guided(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        eps, v = split_output(eps_fn(x_t, t, **cond), x_t)
        coefficients = [per_sample(column, x_t) for column in table[t].unbind(1)]
        if not learned:
            shift = -coefficients[0]
        elif v is None:
            raise ValueError("variance='learned' needs eps_fn to return [ε, v] (2C channels)")
        else:  # Σ_θ = exp(log Σ_θ(v)) in v's dtype, as guided-diffusion computes it
            k, min_log, max_log = coefficients
            shift = -k * learned_log_variance(v, min_log, max_log).exp()
        return join_output(eps + scale * shift * grad_fn(x_t, t, **cond), v)

    return guided


def classifier_log_prob_grad(classifier: Callable[[Tensor, Tensor], Tensor]) -> GradFn:
    """g = ∇_{x_t} log softmax(f_φ(x_t, t))_y for a noisy classifier f_φ returning logits (B, K).

    ``grad_fn(x_t, t, y, **_)`` takes the labels from the cond kwarg ``y`` and enables grad on a
    detached x_t, so it works inside ``torch.no_grad()`` (not inference mode). Samples must not
    interact inside f_φ (no batch-norm in train mode).
    """

    def grad_fn(x_t: Tensor, t: Tensor, y: Tensor, **_: Any) -> Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_()
            log_probs = classifier(x, t).log_softmax(dim=-1)
            selected = log_probs.gather(1, y[:, None]).sum()  # samples are independent
            return torch.autograd.grad(selected, x)[0]

    return grad_fn


def classifier_free_guidance(eps_fn: EpsFn, scale: float, null_cond: Mapping[str, Any]) -> EpsFn:
    """ε̂ = ε_θ(x_t, ∅) + w (ε_θ(x_t, y) − ε_θ(x_t, ∅)), batched into ONE model call.

    Ho & Salimans 2022 (their w + 1 is our w; LDM's form). Each cond tensor is concatenated along
    the batch with its ``null_cond`` value (broadcast, e.g. a 0-dim null label) or with itself;
    other cond passes through. w = 0 and w = 1 give ε(∅) and ε(y) exactly. A learned-variance
    output keeps the conditional branch's v (as GLIDE's guided sampling does)."""

    def pair(name: str, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        null = torch.as_tensor(null_cond.get(name, value), device=value.device, dtype=value.dtype)
        return torch.cat([value, null.expand_as(value)])

    def guided(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        both = {name: pair(name, value) for name, value in cond.items()}
        out_cond, out_null = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
        (eps_cond, v), (eps_null, _) = split_output(out_cond, x_t), split_output(out_null, x_t)
        return join_output(torch.lerp(eps_null, eps_cond, scale), v)

    return guided
