"""Benchmark: loading the UNet with minsdxl.load_unet against diffusers, same files, one run.

Writes (once, cached under bench/cache/) a random checkpoint of the chosen config in Stability's
single-file layout (SGM names, fp16, as the official release) and as a diffusers UNet folder (fp16),
then loads each to `--dtype` with ours and with diffusers' `UNet2DConditionModel.from_single_file`
/ `from_pretrained`, each load in a fresh subprocess (no Python state is shared), alternating. Before
each load the file is read through (the page cache is warm for both sides) and the bench pauses
`--settle` seconds (neither side runs while the system still reclaims what the previous one freed).
Reports wall time and peak RSS growth (the kernel's high-water mark) as ratios. With `--device cuda`
each side loads onto the GPU (ours straight from the file, diffusers' model then `.to(device)`), and
the child also reports the GPU's peak allocated bytes.

    python bench/load.py --config base --dtype bf16 --repeats 5
    python bench/load.py --config refiner --dtype bf16 --repeats 2    # the SDXL refiner's UNet
    python bench/load.py --config base --dtype bf16 --device cuda --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_checkpoints(config: str, cache: Path, device: str = "cpu") -> tuple[Path, Path]:
    """The random UNet as a single file and as a diffusers folder (written once; `device` draws the weights)."""
    import torch
    from safetensors.torch import save_file

    from bench.common import random_init_
    from minsdxl import UNet, UNetConfig, convert

    single, folder = cache / f"{config}_single_fp16.safetensors", cache / f"{config}_diffusers"
    if single.is_file() and (folder / "unet/diffusion_pytorch_model.safetensors").is_file():
        return single, folder
    cfg = {"base": UNetConfig.sdxl_base, "refiner": UNetConfig.sdxl_refiner, "tiny": UNetConfig.tiny}[config]()
    with torch.device("meta"):
        model = UNet(cfg)
    model = random_init_(model.half().to_empty(device=device), seed=0)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet/config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    save_file(sd, str(folder / "unet/diffusion_pytorch_model.safetensors"))
    save_file({convert.SGM_UNET_PREFIX + k: v for k, v in convert.unet_diffusers_to_sgm(sd).items()}, str(single))
    return single, folder


def read_through(path: Path) -> None:
    """Read the file once so that it is in the page cache: the other layout's file and the previous
    load's 10 GB can push part of it out on a 24 GB machine, and a load from disk is not what we time."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * 2**20)
        while f.readinto(buf):
            pass


def child(side: str, layout: str, path: str, folder: str, dtype: str, device: str = "cpu") -> None:
    """Runs in a subprocess: one load, prints JSON {seconds, peak_rss, peak_vram (CUDA), ...}."""
    import torch

    from bench.common import PeakMemory, sync

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        import diffusers  # import cost outside the timed region, for both sides (the same process state)
    except ImportError:
        if side == "reference":
            raise
    import minsdxl.loading  # noqa: F401
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context: start-up cost, not loading
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        if side == "ours":
            model = minsdxl.loading.load_unet(path if layout == "single" else folder, dtype=dt, device=device, expect="any")
        elif layout == "single":
            model = diffusers.UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet", torch_dtype=dt)
        else:
            model = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dt)
        model = model.to(device)  # ours is there already
        sync(device)
        seconds = time.perf_counter() - start
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vram = {"peak_vram": torch.cuda.max_memory_allocated(device)} if cuda else {}
    print(json.dumps({"seconds": seconds, "peak_rss": mem.peak, "model_bytes": nbytes,
                      "dtype": str(next(model.parameters()).dtype), **vram}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "base", "refiner"], default="base")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the UNet goes: cpu, or cuda (each side's peak VRAM too)")
    p.add_argument("--cache", default=str(ROOT / "bench/cache"))
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait before each load: the memory the previous load freed is handed back to a "
                        "VM's host in the background, which takes CPU time from whichever load runs next")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, layout, path, folder = args.child
        return child(side, layout, path, folder, args.dtype, args.device)

    single, folder = write_checkpoints(args.config, Path(args.cache))
    from bench.common import print_table
    results = {}
    for _ in range(args.repeats):
        for layout in ("single", "folder"):
            for side in ("reference", "ours"):
                read_through(single if layout == "single" else folder / "unet/diffusion_pytorch_model.safetensors")
                time.sleep(args.settle)
                out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--device", args.device,
                                      "--child", side, layout, str(single), str(folder)],
                                     capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode:
                    sys.exit(f"{side} {layout} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((side, layout), []).append(r)
    rows = []
    for layout, label in (("single", "single file (SGM, fp16)"), ("folder", "diffusers folder (fp16)")):
        ref, ours = results[("reference", layout)], results[("ours", layout)]
        rows.append((f"{label}: time", min(r["seconds"] for r in ref), min(r["seconds"] for r in ours), "s"))
        rows.append((f"{label}: peak RSS", max(r["peak_rss"] for r in ref), max(r["peak_rss"] for r in ours), "bytes"))
    model_bytes = results[("ours", "single")][0]["model_bytes"]
    print_table(f"UNet {args.config} loaded to {args.dtype} on {args.device}, best of {args.repeats} (time) / worst (memory)", rows)
    for layout in ("single", "folder"):
        ref, ours = (sorted(r["seconds"] for r in results[(side, layout)]) for side in ("reference", "ours"))
        print(f"{layout}: every time, reference {', '.join(f'{t:.2f}' for t in ref)} s; ours {', '.join(f'{t:.2f}' for t in ours)} s; "
              f"median ratio {statistics.median(ours) / statistics.median(ref):.3f}")
    worst = max(r["peak_rss"] for (side, _), rs in results.items() if side == "ours" for r in rs)
    print(f"ours: peak RSS / model bytes = {worst / model_bytes:.3f} (model {model_bytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
