"""--fp8_base (minsdxl/fp8.py): float8 weights with a per-tensor scale, upcast per layer.

Against the unquantised model on the tiny config: the output error, the bytes, the state-dict keys,
the meta device, LoRA training on top (gradients equal to those through the dequantised weights, and
no upcast weight kept for the backward pass), train.py and sample.py end to end, and what is refused.
The full-size output error is `slow`. Each measured error is printed (pytest -s shows it).
"""

import copy
import gc

import pytest
import torch
import torch.nn as nn

import lora
import sample
import train
from minsdxl import UNet, UNetConfig, load_unet
from minsdxl.fp8 import FP8, Float8Conv2d, Float8Linear, dequantize, quantize_fp8, quantize_weight
from minsdxl.lora_files import load_sdxl_lora, save_sdxl_lora
from tests.test_unet import make_inputs


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||"""
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def tiny_unet(seed: int = 0, dtype=torch.float32) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.tiny()).to(dtype).eval().requires_grad_(False)


def dequantized_copy(q: nn.Module, ref: nn.Module) -> nn.Module:
    """`ref` with each quantised layer's weight replaced by what the fp8 layer computes with: plain layers, plain autograd."""
    out = copy.deepcopy(ref)
    for (_, layer), (_, plain) in zip(q.named_modules(), out.named_modules()):
        if isinstance(layer, (Float8Linear, Float8Conv2d)):
            plain.weight.data = dequantize(layer.weight, layer.weight_scale, torch.float32)
    return out


def test_the_per_tensor_scale_lowers_the_weight_error():
    """At SDXL's layer sizes most weights are below e4m3's smallest normal number (2^-6): a plain cast
    makes them subnormal. The scale keeps the error at e4m3's 3 mantissa bits whatever the weight's size."""
    g = torch.Generator().manual_seed(0)
    for std in (0.002, 0.005, 0.01, 0.02, 0.05):
        w = torch.randn(1280, 1280, generator=g) * std
        q, s = quantize_weight(w)
        scaled, plain = rel_err(dequantize(q, s, torch.float32), w), rel_err(w.to(FP8).float(), w)
        print(f"normal weights, std {std}: relative error {scaled:.4f} with the per-tensor scale, {plain:.4f} plain cast")
        assert scaled < 0.028  # measured 0.0264-0.0265
        if std <= 0.02:
            assert plain > 1.1 * scaled  # measured 0.282, 0.113, 0.057, 0.033 (0.027 at std 0.05)
    q, s = quantize_weight(torch.zeros(3, 3))
    assert torch.equal(dequantize(q, s, torch.float32), torch.zeros(3, 3))  # no 0/0
    big = torch.tensor([1000.0, -1000.0, 1.0])  # beyond e4m3's 448: scaled, not NaN
    q, s = quantize_weight(big)
    torch.testing.assert_close(dequantize(q, s, torch.float32), big, rtol=0.07, atol=0)


def test_tiny_unet_output_bytes_and_keys():
    ref = tiny_unet()
    inputs = make_inputs(UNetConfig.tiny())
    q = copy.deepcopy(ref)
    report = quantize_fp8(q, torch.float32)
    assert report.startswith("263 Linear/Conv2d layers stored in torch.float8_e4m3fn")
    with torch.no_grad():
        expected, got = ref(*inputs), q(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU path: bf16 autocast over fp8 weights
            got_bf16 = q(*inputs)
    err, err_bf16 = rel_err(got, expected), rel_err(got_bf16, expected)
    print(f"tiny UNet, fp8 vs fp32 output: relative error {err:.4f} (fp32 compute), {err_bf16:.4f} (bf16 autocast)")
    assert err < 0.12 and err_bf16 < 0.12  # measured 0.072 and 0.073 (the tiny random UNet amplifies 2.5% weight error ~3x)
    # Every layer is still an nn.Linear / nn.Conv2d; the keys are those of the model, plus one scale per layer.
    fp8_layers = [m for m in q.modules() if isinstance(m, (Float8Linear, Float8Conv2d))]
    assert len(fp8_layers) == 263 and all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in fp8_layers)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in q.modules())
    before, after = ref.state_dict(), q.state_dict()
    assert {k: v.shape for k, v in after.items() if k in before} == {k: v.shape for k, v in before.items()}
    extra = set(after) - set(before)
    assert len(extra) == 263 and all(k.endswith(".weight_scale") and after[k].shape == () for k in extra)
    assert after["conv_in.weight"].dtype == FP8 and after["conv_in.bias"].dtype == torch.float32
    assert after["conv_norm_out.weight"].dtype == torch.float32  # norms are left as they are
    # bf16 weights: the Linear/Conv2d bytes halve (biases stay bf16, plus 4 bytes of scale per layer).
    ref16 = tiny_unet(dtype=torch.bfloat16)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    before16 = nbytes(ref16)
    print(f"tiny UNet bf16 -> fp8: {quantize_fp8(ref16, torch.bfloat16)}")
    assert 0.49 < nbytes(ref16) / before16 < 0.52  # measured 3,086,372 / 6,110,472 = 0.505


