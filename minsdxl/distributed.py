"""Several processes, one run: `torchrun --nproc_per_node N train.py ...` (docs/distributed.md).

torchrun starts N copies of train.py and sets WORLD_SIZE, RANK and LOCAL_RANK in each. Every process
trains on its share of each global batch (minsdxl.data.BucketBatchSampler's rank/world_size). Rank 0
alone writes files and logs. Two ways to keep the processes' models equal:

- LoRA (`wrap`): every process holds the whole model, and DistributedDataParallel averages the
  adapters' gradients in backward, so the copies stay equal.
- full fine-tuning (`shard`): FSDP2 (`torch.distributed.fsdp.fully_shard`) splits every weight along its
  first dimension across the processes; each block's weights are gathered for its forward and backward
  only, its gradients averaged and split again (reduce-scatter), and each process updates its own shard
  with its own shard of the optimizer state. Weights, gradients and optimizer state take 1/N each.
  Whole tensors exist again only where asked for (`full`: checkpoints and the saved model).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP2 shard's local tensor (a DTensor's), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class Distributed:
    """The torchrun launch, if any (one process, without it): rank, world size, the device of this
    process, and the few collective operations the training loop needs."""

    sharded = False  # FSDP2 shards the model (full fine-tuning under torchrun)

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
        """DDP over the trained parameters only: the frozen weights are neither broadcast nor reduced.
        (A model FSDP2 has sharded synchronises itself: it is returned as it is.)"""
        if self.world == 1 or self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, model: torch.nn.Module, device: torch.device, units: tuple[type, ...]) -> torch.nn.Module:
        """FSDP2 over `model`, in place: each module of a type in `units` (the UNet's resnet and transformer
        blocks: what gradient checkpointing recomputes) is one group, gathered for its own forward and
        backward only; the rest (conv_in, the embeddings, norms, up/downsamplers) is the root's group."""
        if self.world == 1:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (self.world,))
        for module in model.modules():
            if isinstance(module, units):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.sharded = True
        return model

    def full(self, named: dict[str, torch.Tensor], like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The whole tensors on the CPU, on rank 0 ({} elsewhere); every rank must call it (it gathers).
        `like`: for local shards (EMA, optimizer state of a weight's shape), the sharded weights they belong to."""
        from torch.distributed.tensor import DTensor
        out = {}
        for name, t in named.items():
            ref = (like or {}).get(name)
            if not isinstance(t, DTensor) and isinstance(ref, DTensor):
                t = DTensor.from_local(t, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride())
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if self.main:
                out[name] = whole.detach().cpu()
        return out

    def to_shards(self, named: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                  like: dict[str, torch.Tensor] | None = None) -> None:
        """Copy whole tensors (from a checkpoint, the same on every rank) into this rank's shards of `named`."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        with torch.no_grad():
            for name, t in named.items():
                ref = t if isinstance(t, DTensor) else (like or {}).get(name)
                value = values[name]
                if isinstance(ref, DTensor):
                    value = distribute_tensor(value.to(local(ref).device, local(t).dtype), ref.device_mesh,
                                              ref.placements, src_data_rank=None).to_local()
                local(t).copy_(value)

    def gather_objects(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (a list in rank order), None elsewhere; every rank must call it."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
