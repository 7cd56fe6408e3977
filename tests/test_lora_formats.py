"""Every LoRA format people share, written here the way its tool writes it (key names and shapes as
kohya's sd-scripts, LyCORIS and diffusers make them), loaded by `load_sdxl_lora`, and checked
against the weight change computed here from the format's own definition (ComfyUI's formulas),
not from our loader. Also checked against LyCORIS's own modules (its forward is what a trained
file means) and with the refusals and all-or-nothing guarantees."""

import copy
import hashlib
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import lora
from minsdxl import convert
from minsdxl.config import UNetConfig
from minsdxl.lora_files import kohya_metadata, load_sdxl_lora, save_sdxl_lora
from minsdxl.unet import UNet

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
LINEAR = [f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_v", f"{BLOCK}.attn2.to_k", f"{BLOCK}.attn1.to_out.0",
          f"{BLOCK}.ff.net.0.proj", f"{BLOCK}.ff.net.2", "down_blocks.0.resnets.0.time_emb_proj"]
CONV = ["down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut"]
SQUARE = [f"{b}.attn1.{p}" for b in (BLOCK, "down_blocks.2.attentions.1.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.1")
          for p in ("to_q", "to_k", "to_v", "to_out.0")]


def make_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():  # every weight non-zero and of similar size, so any wrong change shows
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.fixture(scope="module")
def base():
    return make_unet()


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30]), torch.randn(2, 77, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


def run(unet):
    with torch.no_grad():
        return unet(*inputs())


def sgm(unet, path):
    return "lora_unet_" + convert.diffusers_path_to_sgm(path, unet.config).replace(".", "_")


def rnd(*shape, std=0.2):
    return torch.randn(*shape) * std


def expected_model(unet, changes: dict, strength=1.0):
    """A copy of `unet` whose weights are W + strength (W' - W) for {path: W'} (or {path: (W', b')})."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for path, new in changes.items():
            m = ref.get_submodule(path)
            w, b = new if isinstance(new, tuple) else (new, None)
            m.weight.copy_(m.weight + strength * (w - m.weight))
            if b is not None:
                m.bias.copy_(m.bias + strength * (b - m.bias))
    return ref


def assert_loads_as(unet, path, changes, strength=1.0, **kw):
    expected = run(expected_model(unet, changes, strength))
    model = copy.deepcopy(unet)
    report = load_sdxl_lora(model, path, strength=strength, **kw)
    got = run(model)
    assert (expected - run(unet)).abs().max() > 1e-3  # the file changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    return report, model


# ---- writers, one per format, as each tool writes its files ------------------------------------


def kohya_lora(unet, paths, rank=4, alpha=2.0, dtype=torch.float32, mid=False, dora=None, name=sgm):
    """kohya sd-scripts networks.lora / LyCORIS LoCon: lora_down (r, in[, kh, kw]), lora_up (out, r[, 1, 1]),
    alpha (a 0-dim tensor); LoCon-CP: a 1x1 down, lora_mid (r, r, kh, kw), a 1x1 up; DoRA: dora_scale."""
    tensors, changes = {}, {}
    for path in paths:
        w = unet.get_submodule(path).weight.detach()
        key = name(unet, path)
        conv = w.dim() == 4
        up = rnd(w.shape[0], rank, *([1, 1] if conv else [])).to(dtype).float()  # the values as stored
        if mid:
            down, core = rnd(rank, w.shape[1], 1, 1), rnd(rank, rank, *w.shape[2:])
            delta = torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], core, down[:, :, 0, 0])
            tensors[f"{key}.lora_mid.weight"] = core.to(dtype)
        else:
            down = rnd(rank, *w.shape[1:]).to(dtype).float()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down.to(dtype), up.to(dtype)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha).to(dtype)
        new = w + delta * ((alpha if alpha is not None else rank) / rank)
        if dora:
            new, tensors[f"{key}.dora_scale"] = dora_weights(w, new, dora)
        changes[path] = new
    return tensors, changes


def dora_weights(w, combined, axis):
    """LyCORIS's DoRA: the magnitude per output channel, (out, 1, ...), or per input channel, (1, in, ...)
    (wd_on_output=False); W' = m * combined / norm(combined) along that axis."""
    if axis == "out":
        norm = combined.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = combined.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    m = norm * (1 + rnd(*norm.shape, std=0.3))  # a trained magnitude, not the initial norms
    return combined * m / norm, m


def loha(unet, paths, rank=4, alpha=2.0, tucker=False):
    """LyCORIS LohaModule: hada_w1_a (out, r), hada_w1_b (r, in*kh*kw); Tucker (convs): hada_t1 (r, r, kh, kw),
    hada_w1_a (r, out), hada_w1_b (r, in). W' = W + (w1a w1b) * (w2a w2b) * alpha / r."""
    tensors, changes = {}, {}
    for path in paths:
        w = unet.get_submodule(path).weight.detach()
        key, out, inn, k = sgm(unet, path), w.shape[0], w.shape[1], w.shape[2:]
        mats = []
        for i in (1, 2):
            if tucker:
                t, a, b = rnd(rank, rank, *k), rnd(rank, out), rnd(rank, inn)
                tensors[f"{key}.hada_t{i}"] = t
                mats.append(torch.einsum("ijkl,jr,ip->prkl", t, b, a))
            else:
                a, b = rnd(out, rank), rnd(rank, inn * math.prod(k))
                mats.append((a @ b).reshape(w.shape))
            tensors[f"{key}.hada_w{i}_a"], tensors[f"{key}.hada_w{i}_b"] = a, b
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        changes[path] = w + mats[0] * mats[1] * (alpha / rank)
    return tensors, changes


def factorization(dimension, factor=-1):
    """LyCORIS's factorization (lycoris/functional/general.py), rewritten: m <= n, m * n = dimension."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr(unet, paths, rank=2, alpha=1.0, variant="w2_lora"):
    """LyCORIS LokrModule: w1 (a, c) full, w2 = w2_a (b, r) @ w2_b (r, d[*kh*kw]) ("w2_lora"), both
    decomposed ("both"), w2 full ("full": scale 1), or w2 a Tucker product ("tucker", convs).
    W' = W + kron(w1, w2) * alpha / r."""
    tensors, changes = {}, {}
    for path in paths:
        w = unet.get_submodule(path).weight.detach()
        key, k = sgm(unet, path), w.shape[2:]
        (a, b), (c, d) = factorization(w.shape[0], 4), factorization(w.shape[1], 4)
        scale = alpha / rank
        if variant == "both":
            w1a, w1b = rnd(a, rank), rnd(rank, c)
            tensors[f"{key}.lokr_w1_a"], tensors[f"{key}.lokr_w1_b"] = w1a, w1b
            w1 = w1a @ w1b
        else:
            w1 = tensors[f"{key}.lokr_w1"] = rnd(a, c)
        if variant == "full":
            w2 = tensors[f"{key}.lokr_w2"] = rnd(b, d, *k)
            scale = 1.0
        elif variant == "tucker":
            t2, w2a, w2b = rnd(rank, rank, *k), rnd(rank, b), rnd(rank, d)
            tensors[f"{key}.lokr_t2"], tensors[f"{key}.lokr_w2_a"], tensors[f"{key}.lokr_w2_b"] = t2, w2a, w2b
            w2 = torch.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)
        else:
            w2a, w2b = rnd(b, rank), rnd(rank, d * math.prod(k))
            tensors[f"{key}.lokr_w2_a"], tensors[f"{key}.lokr_w2_b"] = w2a, w2b
            w2 = w2a @ w2b
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        changes[path] = w + torch.kron(w1, w2.contiguous()).reshape(w.shape) * scale
    return tensors, changes


