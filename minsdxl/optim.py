"""The optimizer and the learning-rate schedule of a training run.

`make_optimizer` builds the one --optimizer names from libraries made for the job (torch's AdamW,
bitsandbytes' 8-bit AdamW, prodigyopt's Prodigy, transformers' Adafactor); `lr_factor` is the
schedule as a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import argparse
import math

import torch

from .cli import optional_import
from .train_args import fail


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
        return prodigyopt.Prodigy(groups, betas=betas, beta3=args.prodigy_beta3, weight_decay=wd, d_coef=args.prodigy_d_coef,
                                  decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    from transformers.optimization import Adafactor  # factored second moments: less state than Adam
    if check_only:
        return None
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=wd)
