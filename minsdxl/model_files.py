"""A fine-tuned SDXL UNet as the files people load.

    unet/                       config.json + diffusion_pytorch_model.safetensors, diffusers' layout:
                                `UNet2DConditionModel.from_pretrained("out/unet")`, or the folder in place
                                of a pipeline's unet/
    <name>.safetensors          one file in Stability's SGM layout (`model.diffusion_model.*`, the two text
                                encoders under `conditioner.embedders.*`, the VAE under `first_stage_model.*`):
                                what A1111, ComfyUI and diffusers' `from_single_file` load as a model

The UNet's names go through minsdxl.convert's one table; the text encoders and the VAE are the base
model's own tensors, read from its files as they are stored (dtype and values unchanged), renamed by
convert's maps when the base is a diffusers folder. Our loaders read the single file back bitwise
(`load_unet(path)`). Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from lora.files import write_safetensors

from . import convert
from .loading import CONFIG_METADATA_KEY, LoadError, _component_dir, _download, _hub, _is_repo_id, _weights_in
from .unet import UNet

SDXL_SAMPLE_SIZE = 128  # diffusers' default image side in latents: 128 x 8 = 1024 pixels


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_safetensors(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # a killed run leaves the previous file, never half of one
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def unet_state(unet: UNet) -> dict[str, torch.Tensor]:
    """The UNet's tensors by diffusers name (ours), on the CPU in their own dtype."""
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}


def save_diffusers_unet(unet: UNet, folder: str | Path, metadata: dict | None = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
    """`folder`/config.json and diffusion_pytorch_model.safetensors, as diffusers' save_pretrained writes them.
    `state`: the UNet's tensors when the module does not hold them whole (a model sharded by FSDP2)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DConditionModel", "sample_size": SDXL_SAMPLE_SIZE, **unet.config.to_diffusers_config()}
    _write_atomically(state or unet_state(unet), folder / "diffusion_pytorch_model.safetensors",
                      {"format": "pt", **(metadata or {})})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors files, as stored."""
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def _vae_sgm(source: str, hub: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A VAE (pipeline folder, VAE folder or repo, or a single file) under `first_stage_model.` in LDM
    names, and its diffusers config when the source has one."""
    if _is_repo_id(source):
        source = str(_download(source, ["config.json", "diffusion_pytorch_model*.safetensors", "vae/config.json",
                                        "vae/diffusion_pytorch_model*.safetensors"], "VAE", hub))
    p = Path(source)
    if p.is_file():
        tensors, configs = _read([p]), _configs_in(p)
        vae = {k: v for k, v in tensors.items() if k.startswith(convert.SGM_VAE_PREFIX)}
        if not vae:
            vae = {convert.SGM_VAE_PREFIX + k: v for k, v in tensors.items()
                   if k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))}
        if not vae:
            raise LoadError(f"{p}: no VAE weights in this file")
        return vae, configs.get("vae")
    folder = p / "vae" if (p / "vae").is_dir() else p
    config = json.loads((folder / "config.json").read_text())
    state = _read(_weights_in(folder, "diffusion_pytorch_model", None))
    levels = len(config["block_out_channels"])
    return {convert.SGM_VAE_PREFIX + k: v for k, v in convert.diffusers_vae_to_ldm(state, levels).items()}, config


def _configs_in(path: Path) -> dict:
    """The component configs a single file of ours carries in its metadata (minsdxl.tiny writes them)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get(CONFIG_METADATA_KEY, "{}"))


def base_parts_sgm(base: str | Path, vae_source: str | None = None, variant: str | None = None,
                   revision: str | None = None, cache_dir: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The base model's text encoders and VAE (or `vae_source`'s VAE) under the single file's names, as
    stored, and their diffusers/transformers configs (for a model that is not SDXL's size, which the
    loaders cannot infer from shapes alone)."""
    base, hub = str(base), _hub(revision, cache_dir)
    if Path(base).is_file():
        parts = {k: v for k, v in _read([Path(base)]).items() if not k.startswith(convert.SGM_UNET_PREFIX)}
        if not any(k.startswith(convert.SGM_TE1_PREFIX) for k in parts) or not any(k.startswith(convert.SGM_TE2_PREFIX) for k in parts):
            raise LoadError(f"{base}: no text encoders in this file; a single-file SDXL model needs the base model's "
                            f"(pass the base as a pipeline folder, repo id or full single file)")
        configs = _configs_in(Path(base))
    else:
        parts, configs = {}, {}
        te1_dir = _component_dir(base, "text_encoder", ["config.json"], variant, hub)
        for k, v in _read(_weights_in(te1_dir, "model", variant)).items():
            # The official file names text encoder 1's weights `text_model.*` (transformers 5 files drop it).
            parts[convert.SGM_TE1_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v
        te2_dir = _component_dir(base, "text_encoder_2", ["config.json"], variant, hub)
        te2 = convert.transformers_to_open_clip(_read(_weights_in(te2_dir, "model", variant)))
        parts.update({convert.SGM_TE2_PREFIX + k: v for k, v in te2.items()})
        configs = {"text_encoder": json.loads((te1_dir / "config.json").read_text()),
                   "text_encoder_2": json.loads((te2_dir / "config.json").read_text())}
        if vae_source is None:
            vae, configs["vae"] = _vae_sgm(base, hub)
            parts.update(vae)
    if vae_source is not None:  # --pretrained_vae_model_name_or_path: the VAE the run used goes in the file
        parts = {k: v for k, v in parts.items() if not k.startswith(convert.SGM_VAE_PREFIX)}
        vae, configs["vae"] = _vae_sgm(str(vae_source), {"cache_dir": cache_dir} if cache_dir else {})
        parts.update(vae)
    return parts, {k: v for k, v in configs.items() if v is not None}


def save_single_file(unet: UNet, path: str | Path, base: str | Path, vae_source: str | None = None,
                     variant: str | None = None, revision: str | None = None, cache_dir: str | None = None,
                     metadata: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The UNet (SGM names, its own dtype) with the base model's text encoders and VAE, as one SDXL file."""
    sgm = convert.unet_diffusers_to_sgm(state or unet_state(unet), unet.config)
    tensors = {convert.SGM_UNET_PREFIX + k: v for k, v in sgm.items()}
    parts, configs = base_parts_sgm(base, vae_source, variant, revision, cache_dir)
    tensors.update(parts)
    # modelspec (github.com/Stability-AI/ModelSpec), read by A1111 and ComfyUI to tell the architecture;
    # the components' configs, which our loaders read where shapes do not tell them (the tiny model).
    configs["unet"] = {"_class_name": "UNet2DConditionModel", **unet.config.to_diffusers_config()}
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models", "format": "pt",
            CONFIG_METADATA_KEY: json.dumps(configs), **(metadata or {})}
    return _write_atomically(tensors, Path(path), meta)
