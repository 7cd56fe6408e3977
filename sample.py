r"""sample.py: generate SDXL images with the base model and LoRAs.

    python sample.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --prompt "a photo of a corgi" --lora out/pytorch_lora_weights.safetensors:0.8 --compare

Any source `minsdxl.load_unet` accepts works (single file, diffusers folder, Hub id); `--lora`
takes the LoRA files people share (kohya, LyCORIS LoCon/LoHa/LoKr/DoRA, diffusers; see docs/lora.md),
repeatable, each with an optional `:STRENGTH`, which means what it means in ComfyUI and A1111. Image i of a prompt uses seed `--seed + i`, so any one image can be made again alone.
The text -> latents -> image steps are in `minsdxl/generate.py`, the samplers in
`minsdxl/sampling.py`. `python sample.py --demo` runs on a tiny random SDXL on the CPU.
"""

from __future__ import annotations

import os

# transformers' notices about optional packages we do not use (torchvision image processors, imported
# with diffusers' pipelines) are not ours to report; set TRANSFORMERS_VERBOSITY=warning to see them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

import lora
from minsdxl.cli import HelpFormatter, given_flags
from minsdxl.compile import compile_repeated_blocks
from minsdxl.fp8 import quantize_fp8
from minsdxl.generate import GenerationError, Models, compare_grid, generate
from minsdxl.loading import LoadError, load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.lora_files import load_sdxl_lora
from minsdxl.sampling import SAMPLERS
from minsdxl.tiny import write_tiny_pipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", help="single .safetensors file, diffusers folder or Hub repo id")
    a("--pretrained_vae_model_name_or_path", help="another VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    a("--variant", help="diffusers weight variant, e.g. fp16")
    a("--prompt", action="append", help="repeatable: one set of images per prompt")
    a("--negative_prompt", default="", help="the same for every prompt; empty = SDXL's zero conditioning")
    a("--lora", action="append", default=[], metavar="PATH[:SCALE]",
      help="a LoRA file and its strength (1.0 without :SCALE); repeatable: several LoRAs are merged in turn")
    a("--merge_lora", action="store_true", help="fold the LoRA into the weights (faster steps)")
    a("--steps", type=int, default=30, help="sampler steps")
    a("--guidance_scale", type=float, default=5.0, help="classifier-free guidance; 1 = no guidance")
    a("--sampler", choices=SAMPLERS, default="euler", help="see minsdxl/sampling.py")
    a("--karras", action="store_true", help="Karras sigma spacing (euler, euler_a, dpmpp_2m)")
    a("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon",
      help="what the UNet was trained to predict: SDXL base the noise, v-prediction fine-tunes v")
    a("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    a("--width", type=int, default=1024, help="pixels, a multiple of 8")
    a("--height", type=int, default=1024, help="pixels, a multiple of 8")
    a("--num_images", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    a("--output_dir", default="samples", help="where the PNGs go")
    a("--device", help="cuda when available, else cpu")
    a("--dtype", choices=DTYPES, help="UNet and text encoders; bf16 (fp16 without bf16) on CUDA, fp32 on CPU")
    a("--vae_dtype", choices=DTYPES, default="fp32", help="the SDXL VAE overflows to NaN in fp16; fp32 and bf16 are safe")
    a("--vae_tiling", action="store_true", help="decode in overlapping tiles (large images)")
    a("--fp8_base", action="store_true",
      help="store the UNet's Linear/Conv weights in float8 (e4m3), upcast per layer: about half the weight memory; "
           "a --lora stays a separate layer (one, not merged)")
    a("--channels_last", action=argparse.BooleanOptionalAction, default=True,
      help="the UNet's convolutions in channels-last (NHWC) layout, faster on this project's devices (docs/performance.md)")
    a("--compile", action="store_true",
      help="torch.compile the UNet's repeated blocks (minsdxl/compile.py); says so and runs eager if no compiler works")
    a("--lowvram", action="store_true",
      help="keep models on the CPU; move each stage to the GPU only while it runs (8-12 GB cards)")
    a("--compare", action="store_true",
      help="also generate without the LoRAs (same prompts and seeds) and save a side-by-side grid")
    a("--demo", action="store_true",
      help="a tiny random SDXL on the CPU, no download; flags you give still apply")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `args._explicit` holds the flags that were given, which --demo leaves alone."""
    args = build_parser().parse_args(argv)
    args._explicit = given_flags(build_parser, argv)
    return args


def apply_demo_defaults(args: argparse.Namespace) -> None:
    """--demo: the tiny random SDXL of minsdxl/tiny.py, small images and few steps, on the CPU; each
    setting only where its flag was not given."""
    if not args.pretrained_model_name_or_path:
        args.pretrained_model_name_or_path = str(write_tiny_pipeline(Path(args.output_dir) / "tiny-sdxl"))
    args.prompt = args.prompt or ["a red circle on a blue square"]
    for key, value in dict(width=64, height=64, steps=10, device="cpu").items():
        if key not in getattr(args, "_explicit", set()):
            setattr(args, key, value)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """'file.safetensors:0.8' -> (Path, 0.8); without ':SCALE' the scale is 1.0. A path may contain ':'
    (C:\\...), so only a last part that parses as a number is a scale."""
    path, _, tail = spec.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        path, scale = spec, 1.0
    if not path:
        path, scale = spec, 1.0
    if not Path(path).is_file():
        raise SystemExit(f"sample.py: error: --lora {spec}: no such file '{path}'")
    return Path(path), scale


def check_args(args: argparse.Namespace) -> None:
    def fail(msg):
        raise SystemExit(f"sample.py: error: {msg}")
    if not args.pretrained_model_name_or_path:
        fail("--pretrained_model_name_or_path is required (or --demo for a tiny random model)")
    if not args.prompt:
        fail("--prompt is required")
    if args.width % 8 or args.height % 8:
        fail(f"--width {args.width} and --height {args.height} must be multiples of 8 (the VAE's factor)")
    if args.compare and not args.lora:
        fail("--compare compares the base model with LoRAs: give at least one --lora")
    if args.steps < 1 or args.num_images < 1:
        fail("--steps and --num_images must be at least 1")
    if args.fp8_base and (args.merge_lora or len(args.lora) > 1):
        fail("--fp8_base keeps the LoRA as a separate layer over the float8 weights, which cannot take a merge: "
             "give one --lora, without --merge_lora")


def pick_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # a T4 has no bf16
    return torch.float32  # bf16 matmuls are slow on most CPUs


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models:
    """All four parts; with --lowvram they stay on the CPU until their stage runs."""
    home = torch.device("cpu") if args.lowvram else device
    src = args.pretrained_model_name_or_path
    try:
        unet = load_unet(src, dtype=dtype, device="cpu" if args.fp8_base else home, variant=args.variant)
        if args.fp8_base:  # stored in float8 on the CPU, so the full-precision UNet never occupies the GPU
            print(f"fp8 base: {quantize_fp8(unet, dtype)}")
            unet.to(home)
        text_encoders = load_text_encoders(src, dtype=dtype, device=home, variant=args.variant)
        tokenizers = load_tokenizers(src)
        vae = load_vae(args.pretrained_vae_model_name_or_path or src, dtype=DTYPES[args.vae_dtype], device=home)
    except LoadError as e:
        raise SystemExit(f"sample.py: error: {e}") from None
    return Models(unet.eval(), vae.eval(), text_encoders, tokenizers)


def apply_loras(models: Models, specs: list[tuple[Path, float]], merge: bool) -> None:
    """Load each LoRA file into the UNet (and text encoders) at its strength. LoRA/LoCon/DoRA stay
    separate layers for one file unless `merge`; LoHa, LoKr and the other weight-change kinds are baked
    when loaded; with several files each is baked in turn, so they add up."""
    parts = [models.unet, *models.text_encoders]
    for path, scale in specs:
        try:
            report = load_sdxl_lora(models.unet, path, text_encoders=models.text_encoders, strength=scale, strict=True)
        except (ValueError, LoadError) as e:  # lora.LoRAError is a ValueError; so is DoRA over --fp8_base weights
            said = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"  # the path once
            raise SystemExit(f"sample.py: error: --lora {said}") from None
        if report.layers and not report.baked and all(not layer.lora_up.weight.any() for layer in report.layers):
            print(f"warning: {path} changes nothing: every up matrix is zero (saved before any training step?)")
        print(f"LoRA {report}")
        if merge or len(specs) > 1:
            for m in parts:
                lora.bake(m)


# Our sampler names as AUTOMATIC1111's web UI writes them, so its "PNG Info" tab and other tools read our PNGs.
A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}


def a1111_parameters(info: dict) -> str:
    """The `parameters` text chunk in A1111's layout: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    fields = {"Steps": info["steps"], "Sampler": A1111_SAMPLERS[info["sampler"]],
              "Schedule type": "Karras" if info["karras"] else "Automatic", "CFG scale": info["guidance_scale"],
              "Seed": info["seed"], "Size": f"{info['width']}x{info['height']}", "Model": Path(info["model"]).name}
    if info["lora"]:
        fields["Lora"] = " ".join(info["lora"])
    lines = [info["prompt"]]
    if info["negative_prompt"]:
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_image(image: Image.Image, path: Path, info: dict) -> None:
    """PNG with its generation settings: A1111's `parameters` chunk and all of ours as JSON in `minsdxl`
    (readable with `PIL.Image.open(path).text`)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", a1111_parameters(info))
    meta.add_text("minsdxl", json.dumps(info))
    image.save(path, pnginfo=meta)


def main(args: argparse.Namespace) -> dict:
    """Generate; returns {"images": [paths], "grid": path or None}."""
    if args.demo:
        apply_demo_defaults(args)
    check_args(args)
    specs = [parse_lora_spec(s) for s in args.lora]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = pick_dtype(args, device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(args, device, dtype)
    if args.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if args.compile:
        compile_repeated_blocks(models.unet, device=device)
    settings = dict(steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, karras=args.karras,
                    width=args.width, height=args.height, device=device, dtype=dtype, lowvram=args.lowvram,
                    vae_tiling=args.vae_tiling, prediction_type=args.prediction_type)
    jobs = [(p_i, prompt, args.seed + i) for p_i, prompt in enumerate(args.prompt) for i in range(args.num_images)]

    def run_all(tag: str) -> tuple[list[Image.Image], list[Path]]:
        images, paths = [], []
        for p_i, prompt, seed in jobs:
            try:
                image = generate(models, [prompt], [args.negative_prompt], seed=seed, **settings)[0]
            except GenerationError as e:
                raise SystemExit(f"sample.py: error: {e}") from None
            path = out / f"{tag}{p_i:02d}_seed{seed}.png"
            info = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                    "lora": [f"{p.name}:{s:g}" for p, s in specs] if tag != "base_" else [],
                    "model": args.pretrained_model_name_or_path,
                    **{k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}}
            save_image(image, path, info)
            images.append(image)
            paths.append(path)
        return images, paths

    # 1. Without LoRAs, only for --compare
    base_images, base_paths = run_all("base_") if args.compare else ([], [])
    # 2. With the LoRAs (or the base model alone when none is given)
    apply_loras(models, specs, args.merge_lora)
    images, paths = run_all("")
    grid_path = None
    if args.compare:
        loras = ", ".join(f"{p.name}:{s:g}" for p, s in specs)
        rows = [f"seed {seed}: {prompt}" for _, prompt, seed in jobs]
        grid_path = out / "compare.png"
        compare_grid(base_images, images, rows, ("base", f"+ {loras}")).save(grid_path)
    for p in [*base_paths, *paths, *([grid_path] if grid_path else [])]:
        print(f"wrote {p}")
    return {"images": paths, "base_images": base_paths, "grid": grid_path}


if __name__ == "__main__":
    main(parse_args())