# ---- the formats, one test each ------------------------------------------------------------------


@pytest.mark.parametrize("alpha,dtype", [(2.0, torch.float32), (None, torch.float32), (8.0, torch.float16)])
def test_kohya_lora_and_locon(base, tmp_path, alpha, dtype):
    tensors, changes = kohya_lora(base, LINEAR + CONV, alpha=alpha, dtype=dtype)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    report, model = assert_loads_as(base, tmp_path / "k.safetensors", changes)
    assert report.modules == len(LINEAR + CONV) and report.baked == 0
    assert report.applied["unet"] == {"lora": len(LINEAR) + 1, "locon": 2}  # the 1x1 shortcut is plain LoRA


def test_locon_cp_is_a_live_layer(base, tmp_path):
    tensors, changes = kohya_lora(base, CONV[:2], mid=True)
    save_file(tensors, str(tmp_path / "cp.safetensors"))
    report, model = assert_loads_as(base, tmp_path / "cp.safetensors", changes)
    assert report.applied["unet"] == {"locon_cp": 2} and report.live == 2


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_on_either_axis_square_layers_included(base, tmp_path, axis):
    """The silent bug: a (1, in) dora_scale on square layers (attn1, in == out) was read as a per-output
    magnitude; the axis is the declared one."""
    tensors, changes = kohya_lora(base, SQUARE + LINEAR[4:] + CONV[:2], dora=axis)
    assert tensors[f"{sgm(base, SQUARE[0])}.dora_scale"].shape == ((64, 1) if axis == "out" else (1, 64))
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    report, model = assert_loads_as(base, tmp_path / "dora.safetensors", changes)
    assert report.live == len(SQUARE) + 5
    assert set(report.applied["unet"]) == {"dora" if axis == "out" else "dora_in"}
    # and ours writes the same axis back
    resaved = save_sdxl_lora(model, tmp_path / "again.safetensors")
    assert lora.read_file(resaved)[0][f"{sgm(base, SQUARE[0])}.dora_scale"].shape == tensors[f"{sgm(base, SQUARE[0])}.dora_scale"].shape


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(base, tmp_path, tucker):
    tensors, changes = loha(base, CONV[:2] if tucker else LINEAR + CONV, tucker=tucker)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    report, _ = assert_loads_as(base, tmp_path / "loha.safetensors", changes)
    assert report.baked == len(changes) and report.applied["unet"] == {"loha": len(changes)}


