"""Draw the SDXL UNet as an SVG from a trace of the code (docs/unet.svg).

    python docs/make_diagram.py            # writes docs/unet.svg

Every box is one block of `minsdxl.trace.trace(UNetConfig.sdxl_base(), 1024)`, in the order it runs:
down the left column (the down path), the mid block at the bottom, up the right column (the up path).
Each down-path output is pushed on the skip stack; the dashed lines show which up-path resnet pops it.
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minsdxl import UNetConfig  # noqa: E402
from minsdxl.trace import trace  # noqa: E402

BOX_W, BOX_H, GAP = 330, 26, 6
COLOURS = {"ResnetBlock2D": "#dbe8f7", "Transformer2DModel": "#fde2c8", "Downsample2D": "#e4e4e4",
           "Upsample2D": "#e4e4e4", "Conv2d": "#d8f0d8", "GroupNorm": "#d8f0d8", "TimestepEmbedding": "#efe0f5"}


def label(step) -> str:
    _, c, h, w = step.output_shape
    extra = ""
    if step.kind == "Transformer2DModel":
        extra = f", {step.conditioning.split('; ')[1].split(' (')[0]}"  # "10 blocks, 1024 tokens"
    return f"{step.path}: {step.kind} -> {c}x{h}x{w}{extra}"


def svg(steps) -> str:
    mid = [i for i, s in enumerate(steps) if s.path.startswith("mid_block")]
    down = [s for s in steps[: mid[0]] if s.kind != "TimestepEmbedding"]
    middle, up = steps[mid[0]: mid[-1] + 1], steps[mid[-1] + 1:]
    height = (max(len(down), len(up)) + len(middle) + 3) * (BOX_H + GAP) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * BOX_W + 160}" height="{height}" font-family="monospace" font-size="10">',
           '<text x="10" y="18" font-size="13">SDXL UNet at 1024x1024 (128x128 latents), traced from minsdxl/unet.py; '
           'dashed: skip connections</text>']
    pos = {}

    def box(step, x, y):
        out.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{COLOURS.get(step.kind, "#fff")}" stroke="#555"/>')
        out.append(f'<text x="{x + 5}" y="{y + 17}">{escape(label(step))}</text>')
        pos[step.path] = (x, y)

    y0 = 40
    for i, s in enumerate(down):
        box(s, 10, y0 + i * (BOX_H + GAP))
    base = y0 + max(len(down), len(up)) * (BOX_H + GAP) + GAP
    for i, s in enumerate(middle):
        box(s, BOX_W // 2 + 90, base + i * (BOX_H + GAP))
    for i, s in enumerate(up):  # drawn bottom to top: the up path climbs back to full resolution
        box(s, BOX_W + 150, y0 + (len(up) - 1 - i) * (BOX_H + GAP))
    # Skips: conv_in, then every down resnet/transformer output and downsample, popped by up resnets in reverse.
    pushes = [s.path for s in down if s.kind in ("Conv2d", "Downsample2D") or
              (s.kind in ("ResnetBlock2D", "Transformer2DModel") and not any(
                  t.path == s.path.replace("resnets", "attentions") for t in down if s.kind == "ResnetBlock2D"))]
    pops = [s.path for s in up if s.kind == "ResnetBlock2D"]
    for src, dst in zip(reversed(pushes), pops):
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        out.append(f'<line x1="{x1 + BOX_W}" y1="{y1 + BOX_H / 2}" x2="{x2}" y2="{y2 + BOX_H / 2}" '
                   f'stroke="#999" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> Path:
    path = Path(__file__).resolve().parent / "unet.svg"
    path.write_text(svg(trace(UNetConfig.sdxl_base(), 1024)))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
