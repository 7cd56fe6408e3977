"""Benchmark: one LoRA training step, our UNet + lora/ against diffusers' UNet + peft, one run.

The full SDXL architecture with random weights (memory and speed do not depend on the values),
cached inputs (latents, text conditioning, time ids: the VAE and text encoders are not on the
device, as in train.py with caching), the same options on both sides: rank, targets, gradient
checkpointing, frozen weights in `--dtype` with fp32 LoRA weights under autocast, AdamW (or
bitsandbytes' 8-bit AdamW). A step is noise + forward + MSE loss + backward + optimizer step; in
fp16 the loss is scaled by a GradScaler, as train.py does. Prints seconds per step and peak memory
(CPU: peak RSS above the loaded weights, each side in its own subprocess; CUDA: the total peak
allocated, weights included, which is what has to fit the card, and the peak above the weights).

    python bench/train_step.py --config base --latent 32 --repeats 2                    # CPU, fp32
    python bench/train_step.py --config base --latent 128 --dtype bf16 --device cuda   # 1024x1024, the 8 GB goal
    python bench/train_step.py --config base --latent 128 --dtype bf16 --device cuda --side ours --fp8-base
    python bench/train_step.py --config base --latent 32 --options --repeats 2          # each speed option, on the CPU
    python bench/train_step.py --config base --latent 32 --options --no-checkpointing --repeats 2
    python bench/train_step.py --config base --latent 32 --profile                     # which ops each side runs
    python bench/train_step.py --config overhead --latent 16 --repeats 5                # the framework's own time per step
    python bench/train_step.py --config base --latent 128 --dtype bf16 --device cuda --side ours --cuda-graph

`--options` times the reference against our side with each speed option on its own and all together
(OPTIONS: the checkpointing policy, channels-last, regional compilation; minsdxl/checkpointing.py,
minsdxl/compile.py), in one alternating loop, prints each one's time and peak memory against the
reference, and checks its numerics against our eager fully checkpointed path (the first row): the
UNet output and every LoRA gradient of one forward + backward on the same inputs and adapter values.
`--option NAME` applies one of them to our side in the other modes.

`--config overhead` is SDXL base's topology block for block at widths 32/64/128 (`overhead_config`): the
same ops in the same order as the full UNet with next to no arithmetic, so a step's time is what the
framework spends per op (Python, the dispatcher, autograd, the checkpoint hooks) on one CPU thread, the
thread that launches a GPU's kernels. It prints that time and the ops dispatched per step, each side.

`--cuda-graph` (with `--side`) records each side's whole step once as a CUDA graph and replays it
(`graphed_step_fn`): the step without Python launching each kernel, and its loss and LoRA gradients
against eager on the same weights and inputs ("graph_check" in the JSON line).

`--side ours|reference` measures one side alone in this process and prints one JSON line (time of
each step, peak memory); bench/gpu.py runs its rows that way. `--fp8-base` (minsdxl.fp8: the frozen
weights stored as float8_e4m3fn) has no diffusers counterpart, so it is for `--side ours` and
`--variants` only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
from bench.common import (PeakMemory, device_name, fmt_bytes, print_table, run_child, sdxl_text_encoder_configs, sync,  # noqa: E402
                          time_alternating)
from bench.unet import DTYPES, build, make_inputs  # noqa: E402
from minsdxl import UNetConfig  # noqa: E402
from minsdxl.compile import compile_repeated_blocks  # noqa: E402
from minsdxl.lora_files import LORA_TARGET_PRESETS, TEXT_ENCODER_TARGETS  # noqa: E402
from minsdxl.schedule import NoiseSchedule  # noqa: E402

TARGETS = LORA_TARGET_PRESETS["attn"]  # diffusers' train_text_to_image_lora_sdxl.py
# --variants: our side alone with one technique changed from the baseline (rank 16 on TARGETS, checkpointing)
VARIANTS = {
    "baseline": {},
    "no checkpointing": {"checkpointing": False},
    "rank 64": {"rank": 64},
    "DoRA": {"dora": True},
    "LoCon (every layer, conv rank 16)": {"targets": LORA_TARGET_PRESETS["all"], "conv_rank": 16},
    "EMA on the device": {"ema": True},
    "text encoders trained too (no text cache)": {"text_encoders": True},
}


# --options: our side's speed options, each alone and combined (with --no-checkpointing the policy does not
# apply). Each is what train.py does with the flag: --channels_last, --gradient_checkpointing selective,
# --compile. Compiling is only combined with channels-last: on the CPU inductor gives the convolutions
# channels-last activations, and NCHW weights are then converted at every call (minsdxl/compile.py).
OPTIONS = {
    "baseline: eager, NCHW": {},
    "channels-last": {"channels_last": True},
    "selective checkpointing": {"policy": "selective"},
    "channels-last + selective": {"channels_last": True, "policy": "selective"},
    "channels-last + compiled": {"channels_last": True, "compile": True},
    "channels-last + compiled + selective": {"channels_last": True, "compile": True, "policy": "selective"},
}


def overhead_config() -> UNetConfig:
    """SDXL base's topology (3 levels, transformer depths 0/2/10 and 10 in the mid block, 2 resnets per down
    level and 3 per up level, the same attention, GEGLU and LoRA layers) at widths 32/64/128 and head dim
    32: every op of the full UNet's step, in the same order, each on tensors too small to take time."""
    return UNetConfig(block_out_channels=(32, 64, 128), transformer_depth=(0, 2, 10), mid_transformer_depth=10,
                      num_heads=(1, 2, 4), cross_attention_dim=64, pooled_text_dim=32, addition_time_embed_dim=8,
                      norm_num_groups=8)


