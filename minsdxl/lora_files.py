"""SDXL LoRA files: every format people share, read as the tools that made them mean it; ours
written so that those tools read them.

Names (see docs/lora.md for the full table). The UNet's layers are addressed as
    lora_unet_<SGM path, . -> _>      kohya sd-scripts, LyCORIS, A1111, ComfyUI   lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    lora_unet_<diffusers path, _>     diffusers' convert_state_dict_to_kohya      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q
    unet.<diffusers path>             diffusers' save_lora_weights, peft          unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    unet.<...>.processor.to_q         diffusers' old attention processors         (+ _lora.up.weight)
    lycoris_<diffusers path, _>       LyCORIS' own wrapper
and the text encoders as lora_te1_ / lora_te_ / text_encoder. (CLIP ViT-L) and lora_te2_ /
text_encoder_2. (OpenCLIP bigG), with the transformers module paths. The adapter kinds (LoRA,
LoCon, LoCon-CP, DoRA on either axis, LoHa, LoKr, full, IA3, norm) and their maths are in
lora/formats.py; the SGM names come from the one name table in minsdxl.convert.

A file is loaded completely or not at all: every key is resolved and every shape checked before
the model changes, and a key that fits nothing is an error that says what the file looks like
(ComfyUI's "lora key not loaded" warning is how LoRAs end up silently doing nothing).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import re
import warnings
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

import lora
from lora import formats
from lora.files import collect, our_scales, read_file, write

from . import convert
from .loading import text_encoder_module_name
from .config import UNetConfig
from .unet import UNet

# Which UNet modules get adapters: train.py's --lora_targets presets. "attn" is what diffusers' script
# trains (its `target_modules`); "all" reaches every Linear/Conv2d of the blocks (3x3 convs need a conv rank).
LORA_TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "self_attn": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
    "cross_attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "all": ["transformer_blocks", "proj_in", "proj_out", "resnets", "attentions", "downsamplers", "upsamplers"],
}
# --train_text_encoder: adapters on CLIP's attention projections, as diffusers' script puts them.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

PREFIXES = {  # component -> (kohya prefix, diffusers prefix) of the files we write
    "unet": ("lora_unet_", "unet."),
    "text_encoder": ("lora_te1_", "text_encoder."),
    "text_encoder_2": ("lora_te2_", "text_encoder_2."),
}
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
# The UNet modules kohya's networks.lora creates from a file (Transformer2DModel, ResnetBlock2D,
# Downsample2D, Upsample2D); it skips adapters anywhere else without a word. LyCORIS loads them all.
KOHYA_UNET_MODULES = re.compile(r"(down_blocks|up_blocks)\.\d+\.(attentions|resnets|downsamplers|upsamplers)\.|"
                                r"mid_block\.(attentions|resnets)\.")


def _parts(unet: UNet, text_encoders, fmt: str):
    """(component model, name_fn, prefix) for each component that is given (what we write)."""
    kohya = fmt == "kohya"
    to_sgm = (lambda p: convert.diffusers_path_to_sgm(p, unet.config)) if kohya else None
    parts = [(unet, to_sgm, PREFIXES["unet"][0 if kohya else 1])]
    for name, model in zip(("text_encoder", "text_encoder_2"), text_encoders or ()):
        if model is not None:
            parts.append((model, text_encoder_module_name, PREFIXES[name][0 if kohya else 1]))
    return parts


def _processor_name(path: str) -> str | None:
    """diffusers' old attention-processor name of an attention projection: attn1.processor.to_q, .to_out."""
    m = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out\.0)", path)
    return f"{m.group(1)}.processor.{m.group(2).removesuffix('.0')}" if m else None


