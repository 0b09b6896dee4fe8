"""One thin LightningModule per method, built by composing the shared UNet and diffusion layer."""

from diffusion_apps.methods.autoencoder_kl import AutoencoderKL
from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.consistency import ConsistencyDistillation
from diffusion_apps.methods.consistency_training import ConsistencyTraining
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.diffae import DiffAE
from diffusion_apps.methods.guided import ClassifierGuidedDDPM, NoisyClassifier
from diffusion_apps.methods.latent_ddim import LatentDDIM
from diffusion_apps.methods.ldm import LatentDiffusion
from diffusion_apps.methods.pdae import PDAE

__all__ = [
    "AutoencoderKL",
    "ClassifierGuidedDDPM",
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "DDPM",
    "DiffAE",
    "DiffusionMethod",
    "LatentDDIM",
    "LatentDiffusion",
    "NoisyClassifier",
    "PDAE",
]