CONFIGS = {"tiny": UNetConfig.tiny, "base": UNetConfig.sdxl_base, "overhead": overhead_config}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd (forward, recomputation, backward, optimizer): `ops`
    computes or allocates (on a GPU, roughly a kernel launch each), `views` only reinterpret a tensor."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def text_encoders(cfg: UNetConfig, dtype, device) -> list:
    """SDXL's two text encoders (for the base config at full size: CLIP ViT-L and OpenCLIP ViT-bigG),
    random, frozen; train.py --train_text_encoder then puts LoRA on their q/k/v/out projections."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    clip_l, clip_g = sdxl_text_encoder_configs(cfg.cross_attention_dim, cfg.pooled_text_dim)
    return [m.to(device, dtype).requires_grad_(False) for m in (CLIPTextModel(clip_l), CLIPTextModelWithProjection(clip_g))]


def add_lora(side: str, model, args) -> list[torch.nn.Parameter]:
    """Adapters on `model` (fp32 weights next to the frozen base); returns the trainable parameters."""
    if side == "reference":
        from peft import LoraConfig
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="gaussian"))
        for p in model.parameters():  # peft makes the adapters in the base dtype; train.py keeps fp32 masters
            if p.requires_grad:
                p.data = p.data.float()
    else:
        v = VARIANTS[args.variant]
        lora.inject(model, v.get("targets", TARGETS), rank=v.get("rank", args.rank), alpha=v.get("rank", args.rank),
                    init="gaussian", dtype=torch.float32, dora=v.get("dora", False), conv_rank=v.get("conv_rank"))
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], name: str, foreach: bool | None = None) -> torch.optim.Optimizer:
    """train.py's AdamW, or bitsandbytes' 8-bit AdamW (CUDA; its state is 2 bytes per parameter, not 8).
    foreach=None: torch's default, the multi-tensor update on CUDA and a loop over the parameters on the CPU."""
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)