def read_names(unet: UNet, text_encoders=None) -> list[formats.Part]:
    """Every name a file may give each layer of the UNet and of the text encoders that are given."""
    names = {}
    for path, module in unet.named_modules():
        if not path or path.endswith(".base") or not isinstance(module, (nn.Linear, nn.Conv2d, lora.LoRALayer,
                                                                         nn.LayerNorm, nn.GroupNorm)):
            continue
        flat = path.replace(".", "_")
        for name in (f"lora_unet_{convert.diffusers_path_to_sgm(path, unet.config).replace('.', '_')}",
                     f"lora_unet_{flat}", f"lycoris_{flat}", f"unet.{path}", path):
            names.setdefault(name, path)
        if (proc := _processor_name(path)) is not None:
            names.setdefault(f"unet.{proc}", path)
            names.setdefault(proc, path)
    parts = [formats.Part("unet", unet, names)]
    te_prefixes = {"text_encoder": ("lora_te1_", "lora_te_", "text_encoder."), "text_encoder_2": ("lora_te2_", "text_encoder_2.")}
    for (part, prefixes), model in zip(te_prefixes.items(), text_encoders or ()):
        if model is None:
            continue
        names = {}
        for path, module in model.named_modules():
            if path and not path.endswith(".base") and isinstance(module, (nn.Linear, lora.LoRALayer, nn.LayerNorm)):
                name = text_encoder_module_name(path)
                old = re.sub(r"\.(q|k|v|out)_proj$", lambda m: f".to_{m.group(1)}", name)  # diffusers' old to_q_lora
                for prefix in prefixes:
                    names.setdefault(prefix + (name.replace(".", "_") if prefix.startswith("lora_") else name), path)
                    if not prefix.startswith("lora_"):
                        names.setdefault(prefix + old, path)
        parts.append(formats.Part(part, model, names))
    return parts


