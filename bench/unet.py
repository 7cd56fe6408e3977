"""Benchmark: our UNet against diffusers' UNet2DConditionModel, same weights, same inputs, one run.

Measures forward time, forward+backward time (base weights frozen, the input latents requiring
grad, as in LoRA training), and peak activation memory of forward+backward (CPU: peak RSS above
the level before the step, each side in its own subprocess so one cannot hide the other's peak;
CUDA: torch.cuda.max_memory_allocated above the weights). Prints ours/reference ratios.

    python bench/unet.py --config base --latent 32 --dtype fp32 --repeats 3
    python bench/unet.py --config base --latent 32 --checkpointing
    python bench/unet.py --config base --latent 128 --dtype bf16 --device cuda --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PeakMemory, device_name, print_table, random_init_, run_child, time_alternating  # noqa: E402
from minsdxl import UNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(side: str, cfg: UNetConfig, dtype, device, checkpointing: bool, weights=None):
    """One side's model; `weights` (a state dict) makes it share the other side's tensors."""
    with torch.device("meta"):
        if side == "reference":
            from diffusers import UNet2DConditionModel  # a few seconds of imports that our side does not need
            model = UNet2DConditionModel(**cfg.to_diffusers_config())
        else:
            model = UNet(cfg)
    if weights is None:  # filled where it runs, in its dtype: no fp32 copy of the 2.6B weights on the way
        model = random_init_(model.to(dtype).to_empty(device=device), seed=0)
    else:
        model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if checkpointing:
        model.enable_gradient_checkpointing() if side == "reference" else model.set_gradient_checkpointing(True)
    return model


def make_inputs(cfg: UNetConfig, batch: int, latent: int, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.tensor([999, 500, 17, 250][:batch] * (batch // 4 + 1))[:batch].to(device)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(batch, cfg.pooled_text_dim, generator=g).to(device, dtype)
    size = latent * 8.0
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch, device=device, dtype=dtype)
    return x, t, context, pooled, time_ids


def step_fns(side: str, model, inputs):
    """forward (no grad) and forward+backward closures for one side."""
    x, t, context, pooled, time_ids = inputs

    def run(latents):
        if side == "reference":
            return model(latents, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return model(latents, t, context, pooled, time_ids)

    def forward():
        with torch.no_grad():
            run(x)

    def forward_backward():
        latents = x.detach().requires_grad_(True)
        run(latents).float().square().mean().backward()

    return forward, forward_backward


def main(args):
    cfg = UNetConfig.sdxl_base() if args.config == "base" else UNetConfig.tiny()
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    torch.manual_seed(0)

    if args.memory_only:  # child process: one side, one step, print its peak
        model = build(args.memory_only, cfg, dtype, device, args.checkpointing)
        inputs = make_inputs(cfg, args.batch, args.latent, dtype, device)
        _, forward_backward = step_fns(args.memory_only, model, inputs)
        with PeakMemory(device) as mem:
            forward_backward()
        print(json.dumps({"peak": mem.peak}))
        return

    ref = build("reference", cfg, dtype, device, args.checkpointing)
    ours = build("ours", cfg, dtype, device, args.checkpointing, weights=ref.state_dict())
    inputs = make_inputs(cfg, args.batch, args.latent, dtype, device)
    ref_fwd, ref_fb = step_fns("reference", ref, inputs)
    our_fwd, our_fb = step_fns("ours", ours, inputs)

    fwd = time_alternating({"reference": ref_fwd, "ours": our_fwd}, args.repeats, device)
    fb = time_alternating({"reference": ref_fb, "ours": our_fb}, args.repeats, device)
    rows = [
        ("forward", fwd["reference"], fwd["ours"], "s"),
        ("forward+backward", fb["reference"], fb["ours"], "s"),
    ]
    if device.type == "cuda":
        peaks = {}
        for side, fn in (("reference", ref_fb), ("ours", our_fb)):
            with PeakMemory(device) as mem:
                fn()
            peaks[side] = mem.peak
    else:
        del ref, ours, ref_fwd, ref_fb, our_fwd, our_fb  # free the shared weights before the children run
        peaks = {side: run_child(__file__, "--memory-only", side, drop=("--memory-only",))["peak"] for side in ("reference", "ours")}
    rows.append(("fwd+bwd peak memory above weights", peaks["reference"], peaks["ours"], "bytes"))

    title = (f"UNet {args.config}, batch {args.batch}, latents {args.latent}x{args.latent}, {args.dtype}, "
             f"checkpointing {'on' if args.checkpointing else 'off'}, {args.repeats} repeats, {device_name(device)}")
    print_table(title, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "base"], default="tiny")
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-only", choices=["reference", "ours"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
