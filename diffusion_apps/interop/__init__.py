"""Converters between our modules and other codebases' checkpoints: guided-diffusion and
improved-diffusion (``guided_diffusion``), diffusers folders and AutoencoderKL (``diffusers``),
UNet2DModel and DDPMScheduler (``diffusers_unet``, and back: ``diffusers_export``). Pure torch,
beside ``nn``; the other codebases are never imported."""
