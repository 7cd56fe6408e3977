"""Where a training run's tensors live and in what precision: the dtype of the frozen weights,
autocast, moving a model to the device for one phase only, and the peak memory of each phase.

`autocast` and `staged` are the two seams the memory simulator (minsdxl.memory) replaces: every
caller reaches them as `devices.autocast(...)` / `devices.staged(...)`, so replacing them here
replaces them everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import resource

import torch

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision -> dtype


def pick_precision(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights and of autocast; fills in --mixed_precision when not given."""
    if args.mixed_precision is None:
        if device.type != "cuda":
            args.mixed_precision = "no"
        else:
            args.mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # a T4 has no bf16
    return DTYPES[args.mixed_precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls and convolutions in `dtype` (the frozen weights' dtype), norms, softmax
    and losses in fp32; off for fp32 training. (The memory simulator replaces it by its own model of
    CUDA's autocast, because autocast does nothing to `meta` tensors.)"""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def staged(device: torch.device, *models: torch.nn.Module):
    """Bring `models` to the device for a phase and send them back to where they were after it (the CPU,
    usually), with the cache emptied, so that no phase holds a model it does not run."""
    homes = [next(m.parameters()).device for m in models]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def peak_memory_bytes(device: torch.device) -> int:
    """The run's peak so far: CUDA's max_memory_allocated, or elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PhaseMeter:
    """The measured peak device memory of each phase of a run (CUDA: torch.cuda.max_memory_allocated,
    what the caching allocator handed out; nothing is measured per phase elsewhere). Phases may nest
    (a checkpoint inside the training steps): the outer phase's peak so far is kept before the inner one starts."""

    def __init__(self, device: torch.device):
        self.device, self.peaks, self.stack = device, {}, []
        self.cuda = device.type == "cuda"

    def _record(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda and self.stack:
            self._record(self.stack[-1])
        self.stack.append(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            if self.cuda:
                self._record(name)
                torch.cuda.reset_peak_memory_stats(self.device)  # the outer phase goes on from here
            self.stack.pop()
