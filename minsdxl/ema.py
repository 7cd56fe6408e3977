"""An exponential moving average of trained weights (Polyak averaging; `--use_ema`).

After each optimizer step, ema = decay * ema + (1 - decay) * w: the saved weights are an average over
roughly the last 1 / (1 - decay) steps (1000 for 0.999), smoother than the last step's. The copy is
kept in fp32, on the device or, with --ema_on_cpu, in CPU memory, and is part of every checkpoint.
Under FSDP2 each process averages its own shard of every weight (minsdxl.distributed.local).
"""

from __future__ import annotations

import torch

from .distributed import local


class EMA:
    """fp32 shadow copies of named tensors, moved towards them by `update` after every optimizer step."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float, device):
        self.decay = decay
        self.shadow = {n: local(p).detach().float().to(device, copy=True) for n, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for n, p in named.items():
            self.shadow[n].lerp_(local(p).detach().to(self.shadow[n].device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, named: dict[str, torch.Tensor]) -> None:
        """Overwrite the tensors with their averages (before saving)."""
        for n, p in named.items():
            local(p).copy_(self.shadow[n])
