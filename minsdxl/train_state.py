"""Training checkpoints: everything needed to resume bit-exactly, written atomically, pickle-free.

A checkpoint is a folder `checkpoint-<step>/` holding
    adapters.safetensors   the trained tensors by parameter name: LoRA weights (and their EMA as ema.<name>), or
    weights.safetensors    with --full_finetune every UNet weight, in its training dtype (bf16 or fp32)
    optimizer.safetensors  the optimizer's tensors (Adam moments, step counts), by "<index>.<name>"
    rng.safetensors        the torch RNG states (CPU, CUDA) and the run's own generators (stochastic rounding's)
    state.json             step, epoch, data position, the optimizer's param groups, the fp16 loss scale, run arguments
It is written under a temporary name (`.checkpoint-<step>.tmp-<pid>`), every file and the folder
are flushed to the disk (fsync), and only then renamed into place, with the parent folder flushed
too: a run killed mid-write, or a power cut, never leaves a folder that `find_latest` would pick.
Only safetensors and JSON are read back: a checkpoint cannot run code when it is loaded (torch.save
pickles can), and a damaged one is reported by file (`load_checkpoint`), never half-loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora.files import write_safetensors

from .train_args import CHANGEABLE_ON_RESUME, NOT_PART_OF_THE_RUN, fail

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_RE = re.compile(r"^\.checkpoint-\d+\.")  # a write that was killed before its rename
MARKER = "state.json"  # written last inside the temporary folder
TRAINED_FILES = ("adapters.safetensors", "weights.safetensors")  # LoRA's, --full_finetune's


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and the problem."""


def optimizer_to_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split `optimizer.state_dict()` (or a state dict) into flat tensors and JSON-able param groups."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
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


def rng_tensors(noise_generator: torch.Generator | None, generators: dict[str, torch.Generator] | None = None
                ) -> dict[str, torch.Tensor]:
    """The global torch RNG states, and the named generators' (as "generator.<name>")."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    if noise_generator is not None:
        states["noise_generator"] = noise_generator.get_state()
    for name, g in (generators or {}).items():  # (a generator, or its state already taken)
        states[f"generator.{name}"] = g if torch.is_tensor(g) else g.get_state()
    return states


def restore_rng(states: dict[str, torch.Tensor], noise_generator: torch.Generator | None,
                generators: dict[str, torch.Generator] | None = None) -> None:
    """The inverse of rng_tensors. A named generator the checkpoint lacks is a CheckpointError: the run
    would not repeat itself."""
    missing = [name for name in (generators or {}) if f"generator.{name}" not in states]
    if missing:
        raise CheckpointError(f"the checkpoint holds no random state for {', '.join(missing)}; it was written by a run "
                              f"that did not use it, and resuming from it would not repeat that run")
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if noise_generator is not None and "noise_generator" in states:
        noise_generator.set_state(states["noise_generator"])
    for name, g in (generators or {}).items():
        g.set_state(states[f"generator.{name}"])


def merge_rank_states(per_rank: list[dict]) -> dict:
    """One optimizer state dict from every process's (FSDP2: each holds the state of its own shards): tensor i
    of rank r becomes index r * n + i. `rank_state` takes it apart again; it needs the same number of processes."""
    n = len(per_rank[0]["param_groups"])
    state = {r * n + i: v for r, sd in enumerate(per_rank) for i, v in sd["state"].items()}
    groups = [{**g, "params": [r * n + i]} for r, sd in enumerate(per_rank) for i, g in enumerate(sd["param_groups"])]
    return {"state": state, "param_groups": groups}


def rank_state(sd: dict, rank: int, world: int) -> dict:
    """Process `rank`'s part of a merge_rank_states state dict, indexed from 0 again."""
    n = len(sd["param_groups"]) // world
    state = {i - rank * n: v for i, v in sd["state"].items() if rank * n <= i < (rank + 1) * n}
    groups = [{**g, "params": [i]} for i, g in enumerate(sd["param_groups"][rank * n:(rank + 1) * n])]
    return {"state": state, "param_groups": groups}


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, i.e. names created or renamed in
    it) from the OS cache to the disk. os.replace alone is atomic against a crash of the process, not
    against a power cut: the rename can reach the disk before the data it points at."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, step: int, adapters: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict,
                    noise_generator: torch.Generator | None = None, keep_last: int | None = None,
                    generators: dict[str, torch.Generator] | None = None, trained_file: str = TRAINED_FILES[0]) -> Path:
    """Write `output_dir/checkpoint-<step>` durably; then keep only the newest `keep_last` by step,
    always including this one. `adapters` are the trained tensors, written to `trained_file`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    # A plain mkdir (not tempfile.mkdtemp, which makes 0700 folders): the usual umask permissions.
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if trained_file not in TRAINED_FILES:
            raise ValueError(f"trained_file must be one of {TRAINED_FILES}")
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, tmp / trained_file)
        opt_tensors, param_groups = optimizer_to_tensors(optimizer)
        write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        write_safetensors(rng_tensors(noise_generator, generators), tmp / "rng.safetensors")
        (tmp / MARKER).write_text(json.dumps({**state, "step": step, "param_groups": param_groups}, indent=2))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # a re-run of the same step replaces it only once the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(output_dir)  # the rename itself
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last:
        for old in [p for p in list_checkpoints(output_dir) if p != final][: -(keep_last - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that were killed before their rename (they
    were never complete, so nothing is lost); return what was removed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = sorted(p for p in output_dir.iterdir() if p.is_dir() and TEMPORARY_RE.match(p.name))
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


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
    """(state, trained tensors, optimizer_state_dict, rng_states) from a checkpoint folder. Every file is read
    and checked before anything is returned; a missing or damaged one raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder. Pass an existing checkpoint-<step> folder, "
                              f"or 'latest'.")
    trained = next((n for n in TRAINED_FILES if (path / n).is_file()), TRAINED_FILES[0])
    missing = [n for n in (MARKER, trained, "optimizer.safetensors", "rng.safetensors") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete minsdxl checkpoint: missing {', '.join(missing)}. "
                              f"Pass another --resume_from_checkpoint, or 'latest'.")
    try:
        state = json.loads((path / MARKER).read_text())
        param_groups = state.pop("param_groups")
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MARKER} is damaged ({type(e).__name__}: {e}); this checkpoint cannot "
                              f"be resumed. Pass another --resume_from_checkpoint, or 'latest'.") from None
    tensors = {}
    for name in (trained, "optimizer.safetensors", "rng.safetensors"):
        try:
            tensors[name] = load_file(str(path / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / name} is damaged ({e}); this checkpoint cannot be "
                                  f"resumed. Pass another --resume_from_checkpoint, or 'latest'.") from None
    optimizer_sd = optimizer_from_tensors(tensors["optimizer.safetensors"], param_groups)
    return state, tensors[trained], optimizer_sd, tensors["rng.safetensors"]