@pytest.mark.parametrize("variant", ["w2_lora", "both", "full", "tucker"])
def test_lokr(base, tmp_path, variant):
    paths = CONV[:2] if variant == "tucker" else LINEAR + CONV
    tensors, changes = lokr(base, paths, variant=variant)
    save_file(tensors, str(tmp_path / "lokr.safetensors"))
    report, _ = assert_loads_as(base, tmp_path / "lokr.safetensors", changes)
    assert report.applied["unet"] == {"lokr": len(paths)}


def test_loha_with_dora(base, tmp_path):
    tensors, changes = loha(base, LINEAR[:3])
    for path in LINEAR[:3]:
        w = base.get_submodule(path).weight.detach()
        changes[path], tensors[f"{sgm(base, path)}.dora_scale"] = dora_weights(w, changes[path], "in")
    save_file(tensors, str(tmp_path / "lohadora.safetensors"))
    assert_loads_as(base, tmp_path / "lohadora.safetensors", changes)


def test_full_diff_and_ia3(base, tmp_path):
    tensors, changes = {}, {}
    for path in (LINEAR[3], CONV[0]):  # LyCORIS full: diff and diff_b
        m = base.get_submodule(path)
        d, db = rnd(*m.weight.shape), rnd(*m.bias.shape)
        tensors[f"{sgm(base, path)}.diff"], tensors[f"{sgm(base, path)}.diff_b"] = d, db
        changes[path] = (m.weight + d, m.bias + db)
    for path, on_input in ((LINEAR[4], 0), (LINEAR[5], 1)):  # LyCORIS IA3: weight and on_input
        w = base.get_submodule(path).weight.detach()
        v = rnd(w.shape[1] if on_input else w.shape[0])
        tensors[f"{sgm(base, path)}.weight"], tensors[f"{sgm(base, path)}.on_input"] = v, torch.tensor(on_input)
        changes[path] = w * (1 + (v[None, :] if on_input else v[:, None]))
    save_file(tensors, str(tmp_path / "full.safetensors"))
    report, _ = assert_loads_as(base, tmp_path / "full.safetensors", changes)
    assert report.applied["unet"] == {"full": 2, "ia3": 2}


