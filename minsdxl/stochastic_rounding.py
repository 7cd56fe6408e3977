"""Stochastic rounding of fp32 values into bf16 weights (Gupta et al. 2015, "Deep Learning with Limited
Numerical Precision"; for bf16 training: Zamirai et al. 2020, "Revisiting BFloat16 Training").

Why full fine-tuning needs it: bf16 keeps 8 significant bits, so the neighbours of a weight w are
about |w| * 2^-8 apart (0.4% of it). Round-to-nearest turns w + u back into w whenever the update u
is less than half that gap, and a fine-tuning update (lr 1e-5 to 1e-6 times a gradient-sized step) is
almost always smaller: with plain bf16 weights most of training does nothing. Rounded stochastically,
w + u becomes the upper neighbour with probability (w + u - lower) / gap and the lower one otherwise,
so E[round(w + u)] = w + u exactly: small updates are kept on average and add up over the steps.

How: a bf16 number is the upper 16 bits of an fp32 (sign, 8 exponent bits, 7 mantissa bits). Adding a
uniform random integer in [0, 2^16) to the fp32's bit pattern and cutting the lower 16 bits carries
into the kept bits with probability (lower 16 bits) / 2^16, which is exactly the fraction of the gap
the value has passed. Carries that reach the exponent are right too: the pattern of the next larger
bf16 number is the next integer. (The same bit trick as kohya-ss/sd-scripts' `copy_stochastic_`.)
"""

from __future__ import annotations

import torch

LOW_BITS = 1 << 16  # the fp32 bits below bf16's last mantissa bit
KEEP_HIGH = -65536  # 0xFFFF0000 as an int32: sign, exponent and bf16's 7 mantissa bits


@torch.no_grad()
def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """target (bf16) <- source (fp32), each element rounded up or down at random so that the expected
    result is the source value. `generator` (on source's device) makes the draws repeatable; its state is
    what a resumed run must restore to round the same way."""
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ writes fp32 into bf16, not {source.dtype} into {target.dtype}")
    noise = torch.randint(0, LOW_BITS, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits = noise.add_(source.view(torch.int32))  # the fp32 bit patterns, plus the random carry-in
    bits.bitwise_and_(KEEP_HIGH)  # the lower 16 bits are now zero, so the bf16 copy below is exact
    return target.copy_(bits.view(torch.float32))
