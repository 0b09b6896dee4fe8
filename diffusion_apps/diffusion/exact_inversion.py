"""Exact diffusion inversion: EDICT (Wallace, Gokul & Naik, CVPR 2023; official code
salesforce/EDICT), a sampler/inverter pair on the samplers' ``eps_fn`` contract.

DDIM inversion (:func:`~diffusion_apps.diffusion.ddim_invert`) evaluates ε̂ one level below
where the sampler will, so x_0 → x_T → x_0 is only approximate. EDICT carries two coupled
sequences (x, y); each step is a pair of affine updates, each using ε̂ of the other sequence,
then a mixing layer; every piece is solved backwards in closed form, so inversion followed by
sampling returns x_0 up to float round-off, whatever the network and the number of steps.

Why EDICT and not BDIA (Zhang et al. 2023): BDIA's single sequence needs the two last states
(also a pair) and its inverse divides by γ at every step, an error growth EDICT bounds by the
mixing alone; EDICT's pair is the more common, better documented choice. Its price: two
network calls per step (the second input depends on the first update), twice DDIM's.

Step k, from level t_k to t_{k−1} (ᾱ_{t_{−1}} = 1), with the DDIM (η = 0) coefficients
a_k = √(ᾱ_{t_{k−1}}/ᾱ_{t_k}), b_k = √(1 − ᾱ_{t_{k−1}}) − √(ᾱ_{t_{k−1}}(1 − ᾱ_{t_k})/ᾱ_{t_k})
(EDICT eq. 14 and 15, mixing p ∈ (0, 1], the paper's 0.93):

    x^inter = a_k x + b_k ε(y, t_k)          y^inter = a_k y + b_k ε(x^inter, t_k)
    x'      = p x^inter + (1 − p) y^inter    y'      = p y^inter + (1 − p) x'

and its inverse (EDICT eq. 16), from the top line down:

    y^inter = (y' − (1 − p) x')/p            x^inter = (x' − (1 − p) y^inter)/p
    y       = (y^inter − b_k ε(x^inter, t_k))/a_k
    x       = (x^inter − b_k ε(y, t_k))/a_k.

Like the official code (``leapfrog_steps=True``) the two sequences swap roles at every other
step: on odd k the y-update goes first, so neither sequence always lags. The official code
counts the parity from the first step of each loop, which makes encoding and decoding disagree
for an odd number of steps; we take it from k, the timestep's position, so they always agree.
The mixing layer keeps its x-first order, as in the official code. Decoding returns x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion_apps import stop
from diffusion_apps.diffusion.interpolation import slerp
from diffusion_apps.diffusion.samplers import EpsFn, ddim_invert
from diffusion_apps.diffusion.schedule import NoiseSchedule
from diffusion_apps.diffusion.timesteps import subsequence_tables
from diffusion_apps.diffusion.variance import split_output

InversionKind = Literal["ddim", "edict"]
EDICT_MIX = 0.93  # the paper's p


@dataclass(frozen=True)
class CoupledCode:
    """EDICT's stochastic code: the pair (x_T, y_T) of B images and the mixing p that made it
    (decoding with another p is not the inverse). Sliced, moved and concatenated like a tensor
    along the batch, so batched callers treat it as they treat a DDIM x_T."""

    x: Tensor  # (B, C, H, W)
    y: Tensor  # (B, C, H, W)
    mix: float = EDICT_MIX

    def __post_init__(self) -> None:
        if self.x.shape != self.y.shape:
            raise ValueError(
                f"EDICT's x_T {tuple(self.x.shape)} and y_T {tuple(self.y.shape)} differ"
            )
        check_mix(self.mix)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index) -> CoupledCode:
        return CoupledCode(self.x[index], self.y[index], self.mix)

    def to(self, *args, **kwargs) -> CoupledCode:
        return CoupledCode(self.x.to(*args, **kwargs), self.y.to(*args, **kwargs), self.mix)

    def cpu(self) -> CoupledCode:
        return self.to("cpu")

    def float(self) -> CoupledCode:
        return self.to(torch.float32)

    @staticmethod
    def cat(codes: Sequence[CoupledCode]) -> CoupledCode:
        """The codes' batches one after another (they must share p)."""
        mixes = {c.mix for c in codes}
        if len(mixes) != 1:
            raise ValueError(f"cannot concatenate EDICT codes of different mixing p: {mixes}")
        return CoupledCode(torch.cat([c.x for c in codes]), torch.cat([c.y for c in codes]), *mixes)


StochasticCode = Tensor | CoupledCode


def check_mix(mix: float) -> None:
    """EDICT's p must lie in (0, 1]: the inverse divides by it (1: no mixing, unstable)."""
    if not 0 < mix <= 1:
        raise ValueError(f"EDICT's mixing p must be in (0, 1] (the paper: 0.93), got {mix}")


def _coefficients(schedule: NoiseSchedule, timesteps: Tensor | None) -> tuple[list[int], list]:
    """[t_0, …, t_{S−1}] and the rows (a_k, b_k) of each step k, from float64 ᾱ."""
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    a = (alpha_bar_prev / alpha_bar).sqrt()
    b = (1 - alpha_bar_prev).sqrt() - (alpha_bar_prev * (1 - alpha_bar) / alpha_bar).sqrt()
    return ts, torch.stack([a, b], 1).tolist()


def _eps(eps_fn: EpsFn, x: Tensor, t: int, cond: dict[str, Any]) -> Tensor:
    """ε̂ of ``eps_fn`` at (x, t) for the whole batch (the ε half of an [ε̂, v] output)."""
    t_all = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return split_output(eps_fn(x, t_all, **cond), x)[0]


