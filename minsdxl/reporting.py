"""What a training run reports: metrics.jsonl (one JSON record per optimizer step), loss.png, and
with --report_to the same scalars and the validation images to tensorboard and/or wandb.

metrics.jsonl is the run's record and survives a resume: `MetricsLog` keeps the records up to the
step a run resumes from (a run that went further, then was resumed from an earlier checkpoint, has
its later records dropped) and appends from there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli import optional_import


class MetricsLog:
    """metrics.jsonl, opened for appending after the records of steps <= `step` (rank 0; other ranks write nothing)."""

    def __init__(self, path: Path, step: int, main: bool, log):
        if main:
            kept = [r for r in read_metrics(path, log) if r["step"] <= step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path if main else os.devnull, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path, log) -> list[dict]:
    """The records of metrics.jsonl. A line that is not JSON (the last one, cut by a kill or a full
    disk, usually) is dropped with a warning naming the file and the line."""
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError:
            log(f"warning: {path}, line {number}: not a complete record ({line[:60]!r}); dropped")
            continue
        records.append(record)
    return records


def save_loss_plot(losses: list[float], path: Path) -> None:
    """A small loss-curve PNG drawn with PIL (no plotting dependency): raw loss and a running mean."""
    from PIL import Image, ImageDraw
    if len(losses) < 2:
        return
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    xy = lambda i, v: (pad + (W - 2 * pad) * i / (len(losses) - 1), H - pad - (H - 2 * pad) * (v - lo) / (hi - lo))
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
    draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((pad, 10), f"training loss (running mean of {window})  steps 1..{len(losses)}", fill="black")
    draw.text((5, pad - 5), f"{hi:.4f}", fill="black")
    draw.text((5, H - pad - 5), f"{lo:.4f}", fill="black")
    img.save(path)


class Reporter:
    """--report_to: scalars and validation images to tensorboard and/or wandb (optional extras)."""

    def __init__(self, kind: str, out: Path, args: argparse.Namespace):
        self.tb = self.wandb = None
        if kind in ("tensorboard", "all"):
            optional_import("tensorboard", "--report_to tensorboard", "pip install 'minsdxl[tensorboard]' (or: pip install tensorboard)")
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / args.logging_dir))
        if kind in ("wandb", "all"):
            self.wandb = optional_import("wandb", "--report_to wandb", "pip install 'minsdxl[wandb]' (or: pip install wandb)")
            self.wandb.init(project="minsdxl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}, dir=str(out))

    def scalars(self, record: dict, step: int) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def image(self, name: str, image, step: int) -> None:
        import numpy as np
        if self.tb:
            self.tb.add_image(name, np.asarray(image), step, dataformats="HWC")
        if self.wandb:
            self.wandb.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
