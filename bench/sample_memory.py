"""Benchmark: the memory simulator's prediction of sample.py against what CUDA measures, phase by phase.

    python bench/sample_memory.py --device cuda                          # SDXL base + refiner, 1024x1024, bf16
    python bench/sample_memory.py --device cuda --lowvram --init_image   # one stage at a time on the GPU; image to image
    python bench/sample_memory.py --config tiny --device cpu             # dry run: the tiny models, predictions only

The prediction is `python -m minsdxl.memory sample` for the same flags (minsdxl.memory.simulate_sample,
on meta). The measurement runs minsdxl.generate on the device with models laid out as sample.py loads
them (random weights: memory does not depend on the values; the refiner with its own text encoder),
and records torch.cuda.max_memory_allocated in each phase (the CUDA context is in neither figure; the
prediction's cuBLAS workspace line is, as the allocator hands it out). On the CPU there is nothing to
measure per phase: the dry run prints the prediction and checks that the code path runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import device_name, random_init_  # noqa: E402
from minsdxl import UNet, UNetConfig, memory  # noqa: E402
from minsdxl.generate import Models, generate  # noqa: E402
from minsdxl.tiny import write_tiny_pipeline  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFINER_HUB_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"  # (not fetched: the simulator takes its configs)


class CudaPhases:
    """The meter generate() marks its stages with: max_memory_allocated within each phase."""

    def __init__(self, device: torch.device):
        self.device, self.peaks = device, {}

    @contextlib.contextmanager
    def phase(self, name: str):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))


def full_size_models(device: torch.device, dtype: torch.dtype, home: torch.device) -> tuple[Models, Models]:
    """SDXL base and refiner with random weights, as sample.py holds them: the refiner has its own text encoder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from minsdxl.loading import CLIP_TOKENIZER_DIR, SDXL_VAE_CONFIG, sdxl_text_encoder_configs
    clip_l, clip_g = sdxl_text_encoder_configs()

    def unet(cfg: UNetConfig, seed: int):
        with torch.device("meta"):
            model = UNet(cfg)
        return random_init_(model.to_empty(device=device), seed).to(dtype).eval().to(home)

    def on_device(model, seed: int, dtype=dtype):
        with torch.device(device):
            return torch.nn.Module.to(random_init_(model(), seed), dtype).eval().to(home)  # (no diffusers .to warning)

    tok_l = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    tok_g = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!")
    vae = on_device(lambda: AutoencoderKL.from_config(SDXL_VAE_CONFIG), 3, torch.float32)  # sample.py's --vae_dtype fp32
    base = Models(unet(UNetConfig.sdxl_base(), 0), vae,
                  (on_device(lambda: CLIPTextModel(clip_l), 1), on_device(lambda: CLIPTextModelWithProjection(clip_g), 2)),
                  (tok_l, tok_g))
    refiner = Models(unet(UNetConfig.sdxl_refiner(), 4), None,
                     (on_device(lambda: CLIPTextModelWithProjection(clip_g), 5),), (tok_g,))
    return base, refiner


def tiny_models(tmp: str, device: torch.device, dtype: torch.dtype, home: torch.device) -> tuple[str, str, Models, Models]:
    import sample
    base_dir = str(write_tiny_pipeline(os.path.join(tmp, "tiny")))
    refiner_dir = str(write_tiny_pipeline(os.path.join(tmp, "tiny-refiner"), refiner=True))
    args = sample.parse_args(["--pretrained_model_name_or_path", base_dir, "--refiner", refiner_dir, "--prompt", "x",
                              "--device", str(device), "--dtype", {v: k for k, v in DTYPES.items()}[dtype]]
                             + (["--lowvram"] if home != device else []))
    return base_dir, refiner_dir, sample.load_models(args, device, dtype), sample.load_refiner(args, device, dtype)


def main(args) -> None:
    import sample
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    home = torch.device("cpu") if args.lowvram else device
    with tempfile.TemporaryDirectory() as tmp:
        if args.config == "tiny":
            base_dir, refiner_dir, base, refiner = tiny_models(tmp, device, dtype, home)
        else:
            base_dir, refiner_dir = None, REFINER_HUB_ID
            base, refiner = full_size_models(device, dtype, home)
        flags = ["--refiner", refiner_dir, "--prompt", "a photo of a corgi", "--negative_prompt", "blurry",
                 "--width", str(args.size), "--height", str(args.size), "--dtype", args.dtype, "--device", args.device,
                 "--steps", "2", "--refiner_start", "0.5", "--output_dir", tmp]
        flags += ["--pretrained_model_name_or_path", base_dir] if base_dir else []
        flags += ["--lowvram"] if args.lowvram else []
        init_image = None
        if args.init_image:
            Image.new("RGB", (args.size, args.size), (120, 90, 200)).save(os.path.join(tmp, "init.png"))
            flags += ["--init_image", os.path.join(tmp, "init.png"), "--strength", "1.0"]
            init_image = torch.zeros(1, 3, args.size, args.size)
        plan = memory.simulate_sample(sample.parse_args(flags), device.type)
        measured = None
        if device.type == "cuda":
            meter = CudaPhases(device)
            for _ in range(2):  # the first image pays one-time set-up (cuBLAS handles, kernel selection)
                meter.peaks.clear()
                generate(base, ["a photo of a corgi"], ["blurry"], steps=2, width=args.size, height=args.size,
                         device=device, dtype=dtype, lowvram=args.lowvram, init_image=init_image, strength=1.0,
                         refiner=refiner, refiner_start=0.5, meter=meter)
            measured = meter.peaks
    print(f"sample.py memory, {args.config}, {args.size}x{args.size}, {args.dtype}, base + refiner"
          f"{', lowvram' if args.lowvram else ''}{', image to image' if args.init_image else ''}, {device_name(device)}")
    print(f"{'phase':<18} {'predicted MiB':>14} {'measured MiB':>13} {'measured/predicted':>19}")
    workspace = sum(b for what, b, _ in plan.extras if what == "cuBLAS workspace")
    for p in plan.phases:
        if p.name == "load":
            continue  # the weights before any stage: measured as part of every phase
        predicted = p.peak + workspace
        got = measured.get(p.name) if measured else None
        print(f"{p.name:<18} {predicted / 2**20:>14,.1f} {got / 2**20 if got else float('nan'):>13,.1f} "
              f"{got / predicted if got else float('nan'):>19.3f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "full"], default="full")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; tiny: 64)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lowvram", action="store_true")
    p.add_argument("--init_image", action="store_true", help="image to image (the VAE encoder's phase too)")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.config == "tiny" else 1024)
    args.dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    return args


if __name__ == "__main__":
    main(parse_args())
