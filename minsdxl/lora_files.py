"""SDXL LoRA files in the two formats people exchange, through the generic `lora` library.

    kohya (A1111, ComfyUI, sd-scripts): lora_unet_<SGM module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha
                                        lora_te1_<text encoder 1 path> / lora_te2_<text encoder 2 path>
    diffusers (pipe.load_lora_weights): unet.<diffusers module path>.lora_A.weight / .lora_B.weight
                                        text_encoder.<path> / text_encoder_2.<path>

Our UNet keeps diffusers' module names, so the diffusers format needs no renaming; the kohya format
needs the SGM names, which come from the one name table in minsdxl.convert. A LoRA whose names
do not fit the model is an error listing them: ComfyUI's "lora key not loaded" warning is how LoRAs
end up silently doing nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lora
from lora.files import apply, collect, parse, read_file, write

from . import convert
from .loading import text_encoder_module_name
from .config import UNetConfig
from .unet import UNet

# Which UNet modules get adapters: train.py's --lora_targets presets. "attn" is what diffusers' script
# trains (its `target_modules`); "all" reaches every Linear/Conv2d of the blocks (3x3 convs need a conv rank).
LORA_TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "self_attn": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
    "cross_attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "all": ["transformer_blocks", "proj_in", "proj_out", "resnets", "attentions", "downsamplers", "upsamplers"],
}
# --train_text_encoder: adapters on CLIP's attention projections, as diffusers' script puts them.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

PREFIXES = {  # component -> (kohya prefix, diffusers prefix)
    "unet": ("lora_unet_", "unet."),
    "text_encoder": ("lora_te1_", "text_encoder."),
    "text_encoder_2": ("lora_te2_", "text_encoder_2."),
}


def _parts(unet: UNet, text_encoders, fmt: str):
    """(component model, name_fn, prefix) for each component that is given."""
    kohya = fmt == "kohya"
    to_sgm = (lambda p: convert.diffusers_path_to_sgm(p, unet.config)) if kohya else None
    parts = [(unet, to_sgm, PREFIXES["unet"][0 if kohya else 1])]
    for name, model in zip(("text_encoder", "text_encoder_2"), text_encoders or ()):
        if model is not None:
            parts.append((model, text_encoder_module_name, PREFIXES[name][0 if kohya else 1]))
    return parts


def save_sdxl_lora(unet: UNet, path, format: str = "kohya", text_encoders=None, metadata: dict | None = None) -> Path:
    """Save the adapters of `unet` (and of the text encoders, if given) in `format` ("kohya" or "diffusers")."""
    if format not in ("kohya", "diffusers"):
        raise lora.LoRAError(f"format must be 'kohya' or 'diffusers', not '{format}'")
    tensors, adapters = {}, {}
    for model, name_fn, prefix in _parts(unet, text_encoders, format):
        if not lora.lora_layers(model):
            continue
        t, a = collect(model, "peft" if format == "diffusers" else "kohya", name_fn, prefix)
        tensors.update(t)
        adapters.update(a)
    if not tensors:
        raise lora.LoRAError("no LoRA layers in the UNet or text encoders: nothing to save")
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", **(metadata or {})}
    return write(path, tensors, adapters, "peft" if format == "diffusers" else "kohya", meta)


def load_sdxl_lora(unet: UNet, path, text_encoders=None, strict: bool = True) -> list[str]:
    """Load a kohya or diffusers SDXL LoRA (ours or from elsewhere) into `unet` and the text encoders.

    Creates the LoRA layers the file needs. Returns the keys that were not placed; with strict=True
    any key that fits no module is an error."""
    tensors, metadata = read_file(path)
    entries = parse(tensors, metadata)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in entries)
    fmt = "kohya" if kohya else "diffusers"
    unplaced = set(entries)
    for model, name_fn, prefix in _parts(unet, text_encoders, fmt):
        left = apply(model, entries, name_fn, strict=False, prefix=prefix, where=str(path))
        unplaced -= {k for k in entries if k.startswith(prefix)} - set(left)
    unplaced = sorted(unplaced)
    if unplaced and strict:
        te_hint = "" if text_encoders else " (pass text_encoders= to load text-encoder adapters)"
        raise lora.LoRAError(f"{path}: {len(unplaced)} of {len(entries)} adapters fit no SDXL module{te_hint}; "
                             f"first ten: {unplaced[:10]}. This LoRA may be for another model (SD 1.5, the refiner).")
    return unplaced


def adapter_table(rank: int = 16, conv_rank: int | None = None, cfg: UNetConfig | None = None) -> list[tuple[str, int, int]]:
    """[(preset, adapted modules, trainable parameters)] on SDXL base (built on the meta device)."""
    rows = []
    for name, targets in LORA_TARGET_PRESETS.items():
        with torch.device("meta"):
            unet = UNet(cfg or UNetConfig.sdxl_base())
        report = lora.inject(unet, targets, rank=rank, conv_rank=conv_rank)
        rows.append((name, report.wrapped, report.trainable_params))
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m minsdxl.lora_files --rank 16`: how many parameters each --lora_targets preset trains."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--conv_rank", type=int, help="also adapt 3x3 convs (LoCon) where a preset reaches them")
    args = p.parse_args(argv)
    print(f"| preset | patterns | adapted modules | trainable parameters (rank {args.rank}"
          f"{f', conv rank {args.conv_rank}' if args.conv_rank else ''}) |\n| --- | --- | ---: | ---: |")
    for name, modules, params in adapter_table(args.rank, args.conv_rank):
        print(f"| `{name}` | {', '.join(LORA_TARGET_PRESETS[name])} | {modules} | {params:,} |")


if __name__ == "__main__":
    main()
