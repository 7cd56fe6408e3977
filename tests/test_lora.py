"""lora/: matching rules, injection, freezing and placement, merge/remove, files, equality with peft."""

import copy

import pytest
import torch
import torch.nn as nn

import lora
from minsdxl import UNet, UNetConfig

P = "down_blocks.1.attentions.0.transformer_blocks.0"

# (pattern, path, matches): the table in lora/matching.py's docstring, row by row.
MATCH_TABLE = [
    ("to_q", f"{P}.attn1.to_q", True),
    ("to_q", "to_q", True),
    ("to_q", f"{P}.attn1.to_q_proj", False),
    ("q", f"{P}.attn1.to_q", False),
    ("attn2.to_k", f"{P}.attn2.to_k", True),
    ("attn2.to_k", f"{P}.attn1.to_k", False),
    ("to_out.0", f"{P}.attn1.to_out.0", True),
    ("to_out.0", f"{P}.attn1.to_out.1", False),
    ("to_out.0", f"{P}.attn1.to_out", False),
    ("attn*.to_v", f"{P}.attn1.to_v", True),
    ("attn*.to_v", f"{P}.attn2.to_v", True),
    ("attn*.to_v", f"{P}.attn1.sub.to_v", False),
    ("down_blocks.**.to_q", f"{P}.attn1.to_q", True),
    ("down_blocks.**.to_q", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", False),
    ("down_blocks.**", f"{P}.attn1.to_q", True),
    (r"re:.*attn1\.to_(q|k)", f"{P}.attn1.to_q", True),
    (r"re:.*attn1\.to_(q|k)", f"{P}.attn1.to_k", True),
    (r"re:.*attn1\.to_(q|k)", f"{P}.attn1.to_v", False),
    (r"re:attn1\.to_q", f"{P}.attn1.to_q", False),  # re: is a full match of the whole path
]


@pytest.mark.parametrize("pattern,path,expected", MATCH_TABLE)
def test_matching_table(pattern, path, expected):
    assert lora.matches(path, pattern) is expected
    assert lora.matches(path, ["nothing_like_it", pattern]) is expected


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()
        self.shared = nn.Linear(8, 8)
        self.b.extra = self.shared  # the same module at two paths
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # x (B, 8, H, W)
        h = self.a.conv(self.a.proj(x)) + self.b.conv(self.b.proj(x))
        t = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        t = self.a.to_q(t) + self.a.to_k(t) + self.b.to_q(t) + self.shared(t) + self.b.extra(t)
        return self.head(t)


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)


X = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(5))


def test_inject_wraps_linear_and_1x1_conv_and_freezes_first():
    model = toy()
    model.head.weight.requires_grad_(True)
    before = model(X)
    report = lora.inject(model, ["to_q", "proj", "shared"], rank=2)
    # a.to_q, b.to_q, a.proj, b.proj, shared (reached at two paths, one adapter)
    assert sorted(report.paths) == ["a.proj", "a.to_q", "b.extra", "b.proj", "b.to_q", "shared"]
    assert len(lora.lora_layers(model)) == 5
    assert model.shared is model.b.extra
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # the head was trainable before: frozen now
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(model(X), before, rtol=0, atol=1e-6)  # up = 0: unchanged at init
    assert report.unmatched_patterns == []


def test_3x3_convs_only_with_conv_rank():
    report = lora.inject(toy(), ["conv", "to_k"], rank=2)
    assert sorted(report.paths) == ["a.to_k", "b.to_k"]
    assert sorted(report.skipped_convs) == ["a.conv", "b.conv"]
    model = toy()
    report = lora.inject(model, ["conv"], rank=2, conv_rank=3, conv_alpha=6)
    assert sorted(report.paths) == ["a.conv", "b.conv"]
    layer = model.a.conv
    assert layer.rank == 3 and layer.scale == 2.0 and layer.lora_down.weight.shape == (3, 8, 3, 3)


