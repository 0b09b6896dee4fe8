"""One thin LightningModule per method, built by composing the shared UNet and diffusion layer."""

from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.diffae import DiffAE
from diffusion_apps.methods.guided import ClassifierGuidedDDPM, NoisyClassifier
from diffusion_apps.methods.latent_ddim import LatentDDIM
from diffusion_apps.methods.pdae import PDAE

__all__ = [
    "ClassifierGuidedDDPM",
    "DDPM",
    "DiffAE",
    "DiffusionMethod",
    "LatentDDIM",
    "NoisyClassifier",
    "PDAE",
]
