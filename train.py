"""train.py: LoRA training and full fine-tuning of SDXL on a 12 GB GPU, resumable, with a CPU demo.

The flags are those of diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py`, with
--full_finetune of `train_text_to_image_sdxl.py`, and with --instance_prompt (DreamBooth) of
`examples/dreambooth/train_dreambooth_lora_sdxl.py`, with the same meaning, so a command line written
for them runs here with only the script name changed.
One training step (epsilon prediction, DDPM; Ho et al. 2020, SDXL: Podell et al. 2023):

    x0      = VAE(image) * 0.13025                  latents (B, 4, H/8, W/8), cached once
    c, p    = text encoders(caption)               (B, 77, 2048) and pooled (B, 1280), cached once
    t, eps  ~ U{0..999}, N(0, I)
    x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps    minsdxl.schedule.add_noise
    loss    = | UNet_with_LoRA(x_t, t, c, p, time_ids) - eps |^2

With LoRA only the adapter matrices train (fp32 master weights); the UNet is frozen in bf16/fp16 and
runs under autocast. With --full_finetune every UNet weight trains, in bf16 with stochastic rounding,
each updated inside backward as soon as its gradient is complete (minsdxl.fused_backward), so the
2.6B-parameter UNet trains at 1024x1024 in under 8 GB. `python train.py --demo` runs either on a tiny
random SDXL on the CPU in a minute.

DreamBooth's prior preservation (minsdxl.dreambooth) trains each batch on the subject's images and as
many class images, generated first by the model itself: loss = instance loss + w x class loss.

How to read this file: `train()` at the bottom is one run, phase by phase (0. checks, 1. data,
2. encoders, 2b. DreamBooth's class images, 3. caches, 4. UNet, 5. what trains: LoRA adapters or every
weight, 6. optimizer and resume, 7. the loop, 8. save), each
phase one call to a function defined above it, in that order. The step itself is three functions
at the top: `batch_loss` (the noise is added and the loss computed), `optimizer_step` (the weights
are updated) and `train_loop` (which runs them). The reusable pieces live in minsdxl, each in a
module named for what it is: the flags (train_args), caches (cache), optimizer and schedule (optim),
the full fine-tuning step (fused_backward, stochastic_rounding), EMA (ema), validation images
(validation), torchrun (distributed), checkpoints and resume (train_state), output files (lora_files,
model_files), metrics (reporting), Ctrl-C (stopping), devices and memory (devices, memory).
"""

from __future__ import annotations

import os

# transformers' notices about optional packages we do not use (torchvision image processors, imported
# with diffusers' pipelines) are not ours to report; set TRANSFORMERS_VERBOSITY=warning to see them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lora
from minsdxl import devices
from minsdxl.cache import Cache, Conditioning, model_identity
from minsdxl.data import BucketBatchSampler, DataError, Dataset, drop_caption, seeded_generator
from minsdxl.distributed import Distributed
from minsdxl.dreambooth import class_images, generate_class_images, generation_dtype, missing_class_indices
from minsdxl.ema import EMA
from minsdxl.compile import compile_repeated_blocks
from minsdxl.fp8 import quantize_fp8
from minsdxl.fused_backward import PerParameterOptimizer
from minsdxl.generate import Models
from minsdxl.loading import LoadError, encode_text, load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.lora_files import LORA_TARGET_PRESETS, TEXT_ENCODER_TARGETS, save_sdxl_lora
from minsdxl.memory import plan_memory
from minsdxl.model_files import save_diffusers_unet, save_single_file
from minsdxl.optim import lr_factor, make_optimizer
from minsdxl.reporting import MetricsLog, Reporter, read_metrics, save_loss_plot
from minsdxl.schedule import NoiseSchedule, timestep_weights
from minsdxl.stopping import Interrupted, StopRequest
from minsdxl.train_args import (TrainingError, apply_demo_defaults, build_parser, check_args, fail, parse_args,  # noqa: F401
                                write_config)  # (build_parser: `train.build_parser()` is the script's parser)
from minsdxl.train_state import (TRAINED_FILES, CheckpointError, check_adapters_fit, check_output_dir, find_checkpoint,
                                 guard_previous_run, merge_rank_states, rank_state, restore_rng, save_checkpoint,
                                 single_file_name)
from minsdxl.unet import BasicTransformerBlock, ResnetBlock2D, UNet
from minsdxl.validation import Validator, vae_after_caching



# ---------------------------------------------------------------------------------------------
# The step: noise, loss, update
# ---------------------------------------------------------------------------------------------