def test_container_match_adapts_everything_inside_and_exclude_wins():
    model = toy()
    report = lora.inject(model, ["a"], exclude=["a.to_k"], rank=2, conv_rank=2)
    assert sorted(report.paths) == ["a.conv", "a.proj", "a.to_q"]


def test_zero_matches_is_an_error_and_leaves_the_model_alone():
    model = toy()
    with pytest.raises(lora.LoRAError, match=r"\['to_query'\].*matched no nn.Linear"):
        lora.inject(model, ["to_query"])
    assert all(p.requires_grad for p in model.parameters())
    report = lora.inject(model, ["to_q", "to_query"])
    assert report.unmatched_patterns == ["to_query"]


@pytest.mark.parametrize("dora", [False, True])
def test_bake_keeps_the_scaled_effect_and_drops_the_layers(dora):
    model = toy()
    lora.inject(model, ["to_q", "proj"], rank=3, alpha=6, dora=dora)
    randomize_adapters(model)
    lora.set_scale(model, 0.5)
    scaled = model(X)
    lora.bake(model)
    assert not lora.lora_layers(model) and type(model.a.to_q) is nn.Linear
    torch.testing.assert_close(model(X), scaled, rtol=1e-5, atol=1e-5)
    lora.inject(model, ["to_q"], rank=2)  # a second LoRA goes on top of the baked one
    torch.testing.assert_close(model(X), scaled, rtol=1e-5, atol=1e-5)


