r"""sample.py: generate SDXL images with the base model, the refiner and LoRAs; text or image to image.

    python sample.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --prompt "a photo of a corgi" --lora out/pytorch_lora_weights.safetensors:0.8 --compare
    python sample.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --refiner_start 0.8 --prompt "a lighthouse at dusk"
    python sample.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --init_image sketch.png --strength 0.6 --prompt "a watercolour of a harbour"

Any source `minsdxl.load_unet` accepts works (single file, diffusers folder, Hub id); `--lora`
takes the LoRA files people share (kohya, LyCORIS LoCon/LoHa/LoKr/DoRA, diffusers; see docs/lora.md),
repeatable, each with an optional `:STRENGTH`, which means what it means in ComfyUI and A1111; LoRAs
apply to the base model. Image i of a prompt uses seed `--seed + i`, so any one image can be made again alone.
`--refiner` takes over the base's latents at `--refiner_start` (0.8: the last 20% of the schedule), as
diffusers' ensemble of experts does; `--refiner_start 0` refines the finished image instead (image to
image at `--strength`). `--init_image` starts from a picture (image to image with the base).
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
from PIL import Image, PngImagePlugin, UnidentifiedImageError

import lora
from minsdxl.cli import HelpFormatter, given_flags
from minsdxl.compile import compile_repeated_blocks
from minsdxl.fp8 import quantize_fp8
from minsdxl.generate import GenerationError, Models, compare_grid, generate, image_to_tensor
from minsdxl.loading import LoadError, check_text_encoders, load_text_encoders, load_tokenizers, load_unet, load_vae
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
    a("--refiner", metavar="PATH",
      help="the SDXL refiner (single file, diffusers folder or Hub id, e.g. stabilityai/stable-diffusion-xl-refiner-1.0): "
           "it finishes what the base started")
    a("--refiner_start", type=float, default=0.8,
      help="the share of the schedule the base runs before the refiner takes over (diffusers' denoising_end / "
           "denoising_start); 0: the base finishes, then the refiner re-runs the last --strength of the schedule")
    a("--aesthetic_score", type=float, default=6.0, help="the refiner's aesthetic conditioning for the prompt")
    a("--negative_aesthetic_score", type=float, default=2.5, help="the refiner's aesthetic conditioning for the negative prompt")
    a("--init_image", metavar="IMG",
      help="image to image: start from this picture, at its size (rounded down to multiples of 8) unless --width/--height are given")
    a("--strength", type=float, default=0.3,
      help="the share of the schedule image to image re-runs: near 0 keeps the picture, 1 keeps only its colours' "
           "trace; for --init_image, and for the refiner's pass with --refiner_start 0")
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
    given = getattr(args, "_explicit", set())
    if not args.refiner:
        for flag in ("refiner_start", "aesthetic_score", "negative_aesthetic_score"):
            if flag in given:
                fail(f"--{flag} is for the refiner: give --refiner PATH too")
    if not 0 <= args.refiner_start < 1:
        fail(f"--refiner_start {args.refiner_start} must be in [0, 1): the share of the schedule the base runs")
    if "strength" in given and not args.init_image and not (args.refiner and args.refiner_start == 0):
        fail("--strength is for image to image: give --init_image, or --refiner with --refiner_start 0")
    if not 0 < args.strength <= 1:
        fail(f"--strength {args.strength} must be in (0, 1]: the share of the schedule image to image re-runs")
    if args.init_image and not Path(args.init_image).is_file():
        fail(f"--init_image {args.init_image}: no such file")


def pick_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # a T4 has no bf16
    return torch.float32  # bf16 matmuls are slow on most CPUs


def _load_unet(args: argparse.Namespace, source: str, expect: str, home: torch.device, dtype: torch.dtype):
    unet = load_unet(source, dtype=dtype, device="cpu" if args.fp8_base else home, variant=args.variant, expect=expect)
    if args.fp8_base:  # stored in float8 on the CPU, so the full-precision UNet never occupies the GPU
        print(f"fp8 {expect}: {quantize_fp8(unet, dtype)}")
        unet.to(home)
    return unet.eval()


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models:
    """All four parts; with --lowvram they stay on the CPU until their stage runs."""
    home = torch.device("cpu") if args.lowvram else device
    src = args.pretrained_model_name_or_path
    try:
        unet = _load_unet(args, src, "base", home, dtype)
        text_encoders = load_text_encoders(src, dtype=dtype, device=home, variant=args.variant)
        check_text_encoders(unet, text_encoders, src)
        tokenizers = load_tokenizers(src)
        vae = load_vae(args.pretrained_vae_model_name_or_path or src, dtype=DTYPES[args.vae_dtype], device=home)
    except LoadError as e:
        raise SystemExit(f"sample.py: error: --pretrained_model_name_or_path: {e}") from None
    return Models(unet, vae.eval(), text_encoders, tokenizers)


def load_refiner(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Models | None:
    """The refiner's UNet, text encoder and tokenizer (it decodes with the base's VAE), or None without --refiner."""
    if not args.refiner:
        return None
    home = torch.device("cpu") if args.lowvram else device
    try:
        unet = _load_unet(args, args.refiner, "refiner", home, dtype)
        text_encoders = load_text_encoders(args.refiner, dtype=dtype, device=home, variant=args.variant)
        check_text_encoders(unet, text_encoders, args.refiner)
        tokenizers = load_tokenizers(args.refiner)
    except LoadError as e:
        raise SystemExit(f"sample.py: error: --refiner: {e}") from None
    return Models(unet, None, text_encoders, tokenizers)


def load_init_image(args: argparse.Namespace) -> torch.Tensor | None:
    """--init_image as (1, 3, H, W) in [-1, 1]: at its own size rounded down to multiples of 8 (as diffusers'
    img2img), or at --width x --height when given; resized with Lanczos, as diffusers resizes it."""
    if not args.init_image:
        return None
    from minsdxl.data import DataError, open_image  # (here: minsdxl.data imports `datasets`, which nothing else here needs)
    try:
        image = open_image(Path(args.init_image).read_bytes())
    except (OSError, UnidentifiedImageError, DataError) as e:
        raise SystemExit(f"sample.py: error: --init_image {args.init_image}: not an image PIL can read ({e})") from None
    w, h = image.size
    given = getattr(args, "_explicit", set())
    width, height = (args.width if "width" in given else w - w % 8), (args.height if "height" in given else h - h % 8)
    if width < 8 or height < 8:
        raise SystemExit(f"sample.py: error: --init_image {args.init_image}: {w}x{h} pixels is too small (8x8 at least)")
    if (width, height) != image.size:
        image = image.resize((width, height), Image.LANCZOS)
    return image_to_tensor(image)


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


def generation_settings(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, image_to_image: bool,
                        with_refiner: bool) -> dict:
    """generate()'s settings from the flags, those of image to image and the refiner only where they apply
    (so that the PNG records what ran)."""
    settings = dict(steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, karras=args.karras,
                    width=args.width, height=args.height, device=device, dtype=dtype, lowvram=args.lowvram,
                    vae_tiling=args.vae_tiling, prediction_type=args.prediction_type)
    if image_to_image or (with_refiner and args.refiner_start == 0):
        settings["strength"] = args.strength
    if with_refiner:
        settings.update(refiner_start=args.refiner_start, aesthetic_score=args.aesthetic_score,
                        negative_aesthetic_score=args.negative_aesthetic_score)
    return settings


# Our sampler names as AUTOMATIC1111's web UI writes them, so its "PNG Info" tab and other tools read our PNGs.
A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}


def a1111_parameters(info: dict) -> str:
    """The `parameters` text chunk in A1111's layout: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    fields = {"Steps": info["steps"], "Sampler": A1111_SAMPLERS[info["sampler"]],
              "Schedule type": "Karras" if info["karras"] else "Automatic", "CFG scale": info["guidance_scale"],
              "Seed": info["seed"], "Size": f"{info['width']}x{info['height']}", "Model": Path(info["model"]).name}
    if info.get("init_image"):
        fields["Denoising strength"] = info["strength"]
    if info.get("refiner"):
        fields["Refiner"] = Path(info["refiner"]).name
        fields["Refiner switch at"] = info["refiner_start"]
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
    init_image = load_init_image(args)
    if init_image is not None:
        args.height, args.width = init_image.shape[-2:]
    models = load_models(args, device, dtype)
    refiner = load_refiner(args, device, dtype)
    for unet in [models.unet] + ([refiner.unet] if refiner else []):
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
        if args.compile:
            compile_repeated_blocks(unet, device=device)
    settings = generation_settings(args, device, dtype, init_image is not None, refiner is not None)
    # What the PNG records besides `settings` (paths, not the models and the image themselves)
    sources = {"model": args.pretrained_model_name_or_path, "refiner": args.refiner, "init_image": args.init_image}
    jobs = [(p_i, prompt, args.seed + i) for p_i, prompt in enumerate(args.prompt) for i in range(args.num_images)]

    def run_all(tag: str) -> tuple[list[Image.Image], list[Path]]:
        images, paths = [], []
        for p_i, prompt, seed in jobs:
            try:
                image = generate(models, [prompt], [args.negative_prompt], seed=seed, init_image=init_image,
                                 refiner=refiner, **settings)[0]
            except GenerationError as e:
                raise SystemExit(f"sample.py: error: {e}") from None
            path = out / f"{tag}{p_i:02d}_seed{seed}.png"
            info = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                    "lora": [f"{p.name}:{s:g}" for p, s in specs] if tag != "base_" else [],
                    **{k: v for k, v in sources.items() if v},
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
