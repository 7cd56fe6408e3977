"""The adapter files people share, read as the tools that write them define them.

A file holds tensors named `<module key><suffix>`. The suffixes tell the adapter kind; the module
key names the layer (what it looks like is the caller's business: `lora.files` passes module paths,
`minsdxl.lora_files` the SDXL names). Each kind's weight change at strength 1, with W the base
weight, r the rank, a the alpha (a missing alpha means scale 1):

| kind | tensors per module | W' | written by |
| --- | --- | --- | --- |
| LoRA / LoCon | `lora_up.weight` (B), `lora_down.weight` (A), `alpha`; also `lora_B`/`lora_A` (peft), `lora.up`/`lora.down`, `lora_linear_layer.up`/`.down`, `<name>_lora.up`/`.down` (diffusers' older layouts) | W + (a/r) B A | kohya sd-scripts, LyCORIS, diffusers, peft |
| LoCon-CP | + `lora_mid.weight` (a kxk core between a 1x1 down and a 1x1 up) | W + (a/r) B (mid * A) | LyCORIS `use_tucker` |
| DoRA | + `dora_scale` (kohya/LyCORIS: (out, 1, ...) on the output axis, (1, in, ...) on the input axis) or `lora_magnitude_vector` (peft: output axis) | m * (W + dW) / norm(W + dW), the norm per channel of the axis | LyCORIS `dora_wd`, peft `use_dora` |
| LoHa | `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (+ `hada_t1`, `hada_t2`: Tucker cores), `alpha` | W + (a/r) (w1a w1b) * (w2a w2b), r = rows of w1b | LyCORIS |
| LoKr | `lokr_w1` or `lokr_w1_a`/`_b`, `lokr_w2` or `lokr_w2_a`/`_b` (+ `lokr_t2`), `alpha` | W + (a/r) kron(w1, w2), r = rows of the decomposed factor's b (w2's when both); scale 1 when neither is decomposed | LyCORIS |
| full | `diff` (+ `diff_b`) | W + diff, b + diff_b | LyCORIS `algo=full` |
| IA3 | `weight`, `on_input` | W * (1 + w) along the output (on_input = 0) or input axis | LyCORIS `algo=ia3` |
| norm | `w_norm` (+ `b_norm`) on a norm layer | W + w_norm, b + b_norm | LyCORIS `train_norm` |

LoRA, LoCon, LoCon-CP and DoRA become live `LoRALayer`s (a CP core folds exactly into a kxk down);
the others change the weight in place ("baked"), which is how people use them when sampling.
Strength s means what ComfyUI and A1111 make it mean: W + s (W' - W), for every kind.
OFT / BOFT (`oft_blocks`) and GLoRA (`a1.weight`, ...) are recognised and refused by name.

Loading is planned first (every key resolved, every shape checked, the new weights computed on the
meta device) and only then applied, so a file that cannot be loaded leaves the model untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn

from .errors import LoRAError
from .inject import _replace
from .layer import FLOAT8, LoRALayer, adapter_shapes, innermost, logical_shape, supported

# suffix -> (part, naming). Longest suffixes are tried first, so `.lora_magnitude_vector.weight` wins
# over IA3's bare `.weight` (which only counts next to an `.on_input`).
SUFFIXES = {
    ".lora_up.weight": ("up", "kohya"), ".lora_down.weight": ("down", "kohya"), ".lora_mid.weight": ("mid", "kohya"),
    ".lora_B.weight": ("up", "peft"), ".lora_A.weight": ("down", "peft"),
    ".lora.up.weight": ("up", "diffusers"), ".lora.down.weight": ("down", "diffusers"),
    ".lora_linear_layer.up.weight": ("up", "diffusers"), ".lora_linear_layer.down.weight": ("down", "diffusers"),
    "_lora.up.weight": ("up", "diffusers"), "_lora.down.weight": ("down", "diffusers"),  # processor.to_q_lora
    ".alpha": ("alpha", None), ".dora_scale": ("dora_scale", "kohya"),
    ".lora_magnitude_vector": ("magnitude", "peft"), ".lora_magnitude_vector.weight": ("magnitude", "peft"),
    **{f".hada_{n}": (f"hada_{n}", "lycoris") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": (f"lokr_{n}", "lycoris") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
    ".diff": ("diff", "lycoris"), ".diff_b": ("diff_b", "lycoris"),
    ".w_norm": ("w_norm", "lycoris"), ".b_norm": ("b_norm", "lycoris"),
    ".on_input": ("on_input", "lycoris"),
    ".oft_blocks": ("oft_blocks", "lycoris"), ".oft_diag": ("oft_blocks", "lycoris"), ".rescale": ("oft_rescale", "lycoris"),
    **{f".{n}.weight": (f"glora_{n}", "lycoris") for n in ("a1", "a2", "b1", "b2", "bm")},
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# The tensors each kind may have; anything else in a module is an error, never ignored.
ALLOWED = {
    "lora": {"up", "down", "mid", "alpha", "dora_scale", "magnitude"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"},
    "full": {"diff", "diff_b"},
    "ia3": {"ia3", "on_input"},
    "norm": {"w_norm", "b_norm"},
}
REFUSED = {"oft": "OFT/BOFT (oft_blocks)", "glora": "GLoRA (a1/a2/b1/b2)"}
LABELS = {"lora": "LoRA", "locon": "LoCon", "locon_cp": "LoCon-CP", "dora": "DoRA", "dora_in": "DoRA (input axis)",
          "loha": "LoHa", "lokr": "LoKr", "full": "full (diff)", "ia3": "IA3", "norm": "norm diff"}


def group(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({module key: {part: file key}}, file keys with no known suffix)."""
    modules: dict[str, dict[str, str]] = {}
    loose = []
    ia3 = {k[: -len(".on_input")] for k in tensors if k.endswith(".on_input")}
    for key in tensors:
        if key.endswith(".weight") and key[: -len(".weight")] in ia3:
            modules.setdefault(key[: -len(".weight")], {})["ia3"] = key
            continue
        for suffix in _BY_LENGTH:
            if key.endswith(suffix) and len(key) > len(suffix):
                part = SUFFIXES[suffix][0]
                module = key[: -len(suffix)]
                if part in modules.get(module, {}):
                    raise LoRAError(f"'{key}' and '{modules[module][part]}' are the same tensor of module '{module}'")
                modules.setdefault(module, {})[part] = key
                break
        else:
            loose.append(key)
    return modules, loose


