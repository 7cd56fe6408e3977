"""Text to image with SDXL: text conditioning, classifier-free guidance, a sampler, the VAE decode;
image to image; and the refiner.

    context, pooled = encode_text(prompt)              (B, 77, 2048), (B, 1280)
    z_N ~ N(0, I) at (B, 4, H/8, W/8)
    each step:  eps = eps_uncond + g (eps_cond - eps_uncond)        (Ho & Salimans 2022)
    image = VAE.decode(z_0 / 0.13025)

Under guidance the UNet runs on [negative; positive] stacked along the batch, and the pooled text
and the time ids are stacked the same way. SDXL base treats an empty negative prompt as all-zero
conditioning (`force_zeros_for_empty_prompt` in its pipeline config), not as the encoding of "".

Image to image (SDEdit, Meng et al. 2022): the init image's latent (a sample of the VAE encoder's
distribution, x 0.13025) is noised to the level of step `steps - int(steps x strength)` and only the
steps from there on run: strength 1 starts from (almost) pure noise, 0.3 keeps the composition.

The refiner (Podell et al. 2023, section 2.5) is a second UNet trained on the low-noise end of the
schedule. As diffusers runs the "ensemble of experts", the base denoises the first `refiner_start`
(0.8) of the schedule and hands its partly denoised latents over; the refiner runs the remaining steps
with its own conditioning: text encoder 2 alone (context (B, 77, 1280)), an empty negative prompt
encoded like any prompt, and an aesthetic score (6.0 for the prompt, 2.5 for the negative) in place of
the target size. `refiner_start=0` instead refines a finished image: the base runs every step, then
the refiner runs image to image on its latents at `strength`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import UNetConfig
from .loading import LATENT_SCALE, encode_text
from .sampling import noised, sample, split_step, strength_start


class GenerationError(RuntimeError):
    """Generation produced something unusable; the message says how to fix it."""


@dataclass
class Models:
    """The parts of an SDXL pipeline, wherever they currently are. The refiner's has one text encoder and
    tokenizer (OpenCLIP bigG), and no VAE of its own here: it shares the base's latent space."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
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


@contextmanager
def _stage(name: str, modules: list, device, lowvram: bool, meter=None):
    """One stage of generation: with lowvram only its models are on the device meanwhile; `meter` (the
    memory simulator's tracker, or train.PhaseMeter) records it as the phase `name`."""
    with meter.phase(name) if meter is not None else nullcontext(), ExitStack() as stack:
        for module in modules:
            stack.enter_context(_on(module, device, lowvram))
        yield


@torch.no_grad()
def text_conditioning(models: Models, prompts: list[str], negative_prompts: list[str], device, dtype, lowvram=False,
                      meter=None, phase: str = "text"):
    """(context (2B, 77, D), pooled (2B, 1280)) for [negative; positive], from the model's own text encoders:
    both for the base (D = 768 + 1280 = 2048), OpenCLIP bigG's alone for the refiner (D = 1280)."""
    with _stage(phase, list(models.text_encoders), device, lowvram, meter):
        context, pooled = encode_text(models.text_encoders, models.tokenizers, prompts)
        # An empty negative prompt: all-zero conditioning for the base (force_zeros_for_empty_prompt: true in its
        # model_index.json); the refiner's pipeline encodes "" like any prompt (false in its model_index.json).
        if all(n == "" for n in negative_prompts) and not models.unet.config.takes_aesthetic_score:
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            neg_context, neg_pooled = encode_text(models.text_encoders, models.tokenizers, negative_prompts)
    return torch.cat([neg_context, context]).to(device, dtype), torch.cat([neg_pooled, pooled]).to(device, dtype)


