"""LDM's first stage (Rombach et al. 2022, Sec. 3.1; CompVis/latent-diffusion ``model.py``).

An encoder x (B, C, H, W) → q(z | x) = N(μ, diag σ²) with z of shape (B, c, H/f, W/f), a decoder
z → x̂, and pix2pix's patch discriminator (its hinge loss, training logic, is in
methods/autoencoder_kl.py). With a :class:`~diffusion_apps.nn.VectorQuantizer` the latent is
regularised by a codebook instead (LDM's VQ-reg, ``VQModel``; nn/quantize.py). The encoder is
the UNet's :class:`DownPath` without time embedding (its ResBlocks, attention and middle block);
the decoder mirrors it without skip connections.

With ``norm_eps=1e-6, downsample_padding="asymmetric"`` and one attention head in the middle
blocks it is CompVis's / diffusers' ``AutoencoderKL`` layer for layer (Stable Diffusion's VAE:
interop/diffusers.py, tests/interop/test_interop_diffusers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_apps.nn.checks import check_x
from diffusion_apps.nn.layers import BlockSpec, GroupNorm, Upsample
from diffusion_apps.nn.quantize import Quantized, VectorQuantizer
from diffusion_apps.nn.unet import DownPath


class DiagonalGaussian:
    """q(z | x) = N(μ, diag σ²) from the encoder's 2c channels [μ, log σ²] (log σ² clamped to
    [−30, 20], as in LDM); statistics in fp32."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.float().chunk(2, dim=1)  # (B, c, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = μ + σ ⊙ ε, ε ~ N(0, I) (the reparametrisation trick)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) over (c, h, w), per sample (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum((1, 2, 3))


class PointMass:
    """q(z | x) = δ(z − z_e(x)): a VQ encoder's pre-quantisation latent z_e (fp32), with the
    posterior's interface (``sample`` and ``mode`` both give z_e)."""

    def __init__(self, z: Tensor) -> None:
        self.mean = z.float()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.mean

    def mode(self) -> Tensor:
        return self.mean


