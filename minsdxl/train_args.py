"""The flags of train.py: its parser (diffusers' script's flags, plus ours), `--config` TOML files,
the `--demo` settings, and every check that needs nothing but the flags.

The flags are those of diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py` and of its
`examples/dreambooth/train_dreambooth_lora_sdxl.py` (--instance_prompt and the rest: DreamBooth), with
the same meaning, so a command line written for either runs with only the script name changed. Where
the two scripts' defaults differ, DreamBooth runs take the DreamBooth script's (DREAMBOOTH_DEFAULTS). A flag is
read as `args.<name>` in train.py or in the minsdxl module that does what it says; the resume
lists at the end say which flags may change when a run is resumed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .checkpointing import POLICIES
from .cli import HelpFormatter
from .data import make_demo_dataset
from .lora_files import LORA_TARGET_PRESETS
from .schedule import TIMESTEP_BIAS, timestep_weights
from .tiny import write_tiny_pipeline

DESCRIPTION = """LoRA training of SDXL that fits a 12 GB GPU, resumable, with a CPU demo.

DreamBooth (--instance_prompt, --instance_data_dir, --with_prior_preservation ...: diffusers'
train_dreambooth_lora_sdxl.py): the flags not given take that script's defaults where they differ
from the text-to-image script's, shown below as "DreamBooth default"."""

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")

# Flags of diffusers' script that this version accepts but cannot honour yet: each answers with a
# clear message instead of being silently ignored.
NOT_SUPPORTED_YET = {
    "push_to_hub": "uploading to the Hub (upload output_dir yourself with `huggingface-cli upload`)",
    "do_edm_style_training": "EDM-style training (Karras et al. 2022's preconditioning, for Playground v2.5-like models)",
}

# The defaults of diffusers' train_dreambooth_lora_sdxl.py where they differ from its text-to-image
# script's (this parser's): a DreamBooth run (--instance_prompt or --instance_data_dir) takes these for
# the flags it does not give. caption_column None: every image trains on --instance_prompt.
DREAMBOOTH_DEFAULTS = {"train_batch_size": 4, "num_train_epochs": 1, "validation_epochs": 50,
                       "adam_weight_decay": 1e-4, "output_dir": "lora-dreambooth-model", "caption_column": None}
# ... and, with --train_text_encoder, these (the text-to-image script has neither flag)
DREAMBOOTH_TEXT_ENCODER_DEFAULTS = {"text_encoder_lr": 5e-6, "adam_weight_decay_text_encoder": 1e-3}
DREAMBOOTH_DEFAULT = " (DreamBooth default: {})"  # how --help shows them


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


