"""minsdxl.generate and sample.py on the tiny pipeline: equal to StableDiffusionXLPipeline, LoRAs
applied (scaled, merged, several), the comparison grid, NaN detection and clear errors. Base + refiner
equal to StableDiffusionXLPipeline(denoising_end) followed by StableDiffusionXLImg2ImgPipeline
(denoising_start), and image to image equal to StableDiffusionXLImg2ImgPipeline, on tiny random models."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from PIL import Image

import lora
import sample
from minsdxl import load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.generate import GenerationError, Models, generate, image_to_tensor
from minsdxl.lora_files import save_sdxl_lora
from minsdxl.tiny import write_tiny_pipeline
from tests.parity import assert_matches_reference
from tests.test_sampling import SDXL_SCHEDULER_CONFIG

SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
              "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def tiny_refiner_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "refiner", refiner=True)


def models_of(root) -> Models:
    return Models(load_unet(root), load_vae(root), load_text_encoders(root), load_tokenizers(root))


def refiner_of(root) -> Models:
    return Models(load_unet(root, expect="refiner"), None, load_text_encoders(root), load_tokenizers(root))


def diffusers_pipe(cls, root, sampler):
    pipe = cls.from_pretrained(str(root))
    pipe.scheduler = SCHEDULERS[sampler].from_config(SDXL_SCHEDULER_CONFIG)  # the real models' scheduler config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_picture():
    """A 64x64 RGB test picture with structure at several scales (a gradient, a disc, stripes)."""
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = x * 4
    g = ((x - 32) ** 2 + (y - 28) ** 2 < 300).float() * 200 + 30
    b = (y // 4 % 2) * 180 + 40
    return Image.fromarray(torch.stack([r, g, b], -1).clamp(0, 255).to(torch.uint8).numpy())


def lora_file(root, path, seed=1, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A LoRA file with random (non-zero) up matrices, as if trained."""
    unet = load_unet(root)
    lora.inject(unet, list(targets), rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.3)
    return save_sdxl_lora(unet, path, format="kohya")


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_latents_equal_the_diffusers_pipeline(tiny_dir, sampler, negative):
    ours = generate(models_of(tiny_dir), ["a cat", "a dog"], [negative] * 2, steps=6, guidance_scale=5.0,
                    sampler=sampler, seed=3, width=64, height=64, return_latents=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    pipe.scheduler = SCHEDULERS[sampler].from_config(SDXL_SCHEDULER_CONFIG)  # the real model's scheduler config
    # diffusers zeroes the negative conditioning only when no negative prompt is given (None); ours does for ""
    theirs = pipe(["a cat", "a dog"], negative_prompt=[negative] * 2 if negative else None, num_inference_steps=6, guidance_scale=5.0,
                  width=64, height=64, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert ours.abs().max() > 0.1
    # The whole run to the fp32 bound of tests/parity.py. Measured: 5e-7..8e-7 of max |ref| for every
    # sampler, because diffusers' UNet has trainable weights and ours frozen ones, which sends one
    # matmul down another PyTorch kernel (parity.py); with the reference frozen too, euler, euler_a and
    # dpmpp_2m are bitwise equal and ddim is 3e-7 off (our DDIM takes alpha from sigma: sampling.py).
    assert_matches_reference(ours, theirs, f"final latents, {sampler}, negative {negative!r}")


def test_a_seed_per_image_equals_diffusers_list_of_generators(tiny_dir):
    """seed=[...]: each image's noise from its own generator, as StableDiffusionXLPipeline given a list of
    generators; so an image is the same whatever batch it is made in (DreamBooth's class images)."""
    models = models_of(tiny_dir)
    ours = generate(models, ["a cat"] * 2, steps=4, sampler="euler", seed=[5, 9], width=64, height=64, return_latents=True)
    pipe = diffusers_pipe(StableDiffusionXLPipeline, tiny_dir, "euler")
    theirs = pipe(["a cat"] * 2, num_inference_steps=4, width=64, height=64, output_type="latent",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 9)]).images
    assert_matches_reference(ours, theirs, "final latents, a seed per image")
    alone = generate(models, ["a cat"], steps=4, sampler="euler", seed=9, width=64, height=64, return_latents=True)
    torch.testing.assert_close(ours[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(GenerationError, match="3 seeds for 2 prompts"):
        generate(models, ["a cat"] * 2, steps=1, seed=[1, 2, 3], width=64, height=64)


@pytest.mark.parametrize("sampler, negative", [("euler", ""), ("dpmpp_2m", ""), ("euler", "blurry")])
def test_base_then_refiner_equals_diffusers_ensemble_of_experts(tiny_dir, tiny_refiner_dir, sampler, negative):
    """The base runs the first 80% of the schedule (denoising_end=0.8, latents out), the refiner the rest
    (denoising_start=0.8) with its one text encoder, its empty negative prompt encoded, aesthetic scores 6 / 2.5."""
    prompts, steps, seed = ["a cat", "a dog"], 10, 3
    ours = generate(models_of(tiny_dir), prompts, [negative] * 2, steps=steps, sampler=sampler, seed=seed, width=64,
                    height=64, refiner=refiner_of(tiny_refiner_dir), refiner_start=0.8, return_latents=True)
    negatives = [negative] * 2 if negative else None
    base = diffusers_pipe(StableDiffusionXLPipeline, tiny_dir, sampler)
    handed_over = base(prompts, negative_prompt=negatives, num_inference_steps=steps, denoising_end=0.8, width=64,
                       height=64, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    refiner = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, tiny_refiner_dir, sampler)
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt
    theirs = refiner(prompts, negative_prompt=negatives, image=handed_over, num_inference_steps=steps,
                     denoising_start=0.8, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    without_refiner = generate(models_of(tiny_dir), prompts, [negative] * 2, steps=steps, sampler=sampler, seed=seed,
                               width=64, height=64, return_latents=True)
    assert (ours - without_refiner).abs().max() > 1e-2  # the refiner did something
    assert_matches_reference(ours, theirs, f"base 80% + refiner 20%, final latents, {sampler}, negative {negative!r}")


def test_refiner_over_a_finished_image_equals_diffusers(tiny_dir, tiny_refiner_dir):
    """refiner_start=0: the base runs every step; the refiner runs image to image on its latents at strength 0.3."""
    prompts, steps, seed = ["a cat"], 10, 4
    ours = generate(models_of(tiny_dir), prompts, steps=steps, seed=seed, width=64, height=64,
                    refiner=refiner_of(tiny_refiner_dir), refiner_start=0.0, strength=0.3, return_latents=True)
    base = diffusers_pipe(StableDiffusionXLPipeline, tiny_dir, "euler")
    finished = base(prompts, num_inference_steps=steps, width=64, height=64,
                    generator=torch.Generator().manual_seed(seed), output_type="latent").images
    refiner = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, tiny_refiner_dir, "euler")
    theirs = refiner(prompts, image=finished, strength=0.3, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").images
    assert_matches_reference(ours, theirs, "base, then the refiner over its finished latents at strength 0.3")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_image_to_image_equals_diffusers(tiny_dir, sampler, strength):
    """The init image encoded in fp32 (a sample of the VAE's Gaussian), noised to the step strength leaves,
    denoised from there; the generator draws the VAE sample, then the noise, as diffusers' img2img does."""
    image, prompts, steps, seed = init_picture(), ["a cat", "a dog"], 10, 5
    ours = generate(models_of(tiny_dir), prompts, steps=steps, sampler=sampler, seed=seed, init_image=image_to_tensor(image),
                    strength=strength, return_latents=True)
    pipe = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, tiny_dir, sampler)
    theirs = pipe(prompts, image=image, strength=strength, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed), output_type="latent").images
    assert_matches_reference(ours, theirs, f"image to image, strength {strength}, {sampler}")


def test_init_image_is_encoded_in_fp32_whatever_the_vae_dtype(tiny_dir):
    """The SDXL VAE overflows in fp16: the encoder runs in fp32 for image to image (diffusers upcasts it too),
    and the VAE is back in its own dtype after."""
    models = models_of(tiny_dir)
    models.vae.to(torch.bfloat16)
    seen = []
    models.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, m.conv_in.weight.dtype)))
    generate(models, ["a cat"], steps=4, init_image=image_to_tensor(init_picture()), strength=0.5, return_latents=True)
    assert seen == [(torch.float32, torch.float32)]
    assert {p.dtype for p in models.vae.parameters()} == {torch.bfloat16}