def step_fn(side: str, model, params, cfg: UNetConfig, args, encoders=None):
    """One training step on the cached inputs (with `encoders`: the text conditioning computed, with grad)."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    x0, _, context, pooled, time_ids = make_inputs(cfg, args.batch, args.latent, dtype, device)
    x0 = x0.float()
    schedule = NoiseSchedule()
    # --config overhead stands for a GPU step: AdamW's multi-tensor update, CUDA's default
    optimizer = make_optimizer(params, args.optimizer, foreach=True if args.config == "overhead" else None)
    # fp16 runs out of range below 6e-8: scale the loss so small gradients survive, unscale before the
    # step (skipped if anything overflowed), as train.py does. Disabled, it passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(0)
    ema = [p.detach().clone() for p in params] if side == "ours" and VARIANTS[args.variant].get("ema") else None

    ids = torch.randint(0, 49408, (x0.shape[0], 77), generator=g).to(device)

    def step():
        nonlocal context, pooled
        if encoders:  # SDXL's text conditioning: both penultimate layers, encoder 2's pooled projection
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out1, out2 = (te(ids, output_hidden_states=True) for te in encoders)
                context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                pooled = out2.text_embeds
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g).to(device)
        x_t = schedule.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if side == "reference":
                pred = model(x_t.to(dtype), t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            else:
                pred = model(x_t.to(dtype), t, context, pooled, time_ids)
        scaler.scale(F.mse_loss(pred.float(), noise)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)  # train.py's EMA update

    return step


def graphed_step_fn(side: str, model, params, cfg: UNetConfig, args, capture: bool = True):
    """The same step (bf16/fp32 autocast, AdamW) recorded once as a CUDA graph and replayed: one launch
    for the whole step instead of ~2 x 10^4 from Python (the "whole-network capture" of PyTorch's CUDA
    graphs notes). Each replay reads this step's noise and timesteps from static buffers, filled from the
    CPU generator as step_fn samples them; AdamW keeps its step counts on the device (capturable). The
    step has no random op (no dropout), so checkpointing's stash of the GPU's RNG state, which cannot run
    inside a capture, is switched off on both sides. `capture=False` runs the same code without a graph
    (what the tests check on the CPU). Returns (step, check): check() compares one replay's loss and LoRA
    gradients with an eager forward + backward on the same weights and inputs."""
    import torch.utils.checkpoint as ckpt

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    x0, _, context, pooled, time_ids = make_inputs(cfg, args.batch, args.latent, dtype, device)
    x0 = x0.float()
    alphas = NoiseSchedule().alphas_cumprod.to(device)  # on the device before the capture: no copy inside it
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=capture, foreach=True)
    noise, t = torch.zeros_like(x0), torch.zeros(x0.shape[0], dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 49408, (x0.shape[0], 77), generator=g)  # step_fn's token ids come first: the same noise after
    if capture:
        ckpt.get_device_states = lambda *a: ([], [])  # no GPU RNG state to stash (see above); this process only

    def forward_backward():
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise  # NoiseSchedule.add_noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            if side == "reference":
                pred = model(x_t.to(dtype), t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            else:
                pred = model(x_t.to(dtype), t, context, pooled, time_ids)
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        return loss

    def body():
        loss = forward_backward()
        optimizer.step()
        return loss

    def fill():
        noise.copy_(torch.randn(x0.shape, generator=g))
        t.copy_(torch.randint(0, 1000, (x0.shape[0],), generator=g))

    if not capture:
        def step():
            fill()
            body()
            optimizer.zero_grad(set_to_none=True)
        return step, None

    stream = torch.cuda.Stream()  # warm-up on a side stream, as the notes ask (lazy inits, autotuning)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fill()
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the capture's backward makes the gradients, in the graph's memory
    with torch.cuda.graph(graph):
        static_loss = body()
    grads = [p.grad for p in params]

    def step():
        fill()
        graph.replay()

    def check():
        fill()
        before = [p.detach().clone() for p in params]
        graph.replay()
        loss_graph, grads_graph = static_loss.item(), [gr.clone() for gr in grads]
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        for p in params:
            p.grad = None
        loss_eager = forward_backward().item()
        rel = max(((p.grad - gg).abs().max() / gg.abs().max().clamp_min(1e-30)).item() for p, gg in zip(params, grads_graph))
        for p, gr in zip(params, grads):
            p.grad = gr  # the graph's tensors again: the next replay writes them
        return {"loss_graph": loss_graph, "loss_eager": loss_eager, "grad_rel_err": rel}

    return step, check


def speed_options(model, option: dict) -> None:
    """Our side's layout before the adapters come (as train.py converts the loaded UNet)."""
    if option.get("channels_last"):
        model.to(memory_format=torch.channels_last)