def fail(msg: str):
    """Stop with a one-line error that says what to do (no traceback)."""
    raise SystemExit(f"train.py: error: {msg}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, formatter_class=HelpFormatter)
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
    a("--caption_column", default="text", help="the captions' column of --dataset_name (DreamBooth default: none, "
      "every image trains on --instance_prompt; a column given: each row's caption, --instance_prompt where it is empty)")
    a("--max_train_samples", type=int)
    a("--resolution", type=int, default=1024, help="training side in pixels, a multiple of 64")
    a("--center_crop", action="store_true", help="center crop (default: random crop)")
    a("--random_flip", action="store_true", help="flip half the images horizontally (before cropping)")
    a("--bucketing", action="store_true", help="aspect-ratio buckets of about resolution^2 pixels")
    a("--repeats", type=int, default=1, help="use each training image this many times per epoch, each copy with "
      "its own random crop and flip")
    a("--caption_dropout", "--proportion_empty_prompts", dest="caption_dropout", type=float, default=0.0,
      help="probability of training on the empty caption (diffusers' SDXL fine-tuning script calls it --proportion_empty_prompts)")
    a("--dataloader_num_workers", type=int, default=0, help="accepted; data is prepared in the main process")
    # DreamBooth (diffusers' train_dreambooth_lora_sdxl.py; Ruiz et al. 2022)
    a("--instance_data_dir", help="DreamBooth: a folder of images of one subject, all trained on --instance_prompt")
    a("--instance_prompt", help="DreamBooth: the prompt of the instance images, with a rare identifier, e.g. "
      "'a photo of sks dog'; with --dataset_name, the prompt of rows without a caption")
    a("--with_prior_preservation", action="store_true", help="DreamBooth: also train on images of the subject's "
      "class (--class_prompt), made by the model itself, so that it keeps what the class looks like")
    a("--class_data_dir", help="--with_prior_preservation: the folder of class images; the missing ones are "
      "generated there first and kept for the next run")
    a("--class_prompt", help="--with_prior_preservation: the prompt of the class images, e.g. 'a photo of a dog'")
    a("--prior_loss_weight", type=float, default=1.0, help="--with_prior_preservation: the class images' loss weight")
    a("--num_class_images", type=int, default=100, help="--with_prior_preservation: class images to train on; "
      "those --class_data_dir lacks are generated with --class_prompt")
    a("--sample_batch_size", type=int, default=4, help="--with_prior_preservation: images per batch when generating class images")
    a("--class_inference_steps", type=int, default=50, help="--with_prior_preservation: sampler steps of each class image "
      "(50, StableDiffusionXLPipeline's default, is what diffusers' script uses)")
    a("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"],
      help="--with_prior_preservation: the dtype class images are generated in (default: --mixed_precision's)")
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
    a("--text_encoder_lr", type=float, help="learning rate of the text-encoder adapters (default: --learning_rate)"
      + DREAMBOOTH_DEFAULT.format(DREAMBOOTH_TEXT_ENCODER_DEFAULTS["text_encoder_lr"]))
    a("--adam_weight_decay_text_encoder", type=float, help="weight decay of the text-encoder adapters (default: "
      "--adam_weight_decay)" + DREAMBOOTH_DEFAULT.format(DREAMBOOTH_TEXT_ENCODER_DEFAULTS["adam_weight_decay_text_encoder"]))
    # Full fine-tuning (diffusers' train_text_to_image_sdxl.py)
    a("--full_finetune", action="store_true", help="train every UNet weight instead of LoRA adapters (bf16 weights with "
      "stochastic rounding, Adafactor, the step fused into backward); writes unet/ and a single-file SDXL model")
    a("--fused_backward_pass", action=argparse.BooleanOptionalAction, default=None,
      help="--full_finetune: update each weight inside backward as soon as its gradient is complete, so that no full "
           "set of gradients exists (default: on, unless --gradient_accumulation_steps > 1 or under torchrun)")
    a("--stochastic_rounding", action=argparse.BooleanOptionalAction, default=True,
      help="--full_finetune in bf16: round each updated weight to bf16 at random, unbiased; off: to nearest, which "
           "drops updates smaller than half a bf16 step")
    # Optimisation
    a("--train_batch_size", type=int, default=16, help="images per device and step (with --with_prior_preservation "
      "as many class images again)" + DREAMBOOTH_DEFAULT.format(DREAMBOOTH_DEFAULTS["train_batch_size"]))
    a("--num_train_epochs", type=int, default=100, help=DREAMBOOTH_DEFAULT.format(DREAMBOOTH_DEFAULTS["num_train_epochs"]).strip())
    a("--max_train_steps", type=int, help="total optimizer steps; overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", nargs="?", const="full", choices=POLICIES, metavar="{" + ",".join(POLICIES) + "}",
      help="recompute activations in backward (less memory); alone: full. selective keeps what is expensive to "
           "recompute (minsdxl/checkpointing.py, docs/performance.md)")
    a("--channels_last", action="store_true",
      help="the UNet's convolutions in channels-last (NHWC) layout; off by default: no device measured so far runs "
           "it faster (docs/performance.md), and FSDP2 (torchrun --full_finetune) cannot shard NHWC weights")
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
    a("--adam_weight_decay", type=float, default=1e-2, help=DREAMBOOTH_DEFAULT.format(DREAMBOOTH_DEFAULTS["adam_weight_decay"]).strip())
    a("--adam_epsilon", type=float, default=1e-8)
    a("--optimizer", choices=OPTIMIZERS, default="adamw", type=str.lower,  # (diffusers' DreamBooth script: "AdamW")
      help="adamw8bit needs bitsandbytes and CUDA; prodigy needs prodigyopt (use --learning_rate 1.0); "
           "--full_finetune's default is adafactor")
    a("--use_8bit_adam", action="store_true", help="the same as --optimizer adamw8bit")
    a("--prodigy_d_coef", type=float, default=1.0, help="Prodigy's d_coef")
    a("--prodigy_beta3", type=float, help="Prodigy's beta3 (default: the square root of --adam_beta2)")
    a("--prodigy_decouple", type=boolean, default=True, help="Prodigy: AdamW-style decoupled weight decay")
    a("--prodigy_use_bias_correction", type=boolean, default=True, help="Prodigy: Adam's bias correction")
    a("--prodigy_safeguard_warmup", type=boolean, default=True, help="Prodigy: leave the lr out of the D estimate in warmup")
    a("--use_ema", action="store_true", help="keep an exponential moving average of the trained weights; save it")
    a("--ema_decay", type=float, default=0.999)
    a("--ema_on_cpu", action="store_true", help="keep the EMA copy in CPU memory (saves VRAM)")
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: bf16 on GPUs that have it, fp16 on others, no on the CPU")
    a("--allow_tf32", action="store_true")
    a("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the model's scheduler config (epsilon for SDXL base)")
    a("--timestep_bias_strategy", choices=list(TIMESTEP_BIAS), default="none",
      help="draw the training timesteps more often from the earlier (detail) or later (composition) ones, or a range")
    a("--timestep_bias_multiplier", type=float, default=1.0, help="how much more often the biased timesteps are drawn")
    a("--timestep_bias_portion", type=float, default=0.25, help="earlier/later: the fraction of the timesteps biased")
    a("--timestep_bias_begin", type=int, default=0, help="range: the first biased timestep")
    a("--timestep_bias_end", type=int, default=1000, help="range: the end of the biased timesteps (not included)")
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
    a("--output_dir", default="sd-model-finetuned-lora", help=DREAMBOOTH_DEFAULT.format(DREAMBOOTH_DEFAULTS["output_dir"]).strip())
    a("--output_kohya_format", action="store_true", help="accepted: lora_kohya.safetensors is always written")
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
    a("--validation_epochs", type=int, default=1, help="validate every N epochs"
      + DREAMBOOTH_DEFAULT.format(DREAMBOOTH_DEFAULTS["validation_epochs"]))
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
    a("--do_edm_style_training", action="store_true")
    return p