def edict_sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    code: CoupledCode,
    *,
    timesteps: Tensor | None = None,
    progress: bool = False,
    **cond: Any,
) -> CoupledCode:
    """EDICT's generation (the module docstring's step, k = S−1, …, 0) from ``code`` at level
    t_{S−1} with its p; 2S network calls. Start from fresh noise with x_T = y_T
    (:meth:`Inversion.noise`).

    Returns:
        The pair (x_0, y_0); x_0 is the sample.
    """
    ts, rows = _coefficients(schedule, timesteps)
    x, y, p = code.x, code.y, code.mix
    for k in tqdm(range(len(ts) - 1, -1, -1), disable=not progress):
        stop.check()
        (a, b), t = rows[k], ts[k]
        u, w = (y, x) if k % 2 else (x, y)  # leapfrog: odd steps update y first
        u = u.mul(a).add_(_eps(eps_fn, w, t, cond), alpha=b)  # x^inter = a x + b ε(y)
        w = w.mul(a).add_(_eps(eps_fn, u, t, cond), alpha=b)  # y^inter = a y + b ε(x^inter)
        x_i, y_i = (w, u) if k % 2 else (u, w)
        x = torch.lerp(y_i, x_i, p)  # x' = p x^inter + (1 − p) y^inter
        y = torch.lerp(x, y_i, p)  # y' = p y^inter + (1 − p) x'
    return CoupledCode(x, y, p)


def edict_invert(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    timesteps: Tensor | None = None,
    mix: float = EDICT_MIX,
    progress: bool = False,
    **cond: Any,
) -> CoupledCode:
    """EDICT's exact inversion of x_0 (x = y = x_0 at level t_{−1}) up to level t_{S−1}: the
    inverse steps k = 0, …, S−1 of the module docstring, 2S network calls.
    ``edict_sample(edict_invert(x_0)).x`` is x_0 up to round-off for any ``eps_fn`` and S.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
        schedule: The noise schedule the model was trained with.
        x0: Clean data, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T. Decode with the same.
        mix: EDICT's p ∈ (0, 1].
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.
    """
    check_mix(mix)
    ts, rows = _coefficients(schedule, timesteps)
    x, y, p = x0, x0, mix
    for k in tqdm(range(len(ts)), disable=not progress):
        stop.check()
        (a, b), t = rows[k], ts[k]
        y_i = y.sub(x, alpha=1 - p).div_(p)  # y^inter = (y' − (1 − p) x')/p
        x_i = x.sub(y_i, alpha=1 - p).div_(p)  # x^inter = (x' − (1 − p) y^inter)/p
        u, w = (y_i, x_i) if k % 2 else (x_i, y_i)
        w = w.sub(_eps(eps_fn, u, t, cond), alpha=b).div_(a)  # y = (y^inter − b ε(x^inter))/a
        u = u.sub(_eps(eps_fn, w, t, cond), alpha=b).div_(a)  # x = (x^inter − b ε(y))/a
        x, y = (w, u) if k % 2 else (u, w)
    return CoupledCode(x, y, p)


@dataclass(frozen=True)
class Inversion:
    """How a diffusion autoencoder infers its stochastic code, and decodes one.

    Args:
        kind: "ddim" (approximate, one network call a step, the stochastic code a tensor x_T)
            or "edict" (exact, two calls a step, the code a :class:`CoupledCode`).
        mix: EDICT's mixing p ∈ (0, 1] (ignored by "ddim").
    """

    kind: InversionKind = "ddim"
    mix: float = EDICT_MIX

    def __post_init__(self) -> None:
        if self.kind not in get_args(InversionKind):
            raise ValueError(
                f"inversion must be one of {get_args(InversionKind)}, got {self.kind!r}"
            )
        check_mix(self.mix)

    def invert(
        self, eps_fn: EpsFn, schedule: NoiseSchedule, x0: Tensor, timesteps: Tensor, **cond: Any
    ) -> StochasticCode:
        """The stochastic code of x0: :func:`ddim_invert` or :func:`edict_invert`."""
        if self.kind == "edict":
            return edict_invert(eps_fn, schedule, x0, timesteps=timesteps, mix=self.mix, **cond)
        return ddim_invert(eps_fn, schedule, x0, timesteps=timesteps, **cond)

    def noise(self, like: Tensor, generator: torch.Generator | None = None) -> StochasticCode:
        """A random stochastic code shaped like ``like``: z ~ N(0, I), for EDICT the pair
        (z, z) — the official code starts generation with x_T = y_T."""
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return CoupledCode(z, z, self.mix) if self.kind == "edict" else z

    def nfe(self, steps: int) -> int:
        """Network calls per image of ``steps`` steps, inverting or decoding."""
        return 2 * steps if self.kind == "edict" else steps


def slerp_code(a: StochasticCode, b: StochasticCode, w: float) -> StochasticCode:
    """:func:`~diffusion_apps.diffusion.slerp` of two stochastic codes, each member of an EDICT
    pair on its own."""
    if isinstance(a, CoupledCode) != isinstance(b, CoupledCode):
        raise ValueError("cannot interpolate a DDIM x_T with an EDICT pair: invert both alike")
    if isinstance(a, CoupledCode):
        if a.mix != b.mix:
            raise ValueError(f"EDICT codes of different mixing p ({a.mix}, {b.mix})")
        return CoupledCode(slerp(a.x, b.x, w), slerp(a.y, b.y, w), a.mix)
    return slerp(a, b, w)
