"""Every speed option computes what the eager, fully checkpointed step computes: the checkpointing
policies (minsdxl/checkpointing.py), channels-last memory layout and regional compilation
(minsdxl/compile.py), each compared with `--gradient_checkpointing full` in eager NCHW, outputs and
LoRA gradients, on the tiny config. The policies re-run the same kernels on the same values, so
they must be bitwise equal; channels-last and compiled kernels sum in another order, so their bound
is the fp32 one of tests/parity.py for the output (measured 1.3e-6 / 1.9e-6 of max |out|) and
GRAD_REL per gradient tensor (measured 1.0e-5 / 1.7e-5 of its max |grad|). The test with inductor's
C++ kernels is `slow` (minutes of compiling); the default suite compiles with AOTAutograd alone.

The tiny model's layers are far cheaper than SDXL's, so the tests lower KEEP_COST to make the
selective policy keep some of them; which ops it keeps at SDXL's sizes is checked on the meta device.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from minsdxl import UNet, UNetConfig, checkpointing, memory
from minsdxl.compile import compile_repeated_blocks, compiler_problem
from tests.parity import assert_matches_reference, relative_error
from tests.test_unet import make_inputs

GRAD_REL = 1e-4  # max |grad - grad_ref| <= GRAD_REL * max |grad_ref|, per LoRA tensor (see above)
TINY_KEEP_COST = 64  # keeps the tiny model's 3x3 convs (288+) and C-wide matmuls (32+..64), not LoRA's up (rank 4)
aten = torch.ops.aten


@pytest.fixture
def tiny_keep_cost(monkeypatch):
    monkeypatch.setattr(checkpointing, "KEEP_COST", TINY_KEEP_COST)


# The tiny config with one resnet per level: fewer block shapes, so fewer graphs to compile.
SMALLEST = dataclasses.replace(UNetConfig.tiny(), layers_per_block=1)


def adapted_unet(cfg: UNetConfig = UNetConfig.tiny()) -> UNet:
    """The tiny UNet with LoRA on attention, the feed-forward and every 3x3 conv (LoCon), B non-zero so
    that every adapter gets a gradient."""
    torch.manual_seed(0)
    unet = UNet(cfg).requires_grad_(False)
    lora.inject(unet, ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"], rank=4, conv_rank=4,
                init="gaussian")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_up" in name:
                p.normal_(std=0.1)
    return unet


def step(unet: UNet, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, a loss, backward: (output, {name: LoRA gradient})."""
    out = unet(*inputs)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return out.detach(), grads


def reference_step(unet: UNet, inputs):
    """The eager path with full checkpointing, NCHW: what every option is compared with."""
    unet.set_gradient_checkpointing("full")
    return step(unet, inputs)


def assert_same(got, expected, what: str, exact: bool) -> None:
    (out, grads), (out_ref, grads_ref) = got, expected
    assert grads.keys() == grads_ref.keys() and len(grads) > 50
    if exact:
        assert torch.equal(out, out_ref), what
        for name in grads_ref:
            assert torch.equal(grads[name], grads_ref[name]), f"{what}: gradient of {name}"
        return
    assert_matches_reference(out, out_ref, f"{what}: UNet output")
    worst = max(grads_ref, key=lambda name: relative_error(grads[name], grads_ref[name]))
    assert_matches_reference(grads[worst], grads_ref[worst], f"{what}: LoRA gradients (the worst, {worst})", rel=GRAD_REL)


class CountOps(TorchDispatchMode):
    """The aten ops that run inside the context, each with the recompute cost of every call, and the
    shapes of the tensors that casts (aten._to_copy) make."""

    def __init__(self):
        super().__init__()
        self.costs: dict = {}
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.costs.setdefault(func, []).append(checkpointing.recompute_cost(func, args))
        out = func(*args, **(kwargs or {}))
        if func is aten._to_copy.default:
            self.shapes.append(tuple(out.shape))
        return out


# --- the policies --------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["none", "selective"])
def test_policies_give_the_full_policys_outputs_and_gradients_bitwise(policy, tiny_keep_cost):
    unet = adapted_unet()
    inputs = make_inputs(UNetConfig.tiny())
    expected = reference_step(unet, inputs)
    unet.set_gradient_checkpointing(policy)
    assert_same(step(unet, inputs), expected, f"--gradient_checkpointing {policy}", exact=True)


