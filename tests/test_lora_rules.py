"""lora/'s rules where a LoRA library most easily gives a wrong answer without a word: merge and
strength, what a file carries, what a pattern finds and what it cannot wrap, tied and shared modules,
the meta device, all-or-nothing injection, padding modes, exclusion, several adapters at once."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import lora
from tests.test_lora import X, Toy, randomize_adapters, toy
from tests.test_lora_models import gpt2, llama, lora_free_state, output

ALL = ["to_q", "to_k", "proj", "conv", "shared"]


def adapted_toy(seed=0, **options):
    model = toy(seed)
    lora.inject(model, ALL, rank=3, alpha=6, conv_rank=2, **options)
    randomize_adapters(model)
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lora_free_state(model).items()}


# 1. merge, strength and unmerge -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_unmerge_puts_back_the_exact_weight_whatever_the_strength_now(dora, dtype):
    model = adapted_toy(dora=dora).to(dtype)
    before = base_weights(model)
    lora.set_scale(model, 0.5)
    half = model(X.to(dtype))
    lora.merge(model)
    torch.testing.assert_close(model(X.to(dtype)), half, **tolerance(dtype))
    lora.set_scale(model, 1.0)  # on a merged model: unmerged, scaled, merged again
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    merged_full = model(X.to(dtype))
    lora.unmerge(model)
    torch.testing.assert_close(model(X.to(dtype)), merged_full, **tolerance(dtype))  # strength 1 unmerged
    lora.merge(model)
    lora.remove(model)
    after = base_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bitwise, in bf16 too: the weight is kept


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


# 2. everything that defines the layer's maths round-trips through both formats ---------------------


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("options", [dict(rslora=True), dict(rslora=True, dora=True), dict(dora=True),
                                     dict(conv_alpha=5.0)], ids=["rslora", "rslora-dora", "dora", "conv-alpha"])
def test_layer_maths_round_trip_through_files(tmp_path, fmt, options):
    model = toy()
    lora.inject(model, ALL, rank=4, alpha=3, conv_rank=2, **options)
    randomize_adapters(model)
    expected = model(X)
    path = lora.save_file(model, tmp_path / "a.safetensors", format=fmt)
    fresh = toy()  # no adapters: the file alone says what they are
    assert lora.load_file(fresh, path) == []
    torch.testing.assert_close(fresh(X), expected, rtol=1e-5, atol=1e-6)
    for p, layer in lora.lora_layers(model).items():
        twin = fresh.get_submodule(p)
        assert (twin.rank, twin.alpha, twin.rslora, twin.scale) == (layer.rank, layer.alpha, layer.rslora, layer.scale)
        assert (twin.magnitude is None) == (layer.magnitude is None)
    if fmt == "kohya" and options.get("rslora"):  # what any kohya loader reads: alpha / rank = the rsLoRA scale
        tensors, _ = lora.read_file(path)
        assert tensors["a_to_q.alpha"].item() / 4 == pytest.approx(3 / 4 ** 0.5)


def test_rslora_llama_round_trip(tmp_path):
    torch.manual_seed(0)
    model, ids = llama()
    lora.inject(model, ["q_proj", "v_proj"], rank=4, alpha=8, rslora=True)
    randomize_adapters(model)
    expected = output(model.eval(), ids)
    for fmt in ("peft", "kohya"):
        path = lora.save_file(model, tmp_path / f"{fmt}.safetensors", format=fmt)
        torch.manual_seed(0)
        fresh, _ = llama()
        lora.load_file(fresh.eval(), path)
        torch.testing.assert_close(output(fresh, ids), expected, rtol=1e-5, atol=1e-6)


# 3. patterns that find layers lora/ cannot wrap ---------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids)))


def test_a_pattern_that_only_finds_unwrappable_layers_is_named():
    model = Mixed()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(lora.LoRAError, match=r"nothing was changed: 'emb' matched 1 module of type Embedding, which "
                                             r"lora/ cannot wrap.*'norm' matched 1 module of type LayerNorm.*"
                                             r"skip_unsupported=True"):
        lora.inject(model, ["emb", "norm", "fc"], rank=2)
    assert not lora.lora_layers(model) and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    report = lora.inject(model, ["emb", "norm", "fc"], rank=2, skip_unsupported=True)
    assert report.paths == ["fc"] and report.unsupported == {"emb": ["emb (Embedding)"], "norm": ["norm (LayerNorm)"]}
    assert "not wrappable, skipped: 'emb': ['emb (Embedding)']" in str(report)
    with pytest.raises(lora.LoRAError, match=r"'blocks' matched 1 module of type Sequential, which lora/ cannot wrap"):
        lora.inject(nn.ModuleDict({"fc": nn.Linear(2, 2), "blocks": nn.Sequential(nn.LayerNorm(2))}), ["fc", "blocks"])


def test_a_container_and_a_pattern_inside_it_both_count():
    """SDXL's `all` preset names `attentions` and, inside them, `proj_in`: each layer counts for every
    pattern that chose it, so neither looks like a pattern that found nothing it could wrap."""
    model = nn.ModuleDict({"attentions": nn.ModuleList([nn.ModuleDict({"proj_in": nn.Linear(2, 2),
                                                                        "norm": nn.LayerNorm(2)})])})
    report = lora.inject(model, ["proj_in", "attentions"], rank=1)
    assert report.paths == ["attentions.0.proj_in"] and report.unsupported == {}


def test_gpt2_targets_mixing_conv1d_and_linear_all_adapt():
    """The try that found the bug: c_attn/c_proj are transformers' Conv1D; they are adapted now."""
    model, _ = gpt2()
    report = lora.inject(model, ["c_attn", "c_proj", "lm_head"], rank=2)
    assert report.wrapped == 7 and report.unsupported == {}
    assert isinstance(model.transformer.h[0].attn.c_attn, lora.LoRALayer)