def after_lora(model, option: dict, checkpointing: bool) -> None:
    """Our side's checkpointing policy and compilation, once the adapters are in (as train.py)."""
    model.set_gradient_checkpointing(option.get("policy", "full") if checkpointing else "none")
    if option.get("compile"):
        compile_repeated_blocks(model, log=lambda line: print(line, file=sys.stderr))


def one_side(side: str, cfg: UNetConfig, args, weights=None, before_lora=None, option: str | None = None):
    checkpointing = VARIANTS[args.variant].get("checkpointing", args.checkpointing) if side == "ours" else args.checkpointing
    model = build(side, cfg, DTYPES[args.dtype], torch.device(args.device), checkpointing, weights)
    option = OPTIONS[option or args.option] if side == "ours" else {}
    speed_options(model, option)
    encoders = None
    if side == "ours" and VARIANTS[args.variant].get("text_encoders"):
        encoders = text_encoders(cfg, DTYPES[args.dtype], torch.device(args.device))  # frozen: before the measurement
    if args.fp8_base:  # before the adapters, as train.py: only the frozen weights become fp8
        from minsdxl.fp8 import quantize_fp8
        print(f"fp8 base: {quantize_fp8(model, DTYPES[args.dtype])}", file=sys.stderr)
    if before_lora:
        before_lora()
    params = add_lora(side, model, args)
    if side == "ours":
        after_lora(model, option, checkpointing)
    for te in encoders or ():
        lora.inject(te, TEXT_ENCODER_TARGETS, rank=args.rank, alpha=args.rank, init="gaussian",
                    dtype=torch.float32)
        params += [p for p in te.parameters() if p.requires_grad]
    if args.cuda_graph:
        if encoders or args.optimizer != "adamw" or args.dtype == "fp16":
            raise SystemExit("--cuda-graph records AdamW with cached text in bf16 or fp32: not with text encoders, "
                             "8-bit AdamW or fp16's GradScaler")
        step, model.graph_check = graphed_step_fn(side, model, params, cfg, args, capture=torch.device(args.device).type == "cuda")
        return model, step, sum(p.numel() for p in params)
    return model, step_fn(side, model, params, cfg, args, encoders), sum(p.numel() for p in params)


def measure_side(side: str, cfg: UNetConfig, args) -> dict:
    """One side alone: `--warmup` steps (the optimizer state exists after the first), then `--repeats`
    timed steps. CUDA: the total peak allocated during the timed steps (weights included: what has to
    fit the card) and the caching allocator's peak reserved; CPU: peak RSS above the level before the
    model was built (weights included), over the whole run. `host_seconds_per_step`: until step() returns,
    before the device is synchronized: on a GPU, close to the step's time when the GPU waits for the
    Python side to launch its kernels, well below it when the host runs ahead (a synchronizing call
    inside the step would also make it close: the optimizer's steps are CPU tensors, nothing in it reads
    a GPU value back; in fp16 the GradScaler does, so it is left out there)."""
    device = torch.device(args.device)
    rss = PeakMemory(device).__enter__() if device.type == "cpu" else None
    model, step, n = one_side(side, cfg, args)
    for _ in range(args.warmup):
        step()
    sync(device)
    out = {"side": side, "trainable_params": n, "device": device_name(device)}
    if getattr(model, "graph_check", None):
        out["graph_check"] = model.graph_check()
    if device.type == "cuda":
        out["resident_bytes"] = torch.cuda.memory_allocated(device)  # weights, adapters, optimizer state
        torch.cuda.reset_peak_memory_stats(device)
    seconds, host = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)  # Python is done; on a GPU kernels may still be running
        sync(device)
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        rss.__exit__(None, None, None)
        out["peak_bytes"] = rss.peak
    if args.dtype != "fp16":  # fp16's GradScaler reads a GPU value back (inf checks): host = step by construction
        out["host_seconds_per_step"] = statistics.median(host)
    return {**out, "seconds": seconds, "seconds_per_step": statistics.median(seconds)}


