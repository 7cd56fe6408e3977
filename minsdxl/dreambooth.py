"""DreamBooth's class images: what prior preservation trains on beside the subject's photos.

DreamBooth (Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation") teaches a model one subject from a few photos captioned with a rare
identifier ("a photo of sks dog"). Trained on those alone, the model soon draws every dog as that
dog ("language drift"). Prior preservation (section 4.2 of the paper) trains on images of the
class too, captioned with the class alone ("a photo of a dog"), which the model itself generated
before training: their loss keeps it drawing dogs as it did.

    loss = instance loss + prior_loss_weight x class loss     (train.batch_loss, on the two halves of a batch)

The class images are made here once, as diffusers' train_dreambooth_lora_sdxl.py makes them: with the
base model being trained, the class prompt, its pipeline's defaults (50 Euler steps, guidance 5; the
steps are --class_inference_steps here), into
--class_data_dir, where the next run finds and reuses them. Ours differ in three ways, each so that a
rerun gives the same files: image i starts from its own seeded noise (`class_image_seed`), so it does
not depend on the batch it is made in, nor on how many were made before; the missing indices are
generated, not "count + i" (which, after an image is deleted, names an index that is taken); and each
file is written whole or not at all (PNG, not diffusers' JPEG, so the images are what the model made).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import devices
from .data import image_files, seeded_generator
from .generate import Models, decode, generate
from .loading import encode_text
from .validation import guidance_conditioning

CLASS_IMAGE_STEPS = 50  # StableDiffusionXLPipeline's default num_inference_steps, with which diffusers makes them
CLASS_IMAGE_GUIDANCE = 5.0  # its default guidance_scale
CLASS_IMAGE_SAMPLER = "euler"  # SDXL base's scheduler: EulerDiscreteScheduler (minsdxl.sampling says they agree)
INDEX = re.compile(r"^(\d+)-")  # a class image's file name starts with its index: "12-<sha1>.png", as diffusers names them


def class_images(folder: Path) -> list[Path]:
    """The images in a class folder (any format PIL opens, at any depth), sorted."""
    return image_files(folder)[0] if folder.is_dir() else []


def missing_class_indices(folder: Path, wanted: int) -> list[int]:
    """The indices of the class images to generate so that `folder` holds `wanted` images: as many as are
    missing (every image there counts, whoever made it, as in diffusers), at the lowest indices that no
    file name there starts with."""
    present = class_images(folder)
    taken = {int(m.group(1)) for p in present if (m := INDEX.match(p.name))}
    missing, index = [], 0
    while len(missing) < wanted - len(present):
        if index not in taken:
            missing.append(index)
        index += 1
    return missing


def generation_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype class images are generated in: --prior_generation_precision, else --mixed_precision's."""
    return devices.DTYPES[(args.prior_generation_precision or args.mixed_precision).replace("fp32", "no")]


def class_image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`'s initial noise: a hash of (seed, index), so images are independent."""
    return seeded_generator("class image", seed, index).initial_seed()


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write a PNG under a hidden temporary name and rename it into place: a killed run leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_class_images(models: Models, prompt: str, indices: list[int], folder: Path, *, seed: int,
                          resolution: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                          prediction_type: str = "epsilon", steps: int = CLASS_IMAGE_STEPS,
                          progress: bool = True) -> list[Path]:
    """Class images `indices` of `prompt` into `folder`, `batch_size` at a time; returns their paths.

    The models live in CPU memory and come to the device one at a time: the text encoders once, to encode
    the prompt (the negative prompt is empty: zeros, as SDXL's pipeline makes it), then for each batch the
    UNet to denoise it and the VAE to decode it, so that a batch's images are on disk before the next
    starts. (Keeping the UNet on the device beside the VAE's decode would add the decode's activations,
    3 GiB at 1024x1024 in fp32, to the UNet's weights: the run's peak. Its two copies per batch cost
    little beside the batch's 50 denoising steps.)"""
    with devices.staged(device, *models.text_encoders), devices.autocast(device, dtype):
        context, pooled = encode_text(models.text_encoders, models.tokenizers, [prompt])  # (1, 77, 2048), (1, 1280)
    context, pooled = guidance_conditioning(context[0].float(), pooled[0].float(), device, dtype)  # [negative; prompt]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="generating class images", disable=not progress):
        b = len(batch)
        conditioning = (context.repeat_interleave(b, dim=0), pooled.repeat_interleave(b, dim=0))  # [negative x b; prompt x b]
        with devices.staged(device, models.unet), devices.autocast(device, dtype):
            latents = generate(models, [prompt] * b, steps=steps, guidance_scale=CLASS_IMAGE_GUIDANCE,
                               sampler=CLASS_IMAGE_SAMPLER, seed=[class_image_seed(seed, i) for i in batch],
                               width=resolution, height=resolution, device=device, dtype=dtype,
                               prediction_type=prediction_type, return_latents=True, conditioning=conditioning)
        with devices.staged(device, models.vae):
            images = decode(models.vae, latents, device)  # (outside autocast: the VAE decodes in its own dtype)
        for index, image in zip(batch, images):
            path = folder / f"{index}-{hashlib.sha1(image.tobytes()).hexdigest()}.png"
            save_atomically(image, path)
            paths.append(path)
    return paths
