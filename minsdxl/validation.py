"""Validation images during training: --validation_prompt with the model as it is now, beside the
base model's image for the same seed, as a grid in output_dir/validation/<tag>.png.

`validation_images` runs minsdxl.generate with whatever is on the device; the text encoders and the
VAE come to the device only for their part (`devices.staged`). `Validator` keeps the base model's
images, made once: with LoRA, by turning the adapters' scale to 0 for them.
"""

from __future__ import annotations


import argparse
import contextlib
from pathlib import Path

import torch

import lora

from . import devices
from .generate import Models, compare_grid, decode, generate, text_conditioning


def guidance_conditioning(context: torch.Tensor, pooled: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's cached (77, 2048) context and (1280,) pooled vector -> the (2, ...) pair classifier-free
    guidance runs, [empty negative prompt; prompt], the negative zeros as SDXL's pipeline makes them
    (force_zeros_for_empty_prompt), as minsdxl.generate.text_conditioning does."""
    context, pooled = torch.stack([torch.zeros_like(context), context]), torch.stack([torch.zeros_like(pooled), pooled])
    return context.to(device, dtype), pooled.to(device, dtype)


def vae_after_caching(vae, args: argparse.Namespace, weight_dtype: torch.dtype):
    """With the latents cached, the VAE only decodes validation images: in bf16 when training in bf16,
    which halves its activations (3.0 -> 1.5 GiB at 1024x1024); fp32 otherwise (fp16 overflows)."""
    if args.cache_latents and weight_dtype == torch.bfloat16:
        vae.to(torch.bfloat16)
    return vae


def validation_images(unet, vae, text_encoders, tokenizers, args, device, weight_dtype, seeds: list[int],
                      stopping=lambda: False, meter: devices.PhaseMeter | None = None, conditioning=None) -> list:
    """One image per seed of --validation_prompt with the UNet as it is now, through minsdxl.generate;
    fewer once `stopping()` is true (a stop is not kept waiting for the remaining images).

    The UNet and its adapters stay where they are. `conditioning` is the prompt's cached text conditioning
    (guidance_conditioning); without it the text encoders come to the device to encode the prompt. The VAE
    comes only to decode. Each goes back to where it lives after (the CPU, when its outputs are cached)."""
    meter = meter or devices.PhaseMeter(torch.device("cpu"))
    models = Models(unet, vae, text_encoders, tokenizers)
    was_training = [(m, m.training) for m in (unet, *text_encoders)]
    for m, _ in was_training:
        m.eval()  # no LoRA dropout while generating
    images = []
    try:
        if conditioning is None:
            with meter.phase("validation: text"), devices.staged(device, *text_encoders), devices.autocast(device, weight_dtype):
                conditioning = text_conditioning(models, [args.validation_prompt], [""], device, weight_dtype)
        for seed in seeds:
            if stopping():
                break
            with meter.phase("validation: denoise"), devices.autocast(device, weight_dtype):
                latents = generate(models, [args.validation_prompt], steps=args.validation_inference_steps,
                                   seed=seed, width=args.resolution, height=args.resolution, device=device,
                                   dtype=weight_dtype, return_latents=True, conditioning=conditioning)
            with meter.phase("validation: decode"), devices.staged(device, vae):
                images += decode(vae, latents, device)  # outside autocast: the VAE decodes in its own fp32
    finally:
        for m, mode in was_training:
            m.train(mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the validation memory back before training goes on
    return images


class Validator:
    """The validation grid of a run at a given step: base | trained, one row per seed (seed, seed + 1, ...).

    `text_of` gives a prompt's cached text conditioning (None: the text encoders encode it now). The base
    model's images are made once: with LoRA, at the first grid, with the adapters' scale at 0 (`adapted`
    are the models that have them); with --full_finetune, before training changes the weights (`base`); a
    full fine-tuning run resumed from a checkpoint has no base images, and its grids show the trained model only.
    `write`: whether this process writes the grids (rank 0); a UNet sharded by FSDP2 needs every process to
    run the denoising, so they all make the images."""

    def __init__(self, args: argparse.Namespace, models: Models, adapted: dict, device, weight_dtype, seed: int,
                 out: Path, meter, reporter, log, text_of=None, write: bool = True):
        self.args, self.models, self.adapted = args, models, adapted
        self.device, self.weight_dtype, self.out, self.meter, self.reporter, self.log = device, weight_dtype, out, meter, reporter, log
        self.text_of, self.write = text_of, write  # (write: this process writes the grid; under FSDP2 all make it)
        self.seeds = [seed + i for i in range(args.num_validation_images)]
        self.base_images: list = []
        self.made: dict[int, Path | None] = {}  # step -> its grid (None: skipped by a stop)

    def _images(self, stopping) -> list:
        m, args = self.models, self.args
        cached = self.text_of(args.validation_prompt) if self.text_of else None
        conditioning = (guidance_conditioning(cached["context"], cached["pooled"], self.device, self.weight_dtype)
                        if cached else None)
        return validation_images(m.unet, m.vae, m.text_encoders, m.tokenizers, args, self.device, self.weight_dtype,
                                 self.seeds, stopping, self.meter, conditioning)

    def base(self, stopping=lambda: False) -> None:
        """The base model's images, with the model as it is now: LoRA adapters are turned off for them."""
        with contextlib.ExitStack() as off:
            for model in self.adapted.values():
                if lora.lora_layers(model):  # (full fine-tuning: the model before training, no adapters)
                    off.enter_context(lora.disabled(model))
            made = self._images(stopping)
        if not stopping():
            self.base_images = made

    def __call__(self, tag: str, step: int, stopping=lambda: False) -> Path | None:
        """The grid at this step; None when a stop was asked for meanwhile (it is not waited for)."""
        if not self.base_images and not self.args.full_finetune:  # the base model does not change: made once
            self.base(stopping)
            if stopping():
                return None
        trained = self._images(stopping)
        if stopping():
            self.log("validation skipped: stopping")
            return None
        if not self.write:
            return None
        what = "fine-tuned" if self.args.full_finetune else "LoRA"
        grid = compare_grid(self.base_images, trained, [f"seed {s}: {self.args.validation_prompt}" for s in self.seeds],
                            ("base", f"{what}, {tag}"))
        path = self.out / "validation" / f"{tag}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        self.made[step] = path
        self.reporter.image("validation", grid, step)
        self.log(f"validation images: {path}")
        return path