def training_noise(shape: tuple, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I) of `shape` (B, C, h, w), plus with --noise_offset one N(0, offset²) shift per image and
    channel (Guttenberg 2023, "Diffusion with Offset Noise"): it lets the model change an image's mean
    brightness, so it can make very dark and very bright images."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def batch_loss(unet, sched: NoiseSchedule, x0, noise, t, context, pooled, time_ids, device: torch.device,
               weight_dtype: torch.dtype, prediction_type: str, snr_gamma: float | None,
               prior_loss_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-image loss (B,)) of one batch: x0 noised to x_t at timesteps t, the UNet's prediction
    against the target (eps, or v for v-prediction), MSE per image, Min-SNR weighted with --snr_gamma.
    With `prior_loss_weight` (DreamBooth's prior preservation) the batch is [instance images; class
    images], and loss = instance loss + prior_loss_weight x class loss, each the mean of its half, as
    diffusers' DreamBooth script computes it; Min-SNR weights the instance half only (diffusers' fix
    #6356: the class loss is a plain MSE)."""
    x0, noise, t = x0.to(device), noise.to(device), t.to(device)
    x_t = sched.add_noise(x0, noise, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    target = sched.target(x0, noise, t, prediction_type)
    with devices.autocast(device, weight_dtype):
        pred = unet(x_t.to(weight_dtype), t, context.to(device, weight_dtype), pooled.to(device, weight_dtype),
                    time_ids.to(device, weight_dtype))
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        weights = sched.min_snr_weights(t, snr_gamma, prediction_type)  # (B,)
        if prior_loss_weight is not None:  # the class half unweighted
            weights = torch.cat([weights.chunk(2)[0], torch.ones_like(weights.chunk(2)[1])])
        per_sample = per_sample * weights
    if prior_loss_weight is None:
        return per_sample.mean(), per_sample
    instance, prior = per_sample.chunk(2)  # (B/2,) each: [instance images; class images]
    return instance.mean() + prior_loss_weight * prior.mean(), per_sample


def optimizer_step(optimizer, scaler, trainable: list, max_grad_norm: float, ema, trainable_named: dict) -> None:
    """One update from the accumulated gradients: unscale (fp16), clip, step, EMA, and free the gradients.
    A step fused into backward (--full_finetune) has updated every weight already: only the EMA is left."""
    if not (isinstance(optimizer, PerParameterOptimizer) and optimizer.fused):
        scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    if ema is not None:
        ema.update(trainable_named)
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Progress:
    """Where a run is: optimizer steps done, the epoch, and this process's micro-batches done in it."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0


def micro_batch_loss(run: "Run", data: "Data", cond: Conditioning, frozen: "Frozen", unet_step, encoders_step,
                     batch_indices: list[int], p: Progress, sched: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch: its conditioning (from the caches, or computed now), its noise and
    timesteps, and `batch_loss`."""
    args, ddp = run.args, run.ddp
    # This batch's randomness (caption dropout, noise, timesteps) comes from its place in the epoch's
    # global order, so any number of processes, and a resume, draw the same as one process would.
    gen = seeded_generator("noise", run.seed, p.epoch, p.batches_done * ddp.world + ddp.rank)
    samples = data.samples(batch_indices)  # (dataset, index) of each image: with prior preservation 2B of them
    x0 = torch.stack([cond.of(ds).latents(p.epoch, i) for ds, i in samples])  # (B, 4, H/8, W/8), B = len(samples)
    captions = drop_caption([ds.captions[i] for ds, i in samples], args.caption_dropout, gen)
    if args.train_text_encoder:  # through the adapted encoders, with gradients
        with devices.autocast(run.device, run.weight_dtype):
            context, pooled = encode_text(encoders_step, frozen.tokenizers, captions)  # (B, 77, 2048), (B, 1280)
    else:
        texts = [cond.text(c) for c in captions]
        context = torch.stack([t["context"] for t in texts])  # (B, 77, 2048)
        pooled = torch.stack([t["pooled"] for t in texts])  # (B, 1280)
    time_ids = torch.tensor([ds.augmentation(cond.aug_epoch(p.epoch), i).time_ids() for ds, i in samples])  # (B, 6)
    # Noise and timesteps, drawn on the CPU, so runs repeat on any device.
    noise = training_noise(x0.shape, args.noise_offset, gen)
    if data.timestep_weights is None:
        t = torch.randint(0, sched.num_train_timesteps, (x0.shape[0],), generator=gen)  # (B,) uniform
    else:  # --timestep_bias_strategy: some timesteps drawn more often
        t = torch.multinomial(data.timestep_weights, x0.shape[0], replacement=True, generator=gen)  # (B,)
    return batch_loss(unet_step, sched, x0, noise, t, context, pooled, time_ids, run.device, run.weight_dtype,
                      args.prediction_type or "epsilon", args.snr_gamma,
                      args.prior_loss_weight if data.class_dataset is not None else None)


def train_loop(run: "Run", data: "Data", cond: Conditioning, frozen: "Frozen", unet: UNet, adapted: dict,
               trainable_named: dict, optimizer, ema, scaler, p: Progress, validator: Validator) -> tuple[list[float], bool]:
    """7. Optimizer steps until --max_train_steps (or a stop): forward, backward, step; metrics, validation
    and checkpoints. Returns the steps' losses and whether a signal stopped the run."""
    args, ddp, stop = run.args, run.ddp, run.stop
    sched, trainable = NoiseSchedule(), list(trainable_named.values())
    metrics = MetricsLog(run.out / "metrics.jsonl", p.step, ddp.main, run.log)  # (later steps' records are dropped)
    progress = tqdm(total=data.total_steps, initial=p.step, desc="training", dynamic_ncols=True, disable=not ddp.main)
    for model in adapted.values():
        model.train()
    # Under torchrun: DDP averages the trained tensors' gradients over the processes (unet_step is what runs forward).
    unet_step = ddp.wrap(unet, run.device)
    encoders_step = [ddp.wrap(te, run.device) for te in frozen.text_encoders] if args.train_text_encoder else frozen.text_encoders
    wrapped = [m for m in (unet_step, *encoders_step) if m is not unet and all(m is not te for te in frozen.text_encoders)]
    losses, per_image, stopping = [], {}, False
    t_last, accum_loss, micro = time.perf_counter(), 0.0, 0
    stop.training = True  # a signal now stops after the current optimizer step
    try:
        with run.meter.phase("train step"):  # (its peak includes the optimizer's state and temporaries)
            while p.step < data.total_steps and not stopping:
                data.sampler.set_epoch(p.epoch, skip_batches=p.batches_done)
                for batch_indices in data.sampler:
                    last_micro = micro + 1 == args.gradient_accumulation_steps or p.batches_done + 1 == data.batches_per_epoch
                    if micro == 0:  # this step's learning rate, set before backward: a fused step updates inside it
                        for group in optimizer.param_groups:
                            group["lr"] = group["base_lr"] * lr_factor(p.step, args, data.total_steps)
                    with contextlib.ExitStack() as sync:
                        if not last_micro:  # DDP: no gradient all-reduce until the last micro-batch of the step
                            for m in wrapped:
                                sync.enter_context(m.no_sync())
                        if ddp.sharded:  # FSDP2: the same, reduce-scatter after the last micro-batch only
                            unet.set_requires_gradient_sync(last_micro)
                        loss, per_sample = micro_batch_loss(run, data, cond, frozen, unet_step, encoders_step,
                                                            batch_indices, p, sched)
                        if not torch.isfinite(loss):
                            raise TrainingError(
                                f"loss is {loss.item()} at step {p.step + 1}. Likely causes: an fp16 VAE (use fp32, the "
                                f"default, or the fp16-fix VAE), a learning rate too high ({data.lr}), or fp16 overflow "
                                f"(try --mixed_precision bf16). Nothing was saved for this step; the last good checkpoint "
                                f"in {run.out} is kept.")
                        scaler.scale(loss / args.gradient_accumulation_steps).backward()
                    accum_loss += ddp.mean(loss.detach()).item() / args.gradient_accumulation_steps
                    if args.debug_loss:  # which images the loss comes from (diffusers logs it by file name)
                        per_image.update({ds.names[i]: v for (ds, i), v in zip(data.samples(batch_indices), per_sample.tolist())})
                    micro += 1
                    p.batches_done += 1
                    if micro < args.gradient_accumulation_steps and p.batches_done < data.batches_per_epoch:
                        continue
                    # One optimizer step.
                    optimizer_step(optimizer, scaler, trainable, args.max_grad_norm, ema, trainable_named)
                    p.step += 1
                    now = time.perf_counter()
                    record = {"step": p.step, "epoch": p.epoch, "loss": accum_loss, "lr": optimizer.param_groups[0]["lr"],
                              "it_per_s": 1.0 / (now - t_last), "peak_memory_bytes": devices.peak_memory_bytes(run.device)}
                    if args.debug_loss:
                        record["per_image_loss"], per_image = per_image, {}  # (this process's images)
                    if ddp.world > 1 and not ddp.sharded:  # a check that DDP keeps the copies equal: one number per process
                        record["adapter_checksum_per_rank"] = ddp.gather(sum(t.detach().double().sum().item() for t in trainable))
                    run.reporter.scalars(record, p.step)
                    metrics.write(record)
                    losses.append(accum_loss)
                    progress.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{record['lr']:.2e}",
                                         mem=f"{record['peak_memory_bytes'] / 2**30:.1f}G")
                    progress.update(1)
                    t_last, accum_loss, micro = now, 0.0, 0
                    epoch_ended = p.batches_done == data.batches_per_epoch
                    if epoch_ended:
                        p.epoch, p.batches_done = p.epoch + 1, 0
                    if (ddp.main or ddp.sharded) and args.validation_prompt and (
                            p.step % args.validation_steps == 0 if args.validation_steps
                            else epoch_ended and p.epoch % args.validation_epochs == 0):
                        # (the other processes wait at the next all-reduce; a sharded UNet needs them all to run)
                        validator(f"step-{p.step:06d}", p.step, lambda: stop.signum is not None)
                        t_last = time.perf_counter()  # validation time is not training speed
                    stopping = ddp.any(stop.signum is not None)  # a signal to one process stops them all
                    if p.step % args.checkpointing_steps == 0 or stopping:
                        checkpoint(run, p, trainable_named, optimizer, ema, scaler)
                    if p.step >= data.total_steps or stopping:
                        break
    finally:
        progress.close()
        metrics.close()
    stop.training = False  # from here on a signal quits at once: what is left is writing files
    return losses, stopping