def test_selective_recomputes_only_what_is_cheap(tiny_keep_cost):
    """During backward, full checkpointing runs the blocks' convolutions and matmuls again; selective
    runs again only those below KEEP_COST: of the convolutions, LoCon's 1x1 ups (C_in = rank 4). (Of
    the matmuls, the forward's with a bias show as addmm, which backward itself never runs.)"""
    unet = adapted_unet()
    inputs = make_inputs(UNetConfig.tiny())
    recomputed = {}
    for policy in ("full", "selective"):
        unet.set_gradient_checkpointing(policy)
        loss = (unet(*inputs) ** 2).mean()
        with CountOps() as ops:
            loss.backward()
        recomputed[policy] = ops.costs
    full, selective = recomputed["full"], recomputed["selective"]
    assert max(full[aten.convolution.default]) >= 9 * 32 and max(full[aten.addmm.default]) >= 64
    assert set(selective[aten.convolution.default]) == {4}  # LoCon's 1x1 ups
    assert aten.addmm.default not in selective  # every base linear with a bias (K >= 32) kept


def test_selective_keeps_sdxls_expensive_ops_and_recomputes_the_rest(monkeypatch):
    """At SDXL's own sizes (meta device, 1024x1024): every 3x3 convolution, the feed-forward's down
    projection, cross-attention's keys and values of the text and self-attention over 1,024+ tokens are
    kept; the C-wide projections, LoRA's up projections and every cheap op are recomputed."""
    decisions = []
    policy = checkpointing._keep_expensive

    def spy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((op, checkpointing.recompute_cost(op, args), decision == checkpointing.CheckpointPolicy.MUST_SAVE))
        return decision

    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl_base()).requires_grad_(False)
        lora.inject(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=16)
        x, context = torch.empty(1, 4, 128, 128), torch.empty(1, 77, 2048)
        pooled, time_ids = torch.empty(1, 1280), torch.empty(1, 6)
    unet.set_gradient_checkpointing("selective")
    monkeypatch.setattr(checkpointing, "_keep_expensive", spy)
    # SDPA as on a GPU (meta has no kernel of its own): the memory-efficient kernel for fp32
    monkeypatch.setattr(F, "scaled_dot_product_attention", memory.attention_model("cuda", F.scaled_dot_product_attention, {}))
    unet(x, torch.tensor([500], device="meta"), context, pooled, time_ids).sum().backward()
    kept = {(op, cost) for op, cost, keep in decisions if keep}
    recomputed = {(op, cost) for op, cost, keep in decisions if not keep}
    convs = {cost for op, cost in kept if op == aten.convolution.default}
    assert {9 * 320, 9 * 640, 9 * 1280, 9 * 2560} <= convs  # 3x3 convs of every width (and the up path's wider inputs)
    matmuls_kept = {cost for op, cost in kept if op in (aten.mm.default, aten.addmm.default)}
    assert matmuls_kept == {2048, 4 * 640, 4 * 1280}  # the text's keys/values, feed-forward down at both widths
    attention = lambda decided: {cost for op, cost in decided if op in checkpointing._ATTENTION}
    assert attention(kept) == {2 * 1024, 2 * 4096}  # self-attention at 32x32 and 64x64 latents
    assert attention(recomputed) == {2 * 77}  # cross-attention over the 77 text tokens
    assert {cost for op, cost in recomputed if op in (aten.mm.default, aten.addmm.default)} >= {16, 640, 1280}


def test_the_simulator_predicts_each_policy_as_the_profiler_measures_it(tiny_keep_cost):
    """The memory simulator runs the policy itself (on meta) and predicts its step peak; less memory
    than no checkpointing, more than full."""
    peaks = {}
    for policy in ("none", "selective", "full"):
        args, _ = memory.parse_args(["--demo", "--device", "cpu"])
        args.gradient_checkpointing = policy
        if policy == "selective":
            result = memory.check_step_on_cpu(args, steps=1)
            assert abs(result["ratio"] - 1) <= 0.05, result
        plan = memory.simulate(args, "cpu", steps=1)
        peaks[policy] = plan.phase("train step").peak - plan.phase("train step").start
        assert f"checkpointing {policy}" in plan.title
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks


