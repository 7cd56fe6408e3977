"""Training checkpoints: everything needed to resume bit-exactly, written atomically, pickle-free.

A checkpoint is a folder `checkpoint-<step>/` holding
    adapters.safetensors   the trainable tensors (LoRA weights), by parameter name
    optimizer.safetensors  the optimizer's tensors (Adam moments, step counts), by "<index>.<name>"
    rng.safetensors        the torch RNG states (CPU, CUDA, and the training-noise generator)
    state.json             step, epoch, data position, the optimizer's param groups, the fp16 loss scale, run arguments
It is written under a temporary name and renamed into place, so a run killed mid-write never
leaves a folder that `find_latest` would pick. Only safetensors and JSON are read back: a
checkpoint cannot run code when it is loaded (torch.save pickles can).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = "state.json"  # written last inside the temporary folder


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and the problem."""


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split `optimizer.state_dict()` into flat tensors and JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, sd["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    """The inverse of `optimizer_to_tensors`: an `optimizer.load_state_dict` argument."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def rng_tensors(noise_generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    if noise_generator is not None:
        states["noise_generator"] = noise_generator.get_state()
    return states


def restore_rng(states: dict[str, torch.Tensor], noise_generator: torch.Generator | None) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if noise_generator is not None and "noise_generator" in states:
        noise_generator.set_state(states["noise_generator"])


def save_checkpoint(output_dir: str | Path, step: int, adapters: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict,
                    noise_generator: torch.Generator | None = None, keep_last: int | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically; then keep only the newest `keep_last`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
        opt_tensors, param_groups = optimizer_to_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(noise_generator), str(tmp / "rng.safetensors"))
        (tmp / MARKER).write_text(json.dumps({**state, "step": step, "param_groups": param_groups}, indent=2))
        if final.exists():  # a re-run of the same step replaces it only once the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def find_latest(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """(state, adapters, optimizer_state_dict, rng_states) from a checkpoint folder."""
    path = Path(path)
    missing = [n for n in (MARKER, "adapters.safetensors", "optimizer.safetensors", "rng.safetensors") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete minsdxl checkpoint: missing {', '.join(missing)}. "
                              f"Pass another --resume_from_checkpoint, or 'latest'.")
    state = json.loads((path / MARKER).read_text())
    optimizer_sd = optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), state.pop("param_groups"))
    return state, load_file(str(path / "adapters.safetensors")), optimizer_sd, load_file(str(path / "rng.safetensors"))
