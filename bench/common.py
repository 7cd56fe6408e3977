"""Shared measuring tools for the benchmarks: alternating timing, peak memory, random weights.

Every benchmark runs the reference and ours in one run, alternating, and prints ours/reference.
CPU peak memory is the process's resident set size (RSS) sampled every millisecond by a thread;
on CUDA it is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import statistics
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minsdxl.loading import sdxl_text_encoder_configs  # noqa: E402,F401  (the benchmarks' text encoders)

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _reset_peak_rss() -> bool:
    """Linux: make the kernel's peak-RSS counter (VmHWM) start again from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak` = peak bytes above the level at entry.

    On the CPU the kernel's own high-water mark is read where it can be reset (Linux); elsewhere a
    thread samples the RSS every millisecond, which costs the measured code a little time and can
    miss a short peak."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = rss_bytes()
        self._kernel = _reset_peak_rss()
        if not self._kernel:
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._kernel:
            self.peak = max(_peak_rss(), rss_bytes()) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes()) - self._base
        return False


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, callable], repeats: int, device="cpu", warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, calling them in turn (a, b, a, b, ...) so drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fast deterministic weights with the default init's scale (uniform +-1/sqrt(fan_in)); norms at
    weight 1, bias 0. Speed and memory do not depend on the values, but denormals would. The numbers
    are drawn on the parameters' device (a GPU fills the 2.6B UNet in well under a second; the values
    then differ from the CPU's, which no benchmark depends on)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name.split(".")[-2] if "." in name else False):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.shape[0]
            bound = 1 / math.sqrt(fan_in)
            p.copy_(torch.rand(p.shape, generator=g, device=device).mul_(2 * bound).sub_(bound).to(p.dtype))
    return model


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def print_table(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """rows: (metric, reference, ours, unit) -> prints reference, ours and ours/reference."""
    print(f"\n{title}")
    print(f"{'metric':<30}{'reference':>14}{'ours':>14}{'ours/ref':>10}")
    for metric, ref, ours, unit in rows:
        show = fmt_bytes if unit == "bytes" else (lambda v: f"{v:.3f} s")
        ratio = ours / ref if ref else float("nan")
        print(f"{metric:<30}{show(ref):>14}{show(ours):>14}{ratio:>10.3f}")


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU and its core count: every table says where it was measured."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def run_child(script: str, *extra: str, drop: tuple[str, ...] = ()) -> dict:
    """Run `script` again in a fresh process with this process's arguments (less `drop`) plus `extra`,
    and return the JSON dict it prints last. CPU memory is measured this way: peak RSS is per process,
    so each side gets its own and neither can hide the other's peak."""
    cmd = [sys.executable, script, *extra] + [a for a in sys.argv[1:] if a not in drop]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