def test_image_to_image_then_refiner_equals_diffusers(tiny_dir, tiny_refiner_dir):
    """Both at once: the base's img2img cut at denoising_end, the refiner from denoising_start."""
    image, prompts, steps, seed = init_picture(), ["a cat"], 10, 6
    ours = generate(models_of(tiny_dir), prompts, steps=steps, seed=seed, init_image=image_to_tensor(image), strength=0.7,
                    refiner=refiner_of(tiny_refiner_dir), refiner_start=0.8, return_latents=True)
    base = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, tiny_dir, "euler")
    handed_over = base(prompts, image=image, strength=0.7, num_inference_steps=steps, denoising_end=0.8,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images
    refiner = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, tiny_refiner_dir, "euler")
    theirs = refiner(prompts, image=handed_over, num_inference_steps=steps, denoising_start=0.8,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").images
    assert_matches_reference(ours, theirs, "image to image at 0.7, then the refiner from 0.8")


def test_schedules_that_leave_a_model_no_step_are_refused(tiny_dir, tiny_refiner_dir):
    models, refiner = models_of(tiny_dir), refiner_of(tiny_refiner_dir)
    image = image_to_tensor(init_picture())
    common = dict(steps=10, width=64, height=64, return_latents=True)
    with pytest.raises(GenerationError, match="leave the base no step to run"):  # strength 0.1: steps 9-10, cut at 8
        generate(models, ["x"], init_image=image, strength=0.1, refiner=refiner, refiner_start=0.8, **common)
    with pytest.raises(GenerationError, match="leave the base no step to run"):
        generate(models, ["x"], init_image=image, strength=0.05, **common)
    with pytest.raises(GenerationError, match="leave the refiner no step to run"):
        generate(models, ["x"], refiner=refiner, refiner_start=0.9999, **common)
    with pytest.raises(GenerationError, match=r"--refiner_start 1.0 must be in \[0, 1\)"):
        generate(models, ["x"], refiner=refiner, refiner_start=1.0, **common)
    with pytest.raises(GenerationError, match=r"--strength 0.0 must be in \(0, 1\]"):
        generate(models, ["x"], init_image=image, strength=0.0, **common)


def test_images_equal_the_diffusers_pipeline(tiny_dir):
    ours = generate(models_of(tiny_dir), ["a cat"], steps=4, seed=5, width=64, height=64)[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    theirs = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator().manual_seed(5)).images[0]
    diff = torch.tensor(list(ours.getdata())).float() - torch.tensor(list(theirs.getdata())).float()
    assert ours.size == theirs.size == (64, 64)
    assert diff.abs().max() <= 1  # rounding to 8 bits may differ by one level


def test_nan_from_the_vae_is_an_error_not_a_black_png(tiny_dir, tmp_path, monkeypatch):
    models = models_of(tiny_dir)
    with torch.no_grad():
        models.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(GenerationError, match="fp16-fix"):
        generate(models, ["a cat"], steps=2, width=64, height=64)
    monkeypatch.setattr(sample, "load_models", lambda *a: models)
    with pytest.raises(SystemExit, match="VAE decoded NaN"):
        sample.main(sample.parse_args(["--pretrained_model_name_or_path", str(tiny_dir), "--prompt", "x",
                                       "--steps", "2", "--width", "64", "--height", "64", "--output_dir", str(tmp_path)]))
    assert not list(tmp_path.glob("*.png"))


def test_nan_from_the_unet_is_reported(tiny_dir):
    models = models_of(tiny_dir)
    with torch.no_grad():
        models.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(GenerationError, match="UNet produced NaN"):
        generate(models, ["a cat"], steps=2, width=64, height=64)


def args_for(tiny_dir, out, *extra):
    return sample.parse_args(["--pretrained_model_name_or_path", str(tiny_dir), "--prompt", "a red ball",
                              "--steps", "3", "--width", "64", "--height", "64", "--output_dir", str(out), *extra])


def pixels(path):
    return torch.tensor(list(Image.open(path).convert("RGB").getdata())).float()


def test_sample_with_lora_and_compare_grid(tiny_dir, tmp_path):
    path = lora_file(tiny_dir, tmp_path / "style.safetensors")
    result = sample.main(args_for(tiny_dir, tmp_path / "out", "--lora", f"{path}:0.9", "--compare",
                                  "--num_images", "2", "--prompt", "a blue cube"))
    out = tmp_path / "out"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00_seed0.png", "00_seed1.png", "01_seed0.png", "01_seed1.png", "base_00_seed0.png",
                     "base_00_seed1.png", "base_01_seed0.png", "base_01_seed1.png", "compare.png"]
    grid = Image.open(result["grid"])
    assert grid.size == (2 * 64, 20 + 4 * (64 + 16))  # 4 rows (2 prompts x 2 seeds), base | LoRA
    assert (pixels(out / "00_seed0.png") - pixels(out / "base_00_seed0.png")).abs().mean() > 1  # the LoRA acts
    assert (pixels(out / "00_seed0.png") - pixels(out / "00_seed1.png")).abs().mean() > 1  # the seed acts
    # the base column equals a run without any LoRA, and the settings are in the PNG
    sample.main(args_for(tiny_dir, tmp_path / "plain", "--num_images", "2"))
    assert torch.equal(pixels(out / "base_00_seed1.png"), pixels(tmp_path / "plain" / "00_seed1.png"))
    text = Image.open(out / "01_seed1.png").text
    assert json.loads(text["minsdxl"])["seed"] == 1
    assert text["parameters"] == ("a blue cube\nSteps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 5.0, "
                                  "Seed: 1, Size: 64x64, Model: pipe, Lora: style.safetensors:0.9")