# --- channels-last and compilation ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["full", "selective", "none"])
def test_channels_last_matches(policy, tiny_keep_cost):
    unet = adapted_unet()
    inputs = make_inputs(UNetConfig.tiny())
    expected = reference_step(unet, inputs)
    unet.to(memory_format=torch.channels_last)
    unet.set_gradient_checkpointing(policy)
    assert_same(step(unet, inputs), expected, f"channels-last, {policy} checkpointing", exact=False)


def test_compile_falls_back_to_eager_with_one_line_when_no_compiler_works():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\n(details)")

    unet = adapted_unet()
    inputs = make_inputs(UNetConfig.tiny())
    expected = reference_step(unet, inputs)
    said = []
    assert compile_repeated_blocks(unet, backend=broken_backend, log=said.append) is False
    assert len(said) == 1 and "no C++ compiler found" in said[0] and "running eager" in said[0], said
    assert not any(hasattr(m, "compiled_run") for m in unet.modules())
    assert_same(reference_step(unet, inputs), expected, "after a failed compile", exact=True)


def test_compiled_blocks_run_the_same_graph(tiny_keep_cost):
    """The compiled path's wiring, with a backend that traces and partitions forward and backward
    as inductor does (AOTAutograd, selective checkpointing's policy inside the compiled region) but
    runs PyTorch's own kernels: training and sampling (no gradients) give eager's values."""
    unet = adapted_unet(SMALLEST)
    inputs = make_inputs(SMALLEST)
    with torch.no_grad():
        expected_no_grad = unet(*inputs)
    expected = reference_step(unet, inputs)
    assert compile_repeated_blocks(unet, backend="aot_eager") is True
    unet.set_gradient_checkpointing("selective")
    assert_same(step(unet, inputs), expected, "compiled (aot_eager), selective checkpointing", exact=False)
    with torch.no_grad():
        assert torch.equal(unet(*inputs), expected_no_grad)


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_keep_cost):
    """Regional compilation with inductor, the default backend (fused kernels, so the fp32 bounds):
    a training step with selective checkpointing, the checkpoint compiled with the block. `slow`: about
    two minutes of C++ compilation on two cores the first time (inductor caches it on disk), measured
    1.9e-6 of max |out| and 1.7e-5 of max |grad|."""
    problem = compiler_problem("cpu")
    if problem:
        pytest.skip(f"torch.compile does not work on this machine's CPU: {problem}")
    unet = adapted_unet(SMALLEST)
    inputs = make_inputs(SMALLEST)
    expected = reference_step(unet, inputs)
    assert compile_repeated_blocks(unet) is True
    unet.set_gradient_checkpointing("selective")
    assert_same(step(unet, inputs), expected, "compiled (inductor), selective checkpointing", exact=False)


# --- the LoRA layer under autocast ---------------------------------------------------------------------

def test_lora_under_autocast_computes_in_the_compute_dtype_without_copying_its_input():
    """bf16 frozen weights, fp32 adapters, bf16 autocast (train.py's mixed precision): the adapter's
    matmuls take the bf16 activation as it is (autocast casts the fp32 factors, once), so no fp32 copy of
    the activation is made; the result is what the bf16 matmuls give."""
    torch.manual_seed(0)
    layer = lora.LoRALayer(torch.nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False), rank=4,
                           dtype=torch.float32, init="gaussian")
    torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    x = torch.randn(2, 10, 64).to(torch.bfloat16)
    with CountOps() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert aten._to_copy.default in ops.costs  # autocast's casts of the fp32 factors
    copies = [s for s in ops.shapes if s == tuple(x.shape)]
    assert not copies, "an fp32 copy of the input"
    down, up = layer.lora_down.weight.to(torch.bfloat16), layer.lora_up.weight.to(torch.bfloat16)
    assert torch.equal(y, layer.base(x) + F.linear(F.linear(x, down), up) * layer.scale)


def test_selective_without_compile_says_what_it_costs_on_a_gpu(capsys):
    from minsdxl import train_args
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--gradient_checkpointing", "selective"]
    train_args.check_args(train_args.parse_args(base))
    assert "selective without --compile" in capsys.readouterr().out
    train_args.check_args(train_args.parse_args(base + ["--compile"]))
    assert "selective without --compile" not in capsys.readouterr().out
