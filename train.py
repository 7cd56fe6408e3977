"""train.py: LoRA training of SDXL that fits a 12 GB GPU, resumable, with a CPU demo.

The flags are those of diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py`, with
the same meaning, so a command line written for it runs here with only the script name changed.
One training step (epsilon prediction, DDPM; Ho et al. 2020, SDXL: Podell et al. 2023):

    x0      = VAE(image) * 0.13025                  latents (B, 4, H/8, W/8), cached once
    c, p    = text encoders(caption)               (B, 77, 2048) and pooled (B, 1280), cached once
    t, eps  ~ U{0..999}, N(0, I)
    x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps    minsdxl.schedule.add_noise
    loss    = | UNet_with_LoRA(x_t, t, c, p, time_ids) - eps |^2

Only the LoRA matrices train (fp32 master weights); the UNet is frozen in bf16/fp16 and runs under
autocast. `python train.py --demo` runs all of it on a tiny random SDXL on the CPU in a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import lora
from minsdxl.data import BucketBatchSampler, DataError, Dataset, drop_caption, make_demo_dataset
from minsdxl.loading import LATENT_SCALE, LoadError, encode_text, load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.lora_files import save_sdxl_lora
from minsdxl.schedule import NoiseSchedule
from minsdxl.tiny import write_tiny_pipeline
from minsdxl.train_state import CheckpointError, find_latest, load_checkpoint, restore_rng, save_checkpoint

# Which modules get adapters. "attn" is what diffusers' script trains (its `target_modules`).
LORA_TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "self_attn": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
    "cross_attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}

# Flags of diffusers' script that this version accepts but cannot honour yet: each answers with a
# clear message instead of being silently ignored.
NOT_SUPPORTED_YET = {
    "train_text_encoder": "LoRA on the text encoders",
    "use_8bit_adam": "8-bit AdamW",
    "validation_prompt": "validation images during training",
    "push_to_hub": "uploading to the Hub (upload output_dir yourself with `huggingface-cli upload`)",
    "use_ema": "EMA of the adapter weights",
}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # Model
    a("--pretrained_model_name_or_path", help="SDXL base: a diffusers folder, a single .safetensors file or a Hub repo id")
    a("--pretrained_vae_model_name_or_path", help="a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    a("--revision", help="Hub revision of the model")
    a("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    a("--cache_dir", help="Hugging Face download cache")
    # Data
    a("--dataset_name", help="a Hub dataset, e.g. lambdalabs/naruto-blip-captions")
    a("--dataset_config_name", help="config of the Hub dataset")
    a("--train_data_dir", help="a folder of images with .txt captions beside them, or with metadata.jsonl")
    a("--image_column", default="image")
    a("--caption_column", default="text")
    a("--max_train_samples", type=int)
    a("--resolution", type=int, default=1024, help="training side in pixels, a multiple of 64")
    a("--center_crop", action="store_true", help="center crop (default: random crop)")
    a("--random_flip", action="store_true", help="flip half the images horizontally (before cropping)")
    a("--bucketing", action="store_true", help="aspect-ratio buckets of about resolution^2 pixels")
    a("--caption_dropout", "--proportion_empty_prompts", dest="caption_dropout", type=float, default=0.0,
      help="probability of training on the empty caption (diffusers' SDXL fine-tuning script calls it --proportion_empty_prompts)")
    a("--dataloader_num_workers", type=int, default=0, help="accepted; data is prepared in the main process")
    # LoRA
    a("--rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    a("--lora_targets", default="attn", help=f"a preset ({', '.join(LORA_TARGET_PRESETS)}) or comma-separated patterns")
    # Optimisation
    a("--train_batch_size", type=int, default=16)
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, help="total optimizer steps; overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    a("--learning_rate", type=float, default=1e-4)
    a("--scale_lr", action="store_true", help="multiply the learning rate by batch size x accumulation x world size")
    a("--lr_scheduler", default="constant", choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
    a("--lr_warmup_steps", type=int, default=500)
    a("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts: number of restarts")
    a("--lr_power", type=float, default=1.0, help="polynomial: the power")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: bf16 on GPUs that have it, fp16 on others, no on the CPU")
    a("--allow_tf32", action="store_true")
    a("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the model's scheduler config (epsilon for SDXL base)")
    a("--snr_gamma", type=float, help="Min-SNR loss weighting (Hang et al. 2023); 5.0 is the usual value")
    a("--noise_offset", type=float, default=0.0)
    a("--seed", type=int, default=None)
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="accepted for compatibility: attention already runs through PyTorch's fused SDPA kernels")
    # Caching
    a("--cache_latents", action=argparse.BooleanOptionalAction, default=True, help="encode every image once with the VAE")
    a("--cache_text_embeddings", action=argparse.BooleanOptionalAction, default=True, help="encode every caption once")
    # Output, checkpoints, logging
    a("--output_dir", default="sd-model-finetuned-lora")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int)
    a("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    a("--logging_dir", default="logs", help="accepted; metrics go to output_dir/metrics.jsonl")
    a("--report_to", default="none", help="accepted; metrics go to output_dir/metrics.jsonl")
    a("--local_rank", type=int, default=-1, help="accepted for torch.distributed.launch compatibility")
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--demo", action="store_true", help="train on a tiny random SDXL and a generated dataset, on the CPU")
    # Later features: accepted so that a seed command line parses, refused with a message in check_args.
    a("--train_text_encoder", action="store_true")
    a("--use_8bit_adam", action="store_true")
    a("--validation_prompt")
    a("--num_validation_images", type=int, default=4)
    a("--validation_epochs", type=int, default=1)
    a("--push_to_hub", action="store_true")
    a("--hub_token")
    a("--hub_model_id")
    a("--use_ema", action="store_true")
    return p.parse_args(argv)


def apply_demo_defaults(args: argparse.Namespace) -> None:
    """--demo: a tiny random SDXL pipeline and a generated captioned dataset, trained on the CPU."""
    out = Path(args.output_dir)
    model_dir, data_dir = out / "demo-model", out / "demo-data"
    if not (model_dir / "model_index.json").is_file():
        write_tiny_pipeline(model_dir, seed=0)
    if not data_dir.is_dir():
        make_demo_dataset(data_dir, n=16, resolution=64, seed=0)
    args.pretrained_model_name_or_path = str(model_dir)
    args.train_data_dir, args.dataset_name = str(data_dir), None
    args.resolution, args.center_crop, args.random_flip = 64, True, False
    args.train_batch_size, args.max_train_steps = 4, args.max_train_steps or 100
    args.learning_rate, args.lr_scheduler, args.lr_warmup_steps = 1e-3, "constant", 0
    args.rank, args.lora_targets = 8, "attn_ff"
    args.mixed_precision, args.device = args.mixed_precision or "no", args.device or "cpu"
    args.checkpointing_steps = min(args.checkpointing_steps, 50)
    args.seed = 0 if args.seed is None else args.seed


def check_args(args: argparse.Namespace) -> None:
    def fail(msg):
        raise SystemExit(f"train.py: error: {msg}")
    for flag, what in NOT_SUPPORTED_YET.items():
        if getattr(args, flag):
            fail(f"--{flag} ({what}) is not supported yet in minsdxl; remove the flag.")
    if not args.pretrained_model_name_or_path:
        fail("--pretrained_model_name_or_path is required (or pass --demo).")
    if args.dataset_name is None and args.train_data_dir is None:
        fail("give --dataset_name (a Hub dataset) or --train_data_dir (a local folder).")
    if args.resolution % 64 or args.resolution < 64:
        fail(f"--resolution {args.resolution} must be a positive multiple of 64 (SDXL trains at 1024).")
    if args.rank < 1 or args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        fail("--rank, --train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if not 0.0 <= args.caption_dropout < 1.0:
        fail(f"--caption_dropout {args.caption_dropout} must be in [0, 1).")
    if args.enable_xformers_memory_efficient_attention:
        print("note: --enable_xformers_memory_efficient_attention is not needed: minsdxl's attention is "
              "torch's scaled_dot_product_attention, which already uses memory-efficient/flash kernels.")
    if args.report_to not in ("none", "tensorboard", "all"):
        print(f"note: --report_to {args.report_to}: metrics are written to {args.output_dir}/metrics.jsonl only.")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def lr_factor(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer step `step`: a pure function, so resume needs no state.

    The same curves as diffusers' `get_scheduler` (linear warmup, then the named decay)."""
    warmup = args.lr_warmup_steps if args.lr_scheduler != "constant" else 0
    if step < warmup:
        return step / max(1, warmup)
    if args.lr_scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if args.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if args.lr_scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if args.lr_scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((args.lr_num_cycles * progress) % 1.0))))
    # polynomial decay to 1e-7 of the initial rate, as diffusers' default lr_end
    lr_end = 1e-7 / args.learning_rate
    return (1 - lr_end) * max(0.0, 1 - progress) ** args.lr_power + lr_end


