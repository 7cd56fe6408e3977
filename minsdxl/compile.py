"""Regional compilation: torch.compile the UNet's repeated blocks, not the whole graph.

SDXL is a few block types repeated many times: 70 BasicTransformerBlocks of two widths and 22
ResnetBlock2Ds of a dozen channel pairs. Compiling each of those once (as diffusers'
`compile_repeated_blocks` does for its transformer blocks; the PyTorch recipe "regional compilation")
takes seconds to minutes instead of the whole UNet's much longer compile, and gets what compiling
brings here: inductor fuses the chains of cheap ops between the matmuls and convolutions (GroupNorm +
SiLU, LayerNorm, GEGLU's gate, residual adds, the time embedding's broadcast add) into one kernel
each, which reads and writes the activations once instead of once per op. Matmuls, convolutions and
attention still run the vendor libraries' kernels.

What is compiled is `checkpointing.run`, the call through which the UNet runs every such block, with
the block as an argument: one compiled function per block type and shape, shared by all blocks of
that shape (their weights are its inputs), and the block's gradient checkpointing is compiled with it,
so that the selective policy's choice of what to keep reaches the compiler's own split of forward and
backward (AOTAutograd's partitioner honours torch.utils.checkpoint's policy tags).

On the CPU, inductor gives convolutions channels-last activations (what oneDNN runs fastest); the
weights should then be channels-last too (train.py's and sample.py's --channels_last, the default),
or every convolution converts its weight when it runs.

A compiler may be missing or broken (inductor needs a C++ compiler on the CPU and Triton on a GPU).
`compile_repeated_blocks` first compiles and runs, forward and backward, a small probe on the model's
device; if that fails it says so in one line and leaves the model eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checkpointing
from .unet import BasicTransformerBlock, ResnetBlock2D

REPEATED_BLOCKS = (ResnetBlock2D, BasicTransformerBlock)
# One compiled graph per block type, shape, checkpointing policy and grad mode: SDXL has 12 resnet
# channel/size combinations and 2 transformer widths per resolution, so dynamo's default limit of 8
# graphs per function would leave most blocks eager.
RECOMPILE_LIMIT = 128


def compiler_problem(device: torch.device | str, backend="inductor") -> str | None:
    """Why torch.compile with `backend` does not work on `device`, in one line; None if it does.
    Compiles and runs a norm, an activation and a matmul, forward and backward."""

    def probe(x, w):
        return F.linear(F.silu(F.group_norm(x, 2)), w).sum()

    x = torch.randn(2, 4, 8, device=device)
    w = torch.randn(8, 8, device=device, requires_grad=True)
    try:
        torch.compile(probe, backend=backend, dynamic=False)(x, w).backward()
    except Exception as e:  # a missing C++ compiler, Triton or CUDA toolkit shows up here, as any exception
        while getattr(e, "inner_exception", None) or e.__cause__:  # dynamo wraps the backend's own error
            e = getattr(e, "inner_exception", None) or e.__cause__
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    return None


def compile_repeated_blocks(model: torch.nn.Module, backend="inductor", log=print,
                            device: torch.device | str | None = None) -> bool:
    """Compile every ResnetBlock2D and BasicTransformerBlock of `model` (a UNet) together with its
    checkpointing. Returns False, having said why in one line, when no compiler works here (the model
    then runs eager, unchanged). `backend`: torch.compile's (a name or a callable); `device`: where the
    model will run (default: where its weights are; sample.py --lowvram keeps them on the CPU)."""
    blocks = [m for m in model.modules() if isinstance(m, REPEATED_BLOCKS)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResnetBlock2D or BasicTransformerBlock to compile")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    problem = compiler_problem(device, backend)
    if problem:
        log(f"--compile: torch.compile does not work on {device.type} here ({problem}); running eager")
        return False
    nchw = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4
            and not m.weight.is_contiguous(memory_format=torch.channels_last)]
    if device.type == "cpu" and nchw:
        log("--compile: note: on the CPU inductor runs convolutions on channels-last activations; with NCHW weights "
            "each one converts its weight at every call (slower, and a weight-sized copy at a time: measured +800 MiB "
            "at SDXL's peak). --channels_last avoids it.")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(checkpointing.run, backend=backend, dynamic=False)
    for block in blocks:
        block.compiled_run = compiled  # a plain attribute: no new parameters, state dict keys unchanged
    return True
