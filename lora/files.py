"""LoRA files people exchange, safetensors only: the peft/diffusers and the kohya formats.

    peft / diffusers   <prefix><name>.lora_A.weight (down), <prefix><name>.lora_B.weight (up),
                       DoRA: <prefix><name>.lora_magnitude_vector
    kohya (A1111, ComfyUI)  <prefix><name with . -> _>.lora_down.weight, .lora_up.weight, .alpha (scalar)
                            DoRA: .dora_scale, the magnitude as (out, 1) or (out, 1, 1, 1) (LyCORIS, ComfyUI),
                            (1, in[, 1, 1]) on the input axis

Reading takes every adapter kind of lora.formats (LoHa, LoKr, LoCon-CP, ...), not only these two.

`name` is the module path, or what `name_fn(path)` returns (minsdxl passes a function giving the
SGM names kohya files use). The peft format has no place for alpha, and loaders that find none
use scale 1, so we fold the scale into B (lora_B = scale * up) and record rank and alpha in the
metadata; `load_file` unfolds it when that metadata is there. Kohya files carry alpha themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file as _save_safetensors

from . import formats
from .errors import LoRAError
from .inject import adapted_paths, lora_layers
from .layer import LoRALayer, innermost, supported

FORMAT_VERSION = "1"
METADATA_KEY = "lora.adapters"  # JSON {name: {"rank", "alpha", "dora", "scale_folded"}}


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file's permissions those of any new file (0666 less the umask):
    safetensors 0.8 creates its files 0600, which another user or a container then cannot read."""
    _save_safetensors(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _file_name(fmt: str, name: str, prefix: str) -> str:
    return prefix + (name.replace(".", "_") if fmt == "kohya" else name)


def save_file(model: nn.Module, path, format: str = "peft", name_fn=None, metadata: dict | None = None,
              prefix: str = "", name: str | None = None) -> Path:
    """Write the model's adapters (or adapter `name`'s) to `path` (safetensors) in `format`
    ("peft"/"diffusers" or "kohya"). Rank, alpha, rsLoRA, DoRA and conv alpha round-trip through
    both formats with `load_file`."""
    tensors, adapters = collect(model, format, name_fn, prefix, name)
    return write(path, tensors, adapters, format, metadata)


def collect(model: nn.Module, format: str = "peft", name_fn=None, prefix: str = "", name: str | None = None
            ) -> tuple[dict, dict]:
    """(file tensors, per-adapter metadata) of a model's adapters (adapter `name`'s; it may be left out
    when there is one); several models can share one file."""
    fmt = "peft" if format == "diffusers" else format
    if fmt not in ("peft", "kohya"):
        raise LoRAError(f"unknown LoRA file format '{format}': use 'peft' (= 'diffusers') or 'kohya'")
    names = sorted({layer.name for layer in lora_layers(model, name).values()})
    if not names:
        raise LoRAError("the model has no LoRA layers to save" + (f" named '{name}'" if name else ""))
    if len(names) > 1:
        raise LoRAError(f"the model has several adapters ({names}): pass name= to save one of them")
    layers = adapted_paths(model, names[0])  # the model's own paths, through any stack of adapters
    tensors, adapters = {}, {}
    for module_path, layer in layers.items():
        file_name = name_fn(module_path) if name_fn else module_path
        key = _file_name(fmt, file_name, prefix)
        down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
        if layer.magnitude is not None and layer.dora_axis == "in" and fmt == "peft":
            raise LoRAError(f"'{module_path}': DoRA on the input axis has no peft/diffusers form; save it as 'kohya'")
        if fmt == "peft":
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up * layer.scale  # scale folded in: right in any loader
            if layer.magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude.detach()
        else:
            if layer.magnitude is not None:  # LyCORIS/ComfyUI: (out, 1[, 1, 1]), or (1, in[, 1, 1]) on the input axis
                shape = [1] * innermost(layer).weight.dim()
                shape[0 if layer.dora_axis == "out" else 1] = -1
                tensors[f"{key}.dora_scale"] = layer.magnitude.detach().view(shape)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            # kohya's scale is alpha / rank; rsLoRA's alpha / sqrt(rank) is written as the alpha that
            # gives it (LyCORIS does the same), so every kohya loader applies the right scale
            tensors[f"{key}.alpha"] = torch.tensor(layer.scale * layer.rank if layer.rslora else layer.alpha)
        adapters[key] = {"rank": layer.rank, "alpha": layer.alpha, "rslora": layer.rslora,
                         "dora": layer.magnitude is not None, "dora_axis": layer.dora_axis,
                         "scale_folded": fmt == "peft", "scale": layer.scale}
    return tensors, adapters


def write(path, tensors: dict, adapters: dict, format: str, metadata: dict | None = None) -> Path:
    """Write collected tensors atomically, with the adapters' rank/alpha and `metadata` in the header."""
    fmt = "peft" if format == "diffusers" else format
    meta = {"lora.format": fmt, "lora.format_version": FORMAT_VERSION, METADATA_KEY: json.dumps(adapters),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    tmp.replace(path)  # never a half-written LoRA file under the final name
    return path


def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors LoRA file, with clear errors for anything else."""
    path = Path(path)
    if path.suffix.lower() in (".ckpt", ".pt", ".bin", ".pth"):
        raise LoRAError(f"{path}: pickle files can run code when loaded; only .safetensors LoRA files are read")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise LoRAError(f"{path}: no such file") from None
    except Exception as e:
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None


def our_scales(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """Undo what our own writer did: in our peft files the scale is folded into B (`METADATA_KEY`
    says so); returns (tensors with B unfolded, {module key: {"alpha", "rslora"}}) for the modules
    it describes, so the layer comes back with its own rank, alpha and rsLoRA."""
    known = json.loads(metadata.get(METADATA_KEY, "{}"))
    tensors, alphas = dict(tensors), {}
    for key, info in known.items():
        if "alpha" in info:
            alphas[key] = {"alpha": float(info["alpha"]), "rslora": bool(info.get("rslora"))}
        if info.get("scale_folded") and f"{key}.lora_B.weight" in tensors:
            tensors[f"{key}.lora_B.weight"] = tensors[f"{key}.lora_B.weight"].float() / info["scale"]
        if info.get("rslora"):
            tensors.pop(f"{key}.alpha", None)  # kohya's stand-in alpha; the metadata has the real one
    return tensors, alphas


def module_names(model: nn.Module, name_fn=None, prefix: str = "") -> dict[str, str]:
    """{name in a file: module path} for every layer an adapter file can address, at every path of a
    module reachable at two, under both naming schemes (peft keeps the dots, kohya writes _)."""
    names = {}

    def walk(module: nn.Module, path_prefix: str) -> None:
        for attr, child in module.named_children():
            path = path_prefix + attr
            if isinstance(child, LoRALayer) or supported(child) or isinstance(child, (nn.LayerNorm, nn.GroupNorm)):
                name = name_fn(path) if name_fn else path
                names.setdefault(prefix + name, path)
                names.setdefault(prefix + name.replace(".", "_"), path)
            if not isinstance(child, LoRALayer):  # a wrapped layer's insides are not the model's
                walk(child, path + ".")

    walk(model, "")
    return names


def peft_config(path: Path) -> dict | None:
    """peft's adapter_config.json for an adapter folder or a file inside one, when it is there."""
    config = (path if path.is_dir() else path.parent) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"{config}: not readable JSON ({e})") from None


def load_file(model: nn.Module, path, name_fn=None, strict: bool = True, prefix: str = "", alpha: float | None = None,
              name: str = "default") -> list[str]:
    """Load adapters from a LoRA-family file (see lora.formats) or a peft adapter folder into `model`,
    creating LoRA layers where the model has none, filling those of adapter `name` (same rank and
    scale) and stacking on adapters with other names. All or nothing: any problem is an error before
    the model changes.

    The scale of peft-named tensors (lora_A/lora_B) comes from our metadata, else `alpha`, else the
    adapter_config.json beside the file (lora_alpha, rank/alpha patterns, use_rslora); with none of
    them it is an error, never a guess. Returns the module keys that fit no layer (with strict=True
    those are an error)."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    tensors, metadata = read_file(path)
    config = peft_config(path)
    if tensors and all(k.startswith("base_model.model.") for k in tensors):  # peft's save_pretrained
        tensors = {k[len("base_model.model."):]: v for k, v in tensors.items()}
    tensors, ours = our_scales(tensors, metadata)
    peft_keys = {k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    unknown = sorted(k for k in peft_keys if k not in ours and f"{k}.alpha" not in tensors)
    if unknown and alpha is None and config is None:
        raise LoRAError(f"{path}: nothing was loaded; {len(unknown)} peft-format adapters ({unknown[:3]}) carry no alpha: "
                        f"pass alpha= (peft's lora_alpha), or keep the adapter_config.json beside the file")

    def alpha_for(part, module_path, key, rank):
        if key in ours:
            return ours[key]
        if alpha is not None:
            return {"alpha": alpha, "rslora": bool(config and config.get("use_rslora"))}
        if config is not None:
            r = formats._peft_pattern(config.get("rank_pattern"), module_path) or config.get("r", rank)
            if r != rank:
                raise LoRAError(f"rank {rank} in the tensors but {r} in adapter_config.json")
            a = formats._peft_pattern(config.get("alpha_pattern"), module_path) or config.get("lora_alpha", 8)
            return {"alpha": a, "rslora": bool(config.get("use_rslora"))}
        return None  # kohya names without .alpha: alpha = rank, kohya's rule

    part = formats.Part(type(model).__name__, model, module_names(model, name_fn, prefix))
    try:
        p = formats.plan([part], {k: v for k, v in tensors.items() if k.startswith(prefix)},
                         alpha_for=alpha_for, into_existing=True, name=name)
    except LoRAError as e:  # e.g. one tensor under two names
        raise LoRAError(f"{path}: nothing was loaded; {e}") from None
    problems = p.errors + [f"{k}: {formats.REFUSED[kind]} is not applied by lora/" for kind, ks in p.refused.items() for k in ks]
    if p.loose:
        problems.append(f"tensors that are no adapter weights: {p.loose[:10]}")
    if problems:
        raise LoRAError(f"{path}: nothing was loaded; " + "; ".join(problems[:10]))
    unplaced = sorted(p.unresolved)
    if unplaced and strict:
        total = len(p.unresolved) + len(p.modules)
        raise LoRAError(f"{path}: {len(unplaced)} of {total} adapters match no layer of {type(model).__name__} "
                        f"(first ten: {unplaced[:10]}). A LoRA made for another model or with other names would do "
                        f"nothing; pass strict=False to load the rest.")
    formats.apply(p, name=name)
    return unplaced
