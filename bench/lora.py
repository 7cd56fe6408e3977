"""Benchmark: our LoRA injector and layer against peft's, same model, same targets, one run.

1. Injection time on the full SDXL UNet built on the `meta` device (no weights: the walk, the
   matching and the adapter construction are what is timed), rank 16 on to_q/to_k/to_v/to_out.0:
   ours `lora.inject` vs peft's `inject_adapter_in_model(LoraConfig(...))`.
2. Forward+backward time of a UNet with adapters (base frozen, adapters trainable), ours vs peft,
   same adapter values, alternating repeats; printed as ratios ours/peft.

    python bench/lora.py --config tiny --latent 32 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
from bench.common import print_table, time_alternating  # noqa: E402
from minsdxl import UNet, UNetConfig  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def inject_times(repeats: int) -> tuple[float, float]:
    from peft import LoraConfig, inject_adapter_in_model
    ours, theirs = [], []
    for _ in range(repeats):
        with torch.device("meta"):
            a, b = UNet(UNetConfig.sdxl_base()), UNet(UNetConfig.sdxl_base())
        start = time.perf_counter()
        lora.inject(a, TARGETS, rank=16, alpha=32)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=True), b)
        theirs.append(time.perf_counter() - start)
    return min(theirs), min(ours)


def step_times(cfg: UNetConfig, latent: int, repeats: int) -> tuple[float, float]:
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    ours = UNet(cfg)
    theirs = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), copy.deepcopy(ours))
    theirs.requires_grad_(False)
    lora.inject(ours, TARGETS, rank=16, alpha=32)
    with torch.no_grad():  # same adapter values on both sides
        for path, layer in lora.lora_layers(ours).items():
            layer.lora_up.weight.normal_(0, 0.01)
            peft_layer = theirs.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_down.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_up.weight)
            peft_layer.lora_A["default"].weight.requires_grad_(True)
            peft_layer.lora_B["default"].weight.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_text_dim, generator=g)
    tid = torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, ctx, pooled, tid), theirs(x, 500, ctx, pooled, tid))

    def step(model):
        return lambda: model(x, 500, ctx, pooled, tid).square().mean().backward()

    t = time_alternating({"peft": step(theirs), "ours": step(ours)}, repeats)
    return t["peft"], t["ours"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "base"], default="tiny")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cfg = UNetConfig.sdxl_base() if args.config == "base" else UNetConfig.tiny()
    ref_inject, our_inject = inject_times(3)
    ref_step, our_step = step_times(cfg, args.latent, args.repeats)
    print_table(f"LoRA rank 16 on {', '.join(TARGETS)}; CPU ({torch.get_num_threads()} threads), fp32", [
        ("inject, full SDXL UNet (meta)", ref_inject, our_inject, "s"),
        (f"fwd+bwd, {args.config} UNet {args.latent}x{args.latent}", ref_step, our_step, "s"),
    ])


if __name__ == "__main__":
    main()
