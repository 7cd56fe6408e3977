"""A LoRA from the difference of two UNets, by truncated SVD per layer.

    python -m minsdxl.extract_lora --base stabilityai/stable-diffusion-xl-base-1.0 --tuned out/run/unet \\
        --rank 32 --conv_rank 8 --output_dir out/run-lora

For every Linear and Conv2d weight of the UNet's blocks (the layers kohya's networks.lora reads, our
--lora_targets all) the change ΔW = W_tuned - W_base, as a matrix (out, in·kh·kw), is factored by the
singular value decomposition ΔW = U S Vᵀ, and the r largest singular values are kept:

    up = U_r sqrt(S_r)   (out, r)          down = sqrt(S_r) V_rᵀ   (r, in·kh·kw) -> (r, in, kh, kw)
    up @ down = U_r S_r V_rᵀ, the closest rank-r matrix to ΔW (Eckart & Young 1936)

so a change of rank <= r is recovered exactly, and otherwise each layer keeps the fraction
Σ_{i<=r} s_i² / Σ s_i² of its change's energy (squared Frobenius norm), which is printed per layer.
1x1 convolutions take --rank like Linear layers; 3x3 convolutions only with --conv_rank (LoCon: a
3x3 down and a 1x1 up, as train.py's --conv_rank). alpha = rank, so the scale is 1. Layers that did not
change get no adapter. What a LoRA cannot hold is reported, not dropped silently: biases and norms,
and the layers outside the blocks (conv_in, conv_out, the time and size embeddings).

The result is written in both formats people exchange, as train.py writes its LoRAs
(minsdxl.lora_files.save_sdxl_lora): `lora_kohya.safetensors` (ComfyUI, A1111) and
`pytorch_lora_weights.safetensors` (diffusers' load_lora_weights); sample.py reads either.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import lora

from .loading import LoadError, load_unet
from .lora_files import LORA_TARGET_PRESETS, save_sdxl_lora
from .unet import UNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExtractionError(ValueError):
    """The two models cannot be compared (different architectures) or nothing can be extracted."""


@dataclass
class LayerResult:
    """One layer's extraction: its change's size and how much of it the kept rank holds."""

    path: str
    rank: int  # singular values kept (at most the layer's smaller side)
    kept: float  # Σ_{i<=rank} s_i² / Σ s_i²
    change_norm: float  # ||ΔW||_F


def in_blocks(path: str) -> bool:
    """A module inside the containers LORA_TARGET_PRESETS["all"] names (a matched container adapts all inside it)."""
    parts = path.split(".")
    return any(lora.matches(".".join(parts[:i]), LORA_TARGET_PRESETS["all"]) for i in range(1, len(parts) + 1))


def block_layers(unet: UNet, with_convs: bool) -> dict[str, nn.Module]:
    """{path: Linear/Conv2d} of the blocks (LORA_TARGET_PRESETS["all"]); 3x3 convs only `with_convs`."""
    out = {}
    for path, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not in_blocks(path):
            continue
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and not with_convs:
            continue
        out[path] = m
    return out


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, r), down (r, in·kh·kw), kept energy fraction) of `delta` (out, in, [kh, kw]) at rank r
    (r <= min(out, in·kh·kw); unused ranks are zero)."""
    matrix = delta.flatten(1).double()  # (out, in·kh·kw); SVD in fp64, so an exact rank-r change stays exact
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (out, m), (m,), (m, in·kh·kw)
    r = min(rank, S.numel())
    total = (S**2).sum().item()
    kept = (S[:r] ** 2).sum().item() / total if total > 0 else 1.0
    root = S[:r].sqrt()
    up = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    down = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    up[:, :r], down[:r] = U[:, :r] * root, root[:, None] * Vh[:r]  # balanced: neither factor holds all of S
    return up, down, kept