def pick_precision(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights and of autocast."""
    if args.mixed_precision is None:
        if device.type != "cuda":
            args.mixed_precision = "no"
        else:
            args.mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # a T4 has no bf16
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]


def lora_targets(spec: str) -> list[str]:
    return LORA_TARGET_PRESETS.get(spec) or [s.strip() for s in spec.split(",") if s.strip()]


def content_key(*parts) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:32]


def model_identity(args: argparse.Namespace) -> str:
    """What cached latents/embeddings depend on besides the data: the weights they came from."""
    return f"{args.pretrained_model_name_or_path}|{args.variant}|{args.pretrained_vae_model_name_or_path}"


@torch.no_grad()
def encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (4, H/8, W/8) latents, one image at a time (a VAE slice), in fp32.

    We take the mean of the VAE's posterior rather than a sample: deterministic, so a cached latent
    equals a freshly computed one; its standard deviation is tiny for the SDXL VAE anyway."""
    x = pixels[None].to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean * LATENT_SCALE
    if not torch.isfinite(latents).all():
        raise TrainingError("the VAE produced NaN/inf latents. The SDXL VAE overflows in fp16: run it in fp32 "
                            "(the default) or pass --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix.")
    return latents[0].float().cpu()


@torch.no_grad()
def encode_captions(text_encoders, tokenizers, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> context (B, 77, 2048), pooled (B, 1280), in fp32 on the CPU."""
    context, pooled = encode_text(text_encoders, tokenizers, captions)
    return context.float().cpu(), pooled.float().cpu()


class Cache:
    """Latents and text conditioning computed once, kept in RAM and on disk by content key.

    Files are `<dir>/<kind>/<key>.safetensors`; a changed image, caption, resolution, crop or model
    gives another key, so stale entries are never used."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.mem: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, kind: str, key: str, compute) -> dict[str, torch.Tensor]:
        if key in self.mem:
            return self.mem[key]
        path = self.dir / kind / f"{key}.safetensors"
        if path.is_file():
            value = load_file(str(path))
        else:
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(value, str(tmp))
            os.replace(tmp, path)  # a killed run never leaves a half-written entry
        self.mem[key] = value
        return value


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_plan(unet, vae, text_encoders, trainable, cache_latents, cache_text) -> str:
    """What will sit on the device during the training steps, before activations."""
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    adapters = sum(p.numel() * p.element_size() for p in trainable)
    lines = [f"  UNet (frozen)         {nbytes(unet) - adapters:>14,d} bytes",
             f"  LoRA adapters (fp32)  {adapters:>14,d} bytes",
             f"  gradients             {adapters:>14,d} bytes",
             f"  AdamW state (2x)      {2 * adapters:>14,d} bytes"]
    if not cache_latents:
        lines.append(f"  VAE                   {nbytes(vae):>14,d} bytes")
    if not cache_text:
        lines.append(f"  text encoders         {sum(nbytes(t) for t in text_encoders):>14,d} bytes")
    return "\n".join(lines)


def save_loss_plot(losses: list[float], path: Path) -> None:
    """A small loss-curve PNG drawn with PIL (no plotting dependency): raw loss and a running mean."""
    from PIL import Image, ImageDraw
    if len(losses) < 2:
        return
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    xy = lambda i, v: (pad + (W - 2 * pad) * i / (len(losses) - 1), H - pad - (H - 2 * pad) * (v - lo) / (hi - lo))
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
    draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((pad, 10), f"training loss (running mean of {window})  steps 1..{len(losses)}", fill="black")
    draw.text((5, pad - 5), f"{hi:.4f}", fill="black")
    draw.text((5, H - pad - 5), f"{lo:.4f}", fill="black")
    img.save(path)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary dict (final step, losses, output files). See the module docstring."""
    if args.demo:
        apply_demo_defaults(args)
    check_args(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weight_dtype = pick_precision(args, device)
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    print(f"device {device}, frozen weights in {weight_dtype}, LoRA weights in float32")

    # 1. Models: frozen UNet in weight_dtype on the device; VAE and text encoders for encoding.
    try:
        unet = load_unet(args.pretrained_model_name_or_path, dtype=weight_dtype, device=device, variant=args.variant)
        text_encoders = load_text_encoders(args.pretrained_model_name_or_path, dtype=torch.float32, device=device, variant=args.variant)
        tokenizers = load_tokenizers(args.pretrained_model_name_or_path)
        vae = load_vae(args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path, dtype=torch.float32, device=device)
    except LoadError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    prediction_type = args.prediction_type or "epsilon"

    # 2. LoRA: freeze everything, then wrap the matching layers; only the adapters train.
    report = lora.inject(unet, lora_targets(args.lora_targets), rank=args.rank, alpha=args.lora_alpha, dtype=torch.float32)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    print(f"LoRA: {report}")
    unet.set_gradient_checkpointing(args.gradient_checkpointing)

    # 3. Data
    try:
        dataset = Dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                          image_column=args.image_column, caption_column=args.caption_column,
                          resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                          bucketing=args.bucketing, max_train_samples=args.max_train_samples, seed=seed)
    except DataError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    sampler = BucketBatchSampler(dataset.bucket_ids, args.train_batch_size, seed=seed)
    batches_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr = args.learning_rate * (args.train_batch_size * args.gradient_accumulation_steps if args.scale_lr else 1)

    # 4. Caches: every latent and caption encoded once, then the VAE and text encoders leave the device.
    cache = Cache(out / "cache")
    ident = model_identity(args)
    cache_latents, cache_text = args.cache_latents, args.cache_text_embeddings
    aug_epoch = lambda epoch: 0 if cache_latents else epoch  # cached latents: one crop/flip per image

    def latents_of(epoch: int, i: int) -> torch.Tensor:
        compute = lambda: {"latents": encode_image(vae, dataset.get(aug_epoch(epoch), i)["pixels"])}
        if not cache_latents:
            return compute()["latents"]
        return cache.get("latents", content_key(ident, dataset.key(aug_epoch(epoch), i)), compute)["latents"]

    def text_of(caption: str) -> dict[str, torch.Tensor]:
        compute = lambda: dict(zip(("context", "pooled"), (t[0] for t in encode_captions(text_encoders, tokenizers, [caption]))))
        return cache.get("text", content_key(ident, caption), compute) if cache_text else compute()
    if cache_latents:
        if not args.center_crop or args.random_flip:
            print("note: latents are cached, so each image's random crop/flip is drawn once and kept for "
                  "every epoch; pass --no-cache_latents to redraw them every epoch.")
        for i in tqdm(range(len(dataset)), desc="caching latents", disable=len(dataset) < 64):
            latents_of(0, i)
        vae.to("cpu")
    if cache_text:
        for caption in tqdm(sorted(set(dataset.captions)) + [""], desc="caching text", disable=len(dataset) < 64):
            text_of(caption)
        for te in text_encoders:
            te.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print("on the device during training:\n" + memory_plan(unet, vae, text_encoders, trainable, cache_latents, cache_text))

    # 5. Optimizer, noise generator, and resume
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scaler = torch.amp.GradScaler(device.type, enabled=weight_dtype == torch.float16)
    noise_gen = torch.Generator().manual_seed(seed)
    sched = NoiseSchedule()  # timesteps, noise, caption dropout: CPU, so runs repeat
    trainable_named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    step, epoch, batches_done = 0, 0, 0
    if args.resume_from_checkpoint:
        ckpt = find_latest(out) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if ckpt is None:
            print(f"no checkpoint in {out}: starting from step 0")
        else:
            try:
                state, adapters, opt_sd, rng = load_checkpoint(ckpt)
            except CheckpointError as e:
                raise SystemExit(f"train.py: error: {e}") from None
            if set(adapters) != set(trainable_named):
                raise SystemExit(f"train.py: error: {ckpt} holds adapters for other modules than this run's "
                                 f"(--lora_targets/--rank must be those of the run that wrote it).")
            with torch.no_grad():
                for name, value in adapters.items():
                    trainable_named[name].copy_(value)
            optimizer.load_state_dict(opt_sd)
            if scaler.is_enabled() and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale it had reached
            restore_rng(rng, noise_gen)
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
            print(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {batches_done})")

    def checkpoint():
        state = {"epoch": epoch, "batches_done": batches_done, "grad_scaler": scaler.state_dict(), "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
        path = save_checkpoint(out, step, trainable_named, optimizer, state, noise_generator=noise_gen, keep_last=args.checkpoints_total_limit)
        print(f"saved {path}")

    # SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, exit cleanly.
    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum)) for s in (signal.SIGINT, signal.SIGTERM)}

    # 6. Train (metrics of steps after the resumed one, from a run that went further, are dropped)
    metrics_path = out / "metrics.jsonl"
    kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step] if metrics_path.is_file() else []
    metrics_path.write_text("".join(l + "\n" for l in kept))
    metrics = open(metrics_path, "a")
    losses: list[float] = []
    progress = tqdm(total=total_steps, initial=step, desc="training", dynamic_ncols=True)
    unet.train()
    t_last, accum_loss, micro = time.perf_counter(), 0.0, 0
    try:
        while step < total_steps and stop["signal"] is None:
            sampler.set_epoch(epoch, skip_batches=batches_done)
            for batch_indices in sampler:
                # Conditioning, from the caches (or computed now): latents, text, time ids.
                x0 = torch.stack([latents_of(epoch, i) for i in batch_indices])  # (B, 4, H/8, W/8)
                captions = drop_caption([dataset.captions[i] for i in batch_indices], args.caption_dropout, noise_gen)
                texts = [text_of(c) for c in captions]
                context = torch.stack([t["context"] for t in texts])  # (B, 77, 2048)
                pooled = torch.stack([t["pooled"] for t in texts])  # (B, 1280)
                time_ids = torch.tensor([dataset.augmentation(aug_epoch(epoch), i).time_ids() for i in batch_indices])  # (B, 6)
                B = x0.shape[0]
                # Noise and timesteps, drawn on the CPU from one generator.
                noise = torch.randn(x0.shape, generator=noise_gen)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn(B, x0.shape[1], 1, 1, generator=noise_gen)
                t = torch.randint(0, sched.num_train_timesteps, (B,), generator=noise_gen)
                x0, noise, t = x0.to(device), noise.to(device), t.to(device)
                x_t = sched.add_noise(x0, noise, t)
                target = sched.target(x0, noise, t, prediction_type)
                with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                    pred = unet(x_t.to(weight_dtype), t, context.to(device, weight_dtype), pooled.to(device, weight_dtype),
                                time_ids.to(device, weight_dtype))
                per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if args.snr_gamma:
                    per_sample = per_sample * sched.min_snr_weights(t, args.snr_gamma, prediction_type)
                loss = per_sample.mean()
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at step {step + 1}. Likely causes: an fp16 VAE (use fp32, the default, or "
                        f"the fp16-fix VAE), a learning rate too high ({lr}), or fp16 overflow (try --mixed_precision bf16). "
                        f"Nothing was saved for this step; the last good checkpoint in {out} is kept.")
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
                accum_loss += loss.item() / args.gradient_accumulation_steps
                micro += 1
                batches_done += 1
                if micro < args.gradient_accumulation_steps and batches_done < batches_per_epoch:
                    continue
                # One optimizer step.
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, args, total_steps)
                scaler.unscale_(optimizer)
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": accum_loss, "lr": optimizer.param_groups[0]["lr"],
                          "it_per_s": 1.0 / (now - t_last), "peak_memory_bytes": peak_memory_bytes(device)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                losses.append(accum_loss)
                progress.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{record['lr']:.2e}", mem=f"{record['peak_memory_bytes'] / 2**30:.1f}G")
                progress.update(1)
                t_last, accum_loss, micro = now, 0.0, 0
                if batches_done == batches_per_epoch:
                    epoch, batches_done = epoch + 1, 0
                if step % args.checkpointing_steps == 0 or stop["signal"] is not None:
                    checkpoint()
                if step >= total_steps or stop["signal"] is not None:
                    break
    finally:
        progress.close()
        metrics.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        print(f"stopped by signal {stop['signal']} at step {step}; resume with --resume_from_checkpoint latest")
        return {"step": step, "losses": losses, "stopped": True}

    # 7. Save the LoRA in both formats people exchange.
    metadata = {"minsdxl.base_model": str(args.pretrained_model_name_or_path), "minsdxl.steps": str(step),
                "minsdxl.resolution": str(args.resolution), "minsdxl.learning_rate": str(args.learning_rate)}
    files = [out / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"]
    save_sdxl_lora(unet, files[0], format="diffusers", metadata=metadata)
    save_sdxl_lora(unet, files[1], format="kohya", metadata=metadata)
    all_losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    save_loss_plot(all_losses, out / "loss.png")
    print(f"peak memory {peak_memory_bytes(device) / 2**30:.2f} GiB; wrote {', '.join(str(f) for f in files)}, {out / 'loss.png'}")
    return {"step": step, "losses": losses, "files": files, "stopped": False}


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as e:
        sys.exit(f"train.py: error: {e}")
