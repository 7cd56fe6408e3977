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


def test_graphed_step_without_capture_is_the_same_step():
    """--cuda-graph's step (static buffers, device-side noise coefficients, capturable AdamW) run without a
    graph on the CPU: after two steps the adapters are step_fn's, on both sides. The capture itself needs
    CUDA (bench/gpu.sh)."""
    from bench.train_step import graphed_step_fn, one_side

    cfg = UNetConfig.tiny()
    args = parse_args(["--config", "tiny", "--latent", "8", "--device", "cpu"])
    for side in ("reference", "ours"):
        torch.manual_seed(0)
        model_a, step_a, _ = one_side(side, cfg, args)
        torch.manual_seed(0)
        model_b, _, _ = one_side(side, cfg, args)
        params_b = [p for p in model_b.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params_b]
        step_b, check = graphed_step_fn(side, model_b, params_b, cfg, args, capture=False)
        assert check is None
        for _ in range(2):
            step_a()
            step_b()
        a = [p for p in model_a.parameters() if p.requires_grad]
        assert len(a) == len(params_b) > 0
        worst = max(((pa - pb).abs().max() / pa.abs().max()).item() for pa, pb in zip(a, params_b))
        assert worst < 1e-6, (side, worst)
        assert all(not torch.equal(p, p0) for p, p0 in zip(params_b, start))  # both steps trained every adapter
