"""lora/ on models that are not SDXL, against peft: transformers' GPT-2, Llama, ViT and CLIP text
encoder and a small CNN, built from configs here (no download). The same adapter values go into
peft's layers; outputs and every adapter gradient must agree, in fp32 (tests/parity.py's bound)
and in fp64 (where only the order of sums can differ). Also the models whose owners read a child's
weight instead of calling it: nn.MultiheadAttention, nn.TransformerEncoder in eval mode (its fused
fast path), ViT's patch embedding, transformers' output embeddings and resizing."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from tests.parity import assert_matches_reference, relative_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config), torch.randint(0, 64, (2, 7))


def llama(tie=False):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config), torch.randint(0, 64, (2, 7))


def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(config, add_pooling_layer=False), torch.randn(2, 3, 16, 16)


def clip_text():
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=64, max_position_embeddings=16)
    return transformers.CLIPTextModel(config), torch.randint(0, 64, (2, 7))


class CNN(nn.Module):
    """A small ResNet-like classifier: 3x3 convs (one strided), a 1x1 shortcut, a Linear head. (No dilated
    conv: peft's LoCon ignores the base's dilation, test_lora.py checks ours on one.)"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x (B, 3, H, W)
        h = F.silu(self.stem(x))
        h = self.norm(self.conv2(F.silu(self.conv1(h))) + self.shortcut(h))
        return self.head(h.mean(dim=(2, 3)))


def cnn():
    return CNN(), torch.randn(2, 3, 12, 12)


# model factory, LoRA targets, conv rank (None: Linear-like layers only)
MODELS = {
    "gpt2": (gpt2, ["c_attn", "c_proj", "c_fc"], None),  # transformers' Conv1D, weight stored (in, out)
    "llama": (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "vit": (vit, ["q_proj", "v_proj", "fc1", "projection"], 4),  # projection: the 4x4 stride-4 patch conv
    "clip_text": (clip_text, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], None),
    "cnn": (cnn, ["stem", "conv1", "conv2", "shortcut", "head"], 4),
}


def output(model, x):
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def randomize(model, seed=1):
    """Non-zero up weights and trained-looking magnitudes, so every part of the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            up = layer.lora_up.weight
            up.copy_(torch.randn(up.shape, generator=g, dtype=torch.float64).to(up.dtype) * 0.1)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=g, dtype=torch.float64)
                                     .to(layer.magnitude.dtype))


def peft_twin(ours, base, targets, rank, alpha, variant, conv_rank):
    """peft's adapters on a copy of `base` with the values of ours."""
    options = dict(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=variant == "rslora",
                   use_dora=variant == "dora", fan_in_fan_out=isinstance(base, transformers.GPT2PreTrainedModel))
    if conv_rank is not None:
        kxk = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        options.update(rank_pattern={n: conv_rank for n in kxk}, alpha_pattern={n: conv_rank for n in kxk})
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**options), copy.deepcopy(base))
    with torch.no_grad():
        for path, layer in lora.lora_layers(ours).items():
            twin = theirs.get_submodule(path)
            twin.lora_A["default"].weight.copy_(layer.lora_down.weight)
            twin.lora_B["default"].weight.copy_(layer.lora_up.weight)
            if layer.magnitude is not None:
                m = twin.lora_magnitude_vector["default"].weight
                m.copy_(layer.magnitude.view(m.shape))  # peft's conv magnitude is (1, out, 1, 1)
            assert twin.scaling["default"] == pytest.approx(layer.scale, rel=1e-12), path
    return theirs


def adapter_grads(model, peft_names: bool) -> dict[str, torch.Tensor]:
    """{path.down/up/magnitude: gradient} under one naming for both libraries."""
    out = {}
    for path, layer in lora.lora_layers(model).items() if not peft_names else []:
        out[f"{path}.down"], out[f"{path}.up"] = layer.lora_down.weight.grad, layer.lora_up.weight.grad
        if layer.magnitude is not None:
            out[f"{path}.magnitude"] = layer.magnitude.grad
    if peft_names:
        for name, p in model.named_parameters():
            if p.requires_grad:
                path, part = name.rsplit(".default", 1)[0].rsplit(".", 1)
                out[f"{path}.{ {'lora_A': 'down', 'lora_B': 'up', 'lora_magnitude_vector': 'magnitude'}[part] }"] = p.grad
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_outputs_and_gradients_equal_peft(model_name, variant, dtype):
    make, targets, conv_rank = MODELS[model_name]
    torch.manual_seed(0)
    base, x = make()
    base = base.to(dtype).eval()
    x = x.to(dtype) if x.is_floating_point() else x
    rank, alpha = 4, 8
    ours = copy.deepcopy(base)
    report = lora.inject(ours, targets, rank=rank, alpha=alpha, rslora=variant == "rslora", dora=variant == "dora",
                         conv_rank=conv_rank, conv_alpha=conv_rank)
    assert report.unmatched_patterns == [] and not report.skipped_convs and not report.unsupported
    randomize(ours)
    theirs = peft_twin(ours, base, targets, rank, alpha, variant, conv_rank)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == report.trainable_params

    got, expected = output(ours, x), output(theirs, x)
    assert not torch.allclose(got, output(base, x))  # the adapters change the output
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert_matches_reference(got, expected, f"{model_name} {variant} output", rel=rel)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    ours_g, theirs_g = adapter_grads(ours, False), adapter_grads(theirs, True)
    assert ours_g.keys() == theirs_g.keys()
    flat = lambda grads: torch.cat([grads[k].flatten() for k in sorted(grads)])  # noqa: E731
    worst = max(ours_g, key=lambda k: relative_error(ours_g[k], theirs_g[k].view(ours_g[k].shape)))
    assert_matches_reference(ours_g[worst], theirs_g[worst].view(ours_g[worst].shape),
                             f"{model_name} {variant}: worst of {len(ours_g)} adapter gradients ({worst})", rel=rel)
    assert_matches_reference(flat(ours_g), flat(theirs_g), f"{model_name} {variant}: all adapter gradients", rel=rel)


