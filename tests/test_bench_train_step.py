"""bench/train_step.py --config overhead: the framework's own time per step, measured on SDXL base's
topology at tiny widths. The figure stands for the full UNet only if the topology is the same block for
block, and each side's op count is what the table reports."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.train_step import overhead_config, overhead_table, parse_args  # noqa: E402
from minsdxl import UNet, UNetConfig  # noqa: E402
from minsdxl.unet import BasicTransformerBlock  # noqa: E402


def test_overhead_config_is_sdxl_base_block_for_block():
    with torch.device("meta"):
        full, narrow = UNet(UNetConfig.sdxl_base()), UNet(overhead_config())
    assert [(n, type(m).__name__) for n, m in full.named_modules()] == [(n, type(m).__name__) for n, m in narrow.named_modules()]
    assert sum(isinstance(m, BasicTransformerBlock) for m in narrow.modules()) == 70
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 100  # 23M of 2.6B


def test_overhead_table_counts_each_sides_ops(capsys):
    threads = torch.get_num_threads()
    overhead_table(overhead_config(), parse_args(["--config", "overhead", "--latent", "8", "--repeats", "1", "--device", "cpu"]))
    assert torch.get_num_threads() == threads  # timed on one thread, then put back
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("reference ", "ours "))}
    ops = {side: int(row[3].replace(",", "")) for side, row in rows.items()}
    # SDXL's step is ~10^4 ops whatever the widths; ours dispatches fewer than diffusers + peft (no fp32
    # round trip of each adapted layer's input, no scaling multiply at alpha = rank, no p=0 dropout)
    assert 10_000 < ops["ours"] < ops["reference"]