# ---------------------------------------------------------------------------------------------
# The phases of a run, in order
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every phase of one run shares: its flags, processes, device and precision, and where it writes."""

    args: argparse.Namespace
    ddp: Distributed
    log: callable
    stop: StopRequest
    out: Path
    device: torch.device
    weight_dtype: torch.dtype  # of the UNet's weights (frozen, or trained with --full_finetune) and of autocast
    meter: devices.PhaseMeter
    plan: object  # the memory simulator's prediction (minsdxl.memory.Plan), or None
    resume: tuple | None  # the checkpoint to resume from, read and checked (train_state.find_checkpoint)
    reporter: Reporter
    seed: int
    started: float


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


def prepare(args: argparse.Namespace, ddp: Distributed, log, stop: StopRequest) -> Run:
    """0. Everything that can be checked before loading a model: flags, the output folder, the checkpoint,
    the optimizer's package, the predicted memory, the LoRA targets."""
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
    weight_dtype = devices.pick_precision(args, device)
    if args.full_finetune and weight_dtype == torch.float16:  # (a GPU without bf16, --mixed_precision not given)
        fail(f"--full_finetune trains weights in bf16 or fp32, and this {device} has no bf16: pass --mixed_precision no "
             f"(fp32 weights, twice the memory), or train a LoRA.")
    meter = devices.PhaseMeter(device)
    plan = plan_memory(args, device, log)  # (every process: each checks its own GPU)
    resume = find_checkpoint(args, out, ddp.world, log) if args.resume_from_checkpoint else None
    if not args.full_finetune:
        check_lora_targets(args, log)
    if ddp.main:
        write_config(args, out / "config.toml")  # the resolved flags: `--config out/config.toml` repeats the run
    reporter = Reporter(args.report_to if ddp.main else "none", out, args)
    started = time.perf_counter()
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = 0 if args.seed is None else args.seed
    torch.manual_seed(seed)
    if args.full_finetune:
        rounding = " with stochastic rounding" if weight_dtype == torch.bfloat16 and args.stochastic_rounding else ""
        log(f"device {device}, every UNet weight trains in {weight_dtype}{rounding}; {args.optimizer}, each weight's "
            f"step {'fused into backward' if args.fused_backward_pass else 'after backward'}")
    else:
        log(f"device {device}, frozen weights in {weight_dtype}, LoRA weights in float32")
    return Run(args, ddp, log, stop, out, device, weight_dtype, meter, plan, resume, reporter, seed, started)