def lora_latents(tiny_dir, specs, merge):
    models = models_of(tiny_dir)
    sample.apply_loras(models, specs, merge)
    return generate(models, ["a cat"], steps=3, width=64, height=64, seed=2, return_latents=True)


def test_lora_scale_merge_and_several_loras(tiny_dir, tmp_path):
    a = lora_file(tiny_dir, tmp_path / "a.safetensors", seed=1)
    b = lora_file(tiny_dir, tmp_path / "b.safetensors", seed=2, targets=("ff.net.2", "to_k"))
    base = lora_latents(tiny_dir, [], False)
    full = lora_latents(tiny_dir, [(a, 1.0)], False)
    assert (full - base).abs().max() > 1e-2
    torch.testing.assert_close(lora_latents(tiny_dir, [(a, 0.0)], False), base)  # scale 0 = no LoRA
    torch.testing.assert_close(lora_latents(tiny_dir, [(a, 1.0)], True), full, rtol=1e-4, atol=1e-4)  # merged
    # Several LoRAs add up: A at 0.5 twice is A at 1.0.
    torch.testing.assert_close(lora_latents(tiny_dir, [(a, 0.5), (a, 0.5)], False), full, rtol=1e-4, atol=1e-4)
    both = lora_latents(tiny_dir, [(a, 1.0), (b, 1.0)], False)
    assert (both - full).abs().max() > 1e-3


