"""Trace one forward pass of the UNet: every block in the order it runs, with shapes and conditioning.

    python -m minsdxl.trace                          # SDXL base at 1024x1024, on the meta device: no weights
    python -m minsdxl.trace --config sdxl_refiner    # the refiner: four levels, attention on the middle two
    python -m minsdxl.trace --config tiny --resolution 64
    python -m minsdxl.trace --markdown > table.md    # the table in docs/architecture.md

For the full model the pass runs on PyTorch's `meta` device: tensors have shapes and dtypes but no
data, so 2.6B parameters cost no memory and the trace takes about a second. Forward hooks on each
block record its input and output shapes; "conditioning" says what else enters the block: `emb`
(the time + size embedding, (B, 1280)) into every resnet, `context` (the text tokens, (B, 77, 2048))
into every transformer's cross-attention.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import UNetConfig
from .unet import Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, UNet, Upsample2D

LATENT_FACTOR = 8  # the VAE's spatial compression: 1024 px -> 128 latent positions


@dataclass
class Step:
    """One block call of the forward pass."""

    path: str
    kind: str
    input_shape: tuple
    output_shape: tuple
    params: int
    conditioning: str


def _conditioning(module: nn.Module, inputs: tuple) -> str:
    if isinstance(module, ResnetBlock2D):
        return f"emb {tuple(inputs[1].shape)} added after conv1"
    if isinstance(module, Transformer2DModel):
        B, C, H, W = inputs[0].shape
        depth = len(module.transformer_blocks)
        return (f"context {tuple(inputs[1].shape)} via cross-attention; {depth} block{'s' * (depth > 1)}, "
                f"{H * W} tokens (self-attention {H * W}x{H * W}, cross {H * W}x{inputs[1].shape[1]})")
    return ""


def trace(cfg: UNetConfig, resolution: int = 1024, batch: int = 1, device: str = "meta") -> list[Step]:
    """Run one forward pass of UNet(cfg) at `resolution` pixels and return its blocks in order."""
    with torch.device(device):
        unet = UNet(cfg).eval()
        side = resolution // LATENT_FACTOR
        x = torch.zeros(batch, cfg.in_channels, side, side)
        context = torch.zeros(batch, 77, cfg.cross_attention_dim)
        pooled = torch.zeros(batch, cfg.pooled_text_dim)
        time_ids = torch.zeros(batch, cfg.num_time_ids)  # 6 for the base, 5 for the refiner
    blocks = (TimestepEmbedding, ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D)
    steps: list[Step] = []
    hooks = []
    for path, module in unet.named_modules():
        top_level_layer = path in ("conv_in", "conv_norm_out", "conv_out")
        if isinstance(module, blocks) or top_level_layer:
            def record(m, inputs, output, path=path):
                params = sum(p.numel() for p in m.parameters())
                steps.append(Step(path, type(m).__name__, tuple(inputs[0].shape), tuple(output.shape), params,
                                  _conditioning(m, inputs)))
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        unet(x, torch.tensor([500.0] * batch, device=device), context, pooled, time_ids)
    for h in hooks:
        h.remove()
    return steps


def markdown(steps: list[Step]) -> str:
    rows = ["| # | block | type | input | output | parameters | conditioning |", "| ---: | --- | --- | --- | --- | ---: | --- |"]
    for i, s in enumerate(steps):
        shape = lambda t: "x".join(str(d) for d in t)
        rows.append(f"| {i} | `{s.path}` | {s.kind} | {shape(s.input_shape)} | {shape(s.output_shape)} | "
                    f"{s.params:,} | {s.conditioning} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sdxl_base", "sdxl_refiner", "tiny"], default="sdxl_base")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; tiny: 64)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    cfg = getattr(UNetConfig, args.config)()
    resolution = args.resolution or (64 if args.config == "tiny" else 1024)
    if resolution % LATENT_FACTOR or resolution <= 0:
        p.error(f"--resolution {resolution} must be a positive multiple of {LATENT_FACTOR} (the VAE's factor: one "
                f"latent position per {LATENT_FACTOR}x{LATENT_FACTOR} pixels)")
    # The tiny model runs for real on the CPU (it is small); the full one on the meta device.
    steps = trace(cfg, resolution, device="cpu" if args.config == "tiny" else "meta")
    if args.markdown:
        print(markdown(steps))
        return
    total = 0
    side = resolution // LATENT_FACTOR
    print(f"UNet {args.config} at {resolution}x{resolution} pixels = {side}x{side} latents, batch 1")
    down = 2 ** (len(cfg.block_out_channels) - 1)  # 2x per level but the last: SDXL's 3 levels, 128 -> 64 -> 32 (refiner: -> 16)
    if side % down:
        print(f"note: {side} latents is not a multiple of {down} ({LATENT_FACTOR * down} pixels): a "
              f"downsampler rounds an odd side up, and its upsampler resizes back to the skip's size")
    for i, s in enumerate(steps):
        total += s.params
        print(f"{i:3d} {s.path:<36} {s.kind:<20} {str(s.input_shape):<22} -> {str(s.output_shape):<22} "
              f"{s.params:>12,}  {s.conditioning}")
    print(f"total parameters {total:,}")


if __name__ == "__main__":
    main()
