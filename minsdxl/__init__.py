"""minsdxl: a from-scratch SDXL UNet, its weight loading, noise schedule and samplers, in plain PyTorch."""

from .config import ConfigError, UNetConfig
from .unet import UNet

__all__ = ["ConfigError", "UNetConfig", "UNet"]