def test_gpt2_conv1d_layers_are_adapted_merged_and_saved(tmp_path):
    """GPT-2's c_attn/c_proj are transformers' Conv1D (weight (in, out)): adapted like Linear layers,
    merged into the transposed layout, and written with the (r, in)/(out, r) factors peft writes."""
    torch.manual_seed(0)
    model, ids = gpt2()
    model.eval()
    report = lora.inject(model, ["c_attn", "c_proj", "lm_head"], rank=4, skip_unsupported=False)
    assert report.wrapped == 2 * 3 + 1 and report.unmatched_patterns == []  # c_proj: attention's and the MLP's
    randomize(model)
    expected = output(model, ids)
    path = lora.save_file(model, tmp_path / "gpt2.safetensors")
    tensors, _ = lora.read_file(path)
    assert tensors["transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors["transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    fresh, _ = gpt2()
    fresh.load_state_dict(copy.deepcopy(lora_free_state(model)))
    lora.load_file(fresh.eval(), path)
    torch.testing.assert_close(output(fresh, ids), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(lora.LoRAError, match=r"'lm_head': its weight is tied to .*wte.weight"):
        lora.merge(model)  # lm_head shares its weight with the token embeddings


def lora_free_state(model):
    """The model's own weights, by the names they have without adapters."""
    adapters = {f"{path}.{name}" for path, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, lora.LoRALayer) for name, _ in m.named_parameters(recurse=False)}
    adapters |= {f"{path}.{part}.weight" for path, m in model.named_modules(remove_duplicate=False)
                 if isinstance(m, lora.LoRALayer) for part in ("lora_down", "lora_up")}
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if k not in adapters}


# ---- owners that read their child's weight instead of calling it ---------------------------------


def test_multihead_attention_out_proj():
    """nn.MultiheadAttention never calls out_proj: it passes out_proj.weight to its functional form,
    and in eval mode without grad to its fused kernel. Both see the adapted weight."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    lora.inject(mha, ["out_proj"], rank=4)
    randomize(mha)
    reference = copy.deepcopy(mha)
    lora.bake(reference)  # a plain MultiheadAttention with W + dW
    assert type(reference.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    got = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unadapted(mha)(x, x, x, need_weights=False)[0])
    got.sum().backward()
    assert mha.out_proj.lora_up.weight.grad.abs().sum() > 0  # the gradient reaches the adapter
    mha.eval()
    with torch.no_grad():  # the fused fast path
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], reference.eval()(x, x, x, need_weights=False)[0],
                                   rtol=1e-5, atol=1e-6)
        lora.merge(mha)
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], reference(x, x, x, need_weights=False)[0],
                                   rtol=1e-5, atol=1e-6)


def unadapted(model):
    copy_ = copy.deepcopy(model)
    lora.remove(copy_)
    return copy_


@pytest.mark.parametrize("train", [False, True])
def test_transformer_encoder(train):
    """nn.TransformerEncoder in eval mode runs a fused kernel that reads every weight itself."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    lora.inject(model, ["out_proj", "linear1", "linear2"], rank=4)
    randomize(model)
    reference = copy.deepcopy(model)
    lora.bake(reference)
    model.train(train), reference.train(train)
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, unadapted(model)(x), atol=1e-4)
        lora.merge(model)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_vit_patch_embedding_reads_its_conv_weight():
    """ViT's patch embedding reads `projection.weight.dtype`; the wrapper gives the base's."""
    torch.manual_seed(0)
    model, pixels = vit()
    model.eval()
    lora.inject(model, ["projection"], rank=2, conv_rank=2)
    assert model.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    randomize(model)
    expected = output(model, pixels)
    lora.merge(model)
    torch.testing.assert_close(output(model, pixels), expected, rtol=1e-5, atol=1e-5)
    lora.remove(model)
    assert type(model.embeddings.patch_embeddings.projection) is nn.Conv2d


def test_output_embeddings_tying_and_resizing():
    """transformers reads `get_output_embeddings().weight`, ties lm_head by assigning its weight, and
    resizes it by building a new layer. Resizing after injection would replace the adapted head by a
    plain one (transformers builds it), so lora/ says to resize first; both orders are shown here."""
    torch.manual_seed(0)
    model, ids = llama(tie=True)
    model.eval()
    lora.inject(model, ["lm_head", "q_proj"], rank=4)
    head = model.get_output_embeddings()
    assert isinstance(head, lora.LoRALayer) and head.weight.shape == (64, 32)
    assert head.base.weight is model.get_input_embeddings().weight  # tied through the wrapper
    model.tie_weights()  # assigns lm_head.weight: lands on the base layer
    assert head.base.weight is model.get_input_embeddings().weight
    randomize(model)
    before = output(model, ids)
    assert not torch.allclose(before, output(unadapted(model), ids))

    # resize first, then inject: the order docs/lora.md gives, nothing lost
    model, ids = llama(tie=False)
    model.resize_token_embeddings(70, mean_resizing=False)
    lora.inject(model, ["lm_head"], rank=4)
    assert model.lm_head.weight.shape == (70, 32) and output(model.eval(), ids).shape == (2, 7, 70)
    # after inject transformers itself refuses (it rebuilds the head only from an nn.Linear): an error,
    # never a head silently rebuilt without its adapter
    with pytest.raises(TypeError, match="LoRALayer"):
        model.resize_token_embeddings(72, mean_resizing=False)
