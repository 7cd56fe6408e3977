"""Every UNet weight trained on a small card: one optimizer per weight tensor, so that each tensor can be
updated on its own, inside backward, the moment its gradient is complete.

Memory of a full fine-tuning step of SDXL's UNet (2,567,463,684 parameters, bf16), besides activations:

    unfused    weights 5.1 GB + every gradient at once 5.1 GB + optimizer state
    fused      weights 5.1 GB + optimizer state + one tensor's gradient and temporaries (<= 0.3 GB)

The fused step (kohya-ss/sd-scripts PR #1259, "fused backward pass"; PyTorch's tutorial "How to save
memory by fusing the optimizer step into the backward pass") hangs the update on
`Tensor.register_post_accumulate_grad_hook`: autograd calls it when a weight's gradient is complete,
the hook steps that weight's optimizer and frees the gradient, and backward goes on to the next
layer. No full set of gradients ever exists.

The optimizers are the libraries' own, unchanged (torch's AdamW, transformers' Adafactor,
bitsandbytes' AdamW8bit): each sees one fp32 tensor, the weight's "working copy", which exists only
during its update. bf16 weights are copied to fp32 for it and written back with stochastic rounding
(minsdxl.stochastic_rounding), so the optimizer state is fp32 and no fp32 master copy of the model
is kept; fp32 weights are updated in place. Under FSDP2 each process updates its own shard.

Choices, and why:
- gradient accumulation needs the gradients of several backward passes, which the fused step frees as
  they are made: with --gradient_accumulation_steps > 1 train.py steps after backward instead
  (`fused=False`, the same update, with gradients kept) or refuses an explicit --fused_backward_pass;
- clipping by the global norm needs every gradient first: the fused step clips each tensor's gradient
  to --max_grad_norm on its own (as kohya's fused pass does); unfused, train.py clips by the global norm;
- Prodigy estimates one step size from all parameters together, so it cannot be split per tensor: refused.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .distributed import local as _local
from .stochastic_rounding import stochastic_round_


class PerParameterOptimizer:
    """One optimizer (made by `make([group])`) per trained tensor, stepped one tensor at a time: all after
    backward (`step`), or each inside backward as its gradient completes (`fuse`). Exposes what train.py's
    loop and checkpoints use of an optimizer: param_groups (one per tensor), step, zero_grad, state_dict."""

    def __init__(self, named: dict[str, nn.Parameter], make: Callable[[list[dict]], torch.optim.Optimizer], lr: float,
                 stochastic_rounding: bool = True, generator: torch.Generator | None = None):
        self.params = list(named.values())
        self.stochastic_rounding, self.generator = stochastic_rounding, generator
        self.fused, self.max_grad_norm, self.hooks = False, 0.0, []
        # Each tensor's working copy: an fp32 Parameter that holds data only during its update.
        self.work = {p: nn.Parameter(self._empty(p), requires_grad=False) for p in self.params}
        self.optimizers = {p: make([{"params": [self.work[p]], "lr": lr}]) for p in self.params}

    @staticmethod
    def _empty(p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.float32, device=_local(p).device)

    @property
    def param_groups(self) -> list[dict]:
        return [opt.param_groups[0] for opt in self.optimizers.values()]

    def fuse(self, max_grad_norm: float) -> None:
        """Update each tensor in backward, the moment its gradient is complete; clip each gradient on its own."""
        self.fused, self.max_grad_norm = True, max_grad_norm
        self.hooks = [p.register_post_accumulate_grad_hook(self.update) for p in self.params]

    @torch.no_grad()
    def update(self, p: torch.Tensor) -> None:
        """One tensor's optimizer step from its gradient; the gradient is freed."""
        if p.grad is None:
            return
        if self.fused and self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)  # this tensor's norm: the global one is not known yet
        weight, grad, w = _local(p), _local(p.grad), self.work[p]
        w.data = weight if weight.dtype == torch.float32 else weight.float()  # (shape of p) fp32 working copy
        w.grad = grad if grad.dtype == torch.float32 else grad.float()
        self.optimizers[p].step()
        if weight.dtype == torch.bfloat16:
            if self.stochastic_rounding:
                stochastic_round_(weight, w.data, self.generator)
            else:
                weight.copy_(w.data)  # round to nearest: updates under half a bf16 step are lost
        elif weight.dtype != torch.float32:
            raise TypeError(f"full fine-tuning keeps weights in bf16 or fp32, not {weight.dtype}")
        w.data, w.grad = self._empty(p), None
        p.grad = None

    def step(self) -> None:
        """Every tensor's update, after backward (not fused; train.py has clipped by the global norm)."""
        for p in self.params:
            self.update(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """One optimizer state dict for all: state and param group i are tensor i's."""
        state, groups = {}, []
        for i, opt in enumerate(self.optimizers.values()):
            sd = opt.state_dict()
            if sd["state"]:
                state[i] = sd["state"][0]
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """The inverse of state_dict. Each group keeps this run's base_lr (a resumed run may change --learning_rate)."""
        if len(sd["param_groups"]) != len(self.params):
            raise ValueError(f"the optimizer state is for {len(sd['param_groups'])} tensors; this model trains {len(self.params)}")
        for i, opt in enumerate(self.optimizers.values()):
            base_lr = opt.param_groups[0].get("base_lr")
            state = {0: sd["state"][i]} if i in sd["state"] else {}
            opt.load_state_dict({"state": state, "param_groups": [{**sd["param_groups"][i], "params": [0]}]})
            if base_lr is not None:
                opt.param_groups[0]["base_lr"] = base_lr