def test_zero_lora_warns(tiny_dir, tmp_path, capsys):
    unet = load_unet(tiny_dir)
    lora.inject(unet, ["to_q"], rank=2)  # up matrices still zero: saved before any training step
    path = save_sdxl_lora(unet, tmp_path / "z.safetensors")
    sample.apply_loras(models_of(tiny_dir), [(path, 1.0)], False)
    assert "changes nothing" in capsys.readouterr().out


def test_vae_tiling_and_lowvram_run(tiny_dir, tmp_path, monkeypatch):
    calls = []
    original = type(load_vae(tiny_dir)).tiled_decode
    monkeypatch.setattr(type(load_vae(tiny_dir)), "tiled_decode",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    args = sample.parse_args(["--pretrained_model_name_or_path", str(tiny_dir), "--prompt", "a red ball", "--steps", "2",
                              "--width", "128", "--height", "128", "--output_dir", str(tmp_path),
                              "--vae_tiling", "--lowvram"])
    result = sample.main(args)
    assert calls  # 128 px is above the tiny VAE's 64 px tile: the tiled path ran
    assert Image.open(result["images"][0]).size == (128, 128)


def test_lowvram_keeps_only_the_model_in_use_on_the_device(tiny_dir, tiny_refiner_dir, tmp_path, monkeypatch):
    """With --lowvram each stage brings its own models to the device and sends them back: at every forward
    pass of a model exactly that stage's models are there (text encoders, base UNet, refiner, VAE in turn)."""
    generate_module = sys.modules["minsdxl.generate"]  # (the package exports the function `generate` under that name)
    on_device, seen = [], []
    real_on = generate_module._on

    @contextmanager
    def spying_on(module, device, lowvram):
        assert lowvram
        with real_on(module, device, lowvram):
            on_device.append(module)
            try:
                yield module
            finally:
                on_device.remove(module)

    monkeypatch.setattr(generate_module, "_on", spying_on)
    models, refiner = models_of(tiny_dir), refiner_of(tiny_refiner_dir)
    parts = {"text encoder 1": models.text_encoders[0], "text encoder 2": models.text_encoders[1], "UNet": models.unet,
             "refiner text encoder": refiner.text_encoders[0], "refiner UNet": refiner.unet,
             "VAE encoder": models.vae.encoder, "VAE decoder": models.vae.decoder}
    for name, module in parts.items():
        module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, list(on_device))))
    monkeypatch.setattr(sample, "load_models", lambda *a: models)
    monkeypatch.setattr(sample, "load_refiner", lambda *a: refiner)
    init = tmp_path / "init.png"
    init_picture().save(init)
    sample.main(args_for(tiny_dir, tmp_path / "out", "--lowvram", "--refiner", str(tiny_refiner_dir),
                         "--init_image", str(init), "--strength", "0.9", "--steps", "4"))
    stage = {"text encoder 1": [models.text_encoders[0], models.text_encoders[1]],
             "text encoder 2": [models.text_encoders[0], models.text_encoders[1]],
             "UNet": [models.unet], "refiner text encoder": [refiner.text_encoders[0]], "refiner UNet": [refiner.unet],
             "VAE encoder": [models.vae], "VAE decoder": [models.vae]}
    assert {name for name, _ in seen} == set(parts)
    for name, there in seen:
        assert there == stage[name], f"during {name}: {len(there)} models on the device"
    order = [name for i, (name, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != name]
    # (the base's empty negative prompt is zeros, not encoded; the refiner encodes the prompt, then "")
    assert order == ["text encoder 1", "text encoder 2", "VAE encoder", "UNet", "refiner text encoder", "refiner UNet",
                     "VAE decoder"]
    assert not on_device


def test_demo_with_a_tiny_refiner(tiny_refiner_dir, tmp_path):
    """sample.py --demo --refiner PATH: the tiny base hands over to a tiny refiner written by minsdxl.tiny."""
    plain = sample.main(sample.parse_args(["--demo", "--output_dir", str(tmp_path / "plain"), "--steps", "5"]))
    refined = sample.main(sample.parse_args(["--demo", "--output_dir", str(tmp_path / "refined"), "--steps", "5",
                                             "--refiner", str(tiny_refiner_dir)]))
    assert Image.open(refined["images"][0]).size == (64, 64)
    assert not torch.equal(pixels(refined["images"][0]), pixels(plain["images"][0]))  # the refiner ran its last step
    text = Image.open(refined["images"][0]).text
    assert "Refiner: refiner, Refiner switch at: 0.8" in text["parameters"]
    info = json.loads(text["minsdxl"])
    assert (info["refiner"], info["refiner_start"], info["aesthetic_score"]) == (str(tiny_refiner_dir), 0.8, 6.0)


def test_image_to_image_from_the_command_line(tiny_dir, tmp_path):
    init = tmp_path / "init.png"
    init_picture().resize((70, 50)).save(init)
    own_size = sample.parse_args(["--pretrained_model_name_or_path", str(tiny_dir), "--prompt", "a red ball", "--steps", "3",
                                  "--output_dir", str(tmp_path / "a"), "--init_image", str(init), "--strength", "0.6"])
    assert Image.open(sample.main(own_size)["images"][0]).size == (64, 48)  # 70 x 50 rounded down to multiples of 8
    out = sample.main(args_for(tiny_dir, tmp_path / "b", "--init_image", str(init), "--strength", "0.6"))
    assert Image.open(out["images"][0]).size == (64, 64)  # --width 64 --height 64 given: resized to that
    assert "Denoising strength: 0.6" in Image.open(out["images"][0]).text["parameters"]
    # with a LoRA: image to image runs the base with the LoRA applied
    path = lora_file(tiny_dir, tmp_path / "style.safetensors")
    with_lora = sample.main(args_for(tiny_dir, tmp_path / "c", "--init_image", str(init), "--strength", "0.6",
                                     "--lora", str(path)))
    assert (pixels(with_lora["images"][0]) - pixels(out["images"][0])).abs().mean() > 0.5


def test_refiner_and_image_flags_are_checked(tiny_dir, tiny_refiner_dir, tmp_path):
    """A refiner given as the base and the base as the refiner name the file and say what it is; flags that
    only mean something with the refiner or image to image are refused without them."""
    with pytest.raises(SystemExit, match=rf"--pretrained_model_name_or_path: {re.escape(str(tiny_refiner_dir))}.*not an "
                                         r"SDXL base UNet: found the SDXL refiner .*sample.py --refiner"):
        sample.main(args_for(tiny_refiner_dir, tmp_path))
    with pytest.raises(SystemExit, match=rf"--refiner: {re.escape(str(tiny_dir))}.*not an SDXL refiner UNet: found an "
                                         r"SDXL base model"):
        sample.main(args_for(tiny_dir, tmp_path, "--refiner", str(tiny_dir)))
    for flags, message in ((["--aesthetic_score", "7"], "--aesthetic_score is for the refiner"),
                           (["--refiner_start", "0.5"], "--refiner_start is for the refiner"),
                           (["--strength", "0.5"], "--strength is for image to image"),
                           (["--refiner", str(tiny_refiner_dir), "--strength", "0.5"], "--strength is for image to image"),
                           (["--refiner", str(tiny_refiner_dir), "--refiner_start", "1"], r"--refiner_start 1.0 must be in \[0, 1\)"),
                           (["--init_image", "nowhere.png"], "--init_image nowhere.png: no such file"),
                           (["--init_image", str(tmp_path / "x.png"), "--strength", "0"], r"--strength 0.0 must be in \(0, 1\]")):
        (tmp_path / "x.png").write_bytes(b"")
        with pytest.raises(SystemExit, match=message):
            sample.main(args_for(tiny_dir, tmp_path, *flags))
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(SystemExit, match="--init_image .*broken.png: not an image PIL can read"):
        sample.main(args_for(tiny_dir, tmp_path, "--init_image", str(tmp_path / "broken.png")))


def test_bad_input_gets_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="no such file 'missing.safetensors'"):
        sample.main(args_for(tiny_dir, tmp_path, "--lora", "missing.safetensors:0.7"))
    with pytest.raises(SystemExit, match="--compare compares"):
        sample.main(args_for(tiny_dir, tmp_path, "--compare"))
    with pytest.raises(SystemExit, match="multiples of 8"):
        sample.main(args_for(tiny_dir, tmp_path, "--width", "100"))
    # a LoRA for another model: its keys fit no module of this UNet
    other = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
                                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
                                 "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(other))
    with pytest.raises(SystemExit, match="sd15.safetensors: nothing was loaded.*fit no layer.*SD 1.x"):
        sample.main(args_for(tiny_dir, tmp_path, "--lora", str(other)))
    assert sample.parse_lora_spec(f"{other}:0.25") == (other, 0.25)
    assert sample.parse_lora_spec(str(other)) == (other, 1.0)