class Autoencoder(nn.Module):
    """LDM's first stage: x → q(z | x), z → x̂, KL- or VQ-regularised.

    Without ``quantizer`` it is LDM's ``AutoencoderKL``: the encoder gives [μ, log σ²] (2c
    channels) of a diagonal Gaussian. With one it is LDM's ``VQModel`` (VQ-reg): the encoder gives
    z_e (c channels) and the quantisation is the decoder's first layer (LDM Sec. 3.1, "a vector
    quantization layer within the decoder"; the official ``VQModelInterface``): ``encode`` gives
    the pre-quantisation z_e, which a stage 2 diffuses, and ``decode`` snaps any z to its nearest
    codes before decoding.

    Downsampling factor f = 2^(len(channel_mult) − 1); the 1×1 ``quant_conv`` /
    ``post_quant_conv`` around the latent are LDM's.

    Args:
        in_channels: image channels.
        latent_channels: c, channels of z.
        image_size: height and width of the (square) images.
        base_channels, channel_mult, num_res_blocks, attention_resolutions, num_head_channels,
            dropout, num_groups: as for :class:`~diffusion_apps.nn.UNet` (LDM's middle blocks
            attend with one head: ``num_head_channels`` = the last level's width).
        norm_eps: ε of every GroupNorm (LDM / Stable Diffusion: 1e-6; PyTorch's default 1e-5).
        downsample_padding: the strided downsampling conv pads one zero row / column on every
            side ("symmetric", the UNet's) or only at the bottom and right ("asymmetric", LDM's).
        middle_attention: the encoder's and decoder's middle blocks have attention (else two
            ResBlocks each: diffusers' ``mid_block_add_attention=False``).
        quantizer: the codebook of a VQ-regularised first stage (its ``embedding_dim`` must be
            ``latent_channels``); None: KL-regularised.
    """

    def __init__(
        self,
        in_channels: int = 1,
        latent_channels: int = 4,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
        downsample_padding: Literal["symmetric", "asymmetric"] = "symmetric",
        middle_attention: bool = True,
        quantizer: VectorQuantizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(latent_channels, int) or latent_channels < 1:
            raise ValueError(f"latent_channels={latent_channels!r} must be a positive integer")
        if quantizer is not None and quantizer.embedding_dim != latent_channels:
            raise ValueError(
                f"the quantizer's embedding_dim={quantizer.embedding_dim} must equal "
                f"latent_channels={latent_channels} (its codes are the latent vectors)"
            )
        self.in_channels, self.image_size = in_channels, image_size
        self.latent_channels = latent_channels
        self.encoder = DownPath(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, num_head_channels, dropout, num_groups,
            resblock_updown=False, emb_dim=None, norm_eps=norm_eps,
            downsample_padding=downsample_padding, middle_attention=middle_attention,
        )  # fmt: skip
        ch = self.encoder.out_channels
        moments = latent_channels * (1 if quantizer is not None else 2)  # z_e, or [μ, log σ²]
        self.encoder_out = nn.Sequential(
            GroupNorm(num_groups, ch, norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, moments, 3, padding=1),
        )
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.quantizer = quantizer
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(self.encoder, latent_channels, in_channels)

    @property
    def factor(self) -> int:
        """f, the downsampling factor."""
        return 2 ** (len(self.encoder.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one z: (c, H/f, W/f)."""
        size = self.image_size // self.factor
        return (self.latent_channels, size, size)

    def encode(self, x: Tensor) -> DiagonalGaussian | PointMass:
        """q(z | x) for images x (B, C, H, W) in [−1, 1]: the Gaussian (KL) or δ at z_e (VQ)."""
        check_x(x, self.in_channels, self.image_size)
        x = x.to(self.quant_conv.weight.dtype)  # the weights' dtype (bf16-true)
        h = self.quant_conv(self.encoder_out(self.encoder(x)))
        return DiagonalGaussian(h) if self.quantizer is None else PointMass(h)

    def decode(self, z: Tensor) -> Tensor:
        """x̂ (B, C, H, W) from latents z (B, c, H/f, W/f); a VQ first stage quantises z first."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected z of shape (B, {self.latent_shape}), got {tuple(z.shape)}")
        if self.quantizer is not None:
            z = self.quantizer(z).z_q
        return self.decode_code(z)

    def decode_code(self, z: Tensor) -> Tensor:
        """x̂ from z as the decoder's convolutions take it (for VQ: already quantised)."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian | Quantized]:
        """The training pass: x̂ and the regulariser's view of z. KL: x̂ = D(z), z ~ q(z | x) (the
        reparametrisation trick), and q; VQ: x̂ = D(z_q), and the quantisation of z_e."""
        posterior = self.encode(x)
        if self.quantizer is None:
            return self.decode_code(posterior.sample(generator)), posterior
        quantized = self.quantizer(posterior.mode())
        return self.decode_code(quantized.z_q), quantized


class Decoder(nn.Module):
    """The encoder's mirror: conv_in, middle block, num_res_blocks + 1 ResBlocks per level with
    nearest ×2 upsampling between levels, GN → SiLU → conv_out. No skips, no time embedding."""

    def __init__(self, down: DownPath, latent_channels: int, out_channels: int) -> None:
        super().__init__()
        spec: BlockSpec = down.spec
        ch, res = down.out_channels, down.out_resolution
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.middle = spec.middle(ch)
        self.blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(down.channel_mult))):
            layers = []
            for _ in range(down.num_res_blocks + 1):
                layers.append(spec.res_block(ch, down.base_channels * mult))
                ch = down.base_channels * mult
                if res in down.attention_resolutions:
                    layers.append(spec.attention(ch))
            if level > 0:
                layers.append(Upsample(ch))
                res *= 2
            self.blocks.append(spec.sequence(*layers))
        self.out = nn.Sequential(
            GroupNorm(spec.num_groups, ch, spec.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, out_channels, 3, padding=1),
        )

    @property
    def last_layer(self) -> Tensor:
        """Weight of the output conv: LDM's adaptive GAN weight compares gradients there."""
        return self.out[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle(self.conv_in(z))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class PatchDiscriminator(nn.Sequential):
    """pix2pix's N-layer PatchGAN (Isola et al. 2017), LDM's discriminator: 4×4 convs, stride 2
    for the first ``num_layers``, then two stride-1 convs to one logit per patch; BatchNorm and
    LeakyReLU(0.2) between; weights N(0, 0.02), BatchNorm scales N(1, 0.02).

    Args:
        in_channels: image channels.
        base_channels: width of the first conv (doubled per layer, at most 8×).
        num_layers: stride-2 convs; each output logit sees a ~(2^(num_layers+2))-pixel patch.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, num_layers: int = 3):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)
        ]  # fmt: skip
        ch = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(ch, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
