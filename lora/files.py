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
from .inject import LoRAError, lora_layers
from .layer import LoRALayer

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
              prefix: str = "") -> Path:
    """Write the model's adapters to `path` (safetensors) in `format` ("peft"/"diffusers" or "kohya")."""
    tensors, adapters = collect(model, format, name_fn, prefix)
    return write(path, tensors, adapters, format, metadata)


def collect(model: nn.Module, format: str = "peft", name_fn=None, prefix: str = "") -> tuple[dict, dict]:
    """(file tensors, per-adapter metadata) of a model's adapters; several models can share one file."""
    fmt = "peft" if format == "diffusers" else format
    if fmt not in ("peft", "kohya"):
        raise LoRAError(f"unknown LoRA file format '{format}': use 'peft' (= 'diffusers') or 'kohya'")
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers to save")
    tensors, adapters = {}, {}
    for module_path, layer in layers.items():
        name = name_fn(module_path) if name_fn else module_path
        key = _file_name(fmt, name, prefix)
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
                shape = [1] * layer.base.weight.dim()
                shape[0 if layer.dora_axis == "out" else 1] = -1
                tensors[f"{key}.dora_scale"] = layer.magnitude.detach().view(shape)
            if layer.scale != layer.alpha / layer.rank:
                raise LoRAError("rsLoRA scaling cannot be expressed in kohya files (scale = alpha / rank); use 'peft'")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(layer.alpha)
        adapters[key] = {"rank": layer.rank, "alpha": layer.alpha, "dora": layer.magnitude is not None,
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


def our_scales(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """Undo what our own writer did: in our peft files the scale is folded into B (`METADATA_KEY`
    says so); returns (tensors with B unfolded, {module key: alpha}) for the modules it describes."""
    known = json.loads(metadata.get(METADATA_KEY, "{}"))
    tensors, alphas = dict(tensors), {}
    for key, info in known.items():
        if "alpha" in info:  # the alpha that gives the layer's scale with scale = alpha / rank (rsLoRA too)
            exact = info.get("scale") is None or info["scale"] == info["alpha"] / info["rank"]
            alphas[key] = float(info["alpha"]) if exact else info["scale"] * info["rank"]
        if info.get("scale_folded") and f"{key}.lora_B.weight" in tensors:
            tensors[f"{key}.lora_B.weight"] = tensors[f"{key}.lora_B.weight"].float() / info["scale"]
    return tensors, alphas


def module_names(model: nn.Module, name_fn=None, prefix: str = "") -> dict[str, str]:
    """{name in a file: module path} for every layer an adapter file can address, under both naming
    schemes (peft keeps the dots, kohya writes _)."""
    names = {}
    for module_path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, LoRALayer, nn.LayerNorm, nn.GroupNorm)) \
                and not module_path.endswith(".base") and module_path:
            name = name_fn(module_path) if name_fn else module_path
            names[prefix + name] = module_path
            names.setdefault(prefix + name.replace(".", "_"), module_path)
    return names


def load_file(model: nn.Module, path, name_fn=None, strict: bool = True, prefix: str = "") -> list[str]:
    """Load adapters from a LoRA-family file (see lora.formats) into `model`, creating LoRA layers
    where the model has none and filling those it has (same rank and alpha). All or nothing: any
    problem is an error before the model changes.

    Returns the module keys of the file that fit no layer (with strict=True those are an error)."""
    tensors, metadata = read_file(path)
    tensors, alphas = our_scales(tensors, metadata)
    part = formats.Part(type(model).__name__, model, module_names(model, name_fn, prefix))
    try:
        p = formats.plan([part], {k: v for k, v in tensors.items() if k.startswith(prefix)},
                         alpha_for=lambda part, path, key, rank: alphas.get(key), into_existing=True)
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
    formats.apply(p)
    return unplaced