def kind_of(parts) -> str | None:
    """The adapter kind of a module's tensors (see the module docstring), None when there is none."""
    parts = set(parts)
    if "oft_blocks" in parts:
        return "oft"
    if any(p.startswith("glora_") for p in parts):
        return "glora"
    for kind in ("loha", "lokr"):
        if any(p.startswith(("hada_" if kind == "loha" else "lokr_")) for p in parts):
            return kind
    if "diff" in parts or "diff_b" in parts:
        return "full"
    if "ia3" in parts:
        return "ia3"
    if "w_norm" in parts or "b_norm" in parts:
        return "norm"
    if "up" in parts or "down" in parts:
        return "lora"
    return None


def _as_shape(t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    """`t` viewed as `shape` when only singleton dims differ (a (out, r, 1, 1) up on a Linear, as
    kohya writes 1x1 convs); anything else is an error naming both shapes."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.numel() == torch.Size(shape).numel() and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    raise LoRAError(f"{what} has shape {tuple(t.shape)}, the layer needs {tuple(shape)}")


def dora_axis(m: torch.Tensor, weight_shape: tuple, peft: bool) -> str:
    """Which axis a DoRA magnitude is on, from its declared shape and the layer's: peft's vector is
    always per output channel; LyCORIS writes (out, 1, ...) for the output axis and (1, in, ...) for
    the input axis (`wd_on_output=False`). A square layer cannot confuse the two: the axis is where
    the long dimension sits, never a reshape that happens to fit."""
    out, inn, nd = weight_shape[0], weight_shape[1], len(weight_shape)
    shape = tuple(m.shape)
    if peft:
        if m.numel() != out:
            raise LoRAError(f"the DoRA magnitude has {m.numel()} values, the layer has {out} output channels")
        return "out"
    if shape in ((out,) + (1,) * (nd - 1), (out,)):
        return "out"
    if shape == (1, inn) + (1,) * (nd - 2):
        return "in"
    raise LoRAError(f"dora_scale has shape {shape}: for a weight of shape {tuple(weight_shape)} it must be "
                    f"{(out,) + (1,) * (nd - 1)} (output axis) or {(1, inn) + (1,) * (nd - 2)} (input axis)")


def _scale(alpha, rank) -> float:
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


def lora_factors(t: dict, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(down, up, rank) in the shapes of a LoRALayer on `base`; a CP core is folded into down."""
    up, down = t["up"].float(), t["down"].float()
    rank = down.shape[0]
    if "mid" in t:  # LoCon-CP: up(1x1) . mid(kxk) . down(1x1) == up(1x1) . [mid * down](kxk)
        if not isinstance(base, nn.Conv2d):
            raise LoRAError(f"lora_mid (a Tucker core) only exists for 2-D convolutions, this layer is a {type(base).__name__}")
        mid = t["mid"].float()
        if mid.dim() != 4 or mid.shape[:2] != (rank, rank):
            raise LoRAError(f"lora_mid has shape {tuple(mid.shape)}, expected ({rank}, {rank}, kh, kw)")
        down = torch.einsum("rskl,si->rikl", mid, down.reshape(rank, -1))
    shapes = adapter_shapes(base, rank)
    if up.shape[1 if up.dim() > 1 else 0] != rank:
        raise LoRAError(f"up has shape {tuple(up.shape)} and down {tuple(t['down'].shape)}: their ranks differ")
    return _as_shape(down, shapes[0], "down"), _as_shape(up, shapes[1], "up"), rank


def _tucker(t, a, b):
    """A Tucker-decomposed weight as LyCORIS and ComfyUI rebuild it: (out, in, kh, kw)."""
    return torch.einsum("ij...,jr,ip->pr...", t, b, a)


def weight_change(kind: str, t: dict, weight: torch.Tensor) -> torch.Tensor:
    """dW (in the weight's shape, fp32) of a LoHa or LoKr module, alpha applied."""
    shape = weight.shape
    alpha = t["alpha"].item() if "alpha" in t else None
    if kind == "loha":
        w1a, w1b, w2a, w2b = (t[f"hada_{n}"].float() for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        if "hada_t1" in t:
            m1, m2 = _tucker(t["hada_t1"].float(), w1a, w1b), _tucker(t["hada_t2"].float(), w2a, w2b)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        if m1.numel() != shape.numel() or m2.shape != m1.shape:
            raise LoRAError(f"LoHa factors make {tuple(m1.shape)} and {tuple(m2.shape)}, the weight is {tuple(shape)}")
        return (m1 * m2 * _scale(alpha, w1b.shape[0])).reshape(shape)
    if kind == "lokr":
        rank = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"].float()
        else:
            w1, rank = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float(), t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].float()
        else:
            rank = t["lokr_w2_b"].shape[0]
            if "lokr_t2" in t:
                w2 = torch.einsum("ij...,ip,jr->pr...", t["lokr_t2"].float(), t["lokr_w2_a"].float(), t["lokr_w2_b"].float())
            else:
                w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous())  # (kron of a non-contiguous einsum result breaks reshape)
        if delta.numel() != shape.numel() or delta.shape[0] != shape[0]:
            raise LoRAError(f"kron(lokr_w1 {tuple(w1.shape)}, lokr_w2 {tuple(w2.shape)}) is {tuple(delta.shape)}, "
                            f"the weight is {tuple(shape)}")
        return delta.reshape(shape) * _scale(alpha, rank)
    raise AssertionError(kind)


