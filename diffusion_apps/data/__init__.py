"""Data: LightningDataModules over the embedded digits, torchvision datasets and image folders."""

from diffusion_apps.data.datamodule import ImageDataModule
from diffusion_apps.data.sources import load_embedded_digits

__all__ = ["ImageDataModule", "load_embedded_digits"]