def dotted(unet, path):
    return f"unet.{path}"


def test_diffusers_formats(base, tmp_path):
    """diffusers' peft layout with its lora_adapter_metadata (alpha != r), the training scripts'
    `lora.down/up`, the old attention processors' `processor.to_q_lora`, kohya keys with diffusers names."""
    # peft: lora_A/lora_B, alpha from the adapter metadata (diffusers reads it; scale 8/4 = 2)
    t, changes = kohya_lora(base, LINEAR, rank=4, alpha=8.0, name=dotted)
    t = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
         for k, v in t.items() if not k.endswith(".alpha")}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": False})}
    save_file(t, str(tmp_path / "peft.safetensors"), metadata=meta)
    assert_loads_as(base, tmp_path / "peft.safetensors", changes)
    # the same file without the metadata means scale 1, as in diffusers
    save_file(t, str(tmp_path / "peft1.safetensors"))
    assert_loads_as(base, tmp_path / "peft1.safetensors", kohya_lora_same(base, t, "lora_A", "lora_B"))
    # train_text_to_image_lora_sdxl.py output (convert_state_dict_to_diffusers): to_q.lora.down.weight
    t, changes = kohya_lora(base, LINEAR[:4], alpha=None, name=dotted)
    t = {k.replace(".lora_down.", ".lora.down.").replace(".lora_up.", ".lora.up."): v for k, v in t.items()}
    save_file(t, str(tmp_path / "script.safetensors"))
    assert_loads_as(base, tmp_path / "script.safetensors", changes)
    # old attention processors: attn1.processor.to_q_lora.down.weight, to_out_lora for to_out.0
    t, changes = kohya_lora(base, LINEAR[:4], alpha=None, name=dotted)
    old = {}
    for k, v in t.items():
        module, _, part = k.partition(".lora_")
        module = module.replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor.")
        module = module.removesuffix(".0") if module.endswith("to_out.0") else module
        old[f"{module}_lora.{part.replace('.weight', '')}.weight"] = v
    assert f"unet.{BLOCK}.attn1.processor.to_out_lora.up.weight" in old
    save_file(old, str(tmp_path / "old.safetensors"))
    assert_loads_as(base, tmp_path / "old.safetensors", changes)
    # convert_state_dict_to_kohya: lora_unet_<diffusers path with _>, alpha = rank
    t, changes = kohya_lora(base, LINEAR + CONV, rank=4, alpha=4.0, name=lambda u, p: "lora_unet_" + p.replace(".", "_"))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in t
    save_file(t, str(tmp_path / "conv.safetensors"))
    assert_loads_as(base, tmp_path / "conv.safetensors", changes)