def _require(t: dict, names, kind: str):
    missing = [n for n in names if n not in t]
    if missing:
        raise LoRAError(f"{LABELS[kind]} module without {', '.join(missing)}")


def adapted(kind: str, t: dict, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') in fp32 at strength 1 for a baked kind; b' is None when the bias does not change."""
    w = module.weight.float()
    bias = getattr(module, "bias", None)
    if kind in ("full", "norm"):
        wname, bname = ("diff", "diff_b") if kind == "full" else ("w_norm", "b_norm")
        new_w = w + _as_shape(t[wname].float(), w.shape, wname) if wname in t else w
        new_b = None
        if bname in t:
            if bias is None:
                raise LoRAError(f"{bname} changes a bias this layer does not have")
            new_b = bias.float() + _as_shape(t[bname].float(), bias.shape, bname)
        return new_w, new_b
    if kind == "ia3":
        on_input = bool(t["on_input"].item()) if "on_input" in t else False
        axis = 1 if on_input else 0
        v = t["ia3"].float()
        if v.numel() != w.shape[axis]:
            raise LoRAError(f"IA3 weight has {v.numel()} values, the layer has {w.shape[axis]} "
                            f"{'input' if on_input else 'output'} channels")
        shape = [1] * w.dim()
        shape[axis] = -1
        return w * (1 + v.reshape(shape)), None
    _require(t, {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "lokr": ()}[kind], kind)
    if kind == "lokr" and not ("lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= set(t)) \
            or kind == "lokr" and not ("lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= set(t)):
        raise LoRAError("LoKr module without both factors (lokr_w1 or lokr_w1_a/_b, and lokr_w2 or lokr_w2_a/_b)")
    if kind == "loha" and ("hada_t1" in t) != ("hada_t2" in t):
        raise LoRAError("LoHa module with only one of its Tucker cores hada_t1/hada_t2")
    combined = w + weight_change(kind, t, w)
    if "dora_scale" not in t:
        return combined, None
    axis = dora_axis(t["dora_scale"], tuple(w.shape), peft=False)
    m = t["dora_scale"].float().flatten()
    if axis == "out":
        norm, shape = combined.flatten(1).norm(dim=1), (-1,) + (1,) * (w.dim() - 1)
    else:
        norm, shape = combined.transpose(0, 1).flatten(1).norm(dim=1), (1, -1) + (1,) * (w.dim() - 2)
    return combined * (m / norm).view(shape), None


@dataclass
class Part:
    """One model a file may address (the UNet, a text encoder) and the file's names for its modules."""

    name: str
    model: nn.Module
    names: dict[str, str]  # module key as files write it -> module path in `model`


@dataclass
class Planned:
    key: str  # module key in the file
    part: Part
    path: str
    kind: str  # "lora" or a baked kind
    label: str  # LABELS key
    keys: list[str]  # the file keys it uses
    live: dict  # live: LoRALayer arguments and values; baked: {"tensors": the file's tensors}


@dataclass
class Plan:
    modules: list[Planned] = field(default_factory=list)
    unresolved: dict[str, list[str]] = field(default_factory=dict)  # module key -> file keys (no such module)
    loose: list[str] = field(default_factory=list)  # file keys that are no adapter tensor at all
    errors: list[str] = field(default_factory=list)  # modules that resolved but cannot be applied
    refused: dict[str, list[str]] = field(default_factory=dict)  # kind -> module keys (OFT, GLoRA)

    @property
    def unused(self) -> list[str]:
        return sorted(self.loose + [k for ks in self.unresolved.values() for k in ks])


def _peft_pattern(patterns: dict, path: str):
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module path that ends in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def plan(parts: list[Part], tensors: dict[str, torch.Tensor], alpha_for=None, into_existing: bool = False,
         name: str = "default") -> Plan:
    """Resolve every key of a file against `parts` and check every module, touching nothing.

    `alpha_for(part, path, module key, rank)` gives the alpha of a LoRA module without an `.alpha`
    tensor (from the file's metadata): None for alpha = rank, a number, or {"alpha": a, "rslora": True}.
    `into_existing`: a module whose LoRALayer is named `name` takes the file's values into it (same
    rank and scale), one with another adapter gets this one stacked on it; without it any existing
    adapter is an error."""
    modules, loose = group(tensors)
    out = Plan(loose=loose)
    lookup: dict[str, tuple[Part, str]] = {}
    for part in parts:
        for file_name, path in part.names.items():
            lookup.setdefault(file_name, (part, path))
    targets: dict[tuple[int, str], str] = {}
    for key, names in modules.items():
        kind = kind_of(names)
        keys = sorted(names.values())
        if key not in lookup:
            out.unresolved[key] = keys
            continue
        if kind in REFUSED:
            out.refused.setdefault(kind, []).append(key)
            continue
        part, path = lookup[key]
        where = f"'{key}' ({part.name} {path})"
        if kind is None:
            out.errors.append(f"{where}: only {keys}, no adapter weights")
            continue
        extra = set(names) - ALLOWED[kind]
        if extra:
            out.errors.append(f"{where}: {LABELS[kind]} tensors mixed with {sorted(names[p] for p in extra)}")
            continue
        target = id(part.model.get_submodule(path))  # a module at two paths is one target
        if target in targets:
            out.errors.append(f"{where}: the same module as '{targets[target]}' (two names for one layer in one file)")
            continue
        targets[target] = key
        t = {p: tensors[k] for p, k in names.items()}
        module = part.model.get_submodule(path)
        try:
            out.modules.append(_plan_module(key, part, path, kind, keys, t, module, alpha_for, into_existing, name))
        except LoRAError as e:
            out.errors.append(f"{where}: {e}")
    return out


def _named(module: nn.Module, name: str) -> LoRALayer | None:
    """The adapter called `name` in the stack at `module`, if any."""
    while isinstance(module, LoRALayer):
        if module.name == name:
            return module
        module = module.base
    return None


def _plan_module(key, part, path, kind, keys, t, module, alpha_for, into_existing, name) -> Planned:
    existing = _named(module, name)  # fill it
    base = innermost(module)
    if isinstance(module, LoRALayer) and not (into_existing and kind == "lora"):
        raise LoRAError("this layer already has a LoRA adapter: bake or remove it first (lora.bake / lora.remove)")
    if kind == "norm":
        if not isinstance(base, (nn.LayerNorm, nn.GroupNorm)) or base.weight is None:
            raise LoRAError(f"w_norm/b_norm change a norm layer, this is a {type(base).__name__}")
    elif kind == "lora" and not supported(base):
        raise LoRAError(f"LoRA applies to Linear, Conv1d, Conv2d and transformers' Conv1D layers, this is a "
                        f"{type(base).__name__}")
    elif kind != "lora" and not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise LoRAError(f"{LABELS[kind]} applies to Linear and Conv2d layers, this is a {type(base).__name__}")
    if base.weight.dtype in FLOAT8 and (kind != "lora" or "dora_scale" in t or "magnitude" in t):
        raise LoRAError(f"the base weight is stored in {base.weight.dtype}: only plain LoRA can sit on it "
                        f"({LABELS[kind]} changes or reads the weight itself)")
    if kind != "lora":  # baked: compute W' on meta now (shapes checked), for real when applied
        meta = {p: v.to("meta") if p not in ("alpha", "on_input") else v for p, v in t.items()}
        bias = getattr(base, "bias", None)
        adapted(kind, meta, SimpleNamespace(weight=base.weight.to("meta"), bias=None if bias is None else bias.to("meta")))
        return Planned(key, part, path, kind, kind, keys, live={"tensors": t})
    _require(t, ("up", "down"), "lora")
    down, up, rank = lora_factors(t, base)
    given = float(t["alpha"].item()) if "alpha" in t else (alpha_for(part, path, key, rank) if alpha_for else None)
    alpha, rslora = (given["alpha"], bool(given.get("rslora"))) if isinstance(given, dict) else (given, False)
    alpha = float(rank) if alpha is None else float(alpha)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    magnitude, axis = t.get("dora_scale", t.get("magnitude")), "out"
    if magnitude is not None:
        axis = dora_axis(magnitude, logical_shape(base), peft="magnitude" in t)
        magnitude = magnitude.float().flatten()
    if existing is not None:
        if existing.rank != rank or (existing.magnitude is None) != (magnitude is None):
            raise LoRAError(f"'{key}' has shape {tuple(down.shape)} but the layer at '{path}' needs "
                            f"{tuple(existing.lora_down.weight.shape)} (a LoRA for another model, or another rank)")
        if abs(existing.scale - scale) > 1e-6 * max(1.0, abs(scale)):
            raise LoRAError(f"scale {scale:g} (alpha {alpha:g}) in the file, {existing.scale:g} on the layer at '{path}'")
    label = "locon_cp" if "mid" in t else ("dora" if axis == "out" else "dora_in") if magnitude is not None else \
        ("locon" if isinstance(base, (nn.Conv1d, nn.Conv2d)) and any(k != 1 for k in base.kernel_size) else "lora")
    live = {"rank": rank, "alpha": alpha, "rslora": rslora, "down": down, "up": up, "magnitude": magnitude, "axis": axis}
    return Planned(key, part, path, "lora", label, keys, live=live)


def apply(p: Plan, strength: float = 1.0, name: str = "default") -> list[LoRALayer]:
    """Carry out a plan (check it has no errors first): live layers at `strength`, baked weights
    W + strength (W' - W). Returns the LoRA layers it created or filled."""
    layers = []
    with torch.no_grad():
        for m in p.modules:
            module = m.part.model.get_submodule(m.path)
            if m.kind == "lora":
                v = m.live
                layer = _named(module, name)
                if layer is None:
                    module.requires_grad_(False)
                    layer = LoRALayer(module, v["rank"], v["alpha"], dora=v["magnitude"] is not None, dora_axis=v["axis"],
                                      rslora=v["rslora"], name=name)
                    _replace(m.part.model, {id(module): layer})  # at every path of a shared module
                layer.lora_down.weight.copy_(v["down"])
                layer.lora_up.weight.copy_(v["up"])
                if v["magnitude"] is not None:
                    layer.magnitude.copy_(v["magnitude"])
                layer.multiplier = strength
                layers.append(layer)
            else:
                module = innermost(module)
                w, b = adapted(m.kind, m.live["tensors"], module)
                module.weight.copy_((module.weight.float() + strength * (w - module.weight.float())).to(module.weight.dtype))
                if b is not None:
                    module.bias.copy_((module.bias.float() + strength * (b - module.bias.float())).to(module.bias.dtype))
    return layers
