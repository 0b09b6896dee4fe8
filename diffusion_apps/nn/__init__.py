"""Neural networks: plain ``nn.Module``s with no training logic."""

from diffusion_apps.nn.layers import timestep_embedding
from diffusion_apps.nn.mlp import SkipMLP
from diffusion_apps.nn.unet import EncoderUNet, GradientEstimator, UNet

__all__ = ["EncoderUNet", "GradientEstimator", "SkipMLP", "UNet", "timestep_embedding"]