def time_ids(cfg: UNetConfig, height: int, width: int, batch: int, aesthetic_score: float = 6.0,
             negative_aesthetic_score: float = 2.5) -> torch.Tensor:
    """(2 batch, n) fp32 for [negative; positive]: the values `cfg.time_ids` names, as SDXL's pipelines set
    them to generate: original and target size = the image's size, crop (0, 0), i.e. a whole, uncropped
    image; the refiner's aesthetic score (LAION aesthetics, 0-10) high for the prompt, low for the negative."""
    values = {"original_height": height, "original_width": width, "crop_top": 0, "crop_left": 0,
              "target_height": height, "target_width": width}
    negative = [{**values, "aesthetic_score": negative_aesthetic_score}[name] for name in cfg.time_ids]
    positive = [{**values, "aesthetic_score": aesthetic_score}[name] for name in cfg.time_ids]
    return torch.tensor([negative] * batch + [positive] * batch, dtype=torch.float32)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) fp32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess makes it."""
    x = torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return x.permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W)


@torch.no_grad()
def encode(vae, image: torch.Tensor, generator: torch.Generator, device, lowvram=False, meter=None) -> torch.Tensor:
    """An image (1, 3, H, W) in [-1, 1] -> latents (1, 4, H/8, W/8) x 0.13025: one sample of the VAE encoder's
    Gaussian, drawn from `generator` (as diffusers' img2img does), computed in fp32 whatever the VAE's dtype
    (the SDXL VAE overflows in fp16; diffusers upcasts it for this too)."""
    with _stage("encode image", [vae], device, lowvram, meter):
        encoder = [m for m in (vae.encoder, vae.quant_conv) if m is not None]  # all that vae.encode runs
        dtype = vae.dtype
        for m in encoder:
            m.float()
        try:
            latents = vae.encode(image.to(vae.device, torch.float32)).latent_dist.sample(generator)  # (1, 4, H/8, W/8)
        finally:
            for m in encoder:
                m.to(dtype)
    return latents * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device, lowvram=False, tiling=False, meter=None) -> list[Image.Image]:
    """Latents -> PIL images, one image at a time (a VAE "slice"), with a NaN check."""
    # diffusers' tiled decode: overlapping tiles with blended seams, for images above the VAE's sample size
    vae.enable_tiling() if tiling else vae.disable_tiling()
    images = []
    with _stage("decode", [vae], device, lowvram, meter):
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


def denoise(unet, z: torch.Tensor, conditioning: tuple, start: int, end: int, *, steps: int, sampler: str,
            karras: bool, generator: torch.Generator, guidance_scale: float, prediction_type: str, device, dtype):
    """Steps start, ..., end - 1 of the schedule with `unet` under classifier-free guidance, from the latent
    z at step `start`; conditioning = (context, pooled, time_ids), each [negative; positive]."""
    context, pooled, ids = (c.to(device, dtype) for c in conditioning)

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z2 = torch.cat([z, z]).to(dtype)  # (2B, 4, h, w): [negative; positive]
        eps = unet(z2, t.to(device), context, pooled, ids).float()
        uncond, cond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return sample(eps_fn, z.to(device), steps, sampler=sampler, karras=karras, generator=generator,
                  prediction_type=prediction_type, start=start, end=end)  # fp32 between steps


def _check_schedule(steps: int, init_image, strength: float, refiner, refiner_start: float, sampler: str, karras: bool):
    """The steps each model runs, (base start, base end, refiner start), refused with a clear message when a
    model would run none."""
    if not 0 <= refiner_start < 1:
        raise GenerationError(f"--refiner_start {refiner_start} must be in [0, 1): the share of the schedule the base runs")
    if (init_image is not None or (refiner is not None and refiner_start == 0)) and not 0 < strength <= 1:
        raise GenerationError(f"--strength {strength} must be in (0, 1]: the share of the schedule image to image runs")
    start = strength_start(steps, strength) if init_image is not None else 0
    end = split_step(steps, refiner_start, sampler, karras) if refiner is not None and refiner_start > 0 else steps
    refiner_from = strength_start(steps, strength) if refiner is not None and refiner_start == 0 else end
    if start >= end or (refiner is not None and refiner_from >= steps):
        raise GenerationError(
            f"{steps} steps with --strength {strength}" + (f" and --refiner_start {refiner_start}" if refiner else "")
            + f" leave the {'base' if start >= end else 'refiner'} no step to run (the base runs steps {start} to {end},"
            + f" the refiner from {refiner_from}): raise --steps or --strength, or lower --refiner_start")
    return start, end, refiner_from


@torch.no_grad()
def generate(models: Models, prompts: list[str], negative_prompts: list[str] | None = None, *, steps: int = 30,
             guidance_scale: float = 5.0, sampler: str = "euler", karras: bool = False, seed: int | list[int] = 0,
             width: int = 1024, height: int = 1024, device="cpu", dtype: torch.dtype = torch.float32,
             lowvram: bool = False, vae_tiling: bool = False, prediction_type: str = "epsilon",
             return_latents: bool = False, conditioning: tuple | None = None, init_image: torch.Tensor | None = None,
             strength: float = 0.3, refiner: Models | None = None, refiner_start: float = 0.8,
             aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, meter=None):
    """One image per prompt. The initial noise is drawn on the CPU from `seed`, so the same seed gives
    the same image on any device (and the same as diffusers' pipeline given the same generator). A list
    of seeds, one per prompt, draws each image's initial noise from its own generator (diffusers: a list of
    generators), so that an image does not depend on the batch it is made in; the rest of the run (euler_a's
    fresh noise, image to image, the refiner) draws from the first seed's.
    `conditioning`: the (context, pooled) of `text_conditioning` for these prompts, if already computed.
    `init_image`: (1, 3, H, W) in [-1, 1] (`image_to_tensor`) for image to image at `strength`; the image's
    size is the output's. `refiner`: the refiner's Models, which takes over at `refiner_start` (see the
    module docstring), with its own generator seeded from `seed`, as a second diffusers pipeline would be.
    With lowvram only the model in use is on the device: text encoders, base UNet, refiner, VAE in turn."""
    if init_image is not None:
        height, width = init_image.shape[-2:]
    if width % 8 or height % 8:
        raise GenerationError(f"--width {width} and --height {height} must be multiples of 8 (the VAE's factor)")
    start, end, refiner_from = _check_schedule(steps, init_image, strength, refiner, refiner_start, sampler, karras)
    B = len(prompts)
    negative_prompts = negative_prompts or [""] * B
    run = dict(steps=steps, sampler=sampler, karras=karras, guidance_scale=guidance_scale,
               prediction_type=prediction_type, device=device, dtype=dtype)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) not in (1, B):
        raise GenerationError(f"{len(seeds)} seeds for {B} prompts: give one seed, or one per prompt")
    generator = torch.Generator().manual_seed(seeds[0])

    # 1. The base's text conditioning (both encoders) and time ids (size conditioning)
    context, pooled = conditioning or text_conditioning(models, prompts, negative_prompts, device, dtype, lowvram, meter)
    ids = time_ids(models.unet.config, height, width, B)  # (2B, 6)

    # 2. Where the base starts: pure noise, or the init image's latent noised to the level of step `start`
    #    (the VAE's sample and the noise both drawn from the seed's generator, in diffusers' order)
    if init_image is None and len(seeds) == 1:
        z = torch.randn((B, 4, height // 8, width // 8), generator=generator)  # (B, 4, h, w), fp32
    elif init_image is None:  # one generator per image: image i's noise is what seed i alone would draw
        z = torch.cat([torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(s))
                       for s in seeds])  # (B, 4, h, w)
    else:
        x0 = encode(models.vae, init_image, generator, device, lowvram, meter).cpu().float().expand(B, -1, -1, -1)
        z = noised(x0, torch.randn(x0.shape, generator=generator), steps, start, sampler, karras)

    # 3. The base denoises steps [start, end): to the end, or the first refiner_start of the schedule
    with _stage("denoise", [models.unet], device, lowvram, meter):
        z = denoise(models.unet, z, (context, pooled, ids), start, end, generator=generator, **run)

    # 4. The refiner goes on from step `end` with the base's latents, or (refiner_start 0) noises the finished
    #    latents back to step `refiner_from` and runs image to image on them
    if refiner is not None:
        generator = torch.Generator().manual_seed(seeds[0])
        r_context, r_pooled = text_conditioning(refiner, prompts, negative_prompts, device, dtype, lowvram, meter,
                                                "refiner: text")
        r_ids = time_ids(refiner.unet.config, height, width, B, aesthetic_score, negative_aesthetic_score)  # (2B, 5)
        if refiner_start == 0:
            z = noised(z, torch.randn(z.shape, generator=generator).to(z.device), steps, refiner_from, sampler, karras)
        with _stage("refiner: denoise", [refiner.unet], device, lowvram, meter):
            z = denoise(refiner.unet, z, (r_context, r_pooled, r_ids), refiner_from, steps, generator=generator, **run)

    if not torch.isfinite(z).all():
        raise GenerationError(f"the UNet produced NaN/inf latents in {dtype}: fp16 can overflow; use bf16 or fp32 "
                              "(--dtype), and check that the LoRA's weights are finite. Nothing was saved.")
    if return_latents:
        return z
    return decode(models.vae, z.float(), device, lowvram, vae_tiling, meter)


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