def test_conv1d_is_adapted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular"), nn.SiLU(), nn.Conv1d(8, 2, 1))
    x = torch.randn(2, 4, 10)
    report = lora.inject(model, ["0", "2"], rank=2, conv_rank=2, dora=True)
    assert report.wrapped == 2
    randomize_adapters(model)
    unmerged = model(x)
    lora.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


# 4. strength 0 and disabled() on merged models -----------------------------------------------------


@pytest.mark.parametrize("merged", [False, True])
def test_disabled_gives_the_base_output_merged_or_not(merged):
    model = adapted_toy(dora=True)
    base = toy()(X)
    adapted = model(X)
    if merged:
        lora.merge(model)
    with lora.disabled(model):
        torch.testing.assert_close(model(X), base, rtol=0, atol=1e-6)
    assert all(layer.merged == merged for layer in lora.lora_layers(model).values())
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    lora.set_scale(model, 0)
    torch.testing.assert_close(model(X), base, rtol=0, atol=1e-6)


# 5. peft adapters: alpha from adapter_config.json, from the caller, never guessed ------------------


def test_peft_adapter_folder_reads_its_config(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, ids = llama()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = get_peft_model(copy.deepcopy(base), config)  # init_lora_weights=False: B random too
    theirs.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 16
    expected = output(theirs.eval(), ids)

    ours = copy.deepcopy(base).eval()
    lora.load_file(ours, tmp_path / "adapter")  # the folder: alpha 16, scale 4 from the config
    torch.testing.assert_close(output(ours, ids), expected, rtol=1e-5, atol=1e-6)
    assert ours.model.layers[0].self_attn.q_proj.scale == 4

    alone = tmp_path / "alone.safetensors"  # the file without its config: no alpha anywhere
    alone.write_bytes((tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
    untouched = copy.deepcopy(base)
    with pytest.raises(lora.LoRAError, match=r"alone.safetensors: nothing was loaded; 4 peft-format adapters .* carry no "
                                             r"alpha: pass alpha="):
        lora.load_file(untouched, alone)
    assert not lora.lora_layers(untouched)
    lora.load_file(untouched.eval(), alone, alpha=16)
    torch.testing.assert_close(output(untouched, ids), expected, rtol=1e-5, atol=1e-6)


# 6. tied weights -----------------------------------------------------------------------------------


def test_merging_a_tied_weight_is_refused():
    torch.manual_seed(0)
    model, ids = gpt2()
    lora.inject(model, ["lm_head", "c_fc"], rank=2)
    randomize_adapters(model)
    wte = model.transformer.wte.weight.detach().clone()
    for fold in (lora.merge, lora.bake):
        with pytest.raises(lora.LoRAError, match=r"'lm_head': its weight is tied to \['transformer.wte.weight', "
                                                 r"'lm_head.base.weight'\]"):
            fold(model)
        assert torch.equal(model.transformer.wte.weight, wte)  # nothing changed, c_fc not merged either
        assert not any(layer.merged for layer in lora.lora_layers(model).values())
    lora.remove(model)
    lora.inject(model, ["c_fc"], rank=2)
    lora.merge(model)  # untied layers merge as usual


# 7. a module at two paths is one layer -------------------------------------------------------------


def test_a_shared_module_is_one_layer_everywhere(tmp_path):
    model = adapted_toy()
    assert model.shared is model.b.extra and isinstance(model.shared, lora.LoRALayer)
    path = lora.save_file(model, tmp_path / "l.safetensors")
    fresh = toy()
    lora.load_file(fresh, path)
    assert fresh.shared is fresh.b.extra and isinstance(fresh.shared, lora.LoRALayer)
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)
    assert len(lora.lora_layers(fresh)) == 9 and "'default' on 9 layers" in lora.summary(fresh)
    for drop in (lora.remove, lora.bake):
        m = copy.deepcopy(fresh)
        drop(m)
        assert type(m.shared) is nn.Linear and m.shared is m.b.extra
        lora.inject(m, ["shared"], rank=2)  # nothing left behind to block it
    report = lora.inject(toy(), ["extra"], rank=2)
    assert report.wrapped == 1 and sorted(report.paths) == ["b.extra", "shared"]
    with pytest.raises(lora.LoRAError, match=r"the same module as 'shared', which exclude= keeps out .*: b.extra \(Linear\)"):
        lora.inject(toy(), ["extra"], exclude=["shared"], rank=2)


class Aliased(nn.Module):
    """One layer under two attribute names of the same parent."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.alias = self.fc

    def forward(self, x):
        return self.fc(x) + self.alias(x)


def test_an_alias_in_the_same_parent_is_replaced_too():
    model = Aliased()
    lora.inject(model, ["fc"], rank=2)
    assert model.alias is model.fc and isinstance(model.alias, lora.LoRALayer)
    lora.remove(model)
    assert type(model.alias) is nn.Linear and model.alias is model.fc


# 8. the meta device --------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_inject_on_meta_then_materialise(dora):
    reference = toy()
    with torch.device("meta"):
        model = Toy()
    lora.inject(model, ALL, rank=3, conv_rank=2, dora=dora)
    model.to_empty(device="cpu")  # adapters now hold whatever memory held
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)  # the base's own names
    assert not unexpected and all(".lora_" in k or k.endswith(".magnitude") for k in missing)
    lora.init_adapters(model)
    torch.testing.assert_close(model(X), reference(X), rtol=0, atol=1e-6)
    if dora:
        layer = model.a.to_q
        torch.testing.assert_close(layer.magnitude, reference.a.to_q.weight.norm(dim=1))


# 9. injection is all or nothing --------------------------------------------------------------------


def test_a_bad_layer_half_way_changes_nothing():
    model = Mixed()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(lora.LoRAError, match=r"nothing was changed: grouped convolutions cannot take an adapter: "
                                             r"grouped \(Conv2d\), groups=2"):
        lora.inject(model, ["fc", "grouped"], rank=2, conv_rank=2)
    assert type(model.fc) is nn.Linear and flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("pattern,message", [("", "bad LoRA target pattern ''"),
                                             ("re:(", r"bad LoRA target pattern 're:\(': not a regular expression"),
                                             (".fc", r"bad LoRA target pattern '\.fc'"),
                                             ("a..b", r"bad LoRA target pattern 'a\.\.b'"),
                                             (3, r"must be a string, not int \(3\)")])
def test_bad_patterns_are_lora_errors_naming_them(pattern, message):
    with pytest.raises(lora.LoRAError, match=message):
        lora.inject(Mixed(), ["fc", pattern])
    with pytest.raises(lora.LoRAError, match=message):
        lora.inject(Mixed(), ["fc"], exclude=[pattern])


# 10. padding modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_adapters_pad_like_their_base(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode), nn.Conv2d(6, 4, 3, padding=2, dilation=2))
    x = torch.randn(2, 4, 8, 8)
    lora.inject(model, ["0", "1"], rank=2, conv_rank=2)
    assert model[0].lora_down.padding_mode == mode
    randomize_adapters(model)
    unmerged = model(x)
    lora.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)  # the adapter is the weight change


# 11. exclusion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj"], ["layers"], ["re:.*q_proj"]])
def test_an_excluded_path_excludes_everything_under_it(targets):
    model, _ = llama()
    report = lora.inject(model, targets, exclude=["layers.0"], rank=2)
    assert report.paths and all(not p.startswith("model.layers.0.") for p in report.paths)
    assert "model.layers.1.self_attn.q_proj" in report.paths


# several adapters at once ---------------------------------------------------------------------------


def test_several_adapters_each_scaled_disabled_and_removed_alone(tmp_path):
    base = toy()
    model = copy.deepcopy(base)
    lora.inject(model, ["to_q", "proj"], rank=2, name="style")
    randomize_adapters(model, seed=1)
    only_style = model(X)
    lora.inject(model, ["to_q", "conv"], rank=3, conv_rank=3, name="subject")  # to_q: stacked on style
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad}
    assert not model.a.to_q.base.lora_up.weight.requires_grad  # only the new adapter trains
    for layer in lora.lora_layers(model, "subject").values():
        layer.lora_up.weight.data.normal_(0, 0.1)
    both = model(X)
    assert not torch.allclose(both, only_style)
    with lora.disabled(model, "subject"):
        torch.testing.assert_close(model(X), only_style, rtol=1e-5, atol=1e-6)
    with lora.disabled(model):
        torch.testing.assert_close(model(X), base(X), rtol=0, atol=1e-6)
    lora.set_scale(model, 0.0, name="style")
    with lora.disabled(model, "subject"):
        torch.testing.assert_close(model(X), base(X), rtol=0, atol=1e-6)
    lora.set_scale(model, 1.0, name="style")
    torch.testing.assert_close(model(X), both, rtol=1e-5, atol=1e-6)

    lora.merge(model)
    torch.testing.assert_close(model(X), both, rtol=1e-5, atol=1e-5)
    lora.unmerge(model, "style")  # and what is stacked on it: subject's to_q; its conv stays merged
    assert not model.a.to_q.base.merged and not model.a.to_q.merged and model.a.conv.merged
    torch.testing.assert_close(model(X), both, rtol=1e-5, atol=1e-5)
    lora.merge(model)

    path = lora.save_file(model, tmp_path / "subject.safetensors", name="subject")
    with pytest.raises(lora.LoRAError, match=r"several adapters \(\['style', 'subject'\]\): pass name="):
        lora.save_file(model, tmp_path / "x.safetensors")
    lora.remove(model, "style")  # the other stays, merged
    assert {layer.name for layer in lora.lora_layers(model).values()} == {"subject"}
    assert type(model.a.to_q.base) is nn.Linear and model.a.to_q.merged
    subject_only = model(X)
    fresh = copy.deepcopy(base)
    lora.load_file(fresh, path, name="subject")
    torch.testing.assert_close(fresh(X), subject_only, rtol=1e-5, atol=1e-5)
    lora.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
    assert all(p.requires_grad for p in model.parameters())


def test_a_second_adapter_name_is_required_and_files_stack():
    model = adapted_toy()
    with pytest.raises(lora.LoRAError, match="already has an adapter named 'default'"):
        lora.inject(model, ["to_q"], rank=2)
    lora.merge(model, "default")
    lora.inject(model, ["to_q"], rank=2, name="second")
    with pytest.raises(lora.LoRAError, match="adapter 'default' sits on|sits on adapter"):
        lora.bake(model, "second")  # its base is another adapter: bake that one too


# adapter dtype and the everyday helpers ---------------------------------------------------------------


def test_fp32_adapters_on_a_bf16_model_keep_small_updates():
    model = toy().to(torch.bfloat16)
    lora.inject(model, ["to_q"], rank=2)
    up = model.a.to_q.lora_up.weight
    assert up.dtype == torch.float32
    with torch.no_grad():
        up.fill_(1.0)
        up.add_(1e-4)  # below bf16's resolution at 1.0 (2^-7): lost in a bf16 master
    assert up[0, 0].item() != 1.0
    lora.inject(toy().to(torch.bfloat16), ["to_q"], rank=2, dtype=torch.bfloat16)  # asked for: honoured


def test_trainable_parameters_and_summary():
    model = adapted_toy()
    trainable = lora.trainable_parameters(model)
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = lora.summary(model)
    assert line.startswith("'default' on 9 layers at strength 1: ") and "trainable of" in line
    lora.merge(model)
    assert "9 merged" in lora.summary(model)