def numerics(models: dict, cfg: UNetConfig, args) -> dict[str, tuple[float, float]]:
    """Each of our models against the first, on one forward + MSE + backward with the same inputs and
    adapter values (the first's, with the up weights made non-zero so that every adapter has a gradient):
    (max |out - out_0| / max |out_0|, the worst LoRA gradient's max |g - g_0| / max |g_0|)."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    x, t, context, pooled, time_ids = make_inputs(cfg, args.batch, args.latent, dtype, device)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    g = torch.Generator().manual_seed(3)
    first = next(iter(models.values()))
    adapters = {n: (torch.randn(p.shape, generator=g) * 0.01).to(device, p.dtype) if "lora_up" in n else p.detach().clone()
                for n, p in first.named_parameters() if p.requires_grad}
    reference, errors = None, {}
    for name, model in models.items():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(adapters[n])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t, context, pooled, time_ids)
        F.mse_loss(out.float(), target).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        if reference is None:
            reference = out.detach().float(), grads
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        errors[name] = rel(out.detach().float(), reference[0]), max(rel(grads[n], reference[1][n]) for n in grads)
    return errors


def peak_on_cuda(step, device) -> int:
    """Peak memory of a step above what was allocated before it (other models may be resident)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def options_table(cfg: UNetConfig, args) -> None:
    """The reference against our side with each speed option (OPTIONS), in one alternating loop."""
    device = torch.device(args.device)
    names = [n for n in OPTIONS if args.checkpointing or "policy" not in OPTIONS[n]]
    ref, ref_step, _ = one_side("reference", cfg, args)
    base_weights = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    # the channels-last options share one channels-last copy of the convolutions' weights
    nhwc = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in base_weights.items()}
    ours = {name: one_side("ours", cfg, args, weights=nhwc if OPTIONS[name].get("channels_last") else base_weights, option=name)
            for name in names}
    errors = numerics({name: model for name, (model, _, _) in ours.items()}, cfg, args)
    times = time_alternating({"reference": ref_step, **{name: step for name, (_, step, _) in ours.items()}},
                             args.repeats, device)
    if device.type == "cuda":
        peaks = {"reference": peak_on_cuda(ref_step, device), **{n: peak_on_cuda(step, device) for n, (_, step, _) in ours.items()}}
    else:
        del ref, ref_step, ours, base_weights, nhwc
        gc.collect()  # free the shared weights before the children load their own
        peaks = {"reference": run_child(__file__, "--memory-only", "reference", drop=("--options",))["peak"]}
        for name in names:
            peaks[name] = run_child(__file__, "--memory-only", "ours", "--option", name, drop=("--options",))["peak"]
    print(f"\nLoRA training step, UNet {args.config}, batch {args.batch}, latents {args.latent}x{args.latent}, "
          f"{args.dtype}, checkpointing {'on' if args.checkpointing else 'off'} on both sides, {args.repeats} repeats, "
          f"{device_name(device)}; reference: diffusers + peft {times['reference']:.3f} s/step, peak memory above "
          f"weights {fmt_bytes(peaks['reference'])}")
    print(f"{'ours, with':<34}{'s/step':>9}{'/ref':>7}{'peak mem':>11}{'/ref':>7}{'out err':>10}{'grad err':>10}")
    for name in names:
        out_err, grad_err = errors[name]
        print(f"{name:<34}{times[name]:>9.3f}{times[name] / times['reference']:>7.3f}{fmt_bytes(peaks[name]):>11}"
              f"{peaks[name] / peaks['reference']:>7.3f}{out_err:>10.1e}{grad_err:>10.1e}", flush=True)
    print("(out err, grad err: max |difference| against the first row, over max |first row|: the UNet output and "
          "the worst LoRA gradient of one forward + backward on the same inputs and adapter values)")