def test_adapters_follow_the_base_device_and_dtype():
    with torch.device("meta"):
        model = Toy()
    lora.inject(model, ["to_q"], rank=2)
    assert model.a.to_q.lora_down.weight.is_meta
    model = toy().to(torch.bfloat16)
    lora.inject(model, ["to_q"], rank=2, dtype=torch.bfloat16)  # asked for
    assert model.a.to_q.lora_up.weight.dtype == torch.bfloat16
    model = toy().to(torch.bfloat16)
    lora.inject(model, ["to_q"], rank=2)  # fp32 master weights beside a bf16 base by default, as in peft
    assert model.a.to_q.lora_up.weight.dtype == torch.float32 and model.a.to_q.base.weight.dtype == torch.bfloat16
    out = model(X.bfloat16())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_remove(dora):
    model = toy()
    original = copy.deepcopy(model.state_dict())
    lora.inject(model, ["to_q", "to_k", "proj", "conv"], rank=3, alpha=6, conv_rank=2, dora=dora)
    randomize_adapters(model)
    unmerged = model(X)
    assert not torch.allclose(unmerged, toy()(X))
    lora.merge(model)
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    for k, v in original.items():
        key = k.replace("to_q.", "to_q.base.").replace("to_k.", "to_k.base.").replace("proj.", "proj.base.").replace("conv.", "conv.base.")
        torch.testing.assert_close(model.state_dict()[key], v, rtol=0, atol=1e-6)
    lora.set_scale(model, 0.0)
    torch.testing.assert_close(model(X), toy()(X), rtol=0, atol=1e-6)
    lora.remove(model)
    assert not lora.lora_layers(model) and type(model.a.to_q) is nn.Linear
    assert model.state_dict().keys() == original.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_dropouts_act_only_in_training():
    model = toy()
    lora.inject(model, ["to_q"], rank=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    randomize_adapters(model)
    model.eval()
    assert torch.equal(model(X), model(X))
    model.train()
    outs = {tuple(model(X).flatten()[:4].tolist()) for _ in range(8)}
    assert len(outs) > 1


def test_rslora_and_gaussian_init():
    model = toy()
    lora.inject(model, ["to_q"], rank=4, alpha=8, rslora=True, init="gaussian")
    assert model.a.to_q.scale == 4.0  # alpha / sqrt(rank)
    assert abs(model.a.to_q.lora_down.weight.std().item() - 0.25) < 0.1


@pytest.mark.parametrize("alpha,multiplier", [(4, 1.0), (8, 1.0), (4, 0.5)])
def test_no_multiply_at_scale_one_and_the_same_output(alpha, multiplier):
    """alpha = rank at strength 1 (diffusers' scripts' default) skips the scaling multiply: one op less per
    adapted layer and call, which a GPU step at batch 1 pays in host time; the output is bitwise
    base(x) + up(down(x)) * scale."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = toy()
    lora.inject(model, ["to_q"], rank=4, alpha=alpha)
    randomize_adapters(model)
    layer = model.a.to_q
    layer.multiplier = multiplier
    x = torch.randn(3, layer.base.in_features)
    with Ops() as ops:
        out = layer(x)
    factor = alpha / 4 * multiplier
    assert ("mul.Tensor" in ops.names) == (factor != 1.0)
    assert torch.equal(out, layer.base(x) + layer.lora_up(layer.lora_down(x)) * factor)


@pytest.mark.parametrize("dora", [False, True])
def test_same_outputs_as_peft(dora):
    from peft import LoraConfig, inject_adapter_in_model

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    ours = MLP()
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=dora), copy.deepcopy(ours))
    lora.inject(ours, ["fc1", "fc2"], rank=4, alpha=8, dora=dora)
    randomize_adapters(ours)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            layer, peft_layer = getattr(ours, name), getattr(theirs, name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_down.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_up.weight)
            if dora:
                torch.testing.assert_close(peft_layer.lora_magnitude_vector["default"].weight, layer.magnitude)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_sdxl_attention_rank16_trainable_count_on_meta():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl_base())
    report = lora.inject(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=16, alpha=32)
    assert report.trainable_params == 23_224_320
    assert report.wrapped == 4 * 140  # 70 transformer blocks x 2 attentions


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_files_round_trip(tmp_path, fmt, dora):
    model = toy()
    lora.inject(model, ["to_q", "proj"], rank=3, alpha=1.5, dora=dora)
    randomize_adapters(model)
    if dora:  # a trained magnitude, not the initial norms
        with torch.no_grad():
            model.a.proj.magnitude.mul_(1.5)
    expected = model(X)
    path = lora.save_file(model, tmp_path / "l.safetensors", format=fmt, metadata={"note": "hi"})
    tensors, meta = lora.read_file(path)
    assert meta["lora.format"] == fmt and meta["note"] == "hi"
    assert any(k.endswith(".lora_down.weight" if fmt == "kohya" else ".lora_A.weight") for k in tensors)
    fresh = toy()
    assert lora.load_file(fresh, path) == []
    torch.testing.assert_close(fresh(X), expected)
    assert fresh.a.to_q.alpha == 1.5 and fresh.a.to_q.rank == 3
    if dora and fmt == "kohya":
        assert tensors["a_proj.dora_scale"].shape == (8, 1, 1, 1)  # ComfyUI/LyCORIS layout


def test_load_errors(tmp_path):
    model = toy()
    lora.inject(model, ["to_q"], rank=3)
    path = lora.save_file(model, tmp_path / "l.safetensors", format="kohya", name_fn=lambda p: "other_" + p)
    with pytest.raises(lora.LoRAError, match=r"2 of 2 adapters match no layer.*other_a_to_q"):
        lora.load_file(toy(), path)
    assert sorted(lora.load_file(toy(), path, strict=False)) == ["other_a_to_q", "other_b_to_q"]
    path = lora.save_file(model, tmp_path / "k.safetensors", format="kohya")
    target = toy()
    lora.inject(target, ["to_q"], rank=5)  # another rank already in place
    with pytest.raises(lora.LoRAError, match=r"'a_to_q' has shape \(3, 8\) but the layer at 'a.to_q' needs \(5, 8\)"):
        lora.load_file(target, path)
    (tmp_path / "l.ckpt").write_bytes(b"x")
    with pytest.raises(lora.LoRAError, match="pickle"):
        lora.load_file(toy(), tmp_path / "l.ckpt")