def _diffusers_alphas(metadata: dict[str, str]):
    """alpha_for(...) from diffusers' `lora_adapter_metadata` (the peft LoraConfig of each component,
    keys prefixed `unet.`, `text_encoder.`, ...), as diffusers' load_lora_weights reads it."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise lora.LoRAError("its lora_adapter_metadata is not valid JSON") from None

    def alpha_for(part: formats.Part, path: str, key: str, rank: int):
        if key.startswith("lora_") or not config:
            return None  # kohya names: alpha = rank when the file has no .alpha
        c = {k.removeprefix(part.name + "."): v for k, v in config.items() if k.startswith(part.name + ".")}
        if not c:
            return None
        r = formats._peft_pattern(c.get("rank_pattern"), path) or c.get("r", rank)
        alpha = formats._peft_pattern(c.get("alpha_pattern"), path) or c.get("lora_alpha", r)
        if r != rank:
            raise lora.LoRAError(f"'{key}': rank {rank} in the tensors but {r} in lora_adapter_metadata")
        return {"alpha": alpha, "rslora": bool(c.get("use_rslora"))}
    return alpha_for


@dataclass
class LoadReport:
    """What `load_sdxl_lora` did: modules per model part and adapter kind, and the keys it did not use."""

    path: str
    strength: float
    applied: dict[str, dict[str, int]]  # part -> {kind label: modules}
    live: int  # modules with a LoRA layer (scalable later with lora.set_scale)
    baked: int  # modules whose weight was changed in place at `strength`
    unused: list[str]  # file keys not used (only with strict=False)
    layers: list = dataclass_field(default_factory=list, repr=False)  # the LoRA layers created

    @property
    def modules(self) -> int:
        return self.live + self.baked

    def __str__(self) -> str:
        parts = "; ".join(f"{part}: " + ", ".join(f"{n} {formats.LABELS[k]}" for k, n in sorted(kinds.items()))
                          for part, kinds in self.applied.items())
        how = []
        if self.live:
            how.append(f"{self.live} as LoRA layers")
        if self.baked:
            how.append(f"{self.baked} baked into the weights")
        s = f"{Path(self.path).name}: {self.modules} modules at strength {self.strength:g} ({parts}; {', '.join(how)})"
        if self.unused:
            s += f"; {len(self.unused)} keys not used: {self.unused[:5]}"
        return s


def load_sdxl_lora(unet: UNet, path, text_encoders=None, strength: float = 1.0, strict: bool = True) -> LoadReport:
    """Load any SDXL LoRA-family file (kohya, LyCORIS, diffusers, ours) into `unet` and the text
    encoders (when given), at `strength`: W + strength (W' - W), as ComfyUI and A1111 apply it.

    LoRA, LoCon, LoCon-CP and DoRA become LoRA layers (lora.set_scale changes their strength later);
    LoHa, LoKr, full, IA3 and norm files change the weights in place. All or nothing: a file that
    cannot be loaded completely is an error and leaves the models untouched. With strict=False, keys
    that fit no layer are left out and listed in the report instead."""
    tensors, metadata = read_file(path)
    tensors, ours = our_scales(tensors, metadata)
    theirs = _diffusers_alphas(metadata)
    parts = read_names(unet, text_encoders)
    alpha_for = lambda part, p, key, rank: ours.get(key) if key in ours else theirs(part, p, key, rank)
    try:
        p = formats.plan(parts, tensors, alpha_for=alpha_for)
    except lora.LoRAError as e:  # e.g. one tensor under two names
        raise lora.LoRAError(f"{path}: nothing was loaded; {e}") from None
    modules, _ = formats.group(tensors)
    kinds = {k: formats.kind_of(v) for k, v in modules.items()}
    refused = sorted({k for k in kinds.values() if k in formats.REFUSED})
    if refused:
        what = " and ".join(formats.REFUSED[k] for k in refused)
        prefix = " (kohya's networks.oft: oft_unet_ keys)" if any(k.startswith("oft_") for k in modules) else ""
        raise lora.LoRAError(f"{path}: this is a {what} file{prefix}, {sum(k in formats.REFUSED for k in kinds.values())} "
                             f"modules; minsdxl does not apply it. Nothing was loaded.")
    if p.errors:
        model = _model_of(list(tensors), tensors, metadata)
        raise lora.LoRAError(f"{path}: nothing was loaded; {len(p.errors)} of {len(modules)} modules cannot be applied"
                             + (f" (this LoRA is for {model})" if model else "") + ": " + "; ".join(p.errors[:5]))
    if p.loose and not p.modules and not p.unresolved:
        raise lora.LoRAError(f"{path}: no LoRA in this file: {describe_keys(p.loose, tensors, metadata)}")
    if (p.unresolved or p.loose) and strict:
        raise lora.LoRAError(f"{path}: nothing was loaded; {describe_unused(p, tensors, metadata, text_encoders, len(modules))}")
    layers = formats.apply(p, strength)
    applied: dict[str, dict[str, int]] = {}
    for m in p.modules:
        applied.setdefault(m.part.name, {}).setdefault(m.label, 0)
        applied[m.part.name][m.label] += 1
    live = sum(m.kind == "lora" for m in p.modules)
    return LoadReport(str(path), strength, applied, live, len(p.modules) - live, p.unused, layers)


def _model_of(keys, tensors, metadata) -> str | None:
    """What model a LoRA was made for, from its metadata or the width its cross-attention reads."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    named = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sdxl_base": "SDXL base", "sdxl_refiner": "the SDXL refiner"}
    for tag, name in named.items():
        if version.startswith(tag):
            return f"{name} (ss_base_model_version = {version})"
    if arch and not arch.startswith("stable-diffusion-xl-v1-base"):
        return f"{arch} (modelspec.architecture)"
    widths = {768: "SD 1.x (its cross-attention reads CLIP ViT-L's 768 features)",
              1024: "SD 2.x (its cross-attention reads OpenCLIP ViT-H's 1024 features)",
              1280: "the SDXL refiner (its cross-attention reads OpenCLIP bigG's 1280 features alone)"}
    downs = [tensors[k] for k in keys if k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight",
                                                       "lora_linear_layer.down.weight", "hada_w1_b", "hada_w2_b"))]
    for key in keys:
        if re.search(r"attn2[._]to_k", key) and tensors[key] is not None and key.endswith(
                ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight", "hada_w1_b")):
            width = tensors[key].shape[1] if tensors[key].dim() > 1 else None
            if width in widths:
                return widths[width]
    if any(t.dim() > 1 and t.shape[1] in (384, 1536) for t in downs):
        return "the SDXL refiner (layers 384 or 1536 channels wide, which the base does not have)"
    if any(re.search(r"double_blocks|single_blocks|joint_blocks", k) for k in keys):
        return "a diffusion transformer (Flux/SD3 double_blocks, single_blocks or joint_blocks), not a UNet"
    if any(re.search(r"(input_blocks_[12]_1_|down_blocks[._]0[._]attentions)", k) for k in keys):
        return "SD 1.x/2.x (attention in the first level, which SDXL does not have)"
    return None


def describe_keys(keys, tensors, metadata) -> str:
    """A file that holds no adapter tensors at all, in words."""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in keys):
        return "it is a full model checkpoint (SGM layout); give it as --pretrained_model_name_or_path"
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        return "it holds a diffusers UNet's weights, not a LoRA"
    return f"none of its {len(keys)} tensors is an adapter weight; its keys look like {sorted(keys)[:5]}"


