"""minsdxl: a from-scratch SDXL UNet, its weight loading, noise schedule and samplers, in plain PyTorch."""

from .config import ConfigError, UNetConfig
from .generate import GenerationError, Models, generate
from .loading import LATENT_SCALE, LoadError, encode_text, load_text_encoders, load_tokenizers, load_unet, load_vae
from .unet import UNet

__all__ = ["ConfigError", "UNetConfig", "UNet", "LATENT_SCALE", "LoadError", "encode_text", "load_text_encoders",
           "load_tokenizers", "load_unet", "load_vae", "GenerationError", "Models", "generate"]
