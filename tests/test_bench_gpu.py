"""bench/gpu.sh's dry run: the GPU benchmark's code path on the tiny config, on the CPU, so that the
script cannot rot while no GPU is lent. Every row must be in the table, measured or skipped with the
reason; the rows that can run on a CPU must have run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = [("bf16", "ours"), ("bf16", "diffusers + peft"), ("selective", "ours"), ("channels_last", "ours"), ("compile", "ours"),
        ("all_options", "ours"), ("no_ckpt", "ours"), ("no_ckpt", "diffusers + peft"), ("no_ckpt_compile", "ours"),
        ("cuda_graph", "ours"), ("cuda_graph", "diffusers + peft"), ("fp16", "ours"), ("fp16", "diffusers + peft"),
        ("fp8_base", "ours"), ("adamw8bit", "ours"), ("adamw8bit", "diffusers + peft"),
        ("sample", "ours"), ("load", "ours"), ("load", "diffusers")]
# the rest need CUDA (8-bit AdamW; compiling, which takes minutes of C++ compilation on the CPU) or minsdxl.fp8
ON_CPU = [r for r in ROWS if r[0] in ("bf16", "selective", "channels_last", "no_ckpt", "cuda_graph", "fp16", "sample", "load")]


def test_gpu_sh_dry_run_prints_every_row(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MINSDXL_WHEELS": ""}  # this environment's packages, no .whl/
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), "--device", "cpu", "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    table = (tmp_path / "gpu_results.md").read_text()
    assert table in p.stdout  # printed and written alike
    raw = json.loads((tmp_path / "gpu_results.json").read_text())
    rows = {(r["row"], r["side"]): r for r in raw["rows"]}
    assert list(rows) == ROWS

    lines = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines() if line.startswith("| ")}
    for key, r in rows.items():
        cells = [c.strip() for c in lines[key].split("|")[1:-1]]  # row, side, what, status, time, peak, sim, ratio, mfu
        if r["status"] == "ok":
            assert cells[3] == "measured" and cells[4] and cells[5], lines[key]
        else:
            assert r["status"] == "skipped" and r["reason"], (key, r)
            assert cells[3] == f"skipped: {r['reason']}", lines[key]

    must_run = ON_CPU + ([("fp8_base", "ours")] if importlib.util.find_spec("minsdxl.fp8") else [])
    failed = {key: rows[key]["status"] + ": " + rows[key].get("reason", "") for key in must_run if rows[key]["status"] != "ok"}
    assert not failed, f"{failed}\n{(tmp_path / 'gpu_log.txt').read_text()[-6000:]}"
    assert "CUDA" in rows[("adamw8bit", "ours")]["reason"] and "CUDA" in rows[("compile", "ours")]["reason"]
    # The simulator's prediction (or why there is none) beside the first training row; the FLOPs counted.
    bf16 = [c.strip() for c in lines[("bf16", "ours")].split("|")[1:-1]]
    assert bf16[6].endswith("MiB") or bf16[6].startswith("n/a (simulator"), bf16
    flops = raw["flops"]["result"]
    assert raw["flops"]["status"] == "ok" and flops["flops_with_recompute"] >= flops["flops_selective"] > flops["flops"] > 0