def extract(base: UNet, tuned: UNet, rank: int, conv_rank: int | None = None, log=print) -> tuple[list[LayerResult], dict]:
    """Put LoRA adapters holding the change from `base` to `tuned` into `base` (in place); returns each
    adapted layer's result, and what the adapters cannot hold ({what: ||change||_F})."""
    if base.config != tuned.config:
        raise ExtractionError(f"the two UNets differ in architecture: base {base.config}, tuned {tuned.config}")
    tuned_sd = tuned.state_dict()
    layers = block_layers(base, conv_rank is not None)
    deltas = {}
    for path, m in layers.items():
        delta = tuned_sd[f"{path}.weight"].float() - m.weight.float()
        if delta.abs().max() > 0:
            deltas[path] = delta
    if not deltas:
        raise ExtractionError("the tuned UNet's block weights equal the base's: there is no change to extract")
    # What a LoRA of these layers cannot hold: biases and norms, and weights outside the adapted layers.
    adapted = {f"{p}.weight" for p in deltas}
    left = {"biases and norms": 0.0, "layers outside the blocks (conv_in, conv_out, embeddings)": 0.0,
            "3x3 convs (pass --conv_rank)": 0.0}
    for name, value in base.state_dict().items():
        if name in adapted:
            continue
        d = (tuned_sd[name].float() - value.float()).norm().item() ** 2
        module = name.rsplit(".", 1)[0]
        if name.endswith(".bias") or not isinstance(base.get_submodule(module), (nn.Linear, nn.Conv2d)):
            left["biases and norms"] += d
        elif in_blocks(module):
            left["3x3 convs (pass --conv_rank)"] += d
        else:
            left["layers outside the blocks (conv_in, conv_out, embeddings)"] += d
    results = []
    lora.inject(base, list(deltas), rank=rank, conv_rank=conv_rank, dtype=torch.float32)  # alpha = rank: scale 1
    wrapped = lora.lora_layers(base)
    with torch.no_grad():
        for path, delta in deltas.items():
            layer = wrapped[path]
            up, down, kept = truncated_factors(delta, layer.rank)
            layer.lora_up.weight.copy_(up.reshape(layer.lora_up.weight.shape))
            layer.lora_down.weight.copy_(down.reshape(layer.lora_down.weight.shape))
            results.append(LayerResult(path, min(layer.rank, *delta.flatten(1).shape), kept, delta.norm().item()))
    return results, {k: v**0.5 for k, v in left.items() if v > 0}


def report(results: list[LayerResult], left: dict) -> str:
    """The per-layer table, worst kept fraction first, and the total."""
    lines = ["| layer | rank | change kept (energy) | ||ΔW|| |", "| --- | ---: | ---: | ---: |"]
    for r in sorted(results, key=lambda r: r.kept):
        lines.append(f"| {r.path} | {r.rank} | {r.kept:.4f} | {r.change_norm:.4g} |")
    total = sum(r.change_norm**2 for r in results)
    kept = sum(r.kept * r.change_norm**2 for r in results) / total
    lines.append(f"\n{len(results)} layers; of their change {kept:.4f} of the energy is kept")
    for what, norm in left.items():
        lines.append(f"not in the LoRA: {what}, ||change|| {norm:.4g} (the adapted layers' is {total**0.5:.4g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minsdxl.extract_lora", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the model that was fine-tuned: pipeline folder, repo id, single file")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (e.g. train.py --full_finetune's unet/ or .safetensors)")
    p.add_argument("--rank", type=int, default=32, help="rank of the Linear and 1x1 conv adapters")
    p.add_argument("--conv_rank", type=int, help="also the 3x3 convs, at this rank (LoCon)")
    p.add_argument("--output_dir", default="extracted-lora")
    p.add_argument("--save_dtype", choices=list(DTYPES), default="fp32", help="dtype of the LoRA files")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster at full size)")
    p.add_argument("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    args = p.parse_args(argv)
    if args.rank < 1 or (args.conv_rank is not None and args.conv_rank < 1):
        p.error("--rank and --conv_rank must be at least 1")
    try:
        base = load_unet(args.base, dtype=torch.float32, device=args.device, variant=args.variant)
        tuned = load_unet(args.tuned, dtype=torch.float32, device=args.device, variant=args.variant)
        results, left = extract(base, tuned, args.rank, args.conv_rank)
    except (LoadError, ExtractionError) as e:
        sys.exit(f"minsdxl.extract_lora: error: {e}")
    print(report(results, left))
    for layer in lora.lora_layers(base).values():  # (the adapters only: the base layers are not written)
        layer.lora_up.to(DTYPES[args.save_dtype])
        layer.lora_down.to(DTYPES[args.save_dtype])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"minsdxl.extracted_from": json.dumps({"base": str(args.base), "tuned": str(args.tuned)}),
                "minsdxl.kept_energy": json.dumps({r.path: round(r.kept, 6) for r in results})}
    info = {"output_name": out.name, "training_comment": f"extracted by SVD from {args.tuned} - {args.base}"}
    files = [save_sdxl_lora(base, out / "lora_kohya.safetensors", format="kohya", metadata=metadata, info=info),
             save_sdxl_lora(base, out / "pytorch_lora_weights.safetensors", format="diffusers", metadata=metadata)]
    print("wrote:\n  " + "\n  ".join(str(f) for f in files) + "\nfor ComfyUI / A1111 use lora_kohya.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
