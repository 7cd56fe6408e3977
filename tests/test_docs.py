"""The docs cannot go stale: every `file:Lx-Ly (symbol)` reference still points at its symbol, every
command in the learning docs runs (CPU, no download), the committed diagram is what the code draws,
and the numbers the docs quote come out of the code."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minsdxl import UNetConfig
from minsdxl.inspect import summarize
from minsdxl.tiny import write_single_file, write_tiny_pipeline
from minsdxl.trace import main as trace_main, trace

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
RUNNABLE = ["architecture.md", "weights.md", "memory.md", "lora.md", "sampling.md", "training.md"]  # tiny model or meta device
# (performance.md and distributed.md hold benchmark and torchrun recipes for full-size weights and GPUs.)
# Docs commands that take minutes run here with these flags appended (argparse: the last one wins):
# the same code path on fewer steps, so that no test needs more than a minute on 2 cores. The docs
# keep the full command. train.py's demo is 100 steps with two validations; 6 steps with validation
# every 3 still trains, validates twice and writes every output.
SMALLER_IN_TESTS = {"train.py": ["--max_train_steps", "6", "--validation_steps", "3"]}
REFERENCE = re.compile(r"`([\w/]+\.py):L(\d+)-L(\d+) \(([^)]*)\)`")


def references():
    return [(doc.name, *m.groups()) for doc in DOCS for m in REFERENCE.finditer(doc.read_text())]


def test_there_are_references():
    assert len(references()) >= 10


@pytest.mark.parametrize("doc, path, start, end, symbol", references())
def test_line_references_point_at_their_symbol(doc, path, start, end, symbol):
    lines = (ROOT / path).read_text().splitlines()
    start, end = int(start), int(end)
    assert 1 <= start <= end <= len(lines), f"{doc}: {path}:L{start}-L{end} is outside the file"
    assert symbol in lines[start - 1], f"{doc}: {path}:L{start} is now {lines[start - 1]!r}, not {symbol!r}"


def commands(name: str) -> list[str]:
    """The `python ...` lines of a doc's code blocks, in order (later ones may use earlier ones' files)."""
    out = []
    for block in re.findall(r"```\n(.*?)```", (ROOT / "docs" / name).read_text(), flags=re.S):
        out += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("python ")]
    return out


@pytest.mark.parametrize("doc", RUNNABLE)
def test_every_command_in_the_docs_runs(doc, tmp_path):
    assert commands(doc), f"{doc} has no command"
    before = (ROOT / "docs" / "unet.svg").read_bytes()
    for command in commands(doc):
        command = command.replace("/tmp/minsdxl-docs", str(tmp_path)).replace("out/", f"{tmp_path}/out/")
        argv = [sys.executable] + shlex.split(command)[1:]
        argv += SMALLER_IN_TESTS.get(argv[1], [])
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{doc}: `{command}` failed:\n{result.stderr[-2000:]}"
    assert (ROOT / "docs" / "unet.svg").read_bytes() == before  # the committed diagram is the current one


def test_trace_of_the_full_model():
    steps = trace(UNetConfig.sdxl_base(), 1024)
    assert sum(s.params for s in steps) == 2_567_463_684  # every parameter sits in exactly one traced block
    assert steps[2].path == "conv_in" and steps[2].output_shape == (1, 320, 128, 128)
    mid = [s for s in steps if s.path.startswith("mid_block")]
    assert [s.output_shape for s in mid] == [(1, 1280, 32, 32)] * 3
    assert "1024 tokens" in mid[1].conditioning and "77" in mid[1].conditioning
    assert steps[-1].output_shape == (1, 4, 128, 128)
    assert sum(s.kind == "Transformer2DModel" for s in steps) == 11  # 2 + 2 down, 1 mid, 3 + 3 up


def test_trace_takes_any_multiple_of_8(capsys):
    trace_main(["--config", "tiny", "--resolution", "72"])  # 9 latents: odd on the way down, resized on the way up
    out = capsys.readouterr().out
    assert "9x9 latents" in out and "not a multiple of 4 (32 pixels)" in out
    assert "(1, 4, 9, 9)" in out.splitlines()[-2]  # conv_out gives back the input's latent size
    with pytest.raises(SystemExit):
        trace_main(["--config", "tiny", "--resolution", "100"])
    assert "multiple of 8 (the VAE's factor" in capsys.readouterr().err


def test_inspect_names_every_component(tmp_path):
    root = write_tiny_pipeline(tmp_path / "pipe")
    write_single_file(root, tmp_path / "single.safetensors")
    rows = {name: params for name, _, params, _, _ in summarize(tmp_path / "single.safetensors")}
    assert set(rows) == {"UNet (SGM names)", "text encoder 1, CLIP ViT-L (transformers names)",
                         "text encoder 2, OpenCLIP ViT-bigG (OpenCLIP names)", "VAE (SGM names)"}
    unet = {name: params for name, _, params, _, _ in summarize(root / "unet" / "diffusion_pytorch_model.safetensors")}
    assert unet == {"unet/ (diffusers names)": rows["UNet (SGM names)"]}
    refiner = write_tiny_pipeline(tmp_path / "refiner", refiner=True)
    write_single_file(refiner, tmp_path / "refiner.safetensors")
    rows = {name for name, _, _, _, _ in summarize(tmp_path / "refiner.safetensors")}
    assert rows == {"UNet (SGM names)", "text encoder (refiner), OpenCLIP bigG (OpenCLIP names)", "VAE (SGM names)"}
