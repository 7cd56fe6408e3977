"""Several processes, one run: `torchrun --nproc_per_node N train.py ...` (docs/distributed.md).

torchrun starts N copies of train.py and sets WORLD_SIZE, RANK and LOCAL_RANK in each. Every process
holds the whole model, trains on its share of each global batch (minsdxl.data.BucketBatchSampler's
rank/world_size), and DistributedDataParallel averages the trained weights' gradients in backward, so
the copies stay equal. Rank 0 alone writes files and logs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Distributed:
    """The torchrun launch, if any (one process, without it): rank, world size, the device of this
    process, and the few collective operations the training loop needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        if self.world > 1 and not dist.is_initialized():
            # NCCL between GPUs, gloo between CPU processes; a rank that dies makes torchrun stop the others.
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def device(self, requested: str | None) -> torch.device:
        if self.world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (the loss logged is the global batch's)."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a signal that reached one rank stops all)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, value: float) -> list[float]:
        """`value` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DDP over the trained parameters only: the frozen weights are neither broadcast nor reduced."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
