"""A tiny random SDXL pipeline in the official diffusers folder layout, for the demo and the tests.

    python -m minsdxl.tiny DIR
    python -m minsdxl.tiny DIR --refiner --single_file DIR.safetensors   # the refiner, both layouts

writes model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and
scheduler/ exactly as stabilityai/stable-diffusion-xl-base-1.0 lays them out, with the same
topology at toy sizes: the UNet is `UNetConfig.tiny()`, the VAE still compresses 8x (four levels),
and the two CLIP text encoders' widths add up to the UNet's cross-attention width as 768 + 1280 =
2048 do in SDXL. The tokenizers' small vocabulary (single characters) is written by this code, so
nothing is downloaded. Everything loads through the same code paths as the real weights, in
minsdxl and in diffusers' StableDiffusionXLPipeline.

With --refiner it writes the refiner as stabilityai/stable-diffusion-xl-refiner-1.0 lays it out: no
text_encoder/ or tokenizer/ (OpenCLIP bigG alone), a model_index.json for
StableDiffusionXLImg2ImgPipeline with `requires_aesthetics_score: true` and
`force_zeros_for_empty_prompt: false`, and the UNet `UNetConfig.tiny_refiner()`; as a single file,
its text encoder is `conditioner.embedders.0.model.*`.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import convert
from .config import UNetConfig
from .convert import diffusers_vae_to_ldm, transformers_to_open_clip  # (the name maps back to the single file's)

TEXT_1_WIDTH = 32  # SDXL: 768 (CLIP ViT-L/14)
TEXT_2_WIDTH = 32  # SDXL: 1280 (OpenCLIP ViT-bigG/14); 32 + 32 = UNetConfig.tiny().cross_attention_dim


def write_tokenizer_files(folder: Path, pad_token: str) -> int:
    """A CLIP BPE tokenizer whose vocabulary is single characters (no merges); returns the vocab size.

    CLIP marks the end of a word with `</w>`, so every character appears twice."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    return len(vocab)


def tiny_components(seed: int = 0) -> dict:
    """The random models and configs of the tiny pipeline (not yet written anywhere)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = UNetConfig.tiny()
    unet = UNet2DConditionModel(**cfg.to_diffusers_config())
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
    vocab = 2 * len(string.ascii_lowercase + string.digits + ",.!?'-") + 2
    common = dict(vocab_size=vocab, max_position_embeddings=77, num_hidden_layers=2, num_attention_heads=2,
                  bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_1_WIDTH, intermediate_size=64, hidden_act="quick_gelu",
                                       projection_dim=TEXT_1_WIDTH, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TEXT_2_WIDTH, intermediate_size=64, hidden_act="gelu",
                                                     projection_dim=cfg.pooled_text_dim, **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon", interpolation_type="linear")
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "scheduler": scheduler}


def tiny_refiner_components(seed: int = 0) -> dict:
    """The random models and configs of the tiny refiner: the refiner's topology, one text encoder."""
    from diffusers import UNet2DConditionModel

    # The tiny base's VAE and text encoder 2, weight for weight (seeded alike): the official refiner shares the
    # base's VAE and its frozen OpenCLIP bigG.
    parts = tiny_components(seed)
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(**UNetConfig.tiny_refiner().to_diffusers_config())
    del parts["text_encoder"]
    return parts


def write_tiny_pipeline(directory: str | Path, seed: int = 0, refiner: bool = False) -> Path:
    """Write the tiny pipeline (or, with `refiner`, the tiny refiner) to `directory` in the diffusers
    layout; returns the directory."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    tmp = directory / ".tokenizers"
    write_tokenizer_files(tmp / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer_files(tmp / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer_2"))
    if refiner:
        # As the official refiner's model_index.json: the aesthetic score, and "" encoded for an empty negative prompt.
        pipe = StableDiffusionXLImg2ImgPipeline(tokenizer=None, text_encoder=None, tokenizer_2=tokenizer_2,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                **tiny_refiner_components(seed))
    else:
        pipe = StableDiffusionXLPipeline(tokenizer=CLIPTokenizer.from_pretrained(str(tmp / "tokenizer")),
                                         tokenizer_2=tokenizer_2, **tiny_components(seed))
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars say nothing about a tiny model
    try:
        pipe.save_pretrained(str(directory), safe_serialization=True)
    finally:
        transformers_logging.enable_progress_bar()
    for sub in ("tokenizer", "tokenizer_2"):  # keep our plain vocab files beside what save_pretrained wrote
        for f in (tmp / sub).iterdir():
            if (directory / sub).is_dir() and not (directory / sub / f.name).exists():
                f.replace(directory / sub / f.name)
            else:
                f.unlink()
        (tmp / sub).rmdir()
    tmp.rmdir()
    return directory


# --- the same model as Stability's single file ----------------------------------------------------

def write_single_file(root, path, with_metadata: bool = True, dtype: torch.dtype = torch.float16) -> dict:
    """The tiny pipeline (base or refiner) as Stability's single file: SGM/OpenCLIP/LDM names under their
    prefixes, fp16. The refiner's has no text encoder 1 and its text encoder 2 is embedder 0."""
    root = Path(root)
    refiner = not (root / "text_encoder").is_dir()
    unet = load_file(str(root / "unet/diffusion_pytorch_model.safetensors"))
    te2 = load_file(str(root / "text_encoder_2/model.safetensors"))
    vae = load_file(str(root / "vae/diffusion_pytorch_model.safetensors"))
    vae_cfg = json.loads((root / "vae/config.json").read_text())
    sd = {convert.SGM_UNET_PREFIX + k: v for k, v in convert.unet_diffusers_to_sgm(unet).items()}
    if not refiner:
        # The official file names text encoder 1's weights `text_model.*` (transformers 5 models drop it).
        te1 = load_file(str(root / "text_encoder/model.safetensors"))
        sd.update({convert.SGM_TE1_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in te1.items()})
    te2_prefix = convert.SGM_REFINER_TE2_PREFIX if refiner else convert.SGM_TE2_PREFIX
    sd.update({te2_prefix + k: v for k, v in transformers_to_open_clip(te2).items()})
    sd.update({convert.SGM_VAE_PREFIX + k: v for k, v in diffusers_vae_to_ldm(vae, len(vae_cfg["block_out_channels"])).items()})
    metadata = None
    if with_metadata:
        configs = {"unet": json.loads((root / "unet/config.json").read_text()), "vae": vae_cfg,
                   "text_encoder_2": json.loads((root / "text_encoder_2/config.json").read_text()),
                   "model_index": json.loads((root / "model_index.json").read_text())}
        if not refiner:
            configs["text_encoder"] = json.loads((root / "text_encoder/config.json").read_text())
        metadata = {"minsdxl.configs": json.dumps(configs)}
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return sd



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random SDXL pipeline (diffusers layout).")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refiner", action="store_true", help="write a tiny SDXL refiner instead of the base")
    p.add_argument("--single_file", help="also write the model as Stability's single .safetensors file here (fp16)")
    args = p.parse_args(argv)
    root = write_tiny_pipeline(args.directory, args.seed, refiner=args.refiner)
    print(root)
    if args.single_file:
        write_single_file(root, args.single_file)
        print(args.single_file)


if __name__ == "__main__":
    main()