@dataclass
class Data:
    """The dataset, this process's batch order, and how many steps that makes."""

    dataset: Dataset  # the training images (DreamBooth: the instance images)
    sampler: BucketBatchSampler
    batches_per_epoch: int  # of this process
    total_steps: int  # optimizer steps of the whole run
    lr: float  # the learning rate, after --scale_lr
    timestep_weights: torch.Tensor | None  # (1000,) with --timestep_bias_strategy; None: uniform
    class_dataset: Dataset | None = None  # --with_prior_preservation: the class images (phase 2b)

    @property
    def datasets(self) -> list[Dataset]:
        """The images a batch draws from: the training images, then the class images (prior preservation)."""
        return [self.dataset] + ([self.class_dataset] if self.class_dataset is not None else [])

    def samples(self, batch_indices: list[int]) -> list[tuple[Dataset, int]]:
        """(dataset, index) of each image of a batch of epoch positions, in batch order: position i is
        training image i; with prior preservation, the epoch is as long as the longer of the two sets and
        position i pairs instance image i % n with class image i % m (diffusers' DreamBooth dataset), the
        class images making the second half of the batch."""
        return [(ds, i % len(ds)) for ds in self.datasets for i in batch_indices]


def load_data(run: Run) -> Data:
    """1. The dataset and its batches (before any model: a wrong folder or column is reported in seconds).
    DreamBooth: the instance images, each with --instance_prompt; the class images are counted here (and
    read in phase 2b, once the missing ones are made)."""
    args, ddp = run.args, run.ddp
    flag = "--instance_data_dir: " if args.instance_data_dir else ""
    try:
        dataset = Dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir or args.instance_data_dir,
                          image_column=args.image_column, caption_column=args.caption_column,
                          resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                          bucketing=args.bucketing, max_train_samples=args.max_train_samples, seed=run.seed,
                          dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir,
                          prompt=args.instance_prompt, repeats=args.repeats)
    except DataError as e:
        raise SystemExit(f"train.py: error: {flag}{e}") from None
    run.log(dataset.report())
    epoch = len(dataset)  # positions per epoch: with prior preservation, max(instance images, class images)
    if args.with_prior_preservation:
        epoch = max(epoch, args.num_class_images)
        check_class_folder(run)
    buckets = [dataset.bucket_ids[i % len(dataset)] for i in range(epoch)]
    sampler = BucketBatchSampler(buckets, args.train_batch_size, seed=run.seed, rank=ddp.rank, world_size=ddp.world)
    batches_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    global_batch = args.train_batch_size * ddp.world * args.gradient_accumulation_steps
    lr = args.learning_rate * (global_batch if args.scale_lr else 1)
    run.log(f"global batch {global_batch} = {args.train_batch_size} per device x {ddp.world} processes x "
            f"{args.gradient_accumulation_steps} accumulation steps; {total_steps} optimizer steps")
    bias = timestep_weights(args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_portion,
                            args.timestep_bias_begin, args.timestep_bias_end)
    return Data(dataset, sampler, batches_per_epoch, total_steps, lr, bias)


def check_class_folder(run: Run) -> None:
    """1. --class_data_dir: a folder (or none yet) apart from the instance images; says how many class
    images it has and how many phase 2b will generate."""
    args = run.args
    folder = Path(args.class_data_dir)
    if folder.exists() and not folder.is_dir():
        fail(f"--class_data_dir {folder} is a file; it must be a folder (it is made if missing).")
    if args.instance_data_dir and folder.resolve().is_relative_to(Path(args.instance_data_dir).resolve()):
        fail(f"--class_data_dir {folder} is inside --instance_data_dir {args.instance_data_dir}: its class images "
             f"would be read as instance images. Keep the class images in a folder of their own.")
    present, missing = len(class_images(folder)), len(missing_class_indices(folder, args.num_class_images))
    run.log(f"class images: {present} in {folder}" + (f", {missing} to generate with --class_prompt "
                                                      f"{args.class_prompt!r}" if missing else ""))


@dataclass
class Frozen:
    """The frozen encoders: in CPU memory, each brought to the device only for the phase that runs it."""

    text_encoders: tuple
    tokenizers: tuple
    vae: torch.nn.Module


def load_encoders(run: Run) -> Frozen:
    """2. The text encoders, tokenizers and VAE, into CPU memory (fp32)."""
    args = run.args
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)  # for Hub repo ids
    try:
        with run.meter.phase("load encoders"):
            text_encoders = load_text_encoders(args.pretrained_model_name_or_path, dtype=torch.float32, device="cpu",
                                               variant=args.variant, **hub)
            tokenizers = load_tokenizers(args.pretrained_model_name_or_path, **hub)
            # (the separate VAE is another repo: the model's revision is not its, as in diffusers' script)
            vae_source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
            vae = load_vae(vae_source, dtype=torch.float32, device="cpu", cache_dir=args.cache_dir,
                           revision=None if args.pretrained_vae_model_name_or_path else args.revision)
    except LoadError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    return Frozen(text_encoders, tokenizers, vae)


