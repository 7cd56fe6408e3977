"""Key conversion between the two official SDXL layouts, and config inference from tensor shapes.

Stability's single file uses the SGM ("original", generative-models) module names; diffusers
folders use diffusers' names, which are also ours (minsdxl.UNet keeps diffusers' keys). This file
is the only place where UNet names are translated. The translation is a table of module-path
prefixes built from the config (how many levels, resnets per level, which levels have attention),
plus the renames inside a resnet. Transformer blocks keep their names in both layouts.

SGM numbering, for L levels and n resnets per down level (SDXL: L = 3, n = 2):
    input_blocks.0.0                     conv_in
    input_blocks.{i(n+1) + j + 1}.0 / .1 down_blocks.i.resnets.j / .attentions.j
    input_blocks.{(i+1)(n+1)}.0.op       down_blocks.i.downsamplers.0.conv   (not on the last level)
    middle_block.0 / .1 / .2             mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.{i(n+1) + j}.0 / .1    up_blocks.i.resnets.j / .attentions.j   (j = 0..n: n + 1 resnets)
    output_blocks.{i(n+1) + n}.{1|2}.conv up_blocks.i.upsamplers.0.conv   (.2 after an attention)
Text encoder 2 is converted here too (OpenCLIP -> transformers names).
"""

from __future__ import annotations

import re

import torch

from .config import UNetConfig, time_ids_from_widths

SGM_UNET_PREFIX = "model.diffusion_model."
SGM_TE1_PREFIX = "conditioner.embedders.0.transformer."
SGM_TE2_PREFIX = "conditioner.embedders.1.model."
SGM_REFINER_TE2_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder, OpenCLIP bigG
SGM_VAE_PREFIX = "first_stage_model."

# Modules outside the down/mid/up blocks: (SGM, diffusers).
TOP_LEVEL = [
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),  # the 2816 -> 1280 size/text conditioning MLP
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
]
# Inside every resnet: (SGM, diffusers).
RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]


class ConversionError(ValueError):
    """A state dict whose names or shapes do not fit the layout it was read as."""


