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

import os

# transformers' notices about optional packages we do not use (torchvision image processors, imported
# with diffusers' pipelines) are not ours to report; set TRANSFORMERS_VERBOSITY=warning to see them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import contextlib
import hashlib
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

import lora
from lora.files import write_safetensors
from minsdxl.checkpointing import POLICIES
from minsdxl.cli import HelpFormatter
from minsdxl.compile import compile_repeated_blocks
from minsdxl.data import BucketBatchSampler, DataError, Dataset, drop_caption, make_demo_dataset, seeded_generator
from minsdxl.fp8 import quantize_fp8
from minsdxl.generate import Models, compare_grid, decode, generate, text_conditioning
from minsdxl.loading import LATENT_SCALE, LoadError, encode_text, load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.lora_files import LORA_TARGET_PRESETS, TEXT_ENCODER_TARGETS, save_sdxl_lora
from minsdxl.schedule import NoiseSchedule
from minsdxl.tiny import write_tiny_pipeline
from minsdxl.train_state import (CheckpointError, clear_run, load_checkpoint, load_latest_intact, previous_run, remove_leftovers,
                                 restore_rng, save_checkpoint)

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")

# Flags of diffusers' script that this version accepts but cannot honour yet: each answers with a
# clear message instead of being silently ignored.
NOT_SUPPORTED_YET = {
    "push_to_hub": "uploading to the Hub (upload output_dir yourself with `huggingface-cli upload`)",
}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM where nothing is left to save (before training starts, or a second signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def fail(msg: str):
    """Stop with a one-line error that says what to do (no traceback)."""
    raise SystemExit(f"train.py: error: {msg}")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="a TOML file of flags (flag names without --, e.g. rank = 16); the command line overrides it")
    # Model
    a("--pretrained_model_name_or_path", help="SDXL base: a diffusers folder, a single .safetensors file or a Hub repo id")
    a("--pretrained_vae_model_name_or_path", help="a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    a("--revision", help="Hub revision of the model")
    a("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    a("--cache_dir", help="Hugging Face download cache")
    a("--fp8_base", action="store_true", help="store the frozen UNet's Linear/Conv weights in float8 (e4m3), upcast "
      "per layer: about half the weight memory; LoRA training only")
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
    a("--conv_rank", type=int, help="also adapt 3x3 convolutions at this rank (LoCon), for targets that reach them")
    a("--conv_alpha", type=float, help="alpha of the conv adapters (default: conv_rank)")
    a("--lora_dropout", type=float, default=0.0, help="dropout on the adapter's input")
    a("--rank_dropout", type=float, default=0.0, help="kohya's rank dropout: zero whole ranks per sample")
    a("--module_dropout", type=float, default=0.0, help="kohya's module dropout: skip a whole adapter for a step")
    a("--use_dora", action="store_true", help="DoRA: weight-decomposed LoRA (Liu et al. 2024)")
    a("--init_lora_weights", choices=["kaiming", "gaussian"], default="kaiming",
      help="init of the down matrix (up starts at zero either way); diffusers' script uses gaussian")
    a("--train_text_encoder", action="store_true", help="LoRA on both CLIP text encoders too (no text caching then)")
    a("--text_encoder_lr", type=float, help="learning rate of the text-encoder adapters (default: --learning_rate)")
    # Optimisation
    a("--train_batch_size", type=int, default=16)
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, help="total optimizer steps; overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", nargs="?", const="full", choices=POLICIES, metavar="{" + ",".join(POLICIES) + "}",
      help="recompute activations in backward (less memory); alone: full. selective keeps what is expensive to "
           "recompute (minsdxl/checkpointing.py, docs/performance.md)")
    a("--channels_last", action=argparse.BooleanOptionalAction, default=True,
      help="the UNet's convolutions in channels-last (NHWC) layout, faster on this project's devices (docs/performance.md)")
    a("--compile", action="store_true",
      help="torch.compile the UNet's repeated blocks (minsdxl/compile.py); says so and runs eager if no compiler works")
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
    a("--optimizer", choices=OPTIMIZERS, default="adamw",
      help="adamw8bit needs bitsandbytes and CUDA; prodigy needs prodigyopt (use --learning_rate 1.0)")
    a("--use_8bit_adam", action="store_true", help="the same as --optimizer adamw8bit")
    a("--prodigy_d_coef", type=float, default=1.0, help="Prodigy's d_coef")
    a("--use_ema", action="store_true", help="keep an exponential moving average of the adapter weights; save it")
    a("--ema_decay", type=float, default=0.999)
    a("--ema_on_cpu", action="store_true", help="keep the EMA copy in CPU memory (saves VRAM)")
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: bf16 on GPUs that have it, fp16 on others, no on the CPU")
    a("--allow_tf32", action="store_true")
    a("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the model's scheduler config (epsilon for SDXL base)")
    a("--snr_gamma", type=float, help="Min-SNR loss weighting (Hang et al. 2023); 5.0 is the usual value")
    a("--noise_offset", type=float, default=0.0)
    a("--debug_loss", action="store_true", help="also record each image's loss (by dataset index) in metrics.jsonl")
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
    a("--overwrite_output_dir", action="store_true",
      help="start again in an --output_dir that holds a previous run (its checkpoints, metrics and LoRA files are deleted)")
    a("--logging_dir", default="logs", help="tensorboard: event files go to output_dir/logging_dir")
    a("--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"],
      help="also log to tensorboard or wandb (optional extras); metrics.jsonl and loss.png are always written")
    a("--validation_prompt", help="generate images with the current LoRA (and the base model beside them)")
    a("--num_validation_images", type=int, default=4, help="validation images, seeds seed, seed+1, ...")
    a("--validation_epochs", type=int, default=1, help="validate every N epochs")
    a("--validation_steps", type=int, help="validate every N optimizer steps (instead of epochs)")
    a("--validation_inference_steps", type=int, default=25, help="sampler steps of validation images")
    a("--local_rank", type=int, default=-1, help="accepted for torch.distributed.launch compatibility")
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--memory_plan", choices=["auto", "on", "off"], default="auto",
      help="predict the device memory of every phase before loading anything (python -m minsdxl.memory); auto: on CUDA")
    a("--ignore_memory_plan", action="store_true", help="go on even if the predicted peak is more than the GPU has free")
    a("--demo", action="store_true", help="train on a tiny random SDXL and a generated dataset, on the CPU")
    # Later features: accepted so that a seed command line parses, refused with a message in check_args.
    a("--push_to_hub", action="store_true")
    a("--hub_token")
    a("--hub_model_id")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--config run.toml` supplies values for any flag, and flags given on the
    command line win over it. `args._explicit` holds the flags that were given either way."""
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    from_config = read_config(pre.config, {act.dest for act in p._actions}) if pre.config else {}
    p.set_defaults(**from_config)
    args = p.parse_args(argv)
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS  # so only flags on the command line appear
    args._explicit = set(vars(given.parse_args(argv))) | set(from_config)
    return args


def read_config(path: str, known: set[str]) -> dict:
    """Flags from a TOML file: `rank = 16`, `lora_targets = "attn"`, `random_flip = true`."""
    import tomllib
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"train.py: error: --config {path}: {e}") from None
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"train.py: error: --config {path}: unknown flags {unknown} (names as on the command "
                         f"line without --, e.g. train_batch_size)")
    return values


def write_config(args: argparse.Namespace, path: Path) -> None:
    """The resolved flags as TOML, so `--config path` repeats the run."""
    lines = [f"# resolved flags of this run; repeat it with: python train.py --config {path.name}"]
    for key, value in sorted(vars(args).items()):
        if value is None or key == "config" or key.startswith("_"):
            continue
        lines.append(f"{key} = {json.dumps(value) if isinstance(value, (str, bool)) else repr(value)}")
    path.write_text("\n".join(lines) + "\n")


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
    # Settings for a minute on the CPU, each used only where the flag was not given (command line or --config).
    demo = dict(resolution=64, center_crop=True, train_batch_size=4, max_train_steps=100, learning_rate=1e-3,
                lr_scheduler="constant", lr_warmup_steps=0, rank=8, lora_targets="attn_ff", mixed_precision="no",
                device="cpu", checkpointing_steps=50, seed=0, validation_inference_steps=4)
    for key, value in demo.items():
        if key not in getattr(args, "_explicit", set()):
            setattr(args, key, value)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked from the flags alone, before anything is loaded."""
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
    for flag in ("lora_dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            fail(f"--{flag} {getattr(args, flag)} must be in [0, 1).")
    if args.conv_rank is not None and args.conv_rank < 1:
        fail(f"--conv_rank {args.conv_rank} must be at least 1.")
    if args.fp8_base and args.use_dora:
        fail("--use_dora reads the base weights, which --fp8_base stores scaled in float8: pass one of them.")
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    if args.train_text_encoder and args.cache_text_embeddings:
        print("note: --train_text_encoder: the text conditioning changes as the text encoders train, so it is "
              "computed every step instead of cached (--cache_text_embeddings is off).")
        args.cache_text_embeddings = False
    if args.validation_steps is not None and args.validation_steps < 1:
        fail("--validation_steps must be at least 1.")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        fail("--overwrite_output_dir starts the run again and --resume_from_checkpoint goes on with it: pass one.")


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


def training_noise(shape: tuple, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I) of `shape` (B, C, h, w), plus with --noise_offset one N(0, offset²) shift per image and
    channel (Guttenberg 2023, "Diffusion with Offset Noise"): it lets the model change an image's mean
    brightness, so it can make very dark and very bright images."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


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
            write_safetensors(value, tmp)
            os.replace(tmp, path)  # a killed run never leaves a half-written entry
        self.mem[key] = value
        return value


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextlib.contextmanager
def staged(device: torch.device, *models: torch.nn.Module):
    """Bring `models` to the device for a phase and send them back to where they were after it (the CPU,
    usually), with the cache emptied, so that no phase holds a model it does not run."""
    homes = [next(m.parameters()).device for m in models]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(models, homes):
            m.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class PhaseMeter:
    """The measured peak device memory of each phase of a run (CUDA: torch.cuda.max_memory_allocated,
    what the caching allocator handed out; nothing is measured per phase elsewhere). Phases may nest
    (a checkpoint inside the training steps): the outer phase's peak so far is kept before the inner one starts."""

    def __init__(self, device: torch.device):
        self.device, self.peaks, self.stack = device, {}, []
        self.cuda = device.type == "cuda"

    def _record(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda and self.stack:
            self._record(self.stack[-1])
        self.stack.append(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            if self.cuda:
                self._record(name)
                torch.cuda.reset_peak_memory_stats(self.device)  # the outer phase goes on from here
            self.stack.pop()


def plan_memory(args: argparse.Namespace, device: torch.device, log):
    """The simulator's prediction of every phase (minsdxl.memory), before anything is loaded; on CUDA the
    run stops here, with the table and the changes that would fit, if the peak is more than the GPU has free."""
    if args.memory_plan == "off" or (args.memory_plan == "auto" and device.type != "cuda"):
        return None
    from minsdxl import memory
    try:
        plan = memory.simulate(args, device.type)
    except (memory.SimulationError, ImportError) as e:
        log(f"memory plan: not predicted ({e})")
        return None
    log("predicted device memory (python -m minsdxl.memory):\n" + plan.table())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        check_memory(plan, free, args, log)
    return plan


def check_memory(plan, free: int, args: argparse.Namespace, log) -> None:
    """Stop, before loading anything, if the predicted peak does not fit in `free` bytes (what the GPU has
    free now, its CUDA context already made), unless --ignore_memory_plan."""
    from minsdxl import memory
    needed = (plan.peak - memory.CUDA_CONTEXT) * (1 + memory.FRAGMENTATION_MARGIN)
    if needed <= free:
        return
    lines = [f"the predicted peak, {needed / 2**30:.2f} GiB (with {memory.FRAGMENTATION_MARGIN:.0%} for the allocator), "
             f"is more than the {free / 2**30:.2f} GiB this GPU has free; this run would run out of memory."]
    found = memory.suggestions(args, free + memory.CUDA_CONTEXT, "cuda")
    lines += [f"  {label}: predicted peak {(p.peak - memory.CUDA_CONTEXT) / 2**30:.2f} GiB" for label, p in found] \
        or ["  (no single change found)"]
    msg = "\n".join(lines) + "\nChange the flags, or pass --ignore_memory_plan to try anyway."
    if args.ignore_memory_plan:
        log("warning: " + msg)
        return
    fail(msg)


def add_adapters(args: argparse.Namespace, unet, text_encoders, log) -> tuple[dict, dict[str, torch.Tensor]]:
    """LoRA on the UNet (and with --train_text_encoder on both text encoders) as the flags say.
    Returns ({part: model with adapters}, {trainable name: parameter}); the UNet's names have no prefix."""
    options = dict(rank=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout, rank_dropout=args.rank_dropout,
                   module_dropout=args.module_dropout, dora=args.use_dora, init=args.init_lora_weights, dtype=torch.float32)
    report = lora.inject(unet, lora_targets(args.lora_targets), conv_rank=args.conv_rank, conv_alpha=args.conv_alpha, **options)
    log(f"LoRA: {report}")
    adapted = {"unet": unet}
    if args.train_text_encoder:
        for name, te in zip(("te1", "te2"), text_encoders):
            # SDXL reads text encoder 1's penultimate layer, so its last layer gets no gradient: no adapters there.
            # (Text encoder 2's last layer feeds the pooled vector, so it trains.)
            last = f"layers.{te.config.num_hidden_layers - 1}.**" if name == "te1" else ()
            log(f"LoRA on {name}: {lora.inject(te, TEXT_ENCODER_TARGETS, exclude=last, **options)}")
            adapted[name] = te
    trainable_named = {(n if part == "unet" else f"{part}.{n}"): p
                       for part, model in adapted.items() for n, p in model.named_parameters() if p.requires_grad}
    return adapted, trainable_named


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls and convolutions in `dtype` (the frozen weights' dtype), norms, softmax
    and losses in fp32; off for fp32 training. (The memory simulator replaces it by its own model of
    CUDA's autocast, because autocast does nothing to `meta` tensors.)"""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def batch_loss(unet, sched: NoiseSchedule, x0, noise, t, context, pooled, time_ids, device: torch.device,
               weight_dtype: torch.dtype, prediction_type: str, snr_gamma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-image loss (B,)) of one batch: x0 noised to x_t at timesteps t, the UNet's prediction
    against the target (eps, or v for v-prediction), MSE per image, Min-SNR weighted with --snr_gamma."""
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    x_t = sched.add_noise(x0, noise, t)
    target = sched.target(x0, noise, t, prediction_type)
    with autocast(device, weight_dtype):
        pred = unet(x_t.to(weight_dtype), t, context.to(device, weight_dtype), pooled.to(device, weight_dtype),
                    time_ids.to(device, weight_dtype))
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * sched.min_snr_weights(t, snr_gamma, prediction_type)
    return per_sample.mean(), per_sample


def optimizer_step(optimizer, scaler, trainable: list, max_grad_norm: float, ema, trainable_named: dict) -> None:
    """One update from the accumulated gradients: unscale (fp16), clip, step, EMA, and free the gradients."""
    scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(trainable_named)
    optimizer.zero_grad(set_to_none=True)


def read_metrics(path: Path, log) -> list[dict]:
    """The records of metrics.jsonl. A line that is not JSON (the last one, cut by a kill or a full
    disk, usually) is dropped with a warning naming the file and the line."""
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError:
            log(f"warning: {path}, line {number}: not a complete record ({line[:60]!r}); dropped")
            continue
        records.append(record)
    return records


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



class Distributed:
    """The torchrun launch, if any: `torchrun --nproc_per_node N train.py ...` sets WORLD_SIZE, RANK and
    LOCAL_RANK. One process per device; rank 0 alone writes files and logs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        if self.world > 1 and not dist.is_initialized():
            # NCCL between GPUs, gloo between CPU processes; a rank that dies makes torchrun stop the others.
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def device(self, requested: str | None) -> torch.device:
        if self.world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (the loss logged is the global batch's)."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a signal that reached one rank stops all)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DDP over the adapters only: the frozen weights are neither broadcast nor reduced."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def optional_import(module: str, what: str, install: str):
    """Import an optional dependency, or stop with a one-line install hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"train.py: error: {what} needs the '{module}' package, which is not installed: {install}") from None


def make_optimizer(args: argparse.Namespace, groups: list[dict], device: torch.device,
                   check_only: bool = False) -> torch.optim.Optimizer | None:
    """groups: [{"params": [...], "lr": ...}]; each group remembers its base lr for the schedule.
    check_only: stop now if the optimizer cannot run here (device, missing package); build nothing."""
    for g in groups:
        g["base_lr"] = g["lr"]
    betas, wd, eps = (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon
    if args.optimizer == "adamw":
        return None if check_only else torch.optim.AdamW(groups, betas=betas, weight_decay=wd, eps=eps)
    if args.optimizer == "adamw8bit":  # optimizer state in 8 bits: 2 bytes per parameter instead of 8
        if device.type != "cuda":
            fail(f"--optimizer adamw8bit / --use_8bit_adam (bitsandbytes) runs on CUDA GPUs only, not on "
                 f"{device.type}; use --optimizer adamw or adafactor here.")
        bnb = optional_import("bitsandbytes", "8-bit AdamW", "pip install 'minsdxl[bnb]' (or: pip install bitsandbytes)")
        return None if check_only else bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=wd, eps=eps)
    if args.optimizer == "prodigy":  # learns its own step size: the lr is a multiplier, usually 1.0
        prodigyopt = optional_import("prodigyopt", "the Prodigy optimizer", "pip install 'minsdxl[prodigy]' (or: pip install prodigyopt)")
        if check_only:
            return None
        if args.learning_rate < 0.1:
            print(f"note: Prodigy estimates the step size itself; --learning_rate {args.learning_rate} scales it down "
                  f"(the usual value is 1.0).")
        return prodigyopt.Prodigy(groups, betas=betas, weight_decay=wd, d_coef=args.prodigy_d_coef,
                                  use_bias_correction=True, safeguard_warmup=True)
    from transformers.optimization import Adafactor  # factored second moments: less state than Adam
    if check_only:
        return None
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=wd)


class EMA:
    """Exponential moving average of the adapter weights (Polyak averaging): after each optimizer step
    ema = decay * ema + (1 - decay) * w. Kept in fp32, on the CPU with --ema_on_cpu."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float, device):
        self.decay = decay
        self.shadow = {n: p.detach().float().to(device, copy=True) for n, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for n, p in named.items():
            self.shadow[n].lerp_(p.detach().to(self.shadow[n].device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, named: dict[str, torch.Tensor]) -> None:
        for n, p in named.items():
            p.copy_(self.shadow[n])


class Reporter:
    """--report_to: scalars and validation images to tensorboard and/or wandb (optional extras)."""

    def __init__(self, kind: str, out: Path, args: argparse.Namespace):
        self.tb = self.wandb = None
        if kind in ("tensorboard", "all"):
            optional_import("tensorboard", "--report_to tensorboard", "pip install 'minsdxl[tensorboard]' (or: pip install tensorboard)")
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / args.logging_dir))
        if kind in ("wandb", "all"):
            self.wandb = optional_import("wandb", "--report_to wandb", "pip install 'minsdxl[wandb]' (or: pip install wandb)")
            self.wandb.init(project="minsdxl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}, dir=str(out))

    def scalars(self, record: dict, step: int) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def image(self, name: str, image, step: int) -> None:
        import numpy as np
        if self.tb:
            self.tb.add_image(name, np.asarray(image), step, dataformats="HWC")
        if self.wandb:
            self.wandb.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def guidance_conditioning(context: torch.Tensor, pooled: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's cached (77, 2048) context and (1280,) pooled vector -> the (2, ...) pair classifier-free
    guidance runs, [empty negative prompt; prompt], the negative zeros as SDXL's pipeline makes them
    (force_zeros_for_empty_prompt), as minsdxl.generate.text_conditioning does."""
    context, pooled = torch.stack([torch.zeros_like(context), context]), torch.stack([torch.zeros_like(pooled), pooled])
    return context.to(device, dtype), pooled.to(device, dtype)


def vae_after_caching(vae, args: argparse.Namespace, weight_dtype: torch.dtype):
    """With the latents cached, the VAE only decodes validation images: in bf16 when training in bf16,
    which halves its activations (3.0 -> 1.5 GiB at 1024x1024); fp32 otherwise (fp16 overflows)."""
    if args.cache_latents and weight_dtype == torch.bfloat16:
        vae.to(torch.bfloat16)
    return vae


def validation_images(unet, vae, text_encoders, tokenizers, args, device, weight_dtype, seeds: list[int],
                      stopping=lambda: False, meter: "PhaseMeter | None" = None, conditioning=None) -> list:
    """One image per seed of --validation_prompt with the UNet as it is now, through minsdxl.generate;
    fewer once `stopping()` is true (a stop is not kept waiting for the remaining images).

    The UNet and its adapters stay where they are. `conditioning` is the prompt's cached text conditioning
    (guidance_conditioning); without it the text encoders come to the device to encode the prompt. The VAE
    comes only to decode. Each goes back to where it lives after (the CPU, when its outputs are cached)."""
    meter = meter or PhaseMeter(torch.device("cpu"))
    models = Models(unet, vae, text_encoders, tokenizers)
    was_training = [(m, m.training) for m in (unet, *text_encoders)]
    for m, _ in was_training:
        m.eval()  # no LoRA dropout while generating
    images = []
    try:
        if conditioning is None:
            with meter.phase("validation: text"), staged(device, *text_encoders), autocast(device, weight_dtype):
                conditioning = text_conditioning(models, [args.validation_prompt], [""], device, weight_dtype)
        for seed in seeds:
            if stopping():
                break
            with meter.phase("validation: denoise"), autocast(device, weight_dtype):
                latents = generate(models, [args.validation_prompt], steps=args.validation_inference_steps,
                                   seed=seed, width=args.resolution, height=args.resolution, device=device,
                                   dtype=weight_dtype, return_latents=True, conditioning=conditioning)
            with meter.phase("validation: decode"), staged(device, vae):
                images += decode(vae, latents, device)  # outside autocast: the VAE decodes in its own fp32
    finally:
        for m, mode in was_training:
            m.train(mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the validation memory back before training goes on
    return images


# ---------------------------------------------------------------------------------------------
# The output folder, resuming and signals: all checked before any model is loaded
# ---------------------------------------------------------------------------------------------

# At resume, flags that may differ from the checkpoint's run: they take effect from the resumed step
# on (the learning rate and schedule are read every step, the loss weighting and dropouts too).
CHANGEABLE_ON_RESUME = {
    "learning_rate", "text_encoder_lr", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power",
    "max_train_steps", "num_train_epochs", "max_grad_norm", "snr_gamma", "noise_offset", "caption_dropout",
    "lora_dropout", "rank_dropout", "module_dropout", "gradient_checkpointing", "channels_last", "compile", "checkpointing_steps",
    "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_epochs", "validation_steps",
    "validation_inference_steps", "debug_loss",
}
# Flags that do not change what is computed: where files go, how it is logged, where it runs.
NOT_PART_OF_THE_RUN = {
    "config", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_dir", "report_to", "device",
    "local_rank", "dataloader_num_workers", "enable_xformers_memory_efficient_attention", "cache_dir", "allow_tf32",
    "ema_on_cpu", "demo", "push_to_hub", "hub_token", "hub_model_id", "memory_plan", "ignore_memory_plan",
}


def check_output_dir(out: Path) -> None:
    """--output_dir is a folder we can write to (made if needed)."""
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} is a file, not a folder; pass a folder (it is created if needed).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"--output_dir {out} cannot be written to ({e.strerror or e}); pass a folder you can write to.")


def guard_previous_run(args: argparse.Namespace, out: Path, ddp: "Distributed", log) -> None:
    """A fresh run never overwrites a previous run's results without being told to."""
    found = previous_run(out)
    if found and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        fail(f"--output_dir {out} holds a previous run ({'; '.join(found)}). Add --resume_from_checkpoint latest "
             f"to go on with it, --overwrite_output_dir to start again there (deleting its results), or pass "
             f"another --output_dir.")
    ddp.barrier()  # every rank has looked before rank 0 changes anything
    if ddp.main:
        if found and args.overwrite_output_dir:
            clear_run(out, args.logging_dir)
            log(f"--overwrite_output_dir: deleted the previous run in {out} ({'; '.join(found)})")
        for leftover in remove_leftovers(out):
            log(f"removed {leftover.name}: an unfinished checkpoint write of a run that was killed")
    ddp.barrier()


def find_checkpoint(args: argparse.Namespace, out: Path, world: int, log):
    """The checkpoint to resume from, read and checked: (path, state, adapters, optimizer_sd, rng), or
    None to start from step 0. With 'latest', a damaged newest checkpoint is skipped, saying so."""
    if args.resume_from_checkpoint == "latest":
        path, loaded, skipped = load_latest_intact(out)
        for _, why in skipped:
            log(f"warning: {why}")
        if path is None:
            if previous_run(out):
                fail(f"--resume_from_checkpoint latest: {out} holds a previous run ({'; '.join(previous_run(out))}) "
                     f"but no intact checkpoint to resume from. Pass --overwrite_output_dir instead to start "
                     f"again there, or another --output_dir.")
            log(f"no checkpoint in {out}: starting from step 0")
            return None
        if skipped:
            log(f"resuming from {path.name}, the newest intact checkpoint")
    else:
        path = Path(args.resume_from_checkpoint)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            fail(str(e))
    compare_resumed_flags(args, loaded[0], path, world, log)
    return (path, *loaded)


def compare_resumed_flags(args: argparse.Namespace, state: dict, path: Path, world: int, log) -> None:
    """Flags that differ from the checkpoint's run: those that can change are applied, one line each;
    those that shape the adapters, the data or the randomness are refused, by name. The batch size
    and accumulation may change together with the number of processes as long as the global batch
    (batch x processes x accumulation) stays the same: the data position is kept in global batches."""
    saved = state.get("args")
    if saved is None:
        log(f"note: {path} records no flags (an older checkpoint): this run's flags are not compared with it")
        return
    per_step = ("train_batch_size", "gradient_accumulation_steps")
    if all(k in saved for k in per_step):
        before = saved["train_batch_size"] * saved["gradient_accumulation_steps"] * state.get("world_size", 1)
        now = args.train_batch_size * args.gradient_accumulation_steps * world
        if before != now:
            fail(f"{path} was written by a run with a global batch of {before} images per step "
                 f"(--train_batch_size x processes x --gradient_accumulation_steps); this one has {now}. It cannot "
                 f"change on resume: choose the batch size and accumulation that give {before}.")
        saved = {k: v for k, v in saved.items() if k not in per_step}
    ignored = NOT_PART_OF_THE_RUN | ({"pretrained_model_name_or_path", "train_data_dir"} if args.demo else set())
    # (--demo's model and data live inside the output folder, which may have moved)
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if not k.startswith("_") and k in saved and saved[k] != v and k not in ignored}
    refused = {k: c for k, c in changed.items() if k not in CHANGEABLE_ON_RESUME}
    if refused:
        fail(f"{path} was written by a run with other " + ", ".join(
            f"--{k} {old!r} (now {new!r})" for k, (old, new) in refused.items()) +
            ". These shape the adapters, the data or the randomness and cannot change on resume: pass the run's own "
            "values (its config.toml has them), or start a new run in another --output_dir.")
    for k, (old, new) in changed.items():
        log(f"resume: --{k} changed from {old!r} to {new!r}; applied from step {state['step']} on")


def check_adapters_fit(path: Path, adapters: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor]) -> None:
    """The checkpoint's adapters are exactly this run's trainable tensors, by name and shape."""
    names = sorted(set(adapters) ^ set(trainable))
    shapes = [f"{n}: checkpoint {tuple(adapters[n].shape)}, this run {tuple(trainable[n].shape)}"
              for n in sorted(set(adapters) & set(trainable)) if adapters[n].shape != trainable[n].shape]
    if names or shapes:
        fail(f"{path} holds adapters that do not fit this run's LoRA layers ({len(names)} names differ, e.g. "
             f"{names[:3]}; {len(shapes)} shapes differ, e.g. {shapes[:3]}). --rank, --lora_targets, --conv_rank, "
             f"--use_dora and --train_text_encoder must be those of the run that wrote it (its config.toml has them).")


def check_lora_targets(args: argparse.Namespace, log) -> None:
    """--lora_targets against the model's own UNet, built on the meta device from its config and file
    header (no weights read): a pattern that matches nothing is named now, not after loading."""
    try:
        probe = load_unet(args.pretrained_model_name_or_path, device="meta", variant=args.variant,
                          revision=args.revision, cache_dir=args.cache_dir)
        report = lora.inject(probe, lora_targets(args.lora_targets), rank=args.rank, conv_rank=args.conv_rank,
                             dora=args.use_dora, dtype=torch.float32)
    except LoadError as e:
        fail(str(e))
    except lora.LoRAError as e:
        fail(f"--lora_targets {args.lora_targets!r}: {e}")
    if report.unmatched_patterns:
        log(f"warning: --lora_targets patterns that match no layer of this UNet: {report.unmatched_patterns} "
            f"(the others adapt {report.wrapped} layers); `python -m minsdxl.lora_files` lists the layer names")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM. Before training starts there is nothing to save: stop at once. During
    training the first signal stops the run after the current optimizer step, which saves a checkpoint
    and the LoRA files; a second one quits at once. Either way the exit code is 128 + the signal number
    (130 for Ctrl-C, 143 for SIGTERM), as shells expect."""

    def __init__(self, log):
        self.signum, self.training, self.log = None, False, log
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, _frame):
        if not self.training or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step (a checkpoint and the LoRA files will be "
                 f"saved); press Ctrl-C again to quit now", flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary dict (final step, losses, output files). See the module docstring.
    Under torchrun, every rank runs this; see `Distributed`."""
    ddp = Distributed()
    try:
        return train(args, ddp)
    finally:
        ddp.close()


def train(args: argparse.Namespace, ddp: Distributed) -> dict:
    log = print if ddp.main else (lambda *a, **k: None)
    stop = StopRequest(log)  # from here on, a signal gives a clean exit, never a traceback
    try:
        return run(args, ddp, log, stop)
    finally:
        stop.restore()


def run(args: argparse.Namespace, ddp: Distributed, log, stop: StopRequest) -> dict:
    # 0. Everything that can be checked before loading a model: flags, the output folder, the checkpoint.
    out = Path(args.output_dir)
    check_output_dir(out)
    if args.demo:
        if ddp.main:
            apply_demo_defaults(args)  # writes the tiny model and data once ...
        ddp.barrier()
        if not ddp.main:
            apply_demo_defaults(args)  # ... and the other ranks find them
    check_args(args)
    guard_previous_run(args, out, ddp, log)
    device = ddp.device(args.device)
    make_optimizer(args, [], device, check_only=True)  # 8-bit AdamW off CUDA, a missing optional package
    weight_dtype = pick_precision(args, device)
    meter = PhaseMeter(device)
    plan = plan_memory(args, device, log)  # (every process: each checks its own GPU)
    resume = find_checkpoint(args, out, ddp.world, log) if args.resume_from_checkpoint else None
    check_lora_targets(args, log)
    if ddp.main:
        write_config(args, out / "config.toml")  # the resolved flags: `--config out/config.toml` repeats the run
    reporter = Reporter(args.report_to if ddp.main else "none", out, args)
    started = time.perf_counter()
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    log(f"device {device}, frozen weights in {weight_dtype}, LoRA weights in float32")

    # 1. Data (before any model: a wrong folder or column is reported in seconds)
    try:
        dataset = Dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                          image_column=args.image_column, caption_column=args.caption_column,
                          resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                          bucketing=args.bucketing, max_train_samples=args.max_train_samples, seed=seed,
                          dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir)
    except DataError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    log(dataset.report())
    sampler = BucketBatchSampler(dataset.bucket_ids, args.train_batch_size, seed=seed, rank=ddp.rank, world_size=ddp.world)
    batches_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    global_batch = args.train_batch_size * ddp.world * args.gradient_accumulation_steps
    lr = args.learning_rate * (global_batch if args.scale_lr else 1)
    log(f"global batch {global_batch} = {args.train_batch_size} per device x {ddp.world} processes x "
        f"{args.gradient_accumulation_steps} accumulation steps; {total_steps} optimizer steps")

    # 2. The frozen encoders, loaded into CPU memory: each comes to the device only for the phase that runs it.
    try:
        hub = dict(revision=args.revision, cache_dir=args.cache_dir)  # for Hub repo ids
        with meter.phase("load encoders"):
            text_encoders = load_text_encoders(args.pretrained_model_name_or_path, dtype=torch.float32, device="cpu",
                                               variant=args.variant, **hub)
            tokenizers = load_tokenizers(args.pretrained_model_name_or_path, **hub)
            # (the separate VAE is another repo: the model's revision is not its, as in diffusers' script)
            vae_source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
            vae = load_vae(vae_source, dtype=torch.float32, device="cpu", cache_dir=args.cache_dir,
                           revision=None if args.pretrained_vae_model_name_or_path else args.revision)
    except LoadError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    prediction_type = args.prediction_type or "epsilon"

    # 3. Caches: every latent and caption encoded once, with only its encoder on the device (the UNet is not
    # loaded yet), then the encoder goes back to the CPU.
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
            log("note: latents are cached, so each image's random crop/flip is drawn once and kept for "
                  "every epoch; pass --no-cache_latents to redraw them every epoch.")
        with meter.phase("cache latents"), staged(device, vae):
            for i in tqdm(range(ddp.rank, len(dataset), ddp.world), desc="caching latents", disable=len(dataset) < 64 or not ddp.main):
                latents_of(0, i)  # each rank encodes its share; the files are then read by all
    if cache_text:
        captions = sorted(set(dataset.captions) | {"", args.validation_prompt or ""})  # (the prompt: for validation)
        with meter.phase("cache text"), staged(device, *text_encoders):
            for caption in tqdm(captions[ddp.rank::ddp.world], desc="caching text", disable=len(dataset) < 64 or not ddp.main):
                text_of(caption)
    ddp.barrier()  # every cache entry is on disk now
    vae = vae_after_caching(vae, args, weight_dtype)

    # 4. The UNet, frozen in weight_dtype, straight onto the device; with it whatever a step runs that is not cached.
    try:
        with meter.phase("load UNet"):
            # --fp8_base: loaded and quantized in CPU memory, so the device never holds the full-precision UNet
            unet = load_unet(args.pretrained_model_name_or_path, dtype=weight_dtype, device="cpu" if args.fp8_base else device,
                             variant=args.variant, **hub)
            if args.fp8_base:
                log(f"fp8 base: {quantize_fp8(unet, weight_dtype)}")
                unet.to(device)
            if args.channels_last:
                unet.to(memory_format=torch.channels_last)
    except LoadError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    if not cache_latents:
        vae.to(device)  # every step encodes its images
    if args.train_text_encoder or not cache_text:
        for te in text_encoders:  # every step encodes its captions; trained encoders are frozen in weight_dtype
            te.to(device, weight_dtype if args.train_text_encoder else torch.float32)

    # 5. LoRA: everything is frozen; wrap the matching layers; only the adapters train.
    with meter.phase("add LoRA"):
        adapted, trainable_named = add_adapters(args, unet, text_encoders, log)
    trainable = list(trainable_named.values())
    unet.set_gradient_checkpointing(args.gradient_checkpointing)
    if args.compile:
        compile_repeated_blocks(unet, log=log)

    # 6. Optimizer, noise generator, and resume
    groups = [{"params": [p for n, p in trainable_named.items() if not n.startswith(("te1.", "te2."))], "lr": lr}]
    if args.train_text_encoder:
        groups.append({"params": [p for n, p in trainable_named.items() if n.startswith(("te1.", "te2."))],
                       "lr": args.text_encoder_lr or lr})
    optimizer = make_optimizer(args, groups, device)
    ema = EMA(trainable_named, args.ema_decay, "cpu" if args.ema_on_cpu else device) if args.use_ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=weight_dtype == torch.float16)
    sched = NoiseSchedule()
    step, epoch, batches_done = 0, 0, 0
    if resume is not None:
        ckpt, state, adapters, opt_sd, rng = resume
        ema_state = {k[4:]: adapters.pop(k) for k in list(adapters) if k.startswith("ema.")}
        check_adapters_fit(ckpt, adapters, trainable_named)
        with torch.no_grad():
            for name, value in adapters.items():
                trainable_named[name].copy_(value)
            if ema is not None:
                for name in ema.shadow:
                    ema.shadow[name].copy_(ema_state.get(name, trainable_named[name]))
        optimizer.load_state_dict(opt_sd)
        for group, fresh in zip(optimizer.param_groups, groups):
            group["base_lr"] = fresh["base_lr"]  # this run's --learning_rate (the same unless changed)
        if scaler.is_enabled() and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale it had reached
        restore_rng(rng, None)
        # The data position is kept in global batches, so a run can resume on another number of processes.
        step, epoch, global_done = state["step"], state["epoch"], state["batches_done"] * state.get("world_size", 1)
        batches_done = global_done // ddp.world
        if global_done % ddp.world:
            log(f"note: {global_done} batches of this epoch were done by {state.get('world_size', 1)} processes; "
                f"with {ddp.world} the next {global_done % ddp.world} are seen twice.")
        log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {batches_done})")

    def checkpoint():
        if not ddp.main:
            return
        state = {"epoch": epoch, "batches_done": batches_done, "world_size": ddp.world, "grad_scaler": scaler.state_dict(), "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
        tensors = trainable_named | ({f"ema.{n}": t for n, t in ema.shadow.items()} if ema else {})
        with meter.phase("save"):
            path = save_checkpoint(out, step, tensors, optimizer, state, keep_last=args.checkpoints_total_limit)
        log(f"saved {path}")

    # 7. Train (metrics of steps after the resumed one, from a run that went further, are dropped)
    metrics_path = out / "metrics.jsonl" if ddp.main else Path(os.devnull)
    if ddp.main:
        kept = [r for r in read_metrics(metrics_path, log) if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    metrics = open(metrics_path, "a")
    per_image: dict[str, float] = {}

    # Validation: the prompt with the current LoRA, beside the base model's image for the same seed.
    base_images: list = []
    seeds = [seed + i for i in range(args.num_validation_images)]

    def validate(tag: str) -> Path | None:
        """The validation grid at this step; None when a stop was asked for meanwhile (it is not waited for)."""
        stopping = lambda: stop.signum is not None
        cached = text_of(args.validation_prompt) if cache_text else None
        conditioning = guidance_conditioning(cached["context"], cached["pooled"], device, weight_dtype) if cached else None
        images = lambda: validation_images(unet, vae, text_encoders, tokenizers, args, device, weight_dtype, seeds, stopping,
                                           meter, conditioning)
        if not base_images:  # the base model does not change: its images are made once, with the adapters off
            for model in adapted.values():
                lora.set_scale(model, 0.0)
            made = images()
            for model in adapted.values():
                lora.set_scale(model, 1.0)
            if stopping():
                return None
            base_images.extend(made)
        lora_images = images()
        if stopping():
            log("validation skipped: stopping")
            return None
        grid = compare_grid(base_images, lora_images, [f"seed {s}: {args.validation_prompt}" for s in seeds],
                            ("base", f"LoRA, {tag}"))
        path = out / "validation" / f"{tag}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        reporter.image("validation", grid, step)
        log(f"validation images: {path}")
        return path
    losses: list[float] = []
    progress = tqdm(total=total_steps, initial=step, desc="training", dynamic_ncols=True, disable=not ddp.main)
    for model in adapted.values():
        model.train()
    # Under torchrun: DDP averages the adapters' gradients over the processes (unet_step is what runs forward).
    unet_step = ddp.wrap(unet, device)
    encoders_step = [ddp.wrap(te, device) for te in text_encoders] if args.train_text_encoder else text_encoders
    wrapped = [m for m in (unet_step, *encoders_step) if m is not unet and all(m is not te for te in text_encoders)]
    t_last, accum_loss, micro, stopping = time.perf_counter(), 0.0, 0, False
    validated = {}  # step -> its validation grid
    stop.training = True  # a signal now stops after the current optimizer step
    training_phase = meter.phase("train step")  # (its peak includes the optimizer's state and temporaries)
    try:
        training_phase.__enter__()
        while step < total_steps and not stopping:
            sampler.set_epoch(epoch, skip_batches=batches_done)
            for batch_indices in sampler:
                # This batch's randomness (caption dropout, noise, timesteps) comes from its place in the epoch's
                # global order, so any number of processes, and a resume, draw the same as one process would.
                gen = seeded_generator("noise", seed, epoch, batches_done * ddp.world + ddp.rank)
                last_micro = micro + 1 == args.gradient_accumulation_steps or batches_done + 1 == batches_per_epoch
                sync = contextlib.ExitStack()
                if not last_micro:  # DDP: no gradient all-reduce until the last micro-batch of the step
                    for m in wrapped:
                        sync.enter_context(m.no_sync())
                sync.__enter__()
                # Conditioning, from the caches (or computed now): latents, text, time ids.
                x0 = torch.stack([latents_of(epoch, i) for i in batch_indices])  # (B, 4, H/8, W/8)
                captions = drop_caption([dataset.captions[i] for i in batch_indices], args.caption_dropout, gen)
                if args.train_text_encoder:  # through the adapted encoders, with gradients
                    with autocast(device, weight_dtype):
                        context, pooled = encode_text(encoders_step, tokenizers, captions)  # (B, 77, 2048), (B, 1280)
                else:
                    texts = [text_of(c) for c in captions]
                    context = torch.stack([t["context"] for t in texts])  # (B, 77, 2048)
                    pooled = torch.stack([t["pooled"] for t in texts])  # (B, 1280)
                time_ids = torch.tensor([dataset.augmentation(aug_epoch(epoch), i).time_ids() for i in batch_indices])  # (B, 6)
                B = x0.shape[0]
                # Noise and timesteps, drawn on the CPU, so runs repeat on any device.
                noise = training_noise(x0.shape, args.noise_offset, gen)
                t = torch.randint(0, sched.num_train_timesteps, (B,), generator=gen)
                loss, per_sample = batch_loss(unet_step, sched, x0, noise, t, context, pooled, time_ids, device, weight_dtype,
                                              prediction_type, args.snr_gamma)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at step {step + 1}. Likely causes: an fp16 VAE (use fp32, the default, or "
                        f"the fp16-fix VAE), a learning rate too high ({lr}), or fp16 overflow (try --mixed_precision bf16). "
                        f"Nothing was saved for this step; the last good checkpoint in {out} is kept.")
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
                sync.close()
                accum_loss += ddp.mean(loss.detach()).item() / args.gradient_accumulation_steps
                if args.debug_loss:  # which images the loss comes from (diffusers logs it by file name)
                    per_image.update({dataset.names[i]: v for i, v in zip(batch_indices, per_sample.tolist())})
                micro += 1
                batches_done += 1
                if micro < args.gradient_accumulation_steps and batches_done < batches_per_epoch:
                    continue
                # One optimizer step.
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(step, args, total_steps)
                optimizer_step(optimizer, scaler, trainable, args.max_grad_norm, ema, trainable_named)
                step += 1
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": accum_loss, "lr": optimizer.param_groups[0]["lr"],
                          "it_per_s": 1.0 / (now - t_last), "peak_memory_bytes": peak_memory_bytes(device)}
                if args.debug_loss:
                    record["per_image_loss"], per_image = per_image, {}  # (this process's images)
                if ddp.world > 1:  # a check that DDP keeps the copies equal: one number per process
                    record["adapter_checksum_per_rank"] = ddp.gather(sum(p.detach().double().sum().item() for p in trainable))
                reporter.scalars(record, step)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                losses.append(accum_loss)
                progress.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{record['lr']:.2e}", mem=f"{record['peak_memory_bytes'] / 2**30:.1f}G")
                progress.update(1)
                t_last, accum_loss, micro = now, 0.0, 0
                epoch_ended = batches_done == batches_per_epoch
                if epoch_ended:
                    epoch, batches_done = epoch + 1, 0
                if ddp.main and args.validation_prompt and (
                        step % args.validation_steps == 0 if args.validation_steps
                        else epoch_ended and epoch % args.validation_epochs == 0):
                    validated[step] = validate(f"step-{step:06d}")  # the other processes wait at the next all-reduce
                    t_last = time.perf_counter()  # validation time is not training speed
                stopping = ddp.any(stop.signum is not None)  # a signal to one process stops them all
                if step % args.checkpointing_steps == 0 or stopping:
                    checkpoint()
                if step >= total_steps or stopping:
                    break
    finally:
        training_phase.__exit__(None, None, None)
        progress.close()
        metrics.close()
    stop.training = False  # from here on a signal quits at once: what is left is writing files
    if not ddp.main:  # rank 0 writes the files
        return {"step": step, "losses": losses, "stopped": stopping, "signal": stop.signum}

    # 8. Save the LoRA in both formats people exchange (the EMA weights with --use_ema); a stopped run
    # saves them too, from the step it reached, marked partial.
    if ema is not None:
        ema.copy_to(trainable_named)
    metadata = {"minsdxl.base_model": str(args.pretrained_model_name_or_path), "minsdxl.steps": str(step),
                "minsdxl.resolution": str(args.resolution), "minsdxl.learning_rate": str(args.learning_rate),
                "minsdxl.partial": str(stopping).lower()}
    files = [out / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"]
    tes = text_encoders if args.train_text_encoder else None
    # What kohya's trainer writes and tools display (A1111's LoRA cards, civitai): true for this run.
    tags: dict[str, int] = {}
    for caption in dataset.captions:
        for tag in filter(None, (t.strip() for t in (caption or "").split(","))):
            tags[tag] = tags.get(tag, 0) + 1
    info = {"output_name": out.name, "resolution": args.resolution, "steps": step, "epoch": epoch + (batches_done > 0),  # the 1-based epoch of the last step
            "tag_frequency": {Path(args.train_data_dir or args.dataset_name or "data").name: tags},
            "prediction_type": prediction_type, "learning_rate": args.learning_rate,
            "train_batch_size": args.train_batch_size, "seed": args.seed}
    with meter.phase("save"):
        save_sdxl_lora(unet, files[0], format="diffusers", text_encoders=tes, metadata=metadata)
        save_sdxl_lora(unet, files[1], format="kohya", text_encoders=tes, metadata=metadata, info=info,
                       warn=lambda m: log(f"warning: {m}"))
    if stopping:
        log(f"stopped by {signal.Signals(stop.signum).name} at step {step} of {total_steps}: saved a checkpoint, and "
            f"the LoRA of step {step} (marked partial) in {files[0].name} and {files[1].name}. Resume with "
            f"--resume_from_checkpoint latest.")
        return {"step": step, "losses": losses, "files": files, "stopped": True, "signal": stop.signum}
    if args.validation_prompt:
        # The last step's grid, unless it was just made (the last step was also a validation step).
        files.append(validated.get(step) or validate("final"))
    all_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl", log)]
    save_loss_plot(all_losses, out / "loss.png")
    files += [out / "loss.png", out / "metrics.jsonl", out / "config.toml"]
    reporter.close()
    summary = {"steps": step, "seconds": round(time.perf_counter() - started, 1),
               "peak_memory_bytes": peak_memory_bytes(device), "final_loss": all_losses[-1] if all_losses else None,
               "files": [str(f) for f in files], "for_comfyui_and_a1111": files[1].name,
               "memory_by_phase": {"predicted_bytes": {p["phase"]: p["peak_bytes"] for p in plan.to_json()["phases"]} if plan else None,
                                   "measured_bytes": meter.peaks or None,  # CUDA: max_memory_allocated (no CUDA context)
                                   "predicted_includes": [w for w, _, _ in plan.extras] if plan else []}}
    if plan is not None:
        log("device memory by phase:\n" + plan.table(meter.peaks or None))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {step} steps in {summary['seconds']} s, peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB, "
          f"final loss {summary['final_loss']}; wrote:\n  " + "\n  ".join(summary["files"]))
    log(f"for ComfyUI / A1111 use {files[1].name}; {files[0].name} is for diffusers (pipe.load_lora_weights) "
        f"and sample.py, which read both" + (" (DoRA: see docs/lora.md for how each tool renders it)" if args.use_dora else ""))
    return {"step": step, "losses": losses, "files": files, "stopped": False, "summary": summary}


def cli(argv: list[str] | None = None) -> int:
    """The command line: the exit code is 0 when done, 128 + the signal when stopped (130 for Ctrl-C,
    143 for SIGTERM), as shells expect; errors exit with their one-line message."""
    try:
        result = main(parse_args(argv))
    except TrainingError as e:
        sys.exit(f"train.py: error: {e}")
    except Interrupted as e:
        print(f"\ntrain.py: stopped by {e}; nothing more was saved", file=sys.stderr)
        return 128 + e.signum
    return 128 + result["signal"] if result.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(cli())
