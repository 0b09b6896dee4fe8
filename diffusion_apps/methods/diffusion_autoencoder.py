"""What DiffAE and PDAE share: the inference API of a diffusion autoencoder.

A semantic code z = Enc(x_0) and a stochastic code x_T, the deterministic inversion of x_0
given z; decoding runs the matching sampler with the method's z-conditioned ε (:meth:`code_eps`):
DDIM (η = 0) by default, or EDICT's exact pair (:mod:`~diffusion_apps.diffusion.exact_inversion`)
when ``inversion`` says so.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffusion_apps.diffusion import EpsFn
from diffusion_apps.diffusion.exact_inversion import (
    CoupledCode,
    Inversion,
    StochasticCode,
    edict_sample,
    slerp_code,
)
from diffusion_apps.methods.probe import LinearProbe, encode_all
from diffusion_apps.methods.protocol import Autoencoding


class Codes(NamedTuple):
    """A diffusion autoencoder's two codes of B images: what ``autoencode --mode encode``
    writes, and what decodes them again."""

    z: Tensor  # (B, D): the semantic code
    x_T: StochasticCode  # (B, C, H, W) DDIM-inverted, or EDICT's pair (a CoupledCode)


LATENT_HINT = (
    "a diffusion autoencoder decodes given codes: call decode(z, x_T); for unconditional "
    "samples train its latent DDIM stage (configs/diffae_latent.yaml, configs/pdae_latent.yaml) "
    "and sample from that checkpoint"
)


class DiffusionAutoencoder:
    """Mixin for a :class:`~diffusion_apps.methods.DDPM` subclass with an ``encoder`` and
    ``encode_steps``; the subclass supplies :meth:`code_eps`. All inference is under
    ``torch.no_grad`` with DDIM η = 0:

        ``encode``             x_0 → z
        ``encode_stochastic``  (x_0, z) → x_T by DDIM inversion (``encode_steps`` steps)
        ``decode``             (z, x_T) → x_0 by DDIM (``sample_steps`` steps)
        ``codes``              x_0 → :class:`Codes` (z, x_T): encode once, edit many times
        ``reconstruct``        decode(encode(x_0), x_T), x_T inferred or random
        ``interpolate``        lerp on z, slerp on x_T, decoded
        ``stochastic_variations``  z fixed, x_T random
        ``semantic_variations``    x_T (inferred) fixed, z varied
        ``fit_probe``          a linear classifier on normalised z (attribute directions)
        ``manipulate``         decode(z', x_T), z' = denorm(norm(z) + s·√d·w/‖w‖)

    ``interpolate``, ``stochastic_variations`` and ``manipulate`` take images or their
    :class:`Codes`. The modes that infer x_T take ``steps`` (default: ``sample_steps``) and
    ``encode_steps`` (default: ``steps`` when given, else ``encode_steps``): one ``steps`` sets
    the inversion and the decoding alike, so x_T is decoded from the noise level it was
    inverted to.

    ``inversion`` (an :class:`~diffusion_apps.diffusion.exact_inversion.Inversion`, DDIM
    unless set) picks the stochastic encoder; a code decodes with the sampler its type names
    (a tensor: DDIM; an EDICT :class:`CoupledCode`: EDICT with the code's p), and random codes
    are of ``inversion``'s kind.
    """

    inversion: Inversion = Inversion()

    generation = None  # x_0 needs a z: LatentDDIM generates
    sample_instead = (
        "it is an autoencoder, which decodes given codes: train its latent stage "
        "(configs/diffae_latent.yaml, configs/pdae_latent.yaml) and sample that checkpoint"
    )
    autoencoding = Autoencoding(True, ("reconstruct", "interpolate", "variations", "manipulate"))

    def code_eps(self, decoding: bool = False) -> EpsFn:
        """The decoder's ε-model ``eps(x_t, t, z)``. ``decoding`` adds ``clip_x0``'s clamp of
        the network's x̂_0 (:meth:`DDPM.sampling_eps`), before any learned shift; inversion runs
        the unclamped ODE."""
        raise NotImplementedError

    def sample(self, num_samples: int, **request) -> Tensor:
        """Not from nothing: an error that says how to sample unconditionally."""
        raise ValueError(LATENT_HINT)

    def draw(
        self, num_samples: int, *args, z: Tensor, eps_fn: EpsFn | None = None, **kwargs
    ) -> Tensor:
        """:meth:`DDPM.draw` with :meth:`code_eps` given codes z (N, D)."""
        eps_fn = eps_fn or self.code_eps(decoding=True)
        return super().draw(num_samples, *args, eps_fn=eps_fn, z=z, **kwargs)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """Reconstructions (inferred x_T) of the batch's images."""
        return self.reconstruct(batch[0])

    @torch.no_grad()
    def encode(self, x0: Tensor) -> Tensor:
        """z (B, D) of images x0 (B, C, H, W) in [−1, 1]."""
        return self.encoder(x0)

    @torch.no_grad()
    def encode_stochastic(
        self, x0: Tensor, z: Tensor | None = None, steps: int | None = None
    ) -> Tensor:
        """x_T by deterministic inversion of x0 conditioned on z (DiffAE eq. 8, DDIM; or EDICT's
        exact pair, per ``inversion``), over the subsequence of ``steps`` steps (default
        ``encode_steps``)."""
        z = self.encode(x0) if z is None else z
        ts = self.timesteps(steps or self.encode_steps)
        return self.inversion.invert(self.code_eps(), self.schedule, x0, ts, z=z)

    @torch.no_grad()
    def decode(self, z: Tensor, x_T: StochasticCode, steps: int | None = None) -> Tensor:
        """x_0 in [−1, 1] from (z, x_T) by deterministic DDIM (η = 0), or by EDICT for its pair
        (its x_0: :func:`~diffusion_apps.diffusion.exact_inversion.edict_sample`)."""
        if z.shape[0] != x_T.shape[0]:
            raise ValueError(f"z {tuple(z.shape)} and x_T {tuple(x_T.shape)} differ in B")
        if isinstance(x_T, CoupledCode):
            ts = self.timesteps(steps or self.sample_steps)
            pair = edict_sample(self.code_eps(decoding=True), self.schedule, x_T, timesteps=ts, z=z)
            return pair.x.clamp(-1, 1)
        return self.draw(len(z), "ddim", steps, 0.0, x_T=x_T, z=z).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(
        self,
        x0: Tensor,
        inferred: bool = True,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        encode_steps: int | None = None,
    ) -> Tensor:
        """decode(z, x_T) with x_T inferred by ``encode_stochastic`` or drawn N(0, I)."""
        z = self.encode(x0)
        if inferred:
            x_T = self.encode_stochastic(x0, z, encode_steps or steps)
        else:
            x_T = self.inversion.noise(x0, generator)
        return self.decode(z, x_T, steps)

    @torch.no_grad()
    def codes(self, x0: Tensor, encode_steps: int | None = None) -> Codes:
        """Both codes of images x0: z = Enc(x0), x_T = encode_stochastic(x0, z)."""
        z = self.encode(x0)
        return Codes(z, self.encode_stochastic(x0, z, encode_steps))

    def as_codes(self, x: Tensor | Codes, encode_steps: int | None = None) -> Codes:
        """``x`` itself when it is :class:`Codes`, else the codes of the images ``x``."""
        return x if isinstance(x, Codes) else self.codes(x, encode_steps)

    @torch.no_grad()
    def interpolate(
        self,
        a: Tensor | Codes,
        b: Tensor | Codes,
        num: int = 7,
        steps: int | None = None,
        encode_steps: int | None = None,
    ) -> Tensor:
        """Decoded interpolations (B, num, C, H, W) from a (w = 0) to b (w = 1), images or their
        codes: z by lerp, x_T (inferred) by slerp, as DiffAE does."""

        def frame(a: Codes, b: Codes, x_T: Tensor, w: float) -> Tensor:
            return self.decode(torch.lerp(a.z, b.z, w), x_T, steps)

        return self.interpolation_frames(a, b, num, frame, encode_steps or steps)

    def interpolation_frames(
        self,
        a: Tensor | Codes,
        b: Tensor | Codes,
        num: int,
        frame,
        encode_steps: int | None = None,
    ) -> Tensor:
        """(B, num, C, H, W): ``frame(codes_a, codes_b, x_T, w)`` for ``num`` weights w from 0
        to 1, x_T = slerp(x_T^a, x_T^b, w), images inverted over ``encode_steps``."""
        if num < 2:
            raise ValueError(f"num must be >= 2, got {num}")
        a, b = self.as_codes(a, encode_steps), self.as_codes(b, encode_steps)
        if a.z.shape != b.z.shape:
            raise ValueError(f"codes a {tuple(a.z.shape)} and b {tuple(b.z.shape)} differ")
        weights = torch.linspace(0, 1, num).tolist()
        return torch.stack([frame(a, b, slerp_code(a.x_T, b.x_T, w), w) for w in weights], dim=1)

    @torch.no_grad()
    def stochastic_variations(
        self,
        x0: Tensor | Codes,
        num: int = 4,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, num, C, H, W): each image's z (or the codes' z) decoded from ``num`` random x_T —
        what the stochastic code holds (pose, stroke) varies, the semantics stay."""
        z = x0.z if isinstance(x0, Codes) else self.encode(x0)
        like = x0.x_T if isinstance(x0, Codes) else x0
        like = like.x if isinstance(like, CoupledCode) else like
        frames = [self.decode(z, self.inversion.noise(like, generator), steps) for _ in range(num)]
        return torch.stack(frames, dim=1)

    @torch.no_grad()
    def semantic_variations(
        self, x0: Tensor, z: Tensor, steps: int | None = None, encode_steps: int | None = None
    ) -> Tensor:
        """(B, K, C, H, W): each image's inferred x_T decoded with each of the K codes z
        (K, D) — the stochastic detail stays, the semantics change."""
        x_T = self.encode_stochastic(x0, steps=encode_steps or steps)
        frames = [self.decode(z.expand(len(x0), -1), x_T, steps) for z in z]
        return torch.stack(frames, dim=1)

    @torch.no_grad()
    def fit_probe(self, batches) -> LinearProbe:
        """A :class:`LinearProbe` fitted on the z of every (images, labels) batch: one
        logistic regression per class (attribute) on z normalised by its mean and std."""
        return LinearProbe.fit(*encode_all(self.encode, batches, self.device))

    @torch.no_grad()
    def manipulate(
        self,
        x0: Tensor | Codes,
        probe: LinearProbe,
        attribute: int,
        scales: list[float] | tuple[float, ...] = (0.3,),
        steps: int | None = None,
        encode_steps: int | None = None,
    ) -> Tensor:
        """(B, S, C, H, W): each image (or code pair) decoded from its x_T with z moved along
        ``attribute``'s direction by each of the S ``scales`` (DiffAE Sec. 4.2),
            z' = denorm(norm(z) + s·√d · w/‖w‖),
        w the probe's weights for the attribute, norm/denorm its training-set statistics.
        Scale 0 is the reconstruction; the paper uses s = 0.3 on CelebA-HQ."""
        z, x_T = self.as_codes(x0, encode_steps or steps)
        frames = [self.decode(probe.shift(z, attribute, s), x_T, steps) for s in scales]
        return torch.stack(frames, dim=1)

    def log_validation_images(self, x0: Tensor) -> None:
        """Originals over their reconstructions with inferred and with random x_T; interpolation
        strips between the two halves of the batch; x_T- and z-variation grids."""
        x0 = x0[: self.num_val_samples]
        gen = torch.Generator(self.device).manual_seed(0)
        rows = [x0, self.reconstruct(x0), self.reconstruct(x0, inferred=False, generator=gen)]
        tag = "reconstructions (rows: original, inferred x_T, random x_T)"
        self.log_images(tag, torch.cat(rows), nrow=len(x0))
        half = len(x0) // 2
        if half:
            strip = self.interpolate(x0[:half], x0[half : 2 * half])  # (half, num, C, H, W)
            self.log_images("interpolations", strip.flatten(0, 1), nrow=strip.shape[1])
        first = x0[: max(half, 1)]
        grids = {
            "x_T variations (rows: one z, random x_T)": self.stochastic_variations(
                first, generator=gen
            ),
            "z variations (rows: one x_T, the batch's z)": self.semantic_variations(
                first, self.encode(x0)
            ),
        }
        for tag, frames in grids.items():
            self.log_images(tag, frames.flatten(0, 1), nrow=frames.shape[1])