def fill_caches(run: Run, data: Data, frozen: Frozen) -> Conditioning:
    """3. Every latent and caption encoded once (the class images' too), with only its encoder on the
    device (the UNet is not loaded yet), then the encoder goes back to the CPU. Each process encodes its share."""
    args, ddp, device = run.args, run.ddp, run.device
    cond = Conditioning(Cache(run.out / "cache"), model_identity(args), data.dataset, frozen.vae, frozen.text_encoders,
                        frozen.tokenizers, args.cache_latents, args.cache_text_embeddings)
    images = [(ds, i) for ds in data.datasets for i in range(len(ds))]
    quiet = len(images) < 64 or not ddp.main
    if args.cache_latents:
        if not args.center_crop or args.random_flip:
            run.log("note: latents are cached, so each image's random crop/flip is drawn once and kept for "
                    "every epoch; pass --no-cache_latents to redraw them every epoch.")
        with run.meter.phase("cache latents"), devices.staged(device, frozen.vae):
            for ds, i in tqdm(images[ddp.rank::ddp.world], desc="caching latents", disable=quiet):
                cond.of(ds).latents(0, i)  # (the files are then read by all)
    if args.cache_text_embeddings:
        captions = {c for ds in data.datasets for c in ds.captions}
        captions = sorted(captions | {"", args.validation_prompt or ""})  # (the prompt: for validation)
        with run.meter.phase("cache text"), devices.staged(device, *frozen.text_encoders):
            for caption in tqdm(captions[ddp.rank::ddp.world], desc="caching text", disable=quiet):
                cond.text(caption)
    ddp.barrier()  # every cache entry is on disk now
    vae_after_caching(frozen.vae, args, run.weight_dtype)
    return cond


def add_class_images(run: Run, data: Data, frozen: Frozen) -> None:
    """2b. --with_prior_preservation: the class images. Those --class_data_dir lacks are generated first
    with the model being trained (its UNet loaded into CPU memory for it, in float8 with --fp8_base, and
    freed after; the text encoders, the UNet and the VAE each on the device only for its part), each
    process its share; then they are
    read like any dataset, every image with --class_prompt, not flipped (as diffusers' class images)."""
    args, ddp = run.args, run.ddp
    folder = Path(args.class_data_dir)
    missing = missing_class_indices(folder, args.num_class_images)
    ddp.barrier()  # every process has counted before any writes
    if missing:
        dtype = generation_dtype(args)
        with run.meter.phase("class images"):
            unet = load_model_unet(run, dtype, "cpu")
            if args.fp8_base:  # the model as it trains: float8 weights (and the memory --fp8_base was chosen for)
                quantize_fp8(unet, dtype)
            if args.channels_last:
                unet.to(memory_format=torch.channels_last)
            models = Models(unet, frozen.vae, frozen.text_encoders, frozen.tokenizers)
            made = generate_class_images(models, args.class_prompt, missing[ddp.rank::ddp.world], folder, seed=run.seed,
                                         resolution=args.resolution, batch_size=args.sample_batch_size, device=run.device,
                                         dtype=dtype, prediction_type=args.prediction_type or "epsilon",
                                         steps=args.class_inference_steps, progress=ddp.main)
            del unet, models
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        run.log(f"class images: generated {len(missing)} in {folder}" + (f" ({len(made)} by this process)" if ddp.world > 1 else ""))
    ddp.barrier()  # every class image is on disk now
    try:
        classes = Dataset(train_data_dir=folder, caption_column=None, prompt=args.class_prompt, resolution=args.resolution,
                          center_crop=args.center_crop, random_flip=False, max_train_samples=args.num_class_images,
                          seed=run.seed)
    except DataError as e:
        raise SystemExit(f"train.py: error: --class_data_dir: {e}") from None
    if len(classes) < args.num_class_images:
        fail(f"--class_data_dir {folder} has {len(classes)} usable class images, fewer than --num_class_images "
             f"{args.num_class_images}: {classes.report()}\nDelete the files it names; the next run generates others.")
    run.log(classes.report())
    data.class_dataset = classes


def load_model_unet(run: Run, dtype: torch.dtype, device) -> UNet:
    """The model's UNet in `dtype`, straight onto `device`."""
    args = run.args
    try:
        return load_unet(args.pretrained_model_name_or_path, dtype=dtype, device=device, variant=args.variant,
                         revision=args.revision, cache_dir=args.cache_dir)
    except LoadError as e:
        raise SystemExit(f"train.py: error: {e}") from None


def load_frozen_unet(run: Run, frozen: Frozen) -> UNet:
    """4. The UNet, frozen in weight_dtype (--full_finetune unfreezes it in phase 5), straight onto the device;
    with it whatever a step runs that is not cached (the VAE without cached latents, the text encoders
    without cached text)."""
    args, device = run.args, run.device
    with run.meter.phase("load UNet"):
        # --fp8_base: loaded and quantized in CPU memory, so the device never holds the full-precision UNet
        unet = load_model_unet(run, run.weight_dtype, "cpu" if args.fp8_base else device)
        if args.fp8_base:
            run.log(f"fp8 base: {quantize_fp8(unet, run.weight_dtype)}")
            unet.to(device)
        if args.channels_last:  # NHWC convolutions (off by default: measured no faster, docs/performance.md)
            unet.to(memory_format=torch.channels_last)
    if not args.cache_latents:
        frozen.vae.to(device)  # every step encodes its images
    if args.train_text_encoder or not args.cache_text_embeddings:
        for te in frozen.text_encoders:  # every step encodes its captions; trained encoders are frozen in weight_dtype
            te.to(device, run.weight_dtype if args.train_text_encoder else torch.float32)
    return unet