def boolean(text: str) -> bool:
    """A true/false flag value: true, false, 1, 0, yes, no (diffusers' type=bool reads "False" as True)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--config run.toml` supplies values for any flag, and flags given on the
    command line win over it. `args._explicit` holds the flags that were given either way,
    `args._command_line` those given on the command line."""
    p = build_parser()
    pre, _ = p.parse_known_args(argv)
    from_config = read_config(pre.config, {act.dest for act in p._actions}) if pre.config else {}
    p.set_defaults(**from_config)
    args = p.parse_args(argv)
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS  # so only flags on the command line appear
    args._command_line = set(vars(given.parse_args(argv)))
    args._explicit = args._command_line | set(from_config)
    apply_dreambooth_defaults(args)
    return args


def is_dreambooth(args: argparse.Namespace) -> bool:
    """A DreamBooth run: instance images and their prompt (diffusers' train_dreambooth_lora_sdxl.py)."""
    return args.instance_prompt is not None or args.instance_data_dir is not None


def apply_dreambooth_defaults(args: argparse.Namespace) -> None:
    """DreamBooth's defaults (DREAMBOOTH_DEFAULTS) for the flags not given; `args._dreambooth_defaults`
    records which were applied, for the run's log."""
    args._dreambooth_defaults = {}
    if not is_dreambooth(args):
        return
    defaults = DREAMBOOTH_DEFAULTS | (DREAMBOOTH_TEXT_ENCODER_DEFAULTS if args.train_text_encoder else {})
    for key, value in defaults.items():
        if key not in args._explicit and getattr(args, key) != value:
            setattr(args, key, value)
            args._dreambooth_defaults[key] = value


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
    if is_dreambooth(args):  # the demo's pictures are the instance images (each trains on --instance_prompt)
        args.instance_data_dir, args.dataset_name = args.instance_data_dir or str(data_dir), None
    else:
        args.train_data_dir, args.dataset_name = str(data_dir), None
    # Settings for a minute on the CPU, each used only where the flag was not given (command line or --config).
    demo = dict(resolution=64, center_crop=True, train_batch_size=4, max_train_steps=100, learning_rate=1e-3,
                lr_scheduler="constant", lr_warmup_steps=0, rank=8, lora_targets="attn_ff", mixed_precision="no",
                device="cpu", checkpointing_steps=50, seed=0, validation_inference_steps=4)
    for key, value in demo.items():
        if args.full_finetune and key in LORA_ONLY:
            continue  # no adapters
        if key not in getattr(args, "_explicit", set()):
            setattr(args, key, value)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked from the flags alone, before anything is loaded."""
    for flag, what in NOT_SUPPORTED_YET.items():
        if getattr(args, flag):
            fail(f"--{flag} ({what}) is not supported yet in minsdxl; remove the flag.")
    if not args.pretrained_model_name_or_path:
        fail("--pretrained_model_name_or_path is required (or pass --demo).")
    check_dreambooth(args)
    if args.dataset_name is None and args.train_data_dir is None and args.instance_data_dir is None:
        fail("give --dataset_name (a Hub dataset) or --train_data_dir (a local folder), or for DreamBooth "
             "--instance_data_dir and --instance_prompt.")
    if args.resolution % 64 or args.resolution < 64:
        fail(f"--resolution {args.resolution} must be a positive multiple of 64 (SDXL trains at 1024).")
    if args.rank < 1 or args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        fail("--rank, --train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if not 0.0 <= args.caption_dropout < 1.0:
        fail(f"--caption_dropout {args.caption_dropout} must be in [0, 1).")
    if args.enable_xformers_memory_efficient_attention:
        print("note: --enable_xformers_memory_efficient_attention is not needed: minsdxl's attention is "
              "torch's scaled_dot_product_attention, which already uses memory-efficient/flash kernels.")
    if args.gradient_checkpointing == "selective" and not args.compile:
        print("note: --gradient_checkpointing selective without --compile: on a GPU every op then goes through "
              "Python to be tagged, and a step took 1.9x full checkpointing's time (H200, bf16, 1024x1024; on "
              "the CPU 0.98x). Add --compile, or use full (docs/performance.md).")
    for flag in ("lora_dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            fail(f"--{flag} {getattr(args, flag)} must be in [0, 1).")
    if args.conv_rank is not None and args.conv_rank < 1:
        fail(f"--conv_rank {args.conv_rank} must be at least 1.")
    if args.fp8_base and args.use_dora:
        fail("--use_dora reads the base weights, which --fp8_base stores scaled in float8: pass one of them.")
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    check_full_finetune(args)
    if args.train_text_encoder and args.cache_text_embeddings:
        print("note: --train_text_encoder: the text conditioning changes as the text encoders train, so it is "
              "computed every step instead of cached (--cache_text_embeddings is off).")
        args.cache_text_embeddings = False
    try:
        timestep_weights(args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion,
                         args.timestep_bias_begin, args.timestep_bias_end)
    except ValueError as e:
        fail(str(e))
    if args.validation_steps is not None and args.validation_steps < 1:
        fail("--validation_steps must be at least 1.")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        fail("--overwrite_output_dir starts the run again and --resume_from_checkpoint goes on with it: pass one.")


PRIOR_PRESERVATION_ONLY = ("class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight",
                           "sample_batch_size", "prior_generation_precision", "class_inference_steps")


def check_dreambooth(args: argparse.Namespace) -> None:
    """DreamBooth's flags: where the instance images come from, prior preservation's class images, and
    the notes of diffusers' script (class flags without --with_prior_preservation do nothing)."""
    if getattr(args, "_dreambooth_defaults", None):
        print("note: DreamBooth run: the defaults of diffusers' train_dreambooth_lora_sdxl.py for the flags not given: "
              + " ".join(f"--{k} {v}" for k, v in args._dreambooth_defaults.items()))
    if args.repeats < 1:
        fail(f"--repeats {args.repeats} must be at least 1.")
    if args.instance_data_dir is not None:
        others = [f"--{f}" for f in ("dataset_name", "train_data_dir") if getattr(args, f) is not None]
        if others:
            fail(f"--instance_data_dir and {' and '.join(others)} both give the training images: pass one (DreamBooth's "
                 f"instance images are --instance_data_dir, or --dataset_name with --instance_prompt).")
        if args.instance_prompt is None:
            fail("--instance_data_dir needs --instance_prompt, the prompt every instance image trains on, with a rare "
                 "identifier for the subject, e.g. --instance_prompt 'a photo of sks dog'.")
        if "caption_column" in getattr(args, "_explicit", set()):
            print(f"warning: --caption_column {args.caption_column!r} is not used: it names the captions of a "
                  f"--dataset_name, and every image of --instance_data_dir trains on --instance_prompt.")
    if args.instance_prompt is not None and args.train_data_dir is not None:
        fail("--instance_prompt is DreamBooth's, and --train_data_dir a folder of captioned images: give the subject's "
             "images as --instance_data_dir, or drop --instance_prompt to train on the captions.")
    if not args.with_prior_preservation:
        given = [f"--{f}" for f in PRIOR_PRESERVATION_ONLY if f in getattr(args, "_explicit", set())]
        if given:
            print(f"warning: {', '.join(given)} do nothing without --with_prior_preservation: no class images are "
                  f"generated or trained on (diffusers' script warns the same).")
        return
    if not is_dreambooth(args):
        fail("--with_prior_preservation is DreamBooth's: give the subject's images with --instance_data_dir (or "
             "--dataset_name) and their prompt with --instance_prompt.")
    for flag, what in (("class_prompt", "the prompt the class images are generated with, e.g. 'a photo of a dog'"),
                       ("class_data_dir", "the folder the class images are kept in (made if missing)")):
        if getattr(args, flag) is None:
            fail(f"--with_prior_preservation needs --{flag}: {what}.")
    if args.num_class_images < 1 or args.sample_batch_size < 1 or args.class_inference_steps < 1:
        fail("--num_class_images, --sample_batch_size and --class_inference_steps must be at least 1.")
    if args.prior_loss_weight < 0:
        fail(f"--prior_loss_weight {args.prior_loss_weight} must be at least 0.")
    if args.bucketing:
        fail("--bucketing cannot be combined with --with_prior_preservation: every batch pairs instance and class "
             "images of one size (--resolution square), as diffusers' DreamBooth script does. Remove --bucketing.")