def module_table(levels: int, layers_per_block: int, attention: list[bool]) -> list[tuple[str, str, bool]]:
    """(SGM prefix, diffusers prefix, is_resnet) for every block module of the UNet."""
    n, table = layers_per_block, [(s, d, False) for s, d in TOP_LEVEL]
    for i in range(levels):  # down path
        for j in range(n):
            k = i * (n + 1) + j + 1
            table.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", True))
            if attention[i]:
                table.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", False))
        if i < levels - 1:
            table.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
    table += [("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
              ("middle_block.2", "mid_block.resnets.1", True)]
    for i in range(levels):  # up path: up level i mirrors down level levels-1-i, with n + 1 resnets
        has_attn = attention[levels - 1 - i]
        for j in range(n + 1):
            k = i * (n + 1) + j
            table.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", True))
            if has_attn:
                table.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", False))
        if i < levels - 1:
            k = i * (n + 1) + n
            table.append((f"output_blocks.{k}.{2 if has_attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", False))
    return table


def table_for(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    return module_table(len(cfg.block_out_channels), cfg.layers_per_block, [d > 0 for d in cfg.transformer_depth])


def _rename(path: str, table: list[tuple[str, str, bool]], to_diffusers: bool) -> str:
    """Rename one module path (or parameter key) with the longest matching table prefix."""
    best = None
    for sgm, diff, is_resnet in table:
        src = sgm if to_diffusers else diff
        if (path == src or path.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, diff if to_diffusers else sgm, is_resnet)
    if best is None:
        raise ConversionError(f"no {'SGM' if to_diffusers else 'diffusers'} UNet module matches '{path}'")
    src, dst, is_resnet = best
    rest = path[len(src):]  # "" or ".<inner path>"
    if is_resnet and rest:
        for sgm_inner, diff_inner in RESNET:
            a, b = (sgm_inner, diff_inner) if to_diffusers else (diff_inner, sgm_inner)
            if rest == "." + a or rest.startswith("." + a + "."):
                rest = "." + b + rest[len(a) + 1:]
                break
    return dst + rest


def diffusers_path_to_sgm(path: str, cfg: UNetConfig) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    return _rename(path, table_for(cfg), to_diffusers=False)


def sgm_path_to_diffusers(path: str, cfg: UNetConfig) -> str:
    return _rename(path, table_for(cfg), to_diffusers=True)


def unet_sgm_to_diffusers(sd: dict, cfg: UNetConfig | None = None) -> dict:
    """SGM UNet keys (without `model.diffusion_model.`) -> diffusers keys; tensors are not copied."""
    table = table_for(cfg) if cfg is not None else module_table(*sgm_structure(sd))
    return {_rename(k, table, True): v for k, v in sd.items()}


def sgm_names_to_diffusers(keys) -> dict[str, str]:
    """{SGM key: diffusers key} for SGM UNet keys, the block structure read from the keys themselves."""
    table = module_table(*sgm_structure(dict.fromkeys(keys)))
    return {k: _rename(k, table, True) for k in keys}


def unet_diffusers_to_sgm(sd: dict, cfg: UNetConfig | None = None) -> dict:
    table = table_for(cfg) if cfg is not None else module_table(*diffusers_structure(sd))
    return {_rename(k, table, False): v for k, v in sd.items()}


# --- structure and config from tensor names and shapes ------------------------------------------

def _indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def sgm_structure(sd: dict) -> tuple[int, int, list[bool]]:
    """(levels, layers_per_block, attention per level) of an SGM UNet state dict."""
    ops = sorted(_indices(sd, r"input_blocks\.(\d+)\.0\.op\."))
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise ConversionError("no 'input_blocks.*' keys: this is not an SGM UNet state dict")
    n = ops[0] - 1 if ops else max(blocks)
    levels = len(ops) + 1
    attention = [bool(_indices(sd, rf"input_blocks\.({i * (n + 1) + 1})\.1\.")) for i in range(levels)]
    return levels, n, attention


def diffusers_structure(sd: dict) -> tuple[int, int, list[bool]]:
    levels = len(_indices(sd, r"down_blocks\.(\d+)\."))
    if not levels:
        raise ConversionError("no 'down_blocks.*' keys: this is not a diffusers UNet state dict")
    n = len(_indices(sd, r"down_blocks\.0\.resnets\.(\d+)\."))
    attention = [bool(_indices(sd, rf"down_blocks\.({i})\.attentions\.")) for i in range(levels)]
    return levels, n, attention


def infer_unet_config(sd: dict) -> UNetConfig:
    """A UNetConfig from a diffusers-named state dict's shapes, by SDXL's conventions where shapes are silent.

    Shapes give channels, levels, depths and the text dims. They do not give the head count, the
    GroupNorm group count or the split of the added conditioning into pooled text and time ids:
    for those we take SDXL's choices (head dim 64, 32 groups, 256 features per time id, and the
    base's 6 or the refiner's 5 ids by `time_ids_from_widths`), which is why a file written with
    another choice should carry its config (a diffusers config.json, or the `minsdxl.configs`
    metadata our tiny files have)."""
    levels, n, attention = diffusers_structure(sd)
    channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
    depth = tuple(len(_indices(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in range(levels))
    mid_depth = len(_indices(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."))
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    if "add_embedding.linear_1.weight" not in sd or not to_k:
        raise ConversionError("no added (size) conditioning or no cross-attention: not an SDXL-family UNet")
    adm, cross = sd["add_embedding.linear_1.weight"].shape[1], to_k[0].shape[1]
    time_ids = time_ids_from_widths(adm, 256, cross)
    return UNetConfig(
        in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=channels, layers_per_block=n, transformer_depth=depth,
        mid_transformer_depth=mid_depth, num_heads=tuple(max(1, c // 64) for c in channels),
        cross_attention_dim=cross, pooled_text_dim=adm - len(time_ids) * 256, addition_time_embed_dim=256,
        time_ids=time_ids, norm_num_groups=32,
    )


# --- text encoder 2: OpenCLIP names -> transformers' CLIPTextModelWithProjection ------------------

OPENCLIP_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPENCLIP_LAYER = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                  ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")]


def open_clip_to_transformers(sd: dict) -> dict:
    """OpenCLIP text tower keys (prefix stripped) -> CLIPTextModelWithProjection keys.

    Two changes besides names: OpenCLIP fuses q, k, v into one `in_proj` (3*hidden rows, in that
    order), and stores `text_projection` as (hidden, proj) for `x @ P`, where nn.Linear wants (proj, hidden)."""
    out = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            layer, rest = f"text_model.encoder.layers.{m.group(1)}", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}.self_attn.{name}.{kind}"] = part.contiguous()
                continue
            for a, b in OPENCLIP_LAYER:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            else:
                raise ConversionError(f"unknown OpenCLIP text-encoder key '{key}'")
            out[f"{layer}.{rest}"] = value
        elif key in ("logit_scale",) or key.startswith("attn_mask"):
            continue  # not part of the text tower's forward
        else:
            raise ConversionError(f"unknown OpenCLIP text-encoder key '{key}'")
    return out


def infer_clip_text_config(sd: dict, with_projection: bool) -> dict:
    """A transformers CLIPTextConfig dict from a (transformers-named) text encoder state dict.

    Head count by the CLIP convention (head dim 64); the activation is CLIP-L's quick_gelu for text
    encoder 1 and OpenCLIP bigG's gelu for text encoder 2, as in SDXL."""
    hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
    cfg = {
        "vocab_size": sd["text_model.embeddings.token_embedding.weight"].shape[0],
        "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": max(1, hidden // 64),
        "hidden_act": "gelu" if with_projection else "quick_gelu",
        "projection_dim": sd["text_projection.weight"].shape[0] if with_projection else hidden,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }
    return cfg


# --- the way back: the text encoders and VAE in the single file's names (written by minsdxl.model_files) --

def transformers_to_open_clip(sd: dict) -> dict:
    """Text encoder 2 from transformers names back to OpenCLIP's (the inverse of convert.open_clip_to_transformers)."""
    out = {}
    # transformers 5 saves CLIP's weights without the `text_model.` prefix that OpenCLIP's names are mapped from
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
            continue
        rev = {b: a for a, b in OPENCLIP_TOP.items()}
        if k in rev:
            out[rev[k]] = v
            continue
        if k.endswith("position_ids"):
            continue
        layer, rest = k.split(".layers.")[1].split(".", 1)
        base = f"transformer.resblocks.{layer}"
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [sd[f"text_model.encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"{base}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        else:
            for a, b in OPENCLIP_LAYER:
                if rest.startswith(b + "."):
                    rest = a + rest[len(b):]
            out[f"{base}.{rest}"] = v
    return out


def diffusers_vae_to_ldm(sd: dict, levels: int) -> dict:
    """The VAE from diffusers names back to the LDM names of the single file (inverse of diffusers' converter)."""
    out = {}
    for k, v in sd.items():
        n = k
        for i in range(levels):
            n = n.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            n = n.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            n = n.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            n = n.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        n = n.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in n:
            n = n.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                n = n.replace(f".{a}.", f".{b}.")
            if v.dim() == 2:
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[n] = v
    return out