def kohya_lora_same(unet, tensors, down, up):
    changes = {}
    for k, v in tensors.items():
        if k.endswith(f".{down}.weight"):
            path = k[len("unet."):-len(f".{down}.weight")]
            w = unet.get_submodule(path).weight.detach()
            changes[path] = w + (tensors[k.replace(down, up)].flatten(1) @ v.flatten(1)).reshape(w.shape)
    return changes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from minsdxl.tiny import write_tiny_pipeline
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te1_", "text_encoder."])
def test_text_encoder_1_prefixes(tiny_dir, tmp_path, prefix):
    from minsdxl import load_text_encoders, load_unet
    unet = load_unet(tiny_dir)
    te1, te2 = load_text_encoders(tiny_dir)
    layer = "text_model.encoder.layers.0.self_attn.q_proj"  # as files name it, whatever transformers' nesting
    module = next(p for p, _ in te1.named_modules() if p.endswith("encoder.layers.0.self_attn.q_proj"))
    w = te1.get_submodule(module).weight.detach()
    down, up = rnd(2, w.shape[1]), rnd(w.shape[0], 2)
    key = prefix + (layer.replace(".", "_") if prefix.startswith("lora_") else layer)
    if prefix == "text_encoder.":  # diffusers' script writes the text encoder as lora_linear_layer
        t = {f"{key}.lora_linear_layer.down.weight": down, f"{key}.lora_linear_layer.up.weight": up}
    else:
        t = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    save_file(t, str(tmp_path / "te.safetensors"))
    tes = load_text_encoders(tiny_dir)
    report = load_sdxl_lora(unet, tmp_path / "te.safetensors", text_encoders=tes)
    assert report.applied == {"text_encoder": {"lora": 1}}
    scale = 1.0 if prefix == "text_encoder." else 2.0
    torch.testing.assert_close(lora.lora_layers(tes[0])[module].adapted_weight(), w + scale * up @ down)


# ---- strength, as ComfyUI and A1111 apply it -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dora", "loha"])
def test_strength_interpolates_from_the_base(base, tmp_path, fmt):
    tensors, changes = kohya_lora(base, SQUARE + CONV[:2], dora="out") if fmt == "dora" else loha(base, LINEAR + CONV)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    assert_loads_as(base, tmp_path / "s.safetensors", changes, strength=0.6)  # W + 0.6 (W' - W)
    model = copy.deepcopy(base)
    load_sdxl_lora(model, tmp_path / "s.safetensors", strength=0.001)
    full = copy.deepcopy(base)
    load_sdxl_lora(full, tmp_path / "s.safetensors")
    b = run(base)
    assert (run(model) - b).abs().max() <= 0.002 * (run(full) - b).abs().max()


