"""Converters between our modules and other codebases' checkpoints (guided-diffusion,
improved-diffusion): pure torch, beside ``nn`` (they build nn modules); the other codebases are
never imported."""
