"""Neural networks: plain ``nn.Module``s with no training logic."""

from diffusion_apps.nn.conditioning import CaptionEncoder, ClassEmbedder
from diffusion_apps.nn.encoders import EncoderUNet, GradientEstimator
from diffusion_apps.nn.first_stage import Autoencoder, DiagonalGaussian, PatchDiscriminator
from diffusion_apps.nn.layers import timestep_embedding
from diffusion_apps.nn.mlp import SkipMLP
from diffusion_apps.nn.unet import UNet

__all__ = [
    "Autoencoder",
    "CaptionEncoder",
    "ClassEmbedder",
    "DiagonalGaussian",
    "EncoderUNet",
    "GradientEstimator",
    "PatchDiscriminator",
    "SkipMLP",
    "UNet",
    "timestep_embedding",
]
