"""Comparing our outputs with the reference implementations' (diffusers, transformers), to a bound
that means something, with the error actually measured printed at the end of the run.

The bound, for fp32: max |ours - ref| <= 1e-5 * max |ref| over a whole model's (or a whole
sampling run's) output. Why that number:
- fp32 rounds each operation to 2^-24 ~ 6e-8 relative. Two correct implementations of the same
  function differ only in the order of their sums (BLAS blocking, which matmul kernel PyTorch picks),
  which moves a UNet's output by about 1e-7..1e-6 of its scale (measured below: 7.4e-7 of max |ref|
  on the tiny pipeline; a 6-step sampling run with guidance 5 stays at 5e-7..8e-7).
- The smallest real bugs we know of sit just above it: the transformers' GroupNorm with eps 1e-5
  instead of SDXL's 1e-6 moves the tiny UNet's output by 1.3e-5 of its scale, one weight deep in
  the network changed by 1e-2 (test_unet's test_perturbed_weight_breaks_parity) by 3.8e-5.
So 1e-5 leaves 10x room for reordering and still catches those; a looser bound would not.

Exact equality with the reference is not ours to promise: it depends on which kernel PyTorch picks
for the other library's tensors. One example, found when diffusers 0.42 started to fail a bitwise
assertion: `F.linear` on the (B, L, C) token tensor (a transposed view after the permute) takes one of
two paths in PyTorch's matmul, a copy and one 2-D matmul or a batched matmul on the view, depending on
whether the *weight requires grad*, even under `torch.no_grad()`. diffusers' `from_pretrained` returns trainable parameters, our loaders
frozen ones; with both frozen the outputs are bitwise equal, with one of each they differ by 6.6e-7.
That is why every comparison records what it measured (0.0 is printed as "bitwise") instead of
asserting it; `conftest.py` prints the table.
"""

from __future__ import annotations

import os

import torch

FP32_REL = 1e-5  # relative to max |ref|, for a whole model's fp32 output (see above)

MEASURED: list[tuple[str, str, float]] = []  # (test, what, max |ours - ref| / max |ref|)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, computed in fp64."""
    got, expected = got.detach().double(), expected.detach().double()
    assert got.shape == expected.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0, "the reference output is all zeros: the comparison would prove nothing"
    return (got - expected).abs().max().item() / scale


def assert_matches_reference(got: torch.Tensor, expected: torch.Tensor, what: str, rel: float = FP32_REL) -> float:
    """Assert max |got - expected| <= rel * max |expected|; record the measured error for the report."""
    err = relative_error(got, expected)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    MEASURED.append((test, what, err))
    assert err <= rel, f"{what}: max |ours - ref| / max |ref| = {err:.3e} > {rel:.0e}"
    return err