def test_set_scale_and_merge_follow_the_same_rule(base, tmp_path):
    tensors, changes = kohya_lora(base, SQUARE, dora="in")
    save_file(tensors, str(tmp_path / "d.safetensors"))
    model = copy.deepcopy(base)
    load_sdxl_lora(model, tmp_path / "d.safetensors")
    lora.set_scale(model, 0.3)
    expected = run(expected_model(base, changes, 0.3))
    tol = dict(rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(run(model), expected, **tol)
    lora.merge(model)
    torch.testing.assert_close(run(model), expected, **tol)
    lora.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


# ---- against LyCORIS's own modules ------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["loha", "loha_tucker", "lokr", "lokr_both", "locon_cp", "dora_in", "dora_out"])
def test_files_made_by_lycoris_modules(base, tmp_path, algo):
    lycoris = pytest.importorskip("lycoris")  # noqa: F841
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    cls, kw = {"loha": (LohaModule, {}), "loha_tucker": (LohaModule, {"use_tucker": True}),
               "lokr": (LokrModule, {"factor": 4}), "lokr_both": (LokrModule, {"factor": 8, "decompose_both": True}),
               "locon_cp": (LoConModule, {"use_tucker": True}),
               "dora_in": (LoConModule, {"weight_decompose": True, "wd_on_out": False}),
               "dora_out": (LoConModule, {"weight_decompose": True})}[algo]
    paths = CONV[:2] if "tucker" in algo or algo == "locon_cp" else SQUARE[:4] + LINEAR[4:6] + CONV[:2]
    theirs = copy.deepcopy(base)
    torch.manual_seed(1)
    tensors = {}
    for path in paths:
        org = theirs.get_submodule(path)
        m = cls(sgm(base, path), org, 1.0, 4, 2.0, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(p * (1 + 0.3 * torch.randn_like(p)) if n == "dora_scale" else torch.randn_like(p) * 0.2)
        m.apply_to()
        tensors.update({f"{sgm(base, path)}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
        org._lycoris = m  # keep it alive: its forward replaced the layer's
    save_file(tensors, str(tmp_path / "lyco.safetensors"))
    expected = run(theirs)
    ours = copy.deepcopy(base)
    load_sdxl_lora(ours, tmp_path / "lyco.safetensors")
    assert (expected - run(base)).abs().max() > 1e-3
    torch.testing.assert_close(run(ours), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# ---- refusals and all-or-nothing ------------------------------------------------------------------


def unchanged(model, reference):
    return not lora.lora_layers(model) and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_one_bad_module_leaves_the_model_untouched(base, tmp_path):
    tensors, _ = kohya_lora(base, LINEAR + CONV)
    more, _ = loha(base, [f"down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"])
    tensors.update(more)
    bad = f"{sgm(base, CONV[0])}.lora_up.weight"
    tensors[bad] = rnd(33, 4, 1, 1)  # one module of the wrong shape, after good ones
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    model = copy.deepcopy(base)
    with pytest.raises(lora.LoRAError, match=r"nothing was loaded; 1 of 11 modules cannot be applied.*conv1"):
        load_sdxl_lora(model, tmp_path / "bad.safetensors")
    assert unchanged(model, base)
    tensors[bad] = rnd(32, 4, 1, 1)
    tensors["lora_unet_no_such_block.lora_down.weight"] = rnd(4, 8)  # a key that fits nothing
    tensors["lora_unet_no_such_block.lora_up.weight"] = rnd(8, 4)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(lora.LoRAError, match=r"1 of 12 modules fit no layer \(1 LoRA\).*no_such_block"):
        load_sdxl_lora(model, tmp_path / "extra.safetensors")
    assert unchanged(model, base)
    report = load_sdxl_lora(model, tmp_path / "extra.safetensors", strict=False)
    assert report.modules == 11 and report.unused == ["lora_unet_no_such_block.lora_down.weight",
                                                      "lora_unet_no_such_block.lora_up.weight"]
    with pytest.raises(lora.LoRAError, match="already has a LoRA adapter: bake or remove it first"):
        load_sdxl_lora(model, tmp_path / "extra.safetensors", strict=False)  # a second file onto live layers
    tensors["lora_unet_no_such_block.lora_B.weight"] = tensors.pop("lora_unet_no_such_block.lora_up.weight")
    tensors[f"{sgm(base, CONV[0])}.lora_B.weight"] = tensors[bad].clone()  # one tensor under two names
    save_file(tensors, str(tmp_path / "twice.safetensors"))
    with pytest.raises(lora.LoRAError, match="twice.safetensors: nothing was loaded; .* are the same tensor"):
        load_sdxl_lora(copy.deepcopy(base), tmp_path / "twice.safetensors")


def test_files_for_other_models_say_what_they_are(base, tmp_path):
    def refused(name, tensors, match, metadata=None):
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        model = copy.deepcopy(base)
        with pytest.raises(lora.LoRAError, match=match):
            load_sdxl_lora(model, tmp_path / name)
        assert unchanged(model, base)

    sd15 = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": rnd(4, 768),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": rnd(320, 4),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rnd(4, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rnd(768, 4)}
    refused("sd15.safetensors", sd15, r"SD 1\.x \(its cross-attention reads CLIP ViT-L's 768")
    refused("sd15meta.safetensors", {k: v for k, v in sd15.items() if "te_" not in k},
            r"this LoRA is for SD 1\.x \(ss_base_model_version = sd_v1\)", {"ss_base_model_version": "sd_v1"})
    refiner = {"lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k.hada_w1_a": rnd(768, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k.hada_w1_b": rnd(4, 1280),
               "lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k.hada_w2_a": rnd(768, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_k.hada_w2_b": rnd(4, 1280)}
    refused("refiner.safetensors", refiner, r"1 of 1 modules fit no layer \(1 LoHa\): this LoRA is for the SDXL refiner")
    refused("random.safetensors", {"foo.bar": rnd(3, 3), "baz": rnd(2)}, r"no LoRA in this file: none of its 2 tensors")
    refused("ckpt.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": rnd(4, 4)}, "full model checkpoint")
    oft = {f"{sgm(base, p)}.oft_blocks": rnd(4, 16, 16) for p in SQUARE[:2]}
    refused("oft.safetensors", {**oft, **{k.replace(".oft_blocks", ".alpha"): torch.tensor(1.0) for k in oft}},
            r"this is a OFT/BOFT \(oft_blocks\) file, 2 modules; minsdxl does not apply it")
    refused("kohya_oft.safetensors", {k.replace("lora_unet_", "oft_unet_"): v for k, v in oft.items()},
            r"kohya's networks.oft")
    refused("glora.safetensors", {f"{sgm(base, SQUARE[0])}.{n}.weight": rnd(4, 4) for n in ("a1", "a2", "b1", "b2")},
            "GLoRA")


def test_on_the_full_size_base_other_models_are_named(tmp_path):
    """On SDXL base itself (built on meta: the refusal comes before any weight is touched): an SD 1.5
    LoRA and a refiner LoRA address input_blocks_4_1, which SDXL also has, with the wrong widths."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl_base())
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    for ctx, width, what in ((768, 640, r"SD 1\.x"), (1280, 768, "the SDXL refiner")):
        save_file({f"{key}.lora_down.weight": rnd(4, ctx), f"{key}.lora_up.weight": rnd(width, 4)},
                  str(tmp_path / "other.safetensors"))
        with pytest.raises(lora.LoRAError, match=rf"cannot be applied \(this LoRA is for {what}.*needs \(4, 2048\)"):
            load_sdxl_lora(unet, tmp_path / "other.safetensors")
    assert not lora.lora_layers(unet)


def test_pickles_are_refused(base, tmp_path):
    (tmp_path / "l.ckpt").write_bytes(b"x")
    with pytest.raises(lora.LoRAError, match="pickle"):
        load_sdxl_lora(copy.deepcopy(base), tmp_path / "l.ckpt")


# ---- our writer ---------------------------------------------------------------------------------


def test_kohya_metadata_is_true(base, tmp_path):
    model = copy.deepcopy(base)
    lora.inject(model, ["to_q", "to_k", "resnets"], rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    path = save_sdxl_lora(model, tmp_path / "k.safetensors",
                          info={"output_name": "corgi", "resolution": 64, "steps": 10, "epoch": 2,
                                "tag_frequency": {"corgis": {"a corgi": 3}}})
    tensors, meta = lora.read_file(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_base_model_version"] == "minsdxl_custom"  # the tiny model is no SDXL base
    assert meta["modelspec.architecture"] == "minsdxl-custom/lora" and meta["modelspec.resolution"] == "64x64"
    assert (meta["ss_output_name"], meta["ss_steps"], meta["ss_epoch"]) == ("corgi", "10", "2")
    assert json.loads(meta["ss_tag_frequency"]) == {"corgis": {"a corgi": 3}}
    assert sum(k.startswith("modelspec.") for k in meta) == 8
    raw = path.read_bytes()  # sd-scripts' model hash: sha256 of everything after the header
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() and len(meta["sshs_legacy_hash"]) == 8
    with torch.device("meta"):
        full = UNet(UNetConfig.sdxl_base())
    lora.inject(full, ["to_q"], rank=8, dora=True)
    meta = kohya_metadata(full, list(lora.lora_layers(full).values()), {"resolution": 1024})
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] == "True"


def test_saving_adapters_kohya_skips_warns(base, tmp_path):
    model = copy.deepcopy(base)
    lora.inject(model, ["conv_in", "to_q"], rank=2, conv_rank=2)
    said = []
    save_sdxl_lora(model, tmp_path / "k.safetensors", warn=said.append)
    assert len(said) == 1 and "1 adapters outside the blocks kohya's networks.lora loads (['conv_in'])" in said[0]
    said.clear()
    save_sdxl_lora(model, tmp_path / "d.safetensors", format="diffusers", warn=said.append)
    assert not said