def describe_unused(p: formats.Plan, tensors, metadata, text_encoders, total: int) -> str:
    """The error for keys that fit no layer: how many modules, what they are, the first few keys."""
    keys = p.unused
    te = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
    if te and not text_encoders and len(te) == len(keys) - len(p.loose):
        return (f"{len(p.unresolved)} of {total} modules are text-encoder adapters ({te[:3]}); "
                f"pass text_encoders= to load them")
    modules, _ = formats.group({k: tensors[k] for k in keys})
    kinds = {}
    for names in modules.values():
        label = formats.LABELS.get(formats.kind_of(names) or "", "incomplete")
        kinds[label] = kinds.get(label, 0) + 1
    model = _model_of(keys, tensors, metadata)
    what = f"this LoRA is for {model}" if model else "their names are no layer of this SDXL UNet or its text encoders"
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
    s = f"{len(p.unresolved)} of {total} modules fit no layer ({counts}): {what}. First keys: {keys[:5]}"
    if p.loose:
        s += f". {len(p.loose)} tensors are no adapter weights at all: {p.loose[:3]}"
    return s + ". Pass strict=False to load the rest."


def _network_summary(layers: list) -> dict:
    """kohya's ss_network_* keys for a set of LoRA layers: dim/alpha of the linear (and 1x1) layers,
    conv_dim/conv_alpha of the kxk convs, DoRA as LyCORIS names it."""
    def common(values):
        return max(set(values), key=values.count) if values else None
    kxk = [l for l in layers if isinstance(l.base, nn.Conv2d) and l.base.kernel_size != (1, 1)]
    rest = [l for l in layers if l not in kxk] or kxk
    args = {}
    if kxk:
        args.update(conv_dim=str(common([l.rank for l in kxk])), conv_alpha=str(common([l.alpha for l in kxk])))
    dora = [l for l in layers if l.magnitude is not None]
    if dora:
        args = {"algo": "lora", "dora_wd": "True", **args}
        if any(l.dora_axis == "in" for l in dora):
            args["wd_on_output"] = "False"
    return {"ss_network_module": "lycoris.kohya" if dora else "networks.lora",
            "ss_network_dim": str(common([l.rank for l in rest])), "ss_network_alpha": str(common([l.alpha for l in rest])),
            "ss_network_args": json.dumps(args) if args else None}


def kohya_metadata(unet: UNet, layers: list, info: dict | None = None) -> dict[str, str]:
    """The metadata kohya's sd-scripts writes that tools display and use (A1111's LoRA cards and
    filters, sd-webui-additional-networks, civitai): ss_* and modelspec.*, true for this file.

    `info` may give output_name, resolution (int or (w, h)), steps, epoch, tag_frequency
    ({dataset: {tag: count}}), prediction_type and anything else as ss_<key>."""
    info = dict(info or {})
    cfg = unet.config
    if cfg == UNetConfig.sdxl_base():
        version, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    else:  # a tiny or custom model is no SDXL base: a tool that filters by it must not list this file
        version, arch = "minsdxl_custom", "minsdxl-custom/lora"
    reso = info.pop("resolution", None)
    w, h = (reso, reso) if isinstance(reso, int) else (reso or (None, None))
    name = str(info.pop("output_name", "") or "lora")
    meta = {"ss_base_model_version": version, "ss_output_name": name, **_network_summary(layers)}
    if w:
        meta["ss_resolution"] = str((w, h))
    for key in ("steps", "epoch"):
        if key in info:
            meta[f"ss_{key}"] = str(info.pop(key))
    if "tag_frequency" in info:
        meta["ss_tag_frequency"] = json.dumps(info.pop("tag_frequency"))
    prediction = info.pop("prediction_type", "epsilon")
    meta.update({f"ss_{k}": str(v) for k, v in info.items()})
    meta.update({"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
                 "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                 "modelspec.implementation_version": f"minsdxl/{_version()}", "modelspec.title": name,
                 "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
                 "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"})
    if w:
        meta["modelspec.resolution"] = f"{w}x{h}"
    return {k: v for k, v in meta.items() if v is not None}


