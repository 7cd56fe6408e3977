"""Latents and text embeddings computed once and kept, so that training runs the UNet alone.

SDXL's UNet never sees pixels or words: it sees VAE latents (B, 4, H/8, W/8) and the text encoders'
outputs, context (B, 77, 2048) and pooled (B, 1280). Both encoders are frozen, so each image and each
caption is encoded once (`encode_image`, `encode_captions`), and `Cache` keeps the result in RAM and
on disk under a key of everything it depends on (the image's bytes, crop and flip, the caption, the
model). `Conditioning` is what the training loop asks: the latents of sample i in epoch e, the text
of a caption; from the cache, or computed on the spot when caching is off.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora.files import write_safetensors

from .loading import LATENT_SCALE, encode_text
from .train_args import TrainingError


def content_key(*parts) -> str:
    """A short hash of `parts`: the file name of a cache entry."""
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:32]


def model_identity(args: argparse.Namespace) -> str:
    """What cached latents/embeddings depend on besides the data: the weights they came from."""
    return f"{args.pretrained_model_name_or_path}|{args.variant}|{args.pretrained_vae_model_name_or_path}"


@torch.no_grad()
def encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (4, H/8, W/8) latents, one image at a time (a VAE slice), in fp32.

    We take the mean of the VAE's posterior rather than a sample: deterministic, so a cached latent
    equals a freshly computed one; its standard deviation is tiny for the SDXL VAE anyway."""
    x = pixels[None].to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean * LATENT_SCALE
    if not torch.isfinite(latents).all():
        raise TrainingError("the VAE produced NaN/inf latents. The SDXL VAE overflows in fp16: run it in fp32 "
                            "(the default) or pass --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix.")
    return latents[0].float().cpu()


@torch.no_grad()
def encode_captions(text_encoders, tokenizers, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> context (B, 77, 2048), pooled (B, 1280), in fp32 on the CPU."""
    context, pooled = encode_text(text_encoders, tokenizers, captions)
    return context.float().cpu(), pooled.float().cpu()


class Cache:
    """Latents and text conditioning computed once, kept in RAM and on disk by content key.

    Files are `<dir>/<kind>/<key>.safetensors`; a changed image, caption, resolution, crop or model
    gives another key, so stale entries are never used."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.mem: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, kind: str, key: str, compute) -> dict[str, torch.Tensor]:
        if key in self.mem:
            return self.mem[key]
        path = self.dir / kind / f"{key}.safetensors"
        if path.is_file():
            value = load_file(str(path))
        else:
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            write_safetensors(value, tmp)
            os.replace(tmp, path)  # a killed run never leaves a half-written entry
        self.mem[key] = value
        return value


class Conditioning:
    """The UNet's inputs per sample: latents of dataset image i in epoch e, and the text of a caption,
    from the cache (`cache_latents`, `cache_text`) or computed now with the VAE and text encoders.

    With cached latents each image keeps the crop and flip of epoch 0 (`aug_epoch`): one latent per image."""

    def __init__(self, cache: Cache, ident: str, dataset, vae, text_encoders, tokenizers,
                 cache_latents: bool, cache_text: bool):
        self.cache, self.ident, self.dataset = cache, ident, dataset
        self.vae, self.text_encoders, self.tokenizers = vae, text_encoders, tokenizers
        self.cache_latents, self.cache_text = cache_latents, cache_text

    def of(self, dataset) -> "Conditioning":
        """The same caches and encoders for another dataset's images (DreamBooth's class images)."""
        if dataset is self.dataset:
            return self
        return Conditioning(self.cache, self.ident, dataset, self.vae, self.text_encoders, self.tokenizers,
                            self.cache_latents, self.cache_text)

    def aug_epoch(self, epoch: int) -> int:
        """The epoch whose random crop/flip an image gets: its own, or 0 when latents are cached."""
        return 0 if self.cache_latents else epoch

    def latents(self, epoch: int, i: int) -> torch.Tensor:
        """(4, H/8, W/8) latents of dataset sample i as epoch `epoch` crops and flips it."""
        e = self.aug_epoch(epoch)
        compute = lambda: {"latents": encode_image(self.vae, self.dataset.get(e, i)["pixels"])}
        if not self.cache_latents:
            return compute()["latents"]
        return self.cache.get("latents", content_key(self.ident, self.dataset.key(e, i)), compute)["latents"]

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        """{"context": (77, 2048), "pooled": (1280,)} of one caption."""
        compute = lambda: dict(zip(("context", "pooled"),
                                   (t[0] for t in encode_captions(self.text_encoders, self.tokenizers, [caption]))))
        return self.cache.get("text", content_key(self.ident, caption), compute) if self.cache_text else compute()