def test_demo_runs(tmp_path):
    result = sample.main(sample.parse_args(["--demo", "--output_dir", str(tmp_path), "--steps", "2"]))
    assert Image.open(result["images"][0]).size == (64, 64)


def test_demo_keeps_the_flags_given_and_the_png_says_what_ran(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: ran.append(k) or generate(*a, **k))
    result = sample.main(sample.parse_args(["--demo", "--output_dir", str(tmp_path), "--steps", "12",
                                            "--height", "128", "--seed", "7"]))
    assert [(k["steps"], k["width"], k["height"], k["device"]) for k in ran] == [(12, 64, 128, torch.device("cpu"))]
    text = Image.open(result["images"][0]).text
    assert "Steps: 12," in text["parameters"] and "Size: 64x128" in text["parameters"] and "Seed: 7" in text["parameters"]
    assert json.loads(text["minsdxl"])["steps"] == 12


def test_help_keeps_the_example_and_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "stable-diffusion-xl-base-1.0 \\\n        --prompt" in help_text  # the example's line break survives
    assert "(default: 30)" in help_text and "(default: fp32)" in help_text
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert not re.search(r"\(default[^)]*\)\s*\(default", " ".join(help_text.split()))  # never twice in a row


def test_the_wheel_installs_commands_not_top_level_train_and_sample(tmp_path):
    """pip installs train.py and sample.py as minsdxl_scripts.* behind the commands minsdxl-train and
    minsdxl-sample, with the tokenizer files; no module named plain `train` or `sample`. Built from a
    copy of the sources, so the repository stays clean."""
    pytest.importorskip("setuptools", minversion="68")  # pyproject's build requirement
    root = Path(sample.__file__).parent
    src = tmp_path / "src"
    for name in ("minsdxl", "lora"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "train.py", "sample.py"):
        shutil.copy(root / name, src / name)
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))"
    built = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, check=True)
    wheel = zipfile.ZipFile(tmp_path / built.stdout.split()[-1])
    names = set(wheel.namelist())
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"minsdxl", "lora", "minsdxl_scripts"}
    assert {"minsdxl_scripts/train.py", "minsdxl_scripts/sample.py", "minsdxl/clip_tokenizer/vocab.json",
            "minsdxl/clip_tokenizer/merges.txt", "minsdxl/clip_tokenizer/tokenizer_config.json",
            "minsdxl/clip_tokenizer/LICENSE"} <= names
    entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "minsdxl-train = minsdxl.cli:train" in entry_points and "minsdxl-sample = minsdxl.cli:sample" in entry_points
    # Installed (a pure wheel is a zip to unpack) and run outside the repository: the command is sample.py.
    site = tmp_path / "site"
    wheel.extractall(site)
    run = (f"import sys, minsdxl; assert minsdxl.__file__.startswith({str(site)!r}); "
           "sys.argv = ['minsdxl-sample', '--help']; from minsdxl.cli import sample; sample()")
    result = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 0 and result.stdout.startswith("usage: sample.py"), result.stderr[-2000:]
