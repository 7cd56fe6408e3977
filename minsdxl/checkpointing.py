"""Gradient checkpointing policies: what each UNet block keeps for backward, and what it computes again.

Backward needs tensors from the forward pass (a norm's input, an attention's output, ...). Kept, they
cost memory; dropped, the forward that made them runs again inside backward. The UNet applies one
policy to every ResnetBlock2D and BasicTransformerBlock (`UNet.set_gradient_checkpointing`):

    none        keep everything: the fastest step and the most memory.
    full        keep only each block's inputs; backward runs the whole block's forward again
                (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). About a third
                more arithmetic per step for the least memory. `--gradient_checkpointing` alone means
                this, as it does in diffusers' scripts.
    selective   keep the outputs of the ops that are expensive to compute again for the memory they
                hold, and recompute only the cheap ones from them (PyTorch's selective activation
                checkpointing, torch.utils.checkpoint.create_selective_checkpoint_contexts).

"Expensive for the memory" is one number per op, the multiply-adds behind each value of its output
(`recompute_cost`): a matmul's inner dimension K, a convolution's C_in x kh x kw, attention's 2 x S
(S keys: one dot product and one weighted sum over them per value). Outputs that cost at least
KEEP_COST are kept. In SDXL that keeps every 3x3 convolution (2,880 to 23,040), the feed-forward's
down projection (K = 4C = 2,560 / 5,120), cross-attention's keys and values of the text (K = 2,048),
and self-attention once the image has 1,024 or more tokens (from 1024x1024 at the lowest level); it
recomputes the norms, activations, adds and copies (a few operations per value), the C-wide
projections (K = C, whose outputs are the bulk of a transformer block's memory) and the LoRA up
projections (K = rank). Numerically every policy is the same computation: the values are the ones
the forward made, kept or made again by the same kernels (tests/test_checkpointing.py).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

POLICIES = ("none", "full", "selective")
KEEP_COST = 2048  # multiply-adds per output value from which `selective` keeps an op's output

_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default,  # the CPU's fused kernel
              aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
              aten._scaled_dot_product_cudnn_attention.default}


def policy_name(value: str | bool | None) -> str:
    """The policy a flag value names: True (a bare `--gradient_checkpointing`, or `true` in a TOML
    config) is "full", False / None "none"."""
    if value is True:
        return "full"
    if value is None or value is False:
        return "none"
    if value not in POLICIES:
        raise ValueError(f"gradient checkpointing policy {value!r}: choose one of {', '.join(POLICIES)}")
    return value


def recompute_cost(op, args) -> int:
    """Multiply-adds behind each value of `op`'s output; 0 for the cheap ops (norms, activations, adds)."""
    if op in _MATMULS:
        return args[-2].shape[-1]  # (.., M, K) @ (.., K, N): K per value (addmm/baddbmm take the bias first)
    if op == aten.convolution.default:
        weight = args[1]  # (C_out, C_in / groups, kh, kw)
        return weight.shape[1] * weight.shape[2] * weight.shape[3]
    if op in _ATTENTION:
        return 2 * args[1].shape[-2]  # key (B, h, S, d): q.k over S, then the weighted sum over S
    return 0


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # MUST_, not PREFER_: a PREFER_ is a hint the compiler's partitioner may override (minsdxl.compile)
    if recompute_cost(op, args) >= KEEP_COST:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def run(module: torch.nn.Module, *args: torch.Tensor, policy: str | None) -> torch.Tensor:
    """`module(*args)`, under checkpointing `policy` ("full" or "selective"; None: not checkpointed).
    Non-reentrant checkpointing (PyTorch's recommended mode) needs no input that requires grad, so
    LoRA gradients still flow when every base weight is frozen."""
    if policy is None:
        return module(*args)
    if policy == "selective":
        contexts = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
        return checkpoint(module, *args, use_reentrant=False, context_fn=contexts)
    return checkpoint(module, *args, use_reentrant=False)