def _version() -> str:
    try:
        return importlib.metadata.version("minsdxl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def addnet_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them for sd-webui-additional-networks:
    the sha256 of the data after the header, and 8 hex digits of the sha256 of the 64 KiB at 1 MiB,
    both of the file serialised with only the ss_* metadata."""
    data = safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()},
                                  {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def save_sdxl_lora(unet: UNet, path, format: str = "kohya", text_encoders=None, metadata: dict | None = None,
                   info: dict | None = None, warn=None) -> Path:
    """Save the adapters of `unet` (and of the text encoders, if given) in `format` ("kohya" or "diffusers").

    kohya files carry sd-scripts' metadata (kohya_metadata, with `info`) and its two hashes;
    `metadata` adds keys of your own. `warn(message)` (default: warnings.warn) hears about adapters
    a tool will skip."""
    if format not in ("kohya", "diffusers"):
        raise lora.LoRAError(f"format must be 'kohya' or 'diffusers', not '{format}'")
    tensors, adapters, layers = {}, {}, []
    for model, name_fn, prefix in _parts(unet, text_encoders, format):
        if not lora.lora_layers(model):
            continue
        t, a = collect(model, "peft" if format == "diffusers" else "kohya", name_fn, prefix)
        tensors.update(t)
        adapters.update(a)
        layers += list(lora.lora_layers(model).values())
    if not tensors:
        raise lora.LoRAError("no LoRA layers in the UNet or text encoders: nothing to save")
    meta = dict(metadata or {})
    if format == "kohya":
        meta = {**kohya_metadata(unet, layers, info), **meta}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
        skipped = [p for p in lora.lora_layers(unet) if not KOHYA_UNET_MODULES.match(p)]
        if skipped:
            (warn or warnings.warn)(
                f"{Path(path).name}: {len(skipped)} adapters outside the blocks kohya's networks.lora loads "
                f"({skipped[:3]}): sd-scripts skips them without a word; LyCORIS, ComfyUI and minsdxl load them")
    return write(path, tensors, adapters, "peft" if format == "diffusers" else "kohya", meta)


def adapter_table(rank: int = 16, conv_rank: int | None = None, cfg: UNetConfig | None = None) -> list[tuple[str, int, int]]:
    """[(preset, adapted modules, trainable parameters)] on SDXL base (built on the meta device)."""
    rows = []
    for name, targets in LORA_TARGET_PRESETS.items():
        with torch.device("meta"):
            unet = UNet(cfg or UNetConfig.sdxl_base())
        report = lora.inject(unet, targets, rank=rank, conv_rank=conv_rank)
        rows.append((name, report.wrapped, report.trainable_params))
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m minsdxl.lora_files --rank 16`: how many parameters each --lora_targets preset trains."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--conv_rank", type=int, help="also adapt 3x3 convs (LoCon) where a preset reaches them")
    args = p.parse_args(argv)
    print(f"| preset | patterns | adapted modules | trainable parameters (rank {args.rank}"
          f"{f', conv rank {args.conv_rank}' if args.conv_rank else ''}) |\n| --- | --- | ---: | ---: |")
    for name, modules, params in adapter_table(args.rank, args.conv_rank):
        print(f"| `{name}` | {', '.join(LORA_TARGET_PRESETS[name])} | {modules} | {params:,} |")


if __name__ == "__main__":
    main()
