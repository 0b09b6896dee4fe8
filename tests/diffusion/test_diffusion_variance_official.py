"""Learned variance against guided-diffusion's own code (guided-diffusion-sdk): ``SpacedDiffusion``
with ``ModelVarType.LEARNED_RANGE`` on 25 of 1000 steps (cosine and linear schedules; our uniform
spacing and the official "25" sections), a random-weight model function returning [ε, v].

Both sides run the same process: the official code gets the betas of our float32 ᾱ table,
β_t = 1 − ᾱ_t/ᾱ_{t−1} (it recomputes ᾱ from them in float64). Its ``_WrappedModel`` maps the
respaced index i to the original t_i before calling the model and the classifier
(``rescale_timesteps=False``): the indices our samplers pass.

One step's mean and σ are read off our sampler itself: with every noise draw z = 0 the chain
x_{t_{i−1}} = μ_θ(x_{t_i}) is the chain of means; with z = 1 at step k only, the run follows the
same trajectory up to x_{t_k} and differs after step k by σ_k = exp(½ log Σ_θ) exactly.
"""

import pytest
import torch
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

from diffusion_apps.diffusion import (
    NoiseSchedule,
    clip_denoised,
    ddpm_sample,
    mean_shift_guidance,
    timestep_subsequence,
)

C, SIZE, B = 3, 4, 6
SCALE = 3.0
SPACINGS = {  # ours (DDIM's "ddim25": 0, 40, …, 960) and the official "25" sections (0, …, 999)
    "uniform": timestep_subsequence(1000, 25).tolist(),
    "sections": sorted(space_timesteps(1000, "25")),
}
CASES = [(kind, spacing) for kind in ("cosine", "linear") for spacing in SPACINGS]


class TinyModel:
    """[ε, v]: a random channel mixing of x_t plus functions of the ORIGINAL t; v = 1.2·tanh(·)
    leaves [−1, 1] a little (neither side clamps it). Records the x it is called at."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.5 * torch.randn(2 * C, C, generator=g, dtype=torch.float64)
        self.b = torch.randn(2 * C, 1, 1, generator=g, dtype=torch.float64)
        self.inputs = []

    def __call__(self, x, t, **_):
        self.inputs.append(x.clone())
        phase = torch.sin(t.double() / 97.0).to(x.dtype)[:, None, None, None]
        mixed = torch.einsum("oc,bchw->bohw", self.w.to(x), x) + self.b.to(x) * phase
        eps, v = mixed.chunk(2, dim=1)
        return torch.cat([eps, 1.2 * torch.tanh(v + phase)], dim=1)


def grad_fn(x_t, t, y, **_):
    """A smooth stand-in for ∇ log p(y | x_t), of x_t, the original t and y."""
    shape = (-1, 1, 1, 1)
    return torch.cos(x_t) * (1 + t.to(x_t) / 1000).view(shape) + y.to(x_t).view(shape)


def cond_fn(x, t, y):
    return SCALE * grad_fn(x, t, y)  # guided-diffusion's cond_fn carries the scale


def official(schedule: NoiseSchedule, timesteps: list[int]) -> SpacedDiffusion:
    alpha_bar = schedule.alphas_cumprod.double()
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return SpacedDiffusion(
        use_timesteps=timesteps, betas=betas.numpy(), model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE,
    )  # fmt: skip


def ours(model, schedule, x_T, timesteps, guided, y, generator=None):
    """guided-diffusion's order: clamp x̂_0 (``clip_denoised=True``), then Algorithm 1 with Σ_θ."""
    eps_fn = clip_denoised(model, schedule)
    if guided:
        eps_fn = mean_shift_guidance(eps_fn, grad_fn, schedule, SCALE, "learned",
                                     timesteps=torch.tensor(timesteps))  # fmt: skip
    return ddpm_sample(eps_fn, schedule, x_T, timesteps=torch.tensor(timesteps),
                       variance="learned", generator=generator, y=y)  # fmt: skip