# LoRA's flags. --full_finetune has no adapters: each of these is refused by name when set.
LORA_ONLY = ("rank", "lora_alpha", "lora_targets", "conv_rank", "conv_alpha", "lora_dropout", "rank_dropout",
             "module_dropout", "use_dora", "init_lora_weights", "fp8_base", "train_text_encoder", "text_encoder_lr",
             "adam_weight_decay_text_encoder")
FULL_ONLY = ("fused_backward_pass", "stochastic_rounding")  # and these need --full_finetune


def is_set(args: argparse.Namespace, flag: str, defaults: argparse.ArgumentParser) -> bool:
    """The flag was given on the command line, or has a value other than its default (from a --config file)."""
    return flag in getattr(args, "_command_line", set()) or getattr(args, flag) != defaults.get_default(flag)


def check_full_finetune(args: argparse.Namespace) -> None:
    """--full_finetune's combinations, each refusal naming the flag, and its defaults: Adafactor, and the
    optimizer step fused into backward unless accumulation or torchrun needs the gradients kept."""
    defaults = build_parser()
    if not args.full_finetune:
        for flag in FULL_ONLY:
            if is_set(args, flag, defaults):
                fail(f"--{flag} is for --full_finetune (LoRA keeps fp32 adapters and steps after backward): add "
                     f"--full_finetune or remove --{flag}.")
        return
    reasons = {"train_text_encoder": "the text encoders stay frozen and their outputs cached; only the UNet trains "
                                     "(train the text encoders with LoRA instead)",
               "text_encoder_lr": "the text encoders stay frozen; only the UNet trains",
               "adam_weight_decay_text_encoder": "the text encoders stay frozen; only the UNet trains",
               "fp8_base": "it stores frozen weights in float8, and full fine-tuning updates every weight"}
    for flag in LORA_ONLY:
        if is_set(args, flag, defaults):
            fail(f"--{flag} cannot be combined with --full_finetune: "
                 f"{reasons.get(flag, 'it shapes LoRA adapters, and --full_finetune trains every UNet weight instead')}. "
                 f"Remove --{flag}.")
    if args.optimizer == "prodigy":
        fail("--optimizer prodigy cannot be combined with --full_finetune: Prodigy estimates one step size from all "
             "parameters together, and the full fine-tuning step updates one tensor at a time. Use adafactor (the "
             "default), adamw or adamw8bit.")
    if "optimizer" not in getattr(args, "_explicit", set()) and not args.use_8bit_adam:
        args.optimizer = "adafactor"  # factored second moments: 0.05 GB of state for the UNet instead of AdamW's 20.5 GB
    if args.mixed_precision == "fp16":
        fail("--mixed_precision fp16 cannot be combined with --full_finetune: fp16 weights drop small updates and fp16 "
             "needs a loss scaler, which cannot unscale a step fused into backward. Use bf16 (weights in bf16 with "
             "stochastic rounding; GPUs from Ampere on) or no (fp32 weights, twice the memory).")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    why_not = (f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: the fused step frees each gradient "
               f"as soon as it is made, so there is nothing to accumulate into" if args.gradient_accumulation_steps > 1
               else f"torchrun ({world} processes): FSDP2 reduces the gradients between processes after backward"
               if world > 1 else None)
    if args.channels_last and world > 1:
        fail(f"--channels_last cannot be combined with --full_finetune under torchrun ({world} processes): FSDP2 "
             f"shards only contiguous (NCHW) weights. Remove --channels_last.")
    if args.fused_backward_pass and why_not:
        fail(f"--fused_backward_pass cannot run with {why_not}. Remove --fused_backward_pass (the step then runs after "
             f"backward and keeps a full set of gradients: 2 bytes more per parameter), or change the other flag.")
    if args.fused_backward_pass is None:
        args.fused_backward_pass = why_not is None
        if why_not:
            print(f"note: the optimizer step runs after backward, not fused into it ({why_not}).")


