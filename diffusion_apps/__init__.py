"""diffusion_apps: the main applications of diffusion models in one PyTorch Lightning codebase."""

__version__ = "0.1.0"
