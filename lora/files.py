"""LoRA files people exchange, safetensors only: the peft/diffusers and the kohya formats.

    peft / diffusers   <prefix><name>.lora_A.weight (down), <prefix><name>.lora_B.weight (up),
                       DoRA: <prefix><name>.lora_magnitude_vector
    kohya (A1111, ComfyUI)  <prefix><name with . -> _>.lora_down.weight, .lora_up.weight, .alpha (scalar)
                            DoRA: .dora_scale, the magnitude as (out, 1) or (out, 1, 1, 1) (LyCORIS, ComfyUI)

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
        if fmt == "peft":
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up * layer.scale  # scale folded in: right in any loader
            if layer.magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude.detach()
        else:
            if layer.magnitude is not None:  # LyCORIS/ComfyUI: the magnitude per output channel, (out, 1[, 1, 1])
                tensors[f"{key}.dora_scale"] = layer.magnitude.detach().view(-1, *[1] * (layer.base.weight.dim() - 1))
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


def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, dict]:
    """Group a file's tensors by adapter: {file key: {"down", "up", "alpha", "magnitude", "folded"}}."""
    known = json.loads(metadata.get(METADATA_KEY, "{}"))
    suffixes = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
                ".lora_up.weight": "up", ".alpha": "alpha", ".lora_magnitude_vector": "magnitude",
                ".lora_magnitude_vector.weight": "magnitude", ".dora_scale": "magnitude"}
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            out.setdefault(key, {})["unknown"] = value
    for key, entry in out.items():
        info = known.get(key, {})
        entry["folded_scale"] = info.get("scale") if info.get("scale_folded") else None
        if "alpha" not in entry and "alpha" in info:
            entry["alpha"] = torch.tensor(info["alpha"])
    return out


def load_file(model: nn.Module, path, name_fn=None, strict: bool = True, prefix: str = "") -> list[str]:
    """Load adapters from a LoRA file into `model`, creating LoRA layers where the model has none.

    Returns the file keys that could not be placed (with strict=True those are an error)."""
    tensors, metadata = read_file(path)
    return apply(model, parse(tensors, metadata), name_fn, strict, prefix, where=str(path))


def apply(model: nn.Module, entries: dict[str, dict], name_fn=None, strict: bool = True, prefix: str = "",
          where: str = "LoRA") -> list[str]:
    """Place parsed adapter entries (see `parse`) whose keys start with `prefix` into `model`."""
    entries = {k: v for k, v in entries.items() if k.startswith(prefix)}
    path = where
    # Every candidate module path under both naming schemes (peft keeps dots, kohya uses _).
    candidates = {}
    for module_path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, LoRALayer)) and not module_path.endswith(".base"):
            name = name_fn(module_path) if name_fn else module_path
            candidates[prefix + name] = module_path
            candidates[prefix + name.replace(".", "_")] = module_path
    unplaced, placed = [], {}
    for key, entry in entries.items():
        if key not in candidates or "down" not in entry or "up" not in entry or "unknown" in entry:
            unplaced.append(key)
        else:
            placed[candidates[key]] = (key, entry)
    if unplaced and strict:
        raise LoRAError(f"{path}: {len(unplaced)} of {len(entries)} adapters match no layer of {type(model).__name__} "
                        f"(first ten: {unplaced[:10]}). A LoRA made for another model or with other names would do "
                        f"nothing; pass strict=False to load the rest.")
    existing = lora_layers(model)
    for module_path, (key, entry) in placed.items():
        down, up = entry["down"], entry["up"]
        rank = down.shape[0]
        alpha = float(entry["alpha"]) if "alpha" in entry else float(rank)
        if entry["folded_scale"]:
            up = up / entry["folded_scale"]  # our own peft file: unfold to the trained B
        layer = existing.get(module_path)
        if layer is None:
            layer = _wrap_one(model, module_path, rank, alpha, "magnitude" in entry)
        for param, value in ((layer.lora_down.weight, down), (layer.lora_up.weight, up)) + \
                            (((layer.magnitude, entry["magnitude"]),) if "magnitude" in entry and layer.magnitude is not None else ()):
            if param is layer.magnitude and value.numel() == param.numel():
                value = value.reshape(param.shape)  # kohya's dora_scale keeps singleton dims
            if tuple(param.shape) != tuple(value.shape):
                raise LoRAError(f"{path}: '{key}' has shape {tuple(value.shape)} but the layer at '{module_path}' "
                                f"needs {tuple(param.shape)} (a LoRA for another model, or another rank)")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
    return unplaced


def _wrap_one(model: nn.Module, module_path: str, rank: int, alpha: float, dora: bool) -> LoRALayer:
    """Give the layer at `module_path` an adapter of the file's rank (its values are copied next)."""
    parent_path, _, name = module_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    base = getattr(parent, name)
    base.requires_grad_(False)
    layer = LoRALayer(base, rank, alpha, dora=dora)
    setattr(parent, name, layer)
    return layer