# At resume, flags that may differ from the checkpoint's run: they take effect from the resumed step
# on (the learning rate and schedule are read every step, the loss weighting and dropouts too).
CHANGEABLE_ON_RESUME = {
    "learning_rate", "text_encoder_lr", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power",
    "max_train_steps", "num_train_epochs", "max_grad_norm", "snr_gamma", "noise_offset", "caption_dropout",
    "lora_dropout", "rank_dropout", "module_dropout", "gradient_checkpointing", "channels_last", "compile", "checkpointing_steps",
    "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_epochs", "validation_steps",
    "validation_inference_steps", "debug_loss", "fused_backward_pass", "stochastic_rounding", "prior_loss_weight",
}
# Flags that do not change what is computed: where files go, how it is logged, where it runs.
NOT_PART_OF_THE_RUN = {
    "config", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_dir", "report_to", "device",
    "local_rank", "dataloader_num_workers", "enable_xformers_memory_efficient_attention", "cache_dir", "allow_tf32",
    "ema_on_cpu", "demo", "push_to_hub", "hub_token", "hub_model_id", "memory_plan", "ignore_memory_plan",
    "output_kohya_format",
    # (the class images are made once, before the first step: how they were made is not part of the steps)
    "sample_batch_size", "prior_generation_precision", "class_inference_steps",
}