def run_with_noise(monkeypatch, schedule, timesteps, guided, one_at=None):
    """Our run from a fixed x_T with z = 0 at every draw but z = 1 at draw ``one_at``:
    (the x of each step, walked from t_{S−1} down, then the output)."""
    calls = iter(range(len(timesteps)))

    def scripted(shape, generator=None, device=None, dtype=None):
        return torch.full(shape, float(next(calls) == one_at), dtype=dtype, device=device)

    model = TinyModel()
    x_T = 1.5 * torch.randn(B, C, SIZE, SIZE, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", scripted)
        out = ours(model, schedule, x_T, timesteps, guided, torch.arange(B) % 2)
    return [*model.inputs, out]


def relative(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize(("kind", "spacing"), CASES)
def test_each_step_equals_p_mean_variance(kind, spacing, guided, monkeypatch):
    """At each of the 25 steps, our μ (guided: μ + s Σ_θ g) and log Σ_θ at x_{t_i} equal the
    official ``p_mean_variance(model, x, i, clip_denoised=True)`` (guided: ``condition_mean``),
    float64 data, the official tables float32: measured ≤ 9e-8 relative."""
    schedule, timesteps = NoiseSchedule(kind, 1000), SPACINGS[spacing]
    diffusion, S = official(schedule, timesteps), len(timesteps)
    y = torch.arange(B) % 2
    means = run_with_noise(monkeypatch, schedule, timesteps, guided)
    for k in range(S):  # step k goes from t_i, i = S − 1 − k, to t_{i−1}
        i = torch.full((B,), S - 1 - k)
        out = diffusion.p_mean_variance(TinyModel(), means[k], i, clip_denoised=True)
        if guided:
            out["mean"] = diffusion.condition_mean(cond_fn, out, means[k], i, {"y": y})
        assert relative(means[k + 1], out["mean"]) < 1e-6, k
        if k < S - 1:  # the last step adds no noise: its Σ_θ acts through the guidance only
            noised = run_with_noise(monkeypatch, schedule, timesteps, guided, one_at=k)
            torch.testing.assert_close(noised[k], means[k], rtol=0, atol=0)
            log_var = 2 * (noised[k + 1] - means[k + 1]).log()
            assert relative(log_var, out["log_variance"]) < 1e-6, k


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize(("kind", "spacing"), CASES)
def test_sampling_loop_equals_p_sample_loop(kind, spacing, guided, monkeypatch):
    """The whole 25-step loop in float64 from the same x_T with the same noise, fed to both: the
    official ``randn_like`` and our ``randn`` draw z_k from one list. The official float32
    tables (each coefficient ~6e-8 off) are the limit: measured ≤ 2e-5 (cosine, guided; ≤ 5e-7
    unguided). In float32 the official x̂_0 = √(1/ᾱ) x − √(1/ᾱ − 1) ε cancels ~2·10⁴-sized terms
    at the cosine t = 999 (ᾱ ≈ 2.5e-9), and the two loops part by ~1e-3 there."""
    schedule, timesteps = NoiseSchedule(kind, 1000), SPACINGS[spacing]
    seeded = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    x_T = torch.randn(B, C, SIZE, SIZE, generator=seeded(1), dtype=torch.float64)
    noise = [torch.randn(x_T.shape, generator=seeded(10 + k), dtype=x_T.dtype) for k in range(25)]
    y = torch.arange(B) % 2
    with monkeypatch.context() as patch:
        draws = iter(noise)
        patch.setattr(gd.th, "randn_like", lambda x: next(draws).to(x))
        theirs = official(schedule, timesteps).p_sample_loop(
            TinyModel(), x_T.shape, noise=x_T, clip_denoised=True, device="cpu",
            cond_fn=cond_fn if guided else None, model_kwargs={"y": y},
        )  # fmt: skip
    model = TinyModel()  # built before torch.randn is replaced
    with monkeypatch.context() as patch:
        draws = iter(noise)
        patch.setattr(torch, "randn", lambda shape, **kw: next(draws).to(kw["dtype"]))
        mine = ours(model, schedule, x_T, timesteps, guided, y)
    assert theirs.dtype == torch.float64
    assert (mine - theirs).abs().max() < 5e-5 * theirs.abs().max()