def load_latest_intact(output_dir: str | Path):
    """(path, load_checkpoint(path), [(skipped path, why)]) for the newest checkpoint of `output_dir` that
    loads, newest first; (None, None, skipped) when none does (or there is none)."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, None, skipped


# --- the run folder -------------------------------------------------------------------------------

# What a training run writes into its output folder (besides checkpoints). The caches, which are keyed
# by content, and the --demo model and data are inputs, not a run's results: they are kept.
RUN_FILES = ("metrics.jsonl", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "summary.json",
             "loss.png", "config.toml", "validation", "unet")  # (and --full_finetune's <output_dir name>.safetensors)


def single_file_name(output_dir: str | Path) -> str:
    """--full_finetune's single-file model: named after the run's folder, so that it is recognisable in a
    tool's models folder (out/my-style -> my-style.safetensors)."""
    return f"{Path(output_dir).resolve().name}.safetensors"


def previous_run(output_dir: str | Path) -> list[str]:
    """What a previous run left in `output_dir`, described for a message (empty: none). A config.toml
    alone (a run that stopped while loading) is not a previous run."""
    output_dir = Path(output_dir)
    found = []
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), the newest {checkpoints[-1].name}")
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"metrics.jsonl ({sum(1 for line in metrics.open('rb') if line.strip())} steps)")
    found += [name for name in (*RUN_FILES[1:4], single_file_name(output_dir)) if (output_dir / name).is_file()]
    return found


def clear_run(output_dir: str | Path, logging_dir: str | None = None) -> None:
    """Delete a previous run's results from `output_dir` (--overwrite_output_dir): its checkpoints,
    unfinished checkpoint writes, metrics, LoRA files, plots, validation images and logs."""
    output_dir = Path(output_dir)
    doomed = list_checkpoints(output_dir) + [output_dir / name for name in RUN_FILES]
    doomed.append(output_dir / single_file_name(output_dir))
    doomed += [p for p in output_dir.iterdir() if p.is_dir() and (TEMPORARY_RE.match(p.name) or CHECKPOINT_RE.match(p.name))]
    if logging_dir:
        doomed.append(output_dir / logging_dir)
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


# --- before a run loads anything: its output folder and the checkpoint it resumes from --------------

def check_output_dir(out: Path) -> None:
    """--output_dir is a folder we can write to (made if needed)."""
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} is a file, not a folder; pass a folder (it is created if needed).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"--output_dir {out} cannot be written to ({e.strerror or e}); pass a folder you can write to.")


