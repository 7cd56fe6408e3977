"""What is in a checkpoint: its components, tensor counts, parameters, dtypes and sizes, from the
safetensors headers alone (no tensor is read, so a 7 GB file takes milliseconds).

    python -m minsdxl.inspect sd_xl_base_1.0.safetensors      # the single file: UNet, 2 text encoders, VAE
    python -m minsdxl.inspect sd_xl_refiner_1.0.safetensors   # the refiner's: UNet, 1 text encoder, VAE
    python -m minsdxl.inspect path/to/diffusers/pipeline       # every .safetensors under a folder
    python -m minsdxl.inspect out/lora_kohya.safetensors       # a LoRA: format, modules, ranks

The component of a key is read from its name: the SGM ("original") single-file prefixes of
`minsdxl.convert`, the diffusers folder a file sits in, or the LoRA naming schemes of `lora.files`.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from .convert import SGM_REFINER_TE2_PREFIX, SGM_TE1_PREFIX, SGM_TE2_PREFIX, SGM_UNET_PREFIX, SGM_VAE_PREFIX
from .loading import LoadError, read_header

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}
SGM_COMPONENTS = [(SGM_UNET_PREFIX, "UNet (SGM names)"), (SGM_TE1_PREFIX, "text encoder 1, CLIP ViT-L (transformers names)"),
                  (SGM_TE2_PREFIX, "text encoder 2, OpenCLIP ViT-bigG (OpenCLIP names)"),
                  (SGM_REFINER_TE2_PREFIX, "text encoder (refiner), OpenCLIP bigG (OpenCLIP names)"),
                  (SGM_VAE_PREFIX, "VAE (SGM names)")]
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")


def component(key: str, folder: str) -> str:
    """The part of SDXL a tensor belongs to."""
    for prefix, name in SGM_COMPONENTS:
        if key.startswith(prefix):
            return name
    if key.endswith(LORA_SUFFIXES) or key.endswith((".alpha", ".dora_scale", ".lora_magnitude_vector")):
        kohya = key.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"))
        return f"LoRA, {'kohya' if kohya else 'diffusers/peft'} format, {key.split('_' if kohya else '.')[1 if kohya else 0]}"
    if folder:
        return f"{folder}/ (diffusers names)"
    if key.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.")):
        return "UNet (bare SGM names)"
    if key.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.")):
        return "UNet (diffusers names)"
    return "other"


def summarize(path: Path) -> list[tuple[str, int, int, dict[str, int], int]]:
    """[(component, tensors, parameters, {dtype: tensors}, bytes)] of one file."""
    header, _ = read_header(path)
    folder = path.parent.name if path.parent.name in ("unet", "vae", "text_encoder", "text_encoder_2") else ""
    groups: dict[str, list] = defaultdict(lambda: [0, 0, defaultdict(int), 0])
    for key, (dtype, shape) in header.items():
        g = groups[component(key, folder)]
        n = math.prod(shape)
        g[0] += 1
        g[1] += n
        g[2][dtype] += 1
        g[3] += n * BYTES.get(dtype, 0)
    return [(name, g[0], g[1], dict(g[2]), g[3]) for name, g in groups.items()]


def lora_ranks(path: Path) -> str:
    header, _ = read_header(path)
    ranks = sorted({shape[0] for key, (_, shape) in header.items() if key.endswith((".lora_down.weight", ".lora_A.weight"))})
    modules = sum(key.endswith((".lora_down.weight", ".lora_A.weight")) for key in header)
    return f"{modules} adapted modules, rank {', '.join(map(str, ranks))}" if modules else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a .safetensors file, or a folder to search for them")
    args = p.parse_args(argv)
    root = Path(args.path)
    files = sorted(root.rglob("*.safetensors")) if root.is_dir() else [root]
    if not files:
        raise SystemExit(f"inspect: no .safetensors files under {root}")
    for f in files:
        try:
            rows = summarize(f)
        except LoadError as e:
            raise SystemExit(f"inspect: {e}") from None
        print(f"{f}  ({f.stat().st_size / 2**20:,.1f} MiB)  {lora_ranks(f)}")
        for name, tensors, params, dtypes, nbytes in sorted(rows, key=lambda r: -r[2]):
            kinds = ", ".join(f"{d} x{c}" for d, c in sorted(dtypes.items()))
            print(f"  {name:<54} {tensors:>6} tensors {params:>15,} parameters {nbytes / 2**20:>10,.1f} MiB  {kinds}")


if __name__ == "__main__":
    main()