def profile_table(cfg: UNetConfig, args) -> None:
    """One step of each side under torch.profiler: the ops whose call counts differ, and where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    ref, ref_step, _ = one_side("reference", cfg, args)
    base_weights = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    _, our_step, _ = one_side("ours", cfg, args, weights=base_weights)
    stats = {}
    for side, step in (("reference", ref_step), ("ours", our_step)):
        step()  # the optimizer state exists after the first step
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        stats[side] = {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}
    print(f"\none step under torch.profiler, UNet {args.config}, latents {args.latent}x{args.latent}, {args.dtype}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, our option: {args.option}")
    print(f"{'op (calls that differ)':<52}{'reference':>10}{'ours':>10}")
    ops = sorted(set(stats["reference"]) | set(stats["ours"]))
    for op in ops:
        counts = [stats[side].get(op, (0, 0))[0] for side in ("reference", "ours")]
        if counts[0] != counts[1] and op.startswith("aten::"):
            print(f"{op[:50]:<52}{counts[0]:>10}{counts[1]:>10}")
    for side in ("reference", "ours"):
        top = sorted(stats[side].items(), key=lambda kv: -kv[1][1])[:args.profile_rows]
        total = sum(v[1] for v in stats[side].values())
        print(f"\n{side}: self CPU time {total:.2f} s; the largest")
        for op, (count, seconds) in top:
            print(f"  {op[:50]:<52}{count:>8} calls{seconds:>9.3f} s")


def overhead_table(cfg: UNetConfig, args) -> None:
    """Seconds per step on one thread and ops dispatched per step, each side, on `overhead_config`."""
    steps = {side: one_side(side, cfg, args)[1] for side in ("reference", "ours")}
    counts = {}
    for side, step in steps.items():
        step()  # the optimizer state exists after the first step
        with OpCounter() as counter:
            step()
        counts[side] = counter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host side of a GPU step is one Python thread
    try:
        times = time_alternating(steps, args.repeats, args.device)
    finally:
        torch.set_num_threads(threads)
    print(f"\nFramework time per LoRA step: SDXL base's topology at widths 32/64/128 (bench/train_step.py "
          f"overhead_config), latents {args.latent}x{args.latent}, checkpointing {'on' if args.checkpointing else 'off'}"
          f" on both sides, {args.dtype}, rank {args.rank}, {args.optimizer}, {args.repeats} repeats, 1 thread of {device_name(args.device)}")
    print(f"{'':<12}{'s/step':>9}{'/ref':>7}{'ops/step':>10}{'views/step':>12}{'us/op':>8}")
    for side in ("reference", "ours"):
        c = counts[side]
        print(f"{side:<12}{times[side]:>9.3f}{times[side] / times['reference']:>7.3f}{c.ops:>10,}{c.views:>12,}"
              f"{times[side] / c.ops * 1e6:>8.1f}")


def main(args):
    cfg = CONFIGS[args.config]()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.side:
        print(json.dumps(measure_side(args.side, cfg, args)))
        return
    if args.memory_only:  # child: one side, a warm-up step (optimizer state exists), then the measured one
        _, step, _ = one_side(args.memory_only, cfg, args)
        step()
        with PeakMemory(device) as mem:
            step()
        print(json.dumps({"peak": mem.peak}))
        return
    if args.variant_only:  # child: ours with one variant; memory above the frozen weights, adapters and
        mem = PeakMemory(device)  # optimizer state included
        _, step, n = one_side("ours", cfg, args, before_lora=mem.__enter__)
        step()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        mem.__exit__(None, None, None)
        print(json.dumps({"peak": mem.peak, "seconds": seconds, "params": n}))
        return
    if args.options:
        return options_table(cfg, args)
    if args.config == "overhead":
        return overhead_table(cfg, args)
    if args.profile:
        return profile_table(cfg, args)
    if args.variants:
        print(f"our LoRA step, UNet {args.config}, latents {args.latent}x{args.latent}, {args.dtype}; peak memory above "
              f"the frozen weights (adapters, gradients, AdamW state, activations), one step's time")
        print(f"{'variant':<44}{'trainable':>14}{'peak memory':>14}{'seconds':>10}")
        for name in VARIANTS:
            try:
                r = run_child(__file__, "--variant-only", "--variant", name, drop=("--variants",))
            except subprocess.CalledProcessError as e:  # e.g. DoRA refuses --fp8-base (it reads the base weight)
                print(f"{name:<44}  refused: {e.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            print(f"{name:<44}{r['params']:>14,}{r['peak'] / 2**20:>10,.0f} MiB{r['seconds']:>10.2f}", flush=True)
        return

    if args.fp8_base:
        raise SystemExit("--fp8-base has no diffusers counterpart: use it with --side ours or --variants")
    ref, ref_step, ref_n = one_side("reference", cfg, args)
    base_weights = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    ours, our_step, our_n = one_side("ours", cfg, args, weights=base_weights)
    assert ref_n == our_n, (ref_n, our_n)
    times = time_alternating({"reference": ref_step, "ours": our_step}, args.repeats, device)
    rows = [("seconds per step", times["reference"], times["ours"], "s")]
    if device.type == "cuda":
        del ours, our_step  # measure each side with only its own model on the card
        torch.cuda.empty_cache()
        totals, above = {}, {}
        for side in ("reference", "ours"):
            model, step, _ = (ref, ref_step, 0) if side == "reference" else one_side("ours", cfg, args, weights=base_weights)
            step()
            torch.cuda.synchronize()
            weights = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            totals[side] = torch.cuda.max_memory_allocated(device)
            above[side] = totals[side] - weights
            del model, step
            ref = ref_step = None
            torch.cuda.empty_cache()
        rows += [("peak memory, total", totals["reference"], totals["ours"], "bytes"),
                 ("peak memory above weights", above["reference"], above["ours"], "bytes")]
    else:
        del ref, ref_step, ours, our_step, base_weights
        gc.collect()  # free the shared weights before the children load their own
        peaks = {side: run_child(__file__, "--memory-only", side)["peak"] for side in ("reference", "ours")}
        rows.append(("peak memory above weights", peaks["reference"], peaks["ours"], "bytes"))
    print_table(f"LoRA training step, UNet {args.config}, batch {args.batch}, latents {args.latent}x{args.latent}, "
                f"{args.dtype} weights + fp32 LoRA (rank {args.rank}, {our_n:,} params), checkpointing "
                f"{'on' if args.checkpointing else 'off'}, {args.optimizer}, {args.repeats} repeats, {device_name(device)}", rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="tiny",
                   help="overhead: SDXL's topology at tiny widths, the framework's time per step (overhead_config)")
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw", help="adamw8bit: bitsandbytes, CUDA")
    p.add_argument("--cuda-graph", action="store_true",
                   help="record the step once as a CUDA graph and replay it (graphed_step_fn; --side mode, CUDA)")
    p.add_argument("--fp8-base", action="store_true", help="our frozen UNet weights in float8_e4m3fn (minsdxl.fp8)")
    p.add_argument("--side", choices=["reference", "ours"], help="measure this side alone; print one JSON line")
    p.add_argument("--warmup", type=int, default=1, help="--side: untimed steps before the timed ones")
    p.add_argument("--variants", action="store_true", help="ours alone: memory and time of each technique (VARIANTS)")
    p.add_argument("--options", action="store_true", help="the reference against ours with each speed option (OPTIONS)")
    p.add_argument("--option", default=next(iter(OPTIONS)), choices=list(OPTIONS), help="our side's speed options")
    p.add_argument("--profile", action="store_true", help="one step of each side under torch.profiler")
    p.add_argument("--profile-rows", type=int, default=15, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="baseline", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--variant-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-only", choices=["reference", "ours"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
