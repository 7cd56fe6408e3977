"""Text to image with SDXL: text conditioning, classifier-free guidance, a sampler, the VAE decode.

    context, pooled = encode_text(prompt)              (B, 77, 2048), (B, 1280)
    z_N ~ N(0, I) at (B, 4, H/8, W/8)
    each step:  eps = eps_uncond + g (eps_cond - eps_uncond)        (Ho & Salimans 2022)
    image = VAE.decode(z_0 / 0.13025)

Under guidance the UNet runs on [negative; positive] stacked along the batch, and the pooled text
and the time ids are stacked the same way. SDXL base treats an empty negative prompt as all-zero
conditioning (`force_zeros_for_empty_prompt` in its pipeline config), not as the encoding of "".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .loading import LATENT_SCALE, encode_text
from .sampling import sample


class GenerationError(RuntimeError):
    """Generation produced something unusable; the message says how to fix it."""


@dataclass
class Models:
    """The four parts of an SDXL pipeline, wherever they currently are."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    tokenizers: tuple


@contextmanager
def _on(module: torch.nn.Module, device, lowvram: bool):
    """With lowvram, move a stage to the device only while it is used (and back to the CPU after)."""
    if lowvram:
        module.to(device)
    try:
        yield module
    finally:
        if lowvram:
            module.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@torch.no_grad()
def text_conditioning(models: Models, prompts: list[str], negative_prompts: list[str], device, dtype, lowvram=False):
    """(context (2B, 77, 2048), pooled (2B, 1280)) for [negative; positive]."""
    with _on(models.text_encoders[0], device, lowvram), _on(models.text_encoders[1], device, lowvram):
        context, pooled = encode_text(models.text_encoders, models.tokenizers, prompts)
        if all(n == "" for n in negative_prompts):
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)  # force_zeros_for_empty_prompt
        else:
            neg_context, neg_pooled = encode_text(models.text_encoders, models.tokenizers, negative_prompts)
    return torch.cat([neg_context, context]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device, lowvram=False, tiling=False) -> list[Image.Image]:
    """Latents -> PIL images, one image at a time (a VAE "slice"), with a NaN check."""
    # diffusers' tiled decode: overlapping tiles with blended seams, for images above the VAE's sample size
    vae.enable_tiling() if tiling else vae.disable_tiling()
    images = []
    with _on(vae, device, lowvram):
        for z in latents:
            x = vae.decode((z[None] / LATENT_SCALE).to(vae.device, vae.dtype)).sample.float()  # (1, 3, H, W)
            if not torch.isfinite(x).all():
                raise GenerationError(
                    "the VAE decoded NaN/inf (a black image). The SDXL VAE overflows in fp16: decode in fp32 or bf16 "
                    "(--vae_dtype fp32), or use the fp16-fix VAE (--pretrained_vae_model_name_or_path "
                    "madebyollin/sdxl-vae-fp16-fix). Nothing was saved.")
            x = (x[0] / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
            images.append(Image.fromarray((x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)))
    return images


@torch.no_grad()
def generate(models: Models, prompts: list[str], negative_prompts: list[str] | None = None, *, steps: int = 30,
             guidance_scale: float = 5.0, sampler: str = "euler", karras: bool = False, seed: int = 0,
             width: int = 1024, height: int = 1024, device="cpu", dtype: torch.dtype = torch.float32,
             lowvram: bool = False, vae_tiling: bool = False, prediction_type: str = "epsilon",
             return_latents: bool = False, conditioning: tuple | None = None):
    """One image per prompt. The initial noise is drawn on the CPU from `seed`, so the same seed gives
    the same image on any device (and the same as diffusers' pipeline given the same generator).
    `conditioning`: the (context, pooled) of `text_conditioning` for these prompts, if already computed."""
    if width % 8 or height % 8:
        raise GenerationError(f"--width {width} and --height {height} must be multiples of 8 (the VAE's factor)")
    B = len(prompts)
    negative_prompts = negative_prompts or [""] * B
    context, pooled = conditioning or text_conditioning(models, prompts, negative_prompts, device, dtype, lowvram)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2 * B, dtype=dtype, device=device)  # (2B, 6)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((B, 4, height // 8, width // 8), generator=generator).to(device)  # (B, 4, h, w), fp32

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z2 = torch.cat([z, z]).to(dtype)  # (2B, 4, h, w): [negative; positive]
        eps = models.unet(z2, t.to(device), context, pooled, time_ids).float()
        uncond, cond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    with _on(models.unet, device, lowvram):
        latents = sample(eps_fn, noise, steps, sampler=sampler, karras=karras, generator=generator,
                         prediction_type=prediction_type)  # fp32 between steps
    if not torch.isfinite(latents).all():
        raise GenerationError(f"the UNet produced NaN/inf latents in {dtype}: fp16 can overflow; use bf16 or fp32 "
                              "(--dtype), and check that the LoRA's weights are finite. Nothing was saved.")
    if return_latents:
        return latents
    return decode(models.vae, latents.float(), device, lowvram, vae_tiling)


def compare_grid(base: list[Image.Image], with_lora: list[Image.Image], row_titles: list[str],
                 column_titles: tuple[str, str]) -> Image.Image:
    """One row per (prompt, seed): base | LoRA, with a title over each column and a caption per row.
    With no base images (`base` empty), one column: the second."""
    columns = [(t, images) for t, images in zip(column_titles, (base, with_lora)) if images]
    w, h = with_lora[0].size
    title_h, caption_h = 20, 16
    grid = Image.new("RGB", (len(columns) * w, title_h + len(with_lora) * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        draw.text((c * w + 4, 4), title, fill="black")
        for r, image in enumerate(images):
            grid.paste(image, (c * w, title_h + r * (h + caption_h) + caption_h))
    for r, caption in enumerate(row_titles):
        draw.text((4, title_h + r * (h + caption_h) + 2), caption[: len(columns) * w // 6], fill="black")  # ~6 px a character
    return grid