def lora_targets(spec: str) -> list[str]:
    """--lora_targets: a preset's patterns, or the comma-separated patterns given."""
    return LORA_TARGET_PRESETS.get(spec) or [s.strip() for s in spec.split(",") if s.strip()]


def add_adapters(args: argparse.Namespace, unet, text_encoders, log) -> tuple[dict, dict[str, torch.Tensor]]:
    """5. LoRA on the UNet (and with --train_text_encoder on both text encoders) as the flags say.
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


def optimizer_groups(args: argparse.Namespace, trainable_named: dict, lr: float) -> list[dict]:
    """The UNet's trained tensors at --learning_rate, the text encoders' at --text_encoder_lr (and with
    --adam_weight_decay_text_encoder their own weight decay)."""
    groups = [{"params": [p for n, p in trainable_named.items() if not n.startswith(("te1.", "te2."))], "lr": lr}]
    if args.train_text_encoder:
        groups.append({"params": [p for n, p in trainable_named.items() if n.startswith(("te1.", "te2."))],
                       "lr": args.text_encoder_lr or lr})
        if args.adam_weight_decay_text_encoder is not None:
            groups[-1]["weight_decay"] = args.adam_weight_decay_text_encoder
    return groups


def full_weights(unet: UNet, run: Run | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """5. --full_finetune: every UNet weight trains, in the dtype it was loaded in (the text encoders stay
    frozen, their outputs cached); under torchrun FSDP2 splits the weights across the processes
    (minsdxl.distributed). Returns the same as add_adapters."""
    unet.requires_grad_(True)
    if run is not None and run.ddp.world > 1:
        run.ddp.shard(unet, run.device, (ResnetBlock2D, BasicTransformerBlock))
        run.log(f"FSDP2: every UNet weight, its gradient and its optimizer state split across {run.ddp.world} processes")
        if run.args.optimizer == "adafactor":
            run.log("note: under FSDP2 each process updates its own shard of every weight, and Adafactor factors the "
                    "second moments of that shard (its rows), not of the whole weight: the updates differ from one "
                    "process's. AdamW's are the same (each value on its own).")
    return {"unet": unet}, dict(unet.named_parameters())


def make_full_optimizer(args: argparse.Namespace, trainable_named: dict, lr: float, device: torch.device,
                        seed: int, rank: int = 0) -> PerParameterOptimizer:
    """6. --full_finetune's optimizer: --optimizer for each weight tensor on its own (minsdxl.fused_backward),
    bf16 updates rounded stochastically with a generator seeded from --seed, fused into backward unless the
    gradients must be kept. Under FSDP2 each process (`rank`) rounds its own shards with a stream of its own."""
    generator = None
    if device.type != "meta":  # (the memory simulator's meta tensors draw without one)
        key = ("stochastic rounding", seed) + ((rank,) if rank else ())
        generator = torch.Generator(device).manual_seed(seeded_generator(*key).initial_seed())
    optimizer = PerParameterOptimizer(trainable_named, lambda groups: make_optimizer(args, groups, device), lr,
                                      args.stochastic_rounding, generator)
    if args.fused_backward_pass:
        optimizer.fuse(args.max_grad_norm)
    return optimizer


def generators_of(optimizer, rank: int | None = None) -> dict[str, torch.Generator]:
    """The run's own random streams that checkpoints keep: stochastic rounding's, with --full_finetune
    (under FSDP2 each process rounds its own shards with its own stream: `rank` names it)."""
    gen = getattr(optimizer, "generator", None)
    if gen is None:
        return {}
    return {"stochastic_rounding" + (f".rank{rank}" if rank is not None else ""): gen}


def resume(run: Run, trainable_named: dict, optimizer, groups: list[dict], ema, scaler) -> Progress:
    """6. The checkpoint's weights, optimizer state, EMA, loss scale and random state, and where the run was."""
    if run.resume is None:
        return Progress()
    ckpt, state, adapters, opt_sd, rng = run.resume
    ddp = run.ddp
    if run.args.full_finetune and state.get("world_size", 1) != ddp.world:
        fail(f"{ckpt} was written by a full fine-tuning run of {state.get('world_size', 1)} process(es), whose optimizer "
             f"state is split that way (FSDP2); resume it with {state.get('world_size', 1)} process(es), not {ddp.world}.")
    ema_state = {k[4:]: adapters.pop(k) for k in list(adapters) if k.startswith("ema.")}
    check_adapters_fit(ckpt, adapters, {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in trainable_named.items()})
    ddp.to_shards(trainable_named, adapters)  # (the whole tensor, or under FSDP2 this process's shard of it)
    if ema is not None:
        ddp.to_shards(ema.shadow, {n: ema_state.get(n, adapters[n]) for n in ema.shadow}, like=trainable_named)
    optimizer.load_state_dict(rank_state(opt_sd, ddp.rank, ddp.world) if ddp.sharded else opt_sd)  # (a PerParameterOptimizer keeps this run's base_lr itself)
    if not isinstance(optimizer, PerParameterOptimizer):
        for group, fresh in zip(optimizer.param_groups, groups):
            group["base_lr"] = fresh["base_lr"]  # this run's --learning_rate (the same unless changed)
    if scaler.is_enabled() and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale it had reached
    try:
        restore_rng(rng, None, generators_of(optimizer, ddp.rank if ddp.sharded else None))
    except CheckpointError as e:
        fail(f"{ckpt}: {e}")
    # The data position is kept in global batches, so a run can resume on another number of processes.
    world = run.ddp.world
    global_done = state["batches_done"] * state.get("world_size", 1)
    p = Progress(state["step"], state["epoch"], global_done // world)
    if global_done % world:
        run.log(f"note: {global_done} batches of this epoch were done by {state.get('world_size', 1)} processes; "
                f"with {world} the next {global_done % world} are seen twice.")
    run.log(f"resumed from {ckpt} at step {p.step} (epoch {p.epoch}, batch {p.batches_done})")
    return p


def checkpoint(run: Run, p: Progress, trainable_named: dict, optimizer, ema, scaler) -> None:
    """A checkpoint of this step (written by rank 0): the trained tensors and their EMA, the optimizer, the
    random streams, and where the run is."""
    args, ddp = run.args, run.ddp
    tensors = trainable_named | ({f"ema.{n}": t for n, t in ema.shadow.items()} if ema else {})
    optimizer_state, generators = optimizer, generators_of(optimizer)
    if ddp.sharded:  # FSDP2: the whole tensors, and every process's optimizer shards and stream (all take part)
        tensors = ddp.full(trainable_named) | {f"ema.{n}": t for n, t in ddp.full(ema.shadow, like=trainable_named).items()} \
            if ema else ddp.full(trainable_named)
        to_cpu = lambda sd: {"state": {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                                       for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
        per_rank = ddp.gather_objects(to_cpu(optimizer.state_dict()))
        streams = ddp.gather_objects(optimizer.generator.get_state() if optimizer.generator is not None else None)
        if ddp.main:
            optimizer_state = merge_rank_states(per_rank)
            generators = {f"stochastic_rounding.rank{r}": s for r, s in enumerate(streams) if s is not None}
    if not ddp.main:
        return
    state = {"epoch": p.epoch, "batches_done": p.batches_done, "world_size": ddp.world,
             "grad_scaler": scaler.state_dict(),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    with run.meter.phase("save"):
        path = save_checkpoint(run.out, p.step, tensors, optimizer_state, state, keep_last=args.checkpoints_total_limit,
                               generators=generators, trained_file=TRAINED_FILES[args.full_finetune])
    run.log(f"saved {path}")


def save_lora(run: Run, unet: UNet, frozen: Frozen, dataset: Dataset, p: Progress, stopped: bool) -> list[Path]:
    """8. The LoRA in both formats people exchange: diffusers' and kohya's (what ComfyUI and A1111 read)."""
    args, out = run.args, run.out
    metadata = {"minsdxl.base_model": str(args.pretrained_model_name_or_path), "minsdxl.steps": str(p.step),
                "minsdxl.resolution": str(args.resolution), "minsdxl.learning_rate": str(args.learning_rate),
                "minsdxl.partial": str(stopped).lower()}
    files = [out / "pytorch_lora_weights.safetensors", out / "lora_kohya.safetensors"]
    tes = frozen.text_encoders if args.train_text_encoder else None
    # What kohya's trainer writes and tools display (A1111's LoRA cards, civitai): true for this run.
    tags: dict[str, int] = {}
    for caption in dataset.captions:
        for tag in filter(None, (t.strip() for t in (caption or "").split(","))):
            tags[tag] = tags.get(tag, 0) + 1
    info = {"output_name": out.name, "resolution": args.resolution, "steps": p.step,
            "epoch": p.epoch + (p.batches_done > 0),  # the 1-based epoch of the last step
            "tag_frequency": {Path(args.train_data_dir or args.instance_data_dir or args.dataset_name or "data").name: tags},
            "prediction_type": args.prediction_type or "epsilon", "learning_rate": args.learning_rate,
            "train_batch_size": args.train_batch_size, "seed": args.seed}
    with run.meter.phase("save"):
        save_sdxl_lora(unet, files[0], format="diffusers", text_encoders=tes, metadata=metadata)
        save_sdxl_lora(unet, files[1], format="kohya", text_encoders=tes, metadata=metadata, info=info,
                       warn=lambda m: run.log(f"warning: {m}"))
    return files


def save_full(run: Run, unet: UNet, p: Progress, stopped: bool, whole: dict | None) -> list[Path]:
    """8. --full_finetune: the UNet as a diffusers unet/ folder, and as one SDXL file in the official
    layout with the base model's text encoders and VAE (what ComfyUI and A1111 load as a model). `whole`:
    the gathered weights of a sharded UNet."""
    args, out = run.args, run.out
    metadata = {"minsdxl.base_model": str(args.pretrained_model_name_or_path), "minsdxl.steps": str(p.step),
                "minsdxl.resolution": str(args.resolution), "minsdxl.learning_rate": str(args.learning_rate),
                "minsdxl.partial": str(stopped).lower()}
    with run.meter.phase("save"):
        folder = save_diffusers_unet(unet, out / "unet", metadata, state=whole)
        single = save_single_file(unet, out / single_file_name(out), args.pretrained_model_name_or_path,
                                  args.pretrained_vae_model_name_or_path, args.variant, args.revision, args.cache_dir,
                                  metadata, state=whole)
    return [folder, single]


def finish(run: Run, files: list[Path], p: Progress, validator: Validator) -> dict:
    """The last validation grid, loss.png and summary.json; what was written, said once."""
    args, out, log = run.args, run.out, run.log
    if args.validation_prompt:
        # The last step's grid, unless it was just made (the last step was also a validation step).
        files.append(validator.made.get(p.step) or validator("final", p.step))
    all_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl", log)]
    save_loss_plot(all_losses, out / "loss.png")
    files += [out / "loss.png", out / "metrics.jsonl", out / "config.toml"]
    run.reporter.close()
    plan, measured = run.plan, run.meter.peaks or None  # (CUDA: max_memory_allocated, no CUDA context)
    summary = {"steps": p.step, "seconds": round(time.perf_counter() - run.started, 1),
               "peak_memory_bytes": devices.peak_memory_bytes(run.device),
               "final_loss": all_losses[-1] if all_losses else None,
               "files": [str(f) for f in files], "for_comfyui_and_a1111": files[1].name,
               "memory_by_phase": {"predicted_bytes": {q["phase"]: q["peak_bytes"] for q in plan.to_json()["phases"]} if plan else None,
                                   "measured_bytes": measured,
                                   "predicted_includes": [w for w, _, _ in plan.extras] if plan else []}}
    if plan is not None:
        log("device memory by phase:\n" + plan.table(measured))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {p.step} steps in {summary['seconds']} s, peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB, "
        f"final loss {summary['final_loss']}; wrote:\n  " + "\n  ".join(summary["files"]))
    if args.full_finetune:
        log(f"for ComfyUI / A1111 use {files[1].name} (a whole SDXL model); {files[0].name}/ is the UNet for diffusers "
            f"(UNet2DConditionModel.from_pretrained, or in place of a pipeline's unet/)")
    else:
        log(f"for ComfyUI / A1111 use {files[1].name}; {files[0].name} is for diffusers (pipe.load_lora_weights) "
            f"and sample.py, which read both" + (" (DoRA: see docs/lora.md for how each tool renders it)" if args.use_dora else ""))
    return summary


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def train(args: argparse.Namespace, ddp: Distributed, log, stop: StopRequest) -> dict:
    """One training run, phase by phase; returns a summary dict (final step, losses, output files)."""
    # 0. Everything that can be checked before loading a model: flags, the output folder, the checkpoint.
    run = prepare(args, ddp, log, stop)
    # 1. Data (before any model: a wrong folder or column is reported in seconds)
    data = load_data(run)
    # 2. The frozen encoders, loaded into CPU memory.
    frozen = load_encoders(run)
    # 2b. DreamBooth's prior preservation: the class images, the missing ones generated now by the model.
    if args.with_prior_preservation:
        add_class_images(run, data, frozen)
    # 3. Caches: every latent and caption encoded once, with only its encoder on the device.
    cond = fill_caches(run, data, frozen)
    # 4. The UNet in weight_dtype, straight onto the device.
    unet = load_frozen_unet(run, frozen)
    # 5. What trains: LoRA adapters on the frozen UNet (and text encoders), or every UNet weight.
    if args.full_finetune:
        adapted, trainable_named = full_weights(unet, run)
    else:
        with run.meter.phase("add LoRA"):
            adapted, trainable_named = add_adapters(args, unet, frozen.text_encoders, log)
    unet.set_gradient_checkpointing(args.gradient_checkpointing)  # none, full or selective (minsdxl/checkpointing.py)
    if args.compile:
        compile_repeated_blocks(unet, log=log)  # each repeated block type compiled once (minsdxl/compile.py)
    # 6. Optimizer, EMA, loss scaler (fp16), and the checkpoint's state when resuming.
    groups = optimizer_groups(args, trainable_named, data.lr)
    optimizer = (make_full_optimizer(args, trainable_named, data.lr, run.device, run.seed, ddp.rank) if args.full_finetune
                 else make_optimizer(args, groups, run.device))
    ema = EMA(trainable_named, args.ema_decay, "cpu" if args.ema_on_cpu else run.device) if args.use_ema else None
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.weight_dtype == torch.float16)
    progress = resume(run, trainable_named, optimizer, groups, ema, scaler)
    # 7. Train.
    validator = Validator(args, Models(unet, frozen.vae, frozen.text_encoders, frozen.tokenizers), adapted, run.device,
                          run.weight_dtype, run.seed, run.out, run.meter, run.reporter, log,
                          text_of=cond.text if args.cache_text_embeddings else None, write=ddp.main)
    if args.full_finetune and args.validation_prompt and (ddp.main or ddp.sharded) and progress.step == 0:
        validator.base(lambda: stop.signum is not None)  # the base model's images, before training changes it
    losses, stopped = train_loop(run, data, cond, frozen, unet, adapted, trainable_named, optimizer, ema, scaler,
                                 progress, validator)
    # 8. Save the LoRA, or the fine-tuned model (the EMA weights with --use_ema); a stopped run saves them
    # too, from the step it reached, marked partial. Rank 0 writes the files.
    if ema is not None:
        ema.copy_to(trainable_named)
    whole = ddp.full(unet.state_dict()) if ddp.sharded else None  # (every process takes part in gathering)
    if not ddp.main:
        return {"step": progress.step, "losses": losses, "stopped": stopped, "signal": stop.signum}
    if args.full_finetune:
        files = save_full(run, unet, progress, stopped, whole)
    else:
        files = save_lora(run, unet, frozen, data.dataset, progress, stopped)
    if stopped:
        log(f"stopped by {signal.Signals(stop.signum).name} at step {progress.step} of {data.total_steps}: saved a "
            f"checkpoint, and the {'model' if args.full_finetune else 'LoRA'} of step {progress.step} (marked partial) "
            f"in {files[0].name} and {files[1].name}. Resume with --resume_from_checkpoint latest.")
        return {"step": progress.step, "losses": losses, "files": files, "stopped": True, "signal": stop.signum}
    summary = finish(run, files, progress, validator)
    return {"step": progress.step, "losses": losses, "files": files, "stopped": False, "summary": summary}


def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary dict (final step, losses, output files). See the module docstring.
    Under torchrun, every rank runs this; see minsdxl.distributed."""
    ddp = Distributed()
    try:
        log = print if ddp.main else (lambda *a, **k: None)
        stop = StopRequest(log)  # from here on, a signal gives a clean exit, never a traceback
        try:
            return train(args, ddp, log, stop)
        finally:
            stop.restore()
    finally:
        ddp.close()


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