def guard_previous_run(args: argparse.Namespace, out: Path, ddp, log) -> None:
    """A fresh run never overwrites a previous run's results without being told to."""
    found = previous_run(out)
    if found and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        fail(f"--output_dir {out} holds a previous run ({'; '.join(found)}). Add --resume_from_checkpoint latest "
             f"to go on with it, --overwrite_output_dir to start again there (deleting its results), or pass "
             f"another --output_dir.")
    ddp.barrier()  # every rank has looked before rank 0 changes anything
    if ddp.main:
        if found and args.overwrite_output_dir:
            clear_run(out, args.logging_dir)
            log(f"--overwrite_output_dir: deleted the previous run in {out} ({'; '.join(found)})")
        for leftover in remove_leftovers(out):
            log(f"removed {leftover.name}: an unfinished checkpoint write of a run that was killed")
    ddp.barrier()


def find_checkpoint(args: argparse.Namespace, out: Path, world: int, log):
    """The checkpoint to resume from, read and checked: (path, state, adapters, optimizer_sd, rng), or
    None to start from step 0. With 'latest', a damaged newest checkpoint is skipped, saying so."""
    if args.resume_from_checkpoint == "latest":
        path, loaded, skipped = load_latest_intact(out)
        for _, why in skipped:
            log(f"warning: {why}")
        if path is None:
            if previous_run(out):
                fail(f"--resume_from_checkpoint latest: {out} holds a previous run ({'; '.join(previous_run(out))}) "
                     f"but no intact checkpoint to resume from. Pass --overwrite_output_dir instead to start "
                     f"again there, or another --output_dir.")
            log(f"no checkpoint in {out}: starting from step 0")
            return None
        if skipped:
            log(f"resuming from {path.name}, the newest intact checkpoint")
    else:
        path = Path(args.resume_from_checkpoint)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            fail(str(e))
    compare_resumed_flags(args, loaded[0], path, world, log)
    return (path, *loaded)


def compare_resumed_flags(args: argparse.Namespace, state: dict, path: Path, world: int, log) -> None:
    """Flags that differ from the checkpoint's run: those that can change are applied, one line each;
    those that shape the adapters, the data or the randomness are refused, by name. The batch size
    and accumulation may change together with the number of processes as long as the global batch
    (batch x processes x accumulation) stays the same: the data position is kept in global batches."""
    saved = state.get("args")
    if saved is None:
        log(f"note: {path} records no flags (an older checkpoint): this run's flags are not compared with it")
        return
    per_step = ("train_batch_size", "gradient_accumulation_steps")
    if all(k in saved for k in per_step):
        before = saved["train_batch_size"] * saved["gradient_accumulation_steps"] * state.get("world_size", 1)
        now = args.train_batch_size * args.gradient_accumulation_steps * world
        if before != now:
            fail(f"{path} was written by a run with a global batch of {before} images per step "
                 f"(--train_batch_size x processes x --gradient_accumulation_steps); this one has {now}. It cannot "
                 f"change on resume: choose the batch size and accumulation that give {before}.")
        saved = {k: v for k, v in saved.items() if k not in per_step}
    ignored = NOT_PART_OF_THE_RUN | ({"pretrained_model_name_or_path", "train_data_dir", "instance_data_dir"} if args.demo else set())
    # (--demo's model and data live inside the output folder, which may have moved)
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if not k.startswith("_") and k in saved and saved[k] != v and k not in ignored}
    refused = {k: c for k, c in changed.items() if k not in CHANGEABLE_ON_RESUME}
    if refused:
        fail(f"{path} was written by a run with other " + ", ".join(
            f"--{k} {old!r} (now {new!r})" for k, (old, new) in refused.items()) +
            ". These shape the adapters, the data or the randomness and cannot change on resume: pass the run's own "
            "values (its config.toml has them), or start a new run in another --output_dir.")
    for k, (old, new) in changed.items():
        log(f"resume: --{k} changed from {old!r} to {new!r}; applied from step {state['step']} on")


def check_adapters_fit(path: Path, adapters: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor]) -> None:
    """The checkpoint's trained tensors are exactly this run's, by name, shape and dtype."""
    names = sorted(set(adapters) ^ set(trainable))
    shapes = [f"{n}: checkpoint {tuple(adapters[n].shape)} {adapters[n].dtype}, this run {tuple(trainable[n].shape)} "
              f"{trainable[n].dtype}" for n in sorted(set(adapters) & set(trainable))
              if adapters[n].shape != trainable[n].shape or adapters[n].dtype != trainable[n].dtype]
    if not names and not shapes:
        return
    if (path / TRAINED_FILES[1]).is_file():
        fail(f"{path} holds UNet weights that do not fit this run's UNet ({len(names)} names differ, e.g. {names[:3]}; "
             f"{len(shapes)} shapes or dtypes differ, e.g. {shapes[:3]}). The model and --mixed_precision must be "
             f"those of the run that wrote it (its config.toml has them).")
    fail(f"{path} holds adapters that do not fit this run's LoRA layers ({len(names)} names differ, e.g. "
         f"{names[:3]}; {len(shapes)} shapes differ, e.g. {shapes[:3]}). --rank, --lora_targets, --conv_rank, "
         f"--use_dora and --train_text_encoder must be those of the run that wrote it (its config.toml has them).")
