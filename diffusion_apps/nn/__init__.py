"""Neural networks: plain ``nn.Module``s with no training logic."""

from diffusion_apps.nn.conditioning import CaptionEncoder, ClassEmbedder
from diffusion_apps.nn.encoders import EncoderUNet, GradientEstimator
from diffusion_apps.nn.first_stage import (
    Autoencoder,
    DiagonalGaussian,
    PatchDiscriminator,
    PointMass,
)
from diffusion_apps.nn.layers import timestep_embedding
from diffusion_apps.nn.mlp import SkipMLP
from diffusion_apps.nn.quantize import Quantized, VectorQuantizer, codebook_usage
from diffusion_apps.nn.unet import UNet

__all__ = [
    "Autoencoder",
    "CaptionEncoder",
    "ClassEmbedder",
    "DiagonalGaussian",
    "EncoderUNet",
    "GradientEstimator",
    "PatchDiscriminator",
    "PointMass",
    "Quantized",
    "SkipMLP",
    "UNet",
    "VectorQuantizer",
    "codebook_usage",
    "timestep_embedding",
]