def test_on_the_meta_device():
    """What a memory planner does: the full SDXL UNet and the tiny one, no data, forward and backward."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl_base()).to(torch.bfloat16).requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    report = quantize_fp8(unet, torch.bfloat16)
    print(f"SDXL base, bf16 -> fp8 (meta): {report}")
    weights = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert weights < 0.51 * 2 * params  # measured 2,569,050,224 bytes, from 5,134,927,368 in bf16
    assert all(m.weight_scale.is_meta and m.weight_scale.dtype == torch.float32
               for m in unet.modules() if isinstance(m, (Float8Linear, Float8Conv2d)))
    with torch.device("meta"):
        tiny = UNet(UNetConfig.tiny()).to(torch.bfloat16).requires_grad_(False)
    quantize_fp8(tiny, torch.bfloat16)
    lora.inject(tiny, ["to_q", "to_v"], rank=4, dtype=torch.float32)
    inputs = [t.to("meta") for t in make_inputs(UNetConfig.tiny(), dtype=torch.bfloat16)]
    out = tiny(*inputs)
    out.float().sum().backward()
    assert out.is_meta and out.shape == (2, 4, 16, 16)
    assert all(p.grad is not None for p in tiny.parameters() if p.requires_grad)


def test_lora_on_an_fp8_base_gets_the_gradients_of_the_dequantised_weights():
    """lora.inject wraps the fp8 layers like any other (LoCon reaching the convs too); the gradients reach
    the fp32 adapters, through our backward of every fp8 Linear and Conv2d, and equal plain autograd's
    through the dequantised weights. Autograd keeps no upcast weight for the backward pass."""
    cfg = UNetConfig.tiny()
    ref = tiny_unet()
    q = copy.deepcopy(ref)
    quantize_fp8(q, torch.float32)
    plain = dequantized_copy(q, ref)
    for model in (q, plain):  # early adapters: their gradients come back through every later fp8 layer
        torch.manual_seed(1)
        lora.inject(model, ["to_q", "ff.net.2", "down_blocks.0.resnets.0", "up_blocks.0.resnets.0"], rank=4,
                    conv_rank=2, dtype=torch.float32)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)
    layers = lora.lora_layers(q)
    assert isinstance(layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].base, Float8Linear)
    assert isinstance(layers["up_blocks.0.resnets.0.conv1"].base, Float8Conv2d)
    assert all(layer.lora_down.weight.dtype == torch.float32 for layer in layers.values())

    upcast_shapes = {tuple(m.weight.shape) for m in q.modules() if isinstance(m, (Float8Linear, Float8Conv2d))}
    saved = []
    inputs = make_inputs(cfg)

    def grads(model, gradient_checkpointing=False):
        model.set_gradient_checkpointing(gradient_checkpointing)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            model(*inputs).square().mean().backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    got = grads(q)
    assert not any(dtype == torch.float32 and shape in upcast_shapes for dtype, shape in saved)  # only float8 weights
    assert any(dtype == FP8 for dtype, _ in saved)
    expected = grads(plain)
    assert got.keys() == expected.keys() and len(got) == 2 * len(layers)
    assert all(p.grad is None for n, p in q.named_parameters() if not p.requires_grad)  # nothing reaches the base
    worst = max(rel_err(got[n], expected[n]) for n in got)
    print(f"LoRA gradients on the fp8 base vs plain autograd through the dequantised weights: {worst:.1e} worst relative")
    assert worst < 1e-4 and all(g.abs().sum() > 0 for g in got.values())
    checkpointed = grads(q, gradient_checkpointing=True)
    assert max(rel_err(checkpointed[n], got[n]) for n in got) < 1e-5


def test_what_is_refused():
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        quantize_fp8(tiny_unet(), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        quantize_fp8(tiny_unet(), torch.int8)
    trainable = tiny_unet().requires_grad_(True)
    with pytest.raises(ValueError, match=r"263 Linear/Conv2d layers have trainable weights .*conv_in.*frozen weights only"):
        quantize_fp8(trainable, torch.float32)
    assert type(trainable.conv_in) is nn.Conv2d  # nothing was changed
    dora = tiny_unet()
    lora.inject(dora, ["to_q"], rank=2, dora=True)
    with pytest.raises(ValueError, match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q' is a DoRA layer"):
        quantize_fp8(dora, torch.float32)
    q = tiny_unet()
    quantize_fp8(q, torch.float32)
    with pytest.raises(ValueError, match="DoRA reads its base weight, which is stored in torch.float8_e4m3fn"):
        lora.inject(q, ["to_k"], rank=2, dora=True)
    lora.remove(q)
    lora.inject(q, ["to_v"], rank=2)  # no dtype given: fp32 adapters, not float8 ones
    assert all(layer.lora_up.weight.dtype == torch.float32 for layer in lora.lora_layers(q).values())
    for fold in (lora.merge, lora.bake):  # a float8 weight cannot take the adapter; nothing is changed
        with pytest.raises(lora.LoRAError, match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_v': "
                                                 r"cannot merge into a base weight stored in torch.float8_e4m3fn"):
            fold(q)
    assert not any(layer.merged for layer in lora.lora_layers(q).values())
    with pytest.raises(SystemExit, match="--use_dora reads the base weights"):
        train.check_args(train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                           "--fp8_base", "--use_dora"]))
    for extra in (["--lora", __file__, "--merge_lora"], ["--lora", __file__, "--lora", __file__]):
        with pytest.raises(SystemExit, match="--fp8_base keeps the LoRA as a separate layer"):
            sample.check_args(sample.parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "x", "--fp8_base", *extra]))


def demo_run(out, *extra) -> dict:
    return train.main(train.parse_args(["--demo", "--output_dir", str(out), *extra]))


def test_train_demo_with_fp8_base_reaches_the_same_loss(tmp_path, capsys):
    """The same 8 demo steps (same data, noise and timesteps) with and without --fp8_base; a resume may not
    switch it (it changes what is computed)."""
    steps = ("--max_train_steps", "8", "--checkpointing_steps", "8")
    plain = demo_run(tmp_path / "plain", *steps)["losses"]
    fp8 = demo_run(tmp_path / "fp8", *steps, "--fp8_base")["losses"]
    assert "fp8 base: 263 Linear/Conv2d layers stored in torch.float8_e4m3fn" in capsys.readouterr().out
    worst = max(abs(a - b) / a for a, b in zip(plain, fp8))
    print(f"demo, 8 steps: mean loss {sum(plain) / 8:.4f} plain, {sum(fp8) / 8:.4f} fp8 base; worst step {worst:.4f} relative")
    assert len(fp8) == 8 and worst < 0.02  # measured 0.0038 (over 8, 12 and 40 steps)
    # The LoRA it wrote is an ordinary one: it loads into the unquantised UNet.
    assert load_sdxl_lora(load_unet(tmp_path / "fp8" / "demo-model"), tmp_path / "fp8" / "lora_kohya.safetensors").unused == []
    with pytest.raises(SystemExit, match=r"other --fp8_base False \(now True\).*cannot change on resume"):
        demo_run(tmp_path / "plain", "--max_train_steps", "9", "--resume_from_checkpoint", "latest", "--fp8_base")


def test_train_with_fp8_base_under_bf16_autocast_and_checkpointing(tmp_path):
    run = demo_run(tmp_path / "bf16", "--max_train_steps", "1", "--fp8_base", "--mixed_precision", "bf16",
                   "--gradient_checkpointing")
    assert len(run["losses"]) == 1 and 0.5 < run["losses"][0] < 2  # measured 1.21


def test_sample_demo_with_fp8_base_and_a_lora(tmp_path, capsys):
    first = sample.main(sample.parse_args(["--demo", "--output_dir", str(tmp_path / "a"), "--steps", "2", "--fp8_base"]))
    assert "fp8 base: 263 Linear/Conv2d layers" in capsys.readouterr().out and first["images"][0].is_file()
    pipe = tmp_path / "a" / "tiny-sdxl"
    unet = load_unet(pipe)
    lora.inject(unet, ["to_q", "to_v"], rank=4)
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            layer.lora_up.weight.normal_(std=0.3)
    path = save_sdxl_lora(unet, tmp_path / "style.safetensors")
    result = sample.main(sample.parse_args(["--demo", "--pretrained_model_name_or_path", str(pipe), "--output_dir",
                                            str(tmp_path / "b"), "--steps", "2", "--fp8_base", "--lora", str(path),
                                            "--compare"]))
    assert result["grid"].is_file() and len(result["base_images"]) == len(result["images"]) == 1


@pytest.mark.slow
def test_sdxl_base_full_size_fp8_vs_bf16_output():
    """The full UNet, random weights with PyTorch's (and diffusers') default init: its bf16 weights
    against the same weights in fp8, both computed in fp32 so the difference is the storage alone
    (10.3 GB, then the fp32 weights are freed layer by layer as quantize_fp8 replaces them; measured:
    10.7 GB peak RSS, 3.4 minutes on 2 busy cores)."""
    cfg = UNetConfig.sdxl_base()
    torch.manual_seed(0)
    unet = UNet(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.bfloat16().float())  # the bf16 UNet's values
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([999, 17])
    context = torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, cfg.pooled_text_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2)
    with torch.no_grad():
        expected = unet(x, t, context, pooled, time_ids)
        print(f"SDXL base: {quantize_fp8(unet, torch.float32)}")
        gc.collect()
        got = unet(x, t, context, pooled, time_ids)
    err = rel_err(got, expected)
    print(f"full-size SDXL base UNet, fp8 vs bf16 weights (fp32 compute): relative error {err:.4f}")
    assert err < 0.1  # measured 0.076 (the tiny UNet: 0.072)
