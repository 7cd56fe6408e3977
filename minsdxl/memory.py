"""The memory of a train.py run, phase by phase, predicted from its flags without a GPU.

    python -m minsdxl.memory --resolution 1024 --rank 16 --gradient_checkpointing          # SDXL base, CUDA bf16
    python -m minsdxl.memory --resolution 1024 --rank 16 --gradient_checkpointing --vram 12GB
    python -m minsdxl.memory --demo --device cpu --json                                    # the tiny demo model

The flags are train.py's own (its parser), plus --vram and --json. The prediction is not a sum of
sizes: the simulator runs train.py's own functions on the `meta` device (shapes and dtypes, no data:
seconds for the full model) under a tracker that sees every tensor storage the program allocates
and frees (`Tracker`, a TorchDispatchMode), phase by phase, in the order train.py runs them:

    load encoders   the text encoders and the VAE, into CPU memory (nothing on the device)
    class images    --with_prior_preservation, when class images are missing: the text encoders, then the UNet
                    (denoising one --sample_batch_size batch under guidance), then the VAE, one at a time
    cache latents   the VAE alone on the device, encoding one image at --resolution (minsdxl.cache.encode_image)
    cache text      the text encoders alone on the device, encoding one caption (minsdxl.cache.encode_captions)
    load UNet       the frozen UNet in its dtype (--fp8_base: float8 weights), plus the encoders a step needs
    add LoRA        the adapters, fp32 (train.add_adapters)
    train step      two optimizer steps of train.batch_loss + backward (with our checkpointing and its
                    recomputation) + train.optimizer_step (clipping, the optimizer's state and its
                    temporaries, EMA); the second step is the steady state
    validation: *   text conditioning, one denoising step of classifier-free guidance, one VAE decode
    save            the LoRA files and a checkpoint (copies to the CPU, one tensor at a time)

What the meta device cannot see is modelled, each on its own line with where the figure comes from:
which fused attention kernel SDPA would pick on the target (flash / memory-efficient / math) and what
it allocates (we call that kernel's own meta function), CUDA's autocast (it does nothing to meta
tensors: `Autocast` applies CUDA autocast's op lists), the caching allocator's rounding of every
block to 512 bytes, the cuBLAS workspace, and the CUDA context. Not predicted: the allocator's
fragmentation (reserved minus allocated), cuDNN convolution workspaces, and kernel-internal scratch
buffers; they are what `bench/gpu.sh` measures beside the prediction.

Checked on the CPU (tests/test_memory.py, docs/memory.md): the predicted peak of a real step's live
tensors against the PyTorch profiler's allocation events of the same step run on real tensors.

`python -m minsdxl.memory sample [sample.py's flags]` predicts generation the same way: sample.py's
own loaders and `minsdxl.generate` on meta, one image, each stage a phase (with --lowvram only that
stage's models on the device):

    load              the models sample.py keeps on the device (none with --lowvram)
    text              the base's text encoders on the prompt and the negative prompt
    encode image      --init_image: the VAE encoder, in fp32
    denoise           the base UNet's steps, prompt and negative prompt stacked (classifier-free guidance)
    refiner: text     --refiner: its text encoder (OpenCLIP bigG)
    refiner: denoise  --refiner: the refiner's steps on the base's latents
    decode            the VAE decoder, one image
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import tempfile
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from . import devices
from .cache import encode_captions, encode_image
from .ema import EMA
from .loading import encode_text
from .lora_files import save_sdxl_lora
from .train_args import LORA_ONLY, apply_demo_defaults, build_parser, check_full_finetune, fail
from .train_args import parse_args as parse_args_of_train
from .validation import guidance_conditioning, validation_images, vae_after_caching
from .checkpointing import policy_name

aten = torch.ops.aten
GiB = 2**30


class SimulationError(RuntimeError):
    """The simulated program did something the simulator cannot follow."""


# --- the tracker --------------------------------------------------------------------------------------

CUDA_BLOCK = 512  # the CUDA caching allocator hands out multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize)
HOST_COPY_LIMIT = 256 * 2**20  # a device -> CPU copy above this is a model moving, which the simulator does itself


@dataclass
class PhasePeak:
    """One phase: device bytes live at its start and at its peak, and at the peak by kind."""

    name: str
    start: int
    peak: int
    by_kind: dict[str, int]


class Tracker(TorchDispatchMode):
    """Every storage on `device_type` that the program allocates, counted until it is freed.

    Each operator's outputs pass through `__torch_dispatch__`; a storage not seen before is counted
    with its size (rounded up to `block` bytes) and a weakref callback subtracts it when PyTorch frees
    it, so `live` is exactly the bytes of live storages, as an allocator would see them. Storages
    created before the tracker started are not counted. A storage is labelled with the `kind` current
    when it was made ("weights", "activations", ...), for the breakdown at the peak.

    On `meta` a few things a real program does need a value: `.item()` / `bool()` (a loss check, an
    inf check) read 0 (floats, ints) or True (bools), and a copy to the CPU gives zeros there (small:
    latents, images, LoRA files). Storages of modules placed `on_host` are not counted: in the simulation
    every model is on meta, and this says which ones a real run keeps in CPU memory instead."""

    def __init__(self, device_type: str = "meta", block: int = 1, cpu_conv_scratch: bool = False,
                 cpu_conv_forward_scratch: bool = False):
        super().__init__()
        self.device_type, self.block, self.cpu_conv_scratch = device_type, block, cpu_conv_scratch
        self.cpu_conv_forward_scratch = cpu_conv_forward_scratch
        self.records = WeakIdKeyDictionary()  # storage -> [bytes, kind, counted]
        self.live, self.kind = 0, "other"
        self.live_by_kind: dict[str, int] = defaultdict(int)
        self.phases: list[PhasePeak] = []
        self._phase: PhasePeak | None = None

    def _size(self, nbytes: int) -> int:
        return 0 if nbytes == 0 else -(-nbytes // self.block) * self.block

    def _see(self, t: torch.Tensor, host: bool = False) -> None:
        st = t.untyped_storage()
        if st in self.records:
            return
        record = [self._size(st.nbytes()), self.kind, not host]
        self.records[st] = record
        weakref.finalize(st, self._free, record)
        if not host:
            self._add(record)

    def _add(self, record: list) -> None:
        self.live += record[0]
        self.live_by_kind[record[1]] += record[0]
        p = self._phase
        if p is not None and self.live > p.peak:
            p.peak, p.by_kind = self.live, {k: v for k, v in self.live_by_kind.items() if v}

    def _free(self, record: list) -> None:
        if record[2]:
            self.live -= record[0]
            self.live_by_kind[record[1]] -= record[0]

    def on_host(self, module: torch.nn.Module, host: bool = True) -> None:
        """Count `module`'s parameters and buffers (not) as device memory from now on."""
        for t in [*module.parameters(), *module.buffers()]:
            record = self.records.get(t.untyped_storage())
            if record is None or record[2] != host:
                continue
            record[2] = not host
            if host:
                self.live -= record[0]
                self.live_by_kind[record[1]] -= record[0]
            else:
                self._add(record)

    @contextlib.contextmanager
    def paused(self):
        """Nothing made inside is counted (models built on meta before their weights are placed)."""
        before, self.device_type = self.device_type, "none"
        try:
            yield
        finally:
            self.device_type = before

    def as_host(self, tensors) -> None:
        """Count these tensors (made on meta) as host memory from now on: a copy a real run keeps on the CPU."""
        for t in tensors:
            record = self.records.get(t.untyped_storage())
            if record is not None and record[2]:
                record[2] = False
                self.live -= record[0]
                self.live_by_kind[record[1]] -= record[0]

    def register(self, module: torch.nn.Module, host: bool = False) -> None:
        """Count `module`'s parameters and buffers, made while paused, from now on (as host memory: not at all)."""
        for t in [*module.parameters(), *module.buffers()]:
            self._see(t, host)

    def transient(self, nbytes: int) -> None:
        """A moment's allocation the program makes outside the tracked code (loading one tensor)."""
        record = [self._size(nbytes), self.kind, True]
        self._add(record)
        self._free(record)

    def is_host(self, module: torch.nn.Module) -> bool:
        record = self.records.get(next(module.parameters()).untyped_storage())
        return record is not None and not record[2]

    @contextlib.contextmanager
    def phase(self, name: str, kind: str | None = None):
        """Record the peak of what runs inside as phase `name` (a phase run again keeps its largest peak)."""
        outer, outer_kind = self._phase, self.kind
        self._phase = PhasePeak(name, self.live, self.live, {k: v for k, v in self.live_by_kind.items() if v})
        self.kind = kind or self.kind
        try:
            yield self._phase
        finally:
            done, self._phase, self.kind = self._phase, outer, outer_kind
            earlier = next((p for p in self.phases if p.name == name), None)
            if earlier is None:
                self.phases.append(done)
            elif done.peak > earlier.peak:
                self.phases[self.phases.index(earlier)] = done
            if outer is not None and done.peak > outer.peak:
                outer.peak, outer.by_kind = done.peak, done.by_kind

    @contextlib.contextmanager
    def labelled(self, kind: str):
        """Label the storages made inside as `kind`."""
        before, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is aten._local_scalar_dense.default:  # .item(), bool(): a finite loss, no inf gradient
                return True if first.dtype == torch.bool else 0
            to_cpu = func is aten._to_copy.default and kwargs.get("device") is not None and \
                torch.device(kwargs["device"]).type == "cpu"
            if to_cpu:
                nbytes = first.numel() * (kwargs.get("dtype") or first.dtype).itemsize
                if nbytes > HOST_COPY_LIMIT:
                    raise SimulationError(f"a {nbytes / GiB:.1f} GiB copy from the device to the CPU (a model "
                                          f"moving?); the simulator places models itself (Tracker.on_host)")
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type == "meta":
            return args[0]  # into a CPU tensor: the values do not matter
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._see(t)
        if self.cpu_conv_scratch and func is aten.convolution_backward.default:
            # The CPU's oneDNN convolution backward reorders its operands into its blocked layouts: for the
            # moment of the kernel, a copy of the weight, the input and the output gradient (measured: a
            # 1280x1280 3x3 conv at 32x32 allocates 66.25 MiB beyond its outputs, this is 66.25 MiB).
            with self.labelled("CPU kernel scratch"):
                self.transient(sum(t.numel() * t.element_size() for t in args[:3]))
        if self.cpu_conv_forward_scratch and func is aten.convolution.default:
            # Forward, oneDNN reorders the input and the weight the same way (measured: a 320 -> 320 3x3 conv at
            # 64x64 allocates 8.52 MiB beyond its output, input 5.00 + weight 3.52). Modelled for generation;
            # in a training step the backward's peak is higher.
            with self.labelled("CPU kernel scratch"):
                self.transient(sum(t.numel() * t.element_size() for t in args[:2]))
        return out


# --- what the meta device cannot see: autocast and attention kernels --------------------------------

# CUDA autocast's op lists (https://pytorch.org/docs/stable/amp.html#cuda-op-specific-behavior), by the
# name of the outermost torch function called (F.linear, torch.matmul, Tensor.softmax, ...).
AUTOCAST_LOWER = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv", "chain_matmul",
                  "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                  "prelu", "einsum", "__matmul__", "__rmatmul__", "scaled_dot_product_attention"}
AUTOCAST_FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "mse_loss", "l1_loss", "smooth_l1_loss",
                 "cross_entropy", "nll_loss", "kl_div", "binary_cross_entropy_with_logits", "norm", "normalize", "sum",
                 "prod", "cumsum", "cumprod", "exp", "expm1", "log", "log1p", "log2", "log10", "pow", "__pow__", "__rpow__",
                 "rsqrt", "reciprocal", "softplus", "cosine_similarity", "cdist", "dist", "erfinv", "tan", "sinh", "cosh",
                 "acos", "asin", "renorm", "pdist"}
_AUTOCAST: list["Autocast"] = []  # the active one (our SDPA model casts its inputs through it)


class Autocast(TorchFunctionMode):
    """CUDA autocast, applied to any device: the inputs of AUTOCAST_LOWER ops are cast to `dtype`, those
    of AUTOCAST_FP32 ops from fp16/bf16 to fp32. Like autocast, casts of fp32 leaf tensors that require
    grad (the LoRA weights) are cached until the context ends."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.cache = dtype, {}

    def cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (dtype, torch.float64):
            return x
        if dtype == torch.float32 and x.dtype not in (torch.float16, torch.bfloat16):
            return x
        if x.is_leaf and x.requires_grad and x.dtype == torch.float32:  # autocast's weight cache
            key = id(x)
            if key not in self.cache:
                self.cache[key] = (x, x.to(dtype))  # (x is kept so that the id stays its own)
            return self.cache[key][1]
        return x.to(dtype)

    def _cast_all(self, args, kwargs, dtype):
        cast = lambda v: [self.cast(x, dtype) for x in v] if isinstance(v, (list, tuple)) else self.cast(v, dtype)
        return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in AUTOCAST_LOWER:
            args, kwargs = self._cast_all(args, kwargs, self.dtype)
        elif name in AUTOCAST_FP32:
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        return func(*args, **kwargs)

    def __enter__(self):
        _AUTOCAST.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _AUTOCAST.remove(self)
        self.cache.clear()
        return super().__exit__(*exc)


def sdpa_kernel(target: str, dtype: torch.dtype, head_dim: int, has_mask: bool) -> str:
    """The kernel torch.nn.functional.scaled_dot_product_attention picks, by its default priority
    (torch._C._get_sdp_priority_order(): flash, memory-efficient, math; cuDNN after math, so never).
    CUDA (sm80+, e.g. RTX 30xx/40xx, A100, H100): flash takes fp16/bf16 without a mask, head dim <= 256
    and a multiple of 8; memory-efficient takes fp32 too, and masks. (A T4, sm75, has no flash; its
    memory-efficient kernel needs about the same memory.) The CPU: asked of PyTorch itself."""
    if target == "cpu":
        q = torch.empty(1, 1, 8, head_dim, dtype=dtype)
        mask = torch.zeros(1, 1, 8, 8, dtype=dtype) if has_mask else None
        params = torch.backends.cuda.SDPAParams(q, q, q, mask, 0.0, False, False)
        return {1: "cpu flash"}.get(int(torch._fused_sdp_choice(q, q, q, mask)), "math") if params is not None else "math"
    if dtype in (torch.float16, torch.bfloat16) and not has_mask and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if head_dim % (8 if dtype != torch.float32 else 4) == 0:
        return "memory-efficient"
    return "math"


def attention_model(target: str, original, chosen: dict):
    """A stand-in for F.scaled_dot_product_attention that runs, on meta, the kernel `target` would pick:
    its own meta function allocates what the kernel allocates (output, log-sum-exp; in backward the
    gradients), where the math fallback would store the (B, heads, L, S) scores. `chosen` collects
    {kernel: number of calls}."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if _AUTOCAST:
            query, key, value = (_AUTOCAST[-1].cast(x, _AUTOCAST[-1].dtype) for x in (query, key, value))
        kernel = sdpa_kernel(target, query.dtype, query.shape[-1], attn_mask is not None)
        if enable_gqa or query.dim() != 4:
            kernel = "math"
        chosen[kernel] = chosen.get(kernel, 0) + 1
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        if kernel == "flash":
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if kernel == "memory-efficient":
            mask = attn_mask.to(query.dtype) if attn_mask is not None and attn_mask.dtype == torch.bool else attn_mask
            return aten._scaled_dot_product_efficient_attention(query, key, value, mask, grad, dropout_p, is_causal,
                                                                scale=scale)[0]
        if kernel == "cpu flash":
            return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                    attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return sdpa


# Device memory outside the tensors, on CUDA, with where each figure comes from.
CUBLAS_WORKSPACE = {"hopper": 32 * 2**20, "other": 8 * 2**20 + 128 * 2**10}
CUDA_CONTEXT = 512 * 2**20


def cuda_overheads(hopper: bool = False) -> list[tuple[str, int, str]]:
    """(what, bytes, source) of the device memory the tracker cannot see, on CUDA."""
    ws = CUBLAS_WORKSPACE["hopper" if hopper else "other"]
    return [
        ("cuBLAS workspace", ws, "PyTorch's default CUBLAS_WORKSPACE_CONFIG (:4096:8 = 32 MiB on Hopper, :4096:2:16:8 "
                                 "= 8.1 MiB before; aten/src/ATen/cuda/CublasHandlePool.cpp), one stream, from the "
                                 "caching allocator"),
        ("CUDA context", CUDA_CONTEXT, "the driver's context and lazily loaded kernels (CUDA_MODULE_LOADING=LAZY): "
                                       "0.3-0.6 GiB depending on GPU and driver; 0.5 GiB assumed, not in "
                                       "max_memory_allocated but in what the card has free"),
    ]


class AdamW8bitModel(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as far as device memory goes, for the simulation: bitsandbytes runs on CUDA
    only, so it cannot run on meta. Its state is what `Optimizer2State.init_state` (bitsandbytes 0.4x)
    allocates: for a tensor of at least `min_8bit_size` = 4096 values, two uint8 moments and, for each,
    one fp32 absmax per block of 256 values (blockwise quantisation: 2.03 bytes per parameter); for a
    smaller tensor, two fp32 moments. The update is in place, inside one CUDA kernel: no temporaries."""

    MIN_8BIT_SIZE, BLOCK = 4096, 256

    def __init__(self, params, lr: float = 1e-3, **kwargs):
        super().__init__(params, {"lr": lr, **kwargs})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    eight_bit = p.numel() >= self.MIN_8BIT_SIZE
                    for i in (1, 2):
                        state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8 if eight_bit else torch.float32)
                        if eight_bit:
                            state[f"absmax{i}"] = torch.zeros(-(-p.numel() // self.BLOCK), device=p.device)
                state["step"] += 1


# --- the simulation ------------------------------------------------------------------------------------

def _train_module():
    """train.py: the repository's `train`, or the installed copy (minsdxl_scripts.train)."""
    try:
        import train
    except ModuleNotFoundError as e:
        if e.name != "train":  # train.py is there but needs something missing: say that, not "no train"
            raise
        from minsdxl_scripts import train
    return train


@dataclass
class Plan:
    """The prediction of one run: each phase's peak, and the modelled extras on the device."""

    title: str
    target: str  # "cuda" or "cpu"
    phases: list[PhasePeak]
    extras: list[tuple[str, int, str]]  # (what, bytes, source), added to every phase's peak
    attention: dict[str, int]  # SDPA kernel -> calls in the simulated program
    notes: list[str] = field(default_factory=list)

    @property
    def extra_bytes(self) -> int:
        return sum(b for _, b, _ in self.extras)

    def phase(self, name: str) -> PhasePeak:
        return next(p for p in self.phases if p.name == name)

    @property
    def peak(self) -> int:
        """The largest phase peak, the extras included: what has to fit the device."""
        return max(p.peak for p in self.phases) + self.extra_bytes

    def to_json(self) -> dict:
        return {"title": self.title, "device": self.target, "peak_bytes": self.peak,
                "phases": [{"phase": p.name, "peak_bytes": p.peak + self.extra_bytes, "tensor_peak_bytes": p.peak,
                            "start_bytes": p.start, "at_peak_by_kind": p.by_kind} for p in self.phases],
                "modelled": [{"what": w, "bytes": b, "source": s} for w, b, s in self.extras],
                "attention_kernels": self.attention, "notes": self.notes}

    def table(self, measured: dict[str, int] | None = None) -> str:
        """The per-phase table (GiB; MiB for a tiny model), with a measured column if given."""
        unit, size = ("GiB", GiB) if self.peak >= GiB else ("MiB", 2**20)
        head = f"| phase | predicted {unit} | of which, at the peak |" + (f" measured {unit} |" if measured else "")
        lines = [f"{self.title}", "", head, "| --- | ---: | --- |" + (" ---: |" if measured else "")]
        for p in self.phases:
            parts = ", ".join(f"{k} {v / size:.2f}" for k, v in sorted(p.by_kind.items(), key=lambda kv: -kv[1])
                              if v >= size / 100)
            row = f"| {p.name} | {(p.peak + self.extra_bytes) / size:.2f} | {parts} |"
            if measured:
                row += f" {measured[p.name] / size:.2f} |" if p.name in measured else " |"
            lines.append(row)
        for what, b, source in self.extras:
            lines.append(f"| + {what} (in every row) | {b / size:.2f} | {source} |" + (" |" if measured else ""))
        if measured:
            lines.append("(measured: torch.cuda.max_memory_allocated, which leaves out the CUDA context line)")
        lines.append(f"\npeak {self.peak / GiB:.2f} GiB; attention kernels: "
                     + ", ".join(f"{k} x{v}" for k, v in self.attention.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _models(args, target: str, weight_dtype, tracker: Tracker, train):
    """The text encoders, tokenizers and VAE as train.py loads them (fp32), on meta; their storages
    are counted as host memory (train.py loads them into CPU memory)."""
    from .loading import CLIP_TOKENIZER_DIR, SDXL_VAE_CONFIG, load_text_encoders, load_tokenizers, load_vae, sdxl_text_encoder_configs
    source = args.pretrained_model_name_or_path
    local = source is not None and Path(source).exists()
    if local:  # the real loaders, reading only the files' headers (device="meta")
        tes = load_text_encoders(source, dtype=torch.float32, device="meta", variant=args.variant)
        tokenizers = load_tokenizers(source)
        vae = load_vae(args.pretrained_vae_model_name_or_path or source, dtype=torch.float32, device="meta")
    else:  # SDXL base 1.0's own configs
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        with torch.device("meta"):
            c1, c2 = sdxl_text_encoder_configs()
            tes = (CLIPTextModel(c1).eval().requires_grad_(False), CLIPTextModelWithProjection(c2).eval().requires_grad_(False))
            vae = AutoencoderKL.from_config(SDXL_VAE_CONFIG).eval().requires_grad_(False)
        tokenizers = (CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)),
                      CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!"))
    return tes, tokenizers, vae, local


def _unet(args, weight_dtype, local: bool):
    from .config import UNetConfig
    from .loading import load_unet
    from .unet import UNet
    if local:
        return load_unet(args.pretrained_model_name_or_path, dtype=weight_dtype, device="meta", variant=args.variant)
    with torch.device("meta"):
        return UNet(UNetConfig.sdxl_base()).to(weight_dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def _together(first, second):
    """Two context managers entered as one (checkpoint's context_fn returns one per pass)."""
    with first, second:
        yield


@contextlib.contextmanager
def _seams(train, tracker: Tracker, target: str, chosen: dict):
    """What the simulation changes in the program it runs: autocast and SDPA as on `target`, and the
    staging of models as host/device bookkeeping instead of copies."""
    import lora.layer
    saved = (devices.autocast, devices.staged, F.scaled_dot_product_attention, lora.layer.autocasting)
    real_make_optimizer = train.make_optimizer

    def make_optimizer(args, groups, device, check_only=False):
        if args.optimizer != "adamw8bit":
            return real_make_optimizer(args, groups, device, check_only)
        for g in groups:
            g["base_lr"] = g["lr"]
        return AdamW8bitModel(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay)

    def autocast(device, dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        if target == "cpu":
            raise SimulationError("the CPU simulation is for fp32 (--mixed_precision no)")
        return Autocast(dtype)

    @contextlib.contextmanager
    def staged(device, *models):
        was_host = [tracker.is_host(m) for m in models]
        for m in models:
            tracker.on_host(m, False)
        try:
            yield
        finally:
            for m, host in zip(models, was_host):
                tracker.on_host(m, host)
    def checkpoint(fn, *args, context_fn=None, **kwargs):
        # Checkpointing re-runs a block's forward inside backward under the autocast of its first run:
        # torch.utils.checkpoint restores torch.autocast's state, not our Autocast mode, so we hand it over
        # (beside the selective policy's own contexts, if any).
        dtype = _AUTOCAST[-1].dtype if _AUTOCAST else None

        def contexts():
            forward, recompute = context_fn() if context_fn else (contextlib.nullcontext(), contextlib.nullcontext())
            return forward, _together(recompute, Autocast(dtype) if dtype else contextlib.nullcontext())
        return torch_checkpoint(fn, *args, context_fn=contexts, **kwargs)
    from . import checkpointing
    torch_checkpoint = checkpointing.checkpoint
    devices.autocast, devices.staged, F.scaled_dot_product_attention = autocast, staged, attention_model(target, saved[2], chosen)
    lora.layer.autocasting = lambda x: bool(_AUTOCAST) or saved[3](x)  # what the LoRA layers ask
    checkpointing.checkpoint, train.make_optimizer = checkpoint, make_optimizer
    try:
        yield
    finally:
        devices.autocast, devices.staged, F.scaled_dot_product_attention, lora.layer.autocasting = saved
        checkpointing.checkpoint, train.make_optimizer = torch_checkpoint, real_make_optimizer


def simulate(args: argparse.Namespace, target: str | None = None, steps: int = 2) -> Plan:
    """Predict the device memory of `train.py` with these (parsed, checked) flags, phase by phase, on
    `target` ("cuda", default; or "cpu"). Nothing is loaded but file headers; nothing is written but
    temporary files."""
    train = _train_module()
    args = copy.copy(args)
    target = target or (torch.device(args.device).type if args.device else "cuda")
    if target not in ("cuda", "cpu"):
        raise SimulationError(f"--device {args.device}: the simulator knows CUDA and the CPU")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if target == "cuda" else "no"
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    tracker = Tracker("meta", block=CUDA_BLOCK if target == "cuda" else 1, cpu_conv_scratch=target == "cpu")
    chosen: dict[str, int] = {}
    device = torch.device("meta")
    notes = []
    if args.optimizer == "adamw8bit":
        notes.append("8-bit AdamW is modelled, not run (bitsandbytes needs CUDA): its state as bitsandbytes allocates "
                     "it (memory.AdamW8bitModel), its in-place update without temporaries")
    full = getattr(args, "full_finetune", False)
    if full and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        notes.append("one process holding the whole UNet: under torchrun FSDP2 splits the weights, gradients and "
                     "optimizer state across the processes, so each needs less (an upper bound)")
    with _seams(train, tracker, target, chosen), tracker, tempfile.TemporaryDirectory() as tmp:
        # 2. The frozen encoders, in CPU memory.
        with tracker.phase("load encoders", "encoders"):  # (into CPU memory: nothing on the device)
            with tracker.paused():
                tes, tokenizers, vae, local = _models(args, target, weight_dtype, tracker, train)
            for m in (*tes, vae):
                tracker.register(m, host=True)
        if not local:
            given = args.pretrained_model_name_or_path
            notes.append("models: SDXL base 1.0's own configs (" + (f"{given} is not on this machine" if given else "no model given") + ")")
        side = args.resolution
        # 2b. DreamBooth's class images, if some are missing: the UNet on the device for them, and freed after
        if getattr(args, "with_prior_preservation", False) and _class_images_missing(args):
            _class_images(args, tracker, tes, tokenizers, vae, local, Path(tmp))
        # 3. Caches, each encoder alone on the device.
        if args.cache_latents:
            with tracker.phase("cache latents", "activations"), devices.staged(device, vae):
                encode_image(vae, torch.zeros(3, side, side))
        prompt = None
        if args.cache_text_embeddings:
            with tracker.phase("cache text", "activations"), devices.staged(device, *tes):
                prompt = encode_captions(tes, tokenizers, ["a photo of a cat"])  # (CPU copies: zeros)
        vae = vae_after_caching(vae, args, weight_dtype)
        tracker.on_host(vae)  # (its converted weights too)
        # 4. The UNet; the encoders a step runs.
        with tracker.phase("load UNet", "weights"):
            fp8 = getattr(args, "fp8_base", False)
            with tracker.paused():
                unet = _unet(args, weight_dtype, local)
                if fp8:  # train.py quantizes in CPU memory, then moves the fp8 UNet to the device
                    from .fp8 import quantize_fp8
                    quantize_fp8(unet, weight_dtype)
            tracker.register(unet)
            if not fp8:  # straight onto the device, one tensor at a time in its file dtype, then converted
                tracker.transient(max(p.numel() for p in unet.parameters()) * 2)
            if not args.cache_latents:
                tracker.on_host(vae, False)
            if args.train_text_encoder or not args.cache_text_embeddings:
                for te in tes:
                    te.to(weight_dtype if args.train_text_encoder else torch.float32)
                    tracker.on_host(te, False)
        # 5. LoRA, or every UNet weight
        if full:
            adapted, trainable_named = train.full_weights(unet)
        else:
            with tracker.phase("add LoRA", "LoRA adapters"):
                adapted, trainable_named = train.add_adapters(args, unet, tes, lambda *a, **k: None)
        trainable = list(trainable_named.values())
        unet.set_gradient_checkpointing(args.gradient_checkpointing)
        # 6., 7. Optimizer and training steps (train.py keeps the optimizer and EMA to the end: validation and
        # saving happen beside them)
        kept = _train_steps(train, args, tracker, unet, tes, tokenizers, vae, adapted, trainable_named, trainable,
                            weight_dtype, device, steps)
        # Validation
        if args.validation_prompt:
            v_args = copy.copy(args)
            v_args.validation_inference_steps = 1  # every denoising step needs the same memory
            meter = _TrackerMeter(tracker)
            conditioning = guidance_conditioning(prompt[0][0], prompt[1][0], device, weight_dtype) if prompt else None
            validation_images(unet, vae, tes, tokenizers, v_args, device, weight_dtype, [0], meter=meter,
                                    conditioning=conditioning)
        # 8. Save
        with tracker.phase("save", "saving"):
            if full:  # unet/ and the single file: each weight copied to the CPU (minsdxl.model_files.unet_state)
                for t in unet.state_dict().values():
                    t.detach().cpu()
            else:
                save_sdxl_lora(unet, Path(tmp) / "a.safetensors", format="kohya",
                               text_encoders=tes if args.train_text_encoder else None)
        del kept  # (the optimizer and the EMA lived through validation and saving, as in train.py)
    if "math" in chosen and target == "cuda":
        notes.append("some attention runs SDPA's math kernel, which stores the (B, heads, L, S) scores")
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[weight_dtype]
    trained = (f"full fine-tuning{', step fused into backward' if args.fused_backward_pass else ''}" if full
               else f"rank {args.rank} on {args.lora_targets}")
    title = (f"{'demo (tiny)' if args.demo else Path(str(args.pretrained_model_name_or_path or 'SDXL base')).name}, "
             f"{target}, {args.resolution}x{args.resolution}, batch {args.train_batch_size}"
             f"{' + as many class images' if getattr(args, 'with_prior_preservation', False) else ''}, {trained}, "
             f"{dtype_name}{' + fp8 base' if getattr(args, 'fp8_base', False) else ''}, "
             f"{args.optimizer}, checkpointing {policy_name(args.gradient_checkpointing)}"
             f"{(', EMA' + (' on the CPU' if args.ema_on_cpu else '')) if args.use_ema else ''}"
             f"{', text encoders trained' if args.train_text_encoder else ''}")
    extras = cuda_overheads(hopper=False) if target == "cuda" else []
    assumed = getattr(args, "_assumed", {})
    if assumed:
        notes.append("not given, so the 12 GB recipe's (train.py's own defaults differ; --train_defaults for those): "
                     + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in assumed.items()))
    return Plan(title, target, tracker.phases, extras, chosen, notes)


def _class_images_missing(args: argparse.Namespace) -> bool:
    """Whether train.py would generate class images: --class_data_dir lacks some (or is not given here)."""
    from .dreambooth import missing_class_indices
    return args.class_data_dir is None or bool(missing_class_indices(Path(args.class_data_dir), args.num_class_images))


def _class_images(args: argparse.Namespace, tracker: Tracker, tes, tokenizers, vae, local: bool, tmp: Path) -> None:
    """Phase 2b on meta: one batch of --sample_batch_size class images, one denoising step (each step needs
    the same memory), with train.py's own generate_class_images; the UNet lives in CPU memory, as there."""
    from .dreambooth import generate_class_images, generation_dtype
    from .generate import Models
    dtype = generation_dtype(args)
    with tracker.phase("class images", "weights"):
        with tracker.paused():
            unet = _unet(args, dtype, local)
            if getattr(args, "fp8_base", False):  # as train.py: the model as it trains
                from .fp8 import quantize_fp8
                quantize_fp8(unet, dtype)
        tracker.register(unet, host=True)
        with tracker.labelled("activations"):
            generate_class_images(Models(unet, vae, tes, tokenizers), args.class_prompt or "a photo of a dog",
                                  list(range(args.sample_batch_size)), tmp / "class images", seed=0,
                                  resolution=args.resolution, batch_size=args.sample_batch_size,
                                  device=torch.device("meta"), dtype=dtype, steps=1, progress=False)
    del unet


class _TrackerMeter:
    """devices.PhaseMeter's interface over the tracker: validation_images marks its phases with it."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def phase(self, name: str):
        return self.tracker.phase(name, "activations")


def _train_steps(train, args, tracker, unet, tes, tokenizers, vae, adapted, trainable_named, trainable,
                 weight_dtype, device, steps: int) -> tuple:
    """`steps` optimizer steps of train.py's loop (each with up to two micro-batches when accumulating);
    returns the optimizer and the EMA, which live on in train.py."""
    from .schedule import NoiseSchedule
    groups = train.optimizer_groups(args, trainable_named, args.learning_rate)
    sched = NoiseSchedule()
    prior = getattr(args, "with_prior_preservation", False)  # DreamBooth: as many class images again in each batch
    B, side = args.train_batch_size * (2 if prior else 1), args.resolution // 8
    micro = min(args.gradient_accumulation_steps, 2)
    with tracker.phase("train step", "optimizer state"):
        if getattr(args, "full_finetune", False):
            optimizer = train.make_full_optimizer(args, trainable_named, args.learning_rate, device, seed=0)
            if optimizer.fused:  # the updates run inside backward: label their state and temporaries as the optimizer's
                for hook in optimizer.hooks:
                    hook.remove()
                update = optimizer.update
                optimizer.hooks = [p.register_post_accumulate_grad_hook(
                    lambda p: _labelled_call(tracker, "optimizer state", update, p)) for p in optimizer.params]
        else:
            optimizer = train.make_optimizer(args, groups, device)
        if args.optimizer == "adamw" and args.device != "cpu" and (args.device or "cuda").startswith("cuda"):
            for g in optimizer.param_groups:  # on CUDA torch's AdamW defaults to its foreach kernels (meta: the loop)
                g["foreach"] = True
        if args.use_ema and args.ema_on_cpu and device.type == "meta":
            ema = EMA(trainable_named, args.ema_decay, device)  # (in CPU memory: counted as host memory)
            tracker.as_host(ema.shadow.values())
        else:
            ema = EMA(trainable_named, args.ema_decay, "cpu" if args.ema_on_cpu else device) if args.use_ema else None
        scaler = torch.amp.GradScaler("cuda", enabled=False)  # fp16's loss scaling works in place
        for m in adapted.values():
            m.train()
        for _ in range(steps):
            for _ in range(micro):
                with tracker.labelled("activations"):
                    x0 = torch.zeros(B, 4, side, side)
                    if args.train_text_encoder or not args.cache_text_embeddings:
                        with devices.autocast(device, weight_dtype):
                            context, pooled = encode_text(tes, tokenizers, ["a photo of a cat"] * B)
                    else:
                        context, pooled = torch.zeros(B, 77, unet.config.cross_attention_dim), torch.zeros(B, unet.config.pooled_text_dim)
                    if not args.cache_latents:
                        x0 = torch.stack([encode_image(vae, torch.zeros(3, args.resolution, args.resolution)) for _ in range(B)])
                    time_ids = torch.zeros(B, unet.config.num_time_ids)
                    noise, t = torch.zeros(x0.shape), torch.full((B,), 500)
                    loss, _ = train.batch_loss(unet, sched, x0, noise, t, context, pooled, time_ids, device, weight_dtype,
                                               args.prediction_type or "epsilon", args.snr_gamma,
                                               args.prior_loss_weight if prior else None)
                with tracker.labelled("backward"):
                    (loss / args.gradient_accumulation_steps).backward()
                del loss
            with tracker.labelled("optimizer state"):
                train.optimizer_step(optimizer, scaler, trainable, args.max_grad_norm, ema, trainable_named)
    return optimizer, ema


def _labelled_call(tracker, kind: str, fn, *args):
    with tracker.labelled(kind):
        return fn(*args)


class _NoTracker:
    """Tracker's marks as no-ops: for running _train_steps on real tensors."""

    phase = labelled = staticmethod(lambda *a, **k: contextlib.nullcontext())
    as_host = staticmethod(lambda tensors: None)


def profiler_peak(fn) -> int:
    """The peak of live CPU allocations while `fn()` runs, above what was live before: the running sum of
    the PyTorch profiler's allocation and free events ([memory] events, in time order). This is the
    allocator's own record, independent of our tracker: it sees every tensor, kernels' scratch buffers too."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def check_step_on_cpu(args: argparse.Namespace, random_weights: bool = False, steps: int = 2) -> dict:
    """The training step's peak of live tensors above what is live before it, predicted (simulate, on
    meta) and measured (the same train.py functions on real CPU tensors, profiler_peak), in fp32.
    `random_weights`: build the full SDXL UNet (and text encoders) at random instead of loading files."""
    train = _train_module()
    args = copy.copy(args)
    args.mixed_precision, args.device = "no", "cpu"
    plan = simulate(args, "cpu", steps=steps)
    step = plan.phase("train step")
    predicted = step.peak - step.start
    from .loading import load_text_encoders, load_tokenizers, load_unet, load_vae
    if random_weights:
        from .config import UNetConfig
        from .unet import UNet
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
        from .loading import CLIP_TOKENIZER_DIR, sdxl_text_encoder_configs
        from transformers import CLIPTokenizer
        unet = UNet(UNetConfig.sdxl_base()).requires_grad_(False)
        c1, c2 = sdxl_text_encoder_configs()
        tes = (CLIPTextModel(c1).requires_grad_(False), CLIPTextModelWithProjection(c2).requires_grad_(False)) \
            if args.train_text_encoder else (None, None)
        tokenizers = (CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)),
                      CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!"))
        vae = None
    else:
        source = args.pretrained_model_name_or_path
        unet = load_unet(source, dtype=torch.float32)
        tes, tokenizers, vae = load_text_encoders(source), load_tokenizers(source), load_vae(source)
    if getattr(args, "full_finetune", False):
        adapted, trainable_named = train.full_weights(unet)
    else:
        adapted, trainable_named = train.add_adapters(args, unet, tes, lambda *a, **k: None)
    unet.set_gradient_checkpointing(args.gradient_checkpointing)
    run = lambda: _train_steps(train, args, _NoTracker(), unet, tes, tokenizers, vae, adapted, trainable_named,
                               list(trainable_named.values()), torch.float32, torch.device("cpu"), steps)
    measured = profiler_peak(run)
    return {"predicted": predicted, "measured": measured, "ratio": measured / predicted, "title": plan.title}


# --- suggestions ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'12GB' / '12 GiB' / '11.5G' -> bytes (GB taken as GiB, as cards are sold: a '12 GB' card has 12 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(G|GB|GiB|M|MB|MiB)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--vram {text!r}: give a size such as 12GB or 11.5GiB")
    unit = (m.group(2) or "G").upper()
    return int(float(m.group(1)) * (2**20 if unit.startswith("M") else 2**30))


FRAGMENTATION_MARGIN = 0.05  # the allocator's reserved-but-unused blocks: not predicted, so 5% is kept free


def fits(plan: Plan, vram: int) -> bool:
    """The peak, with FRAGMENTATION_MARGIN on what the allocator hands out (not on the CUDA context), <= vram."""
    context = sum(b for what, b, _ in plan.extras if what == "CUDA context")
    return (plan.peak - context) * (1 + FRAGMENTATION_MARGIN) + context <= vram


CHANGES = [  # (what to write on the command line, the change), cheapest first
    ("--gradient_checkpointing", {"gradient_checkpointing": "full"}),
    ("--cache_latents --cache_text_embeddings", {"cache_latents": True, "cache_text_embeddings": True}),
    ("--ema_on_cpu", {"ema_on_cpu": True}),
    ("--fp8_base", {"fp8_base": True}),
    ("--rank 8", {"rank": 8}),
    ("--train_batch_size 1 (with --gradient_accumulation_steps for the same global batch)", {"train_batch_size": 1}),
    ("--optimizer adafactor", {"optimizer": "adafactor"}),
    ("--fused_backward_pass", {"fused_backward_pass": True}),  # --full_finetune, without accumulation
]


def _flag_value(args: argparse.Namespace, key: str):
    """A flag's value, the checkpointing policy by its name (True from a TOML config is "full")."""
    value = getattr(args, key, None)
    return policy_name(value) if key == "gradient_checkpointing" else value


def suggestions(args: argparse.Namespace, vram: int, target: str = "cuda") -> list[tuple[str, Plan]]:
    """Single changes to the flags, each with its predicted plan: those that fit first; if none fits
    alone, the changes applied together in order until the run fits."""
    out = []
    for label, change in CHANGES:
        if all(_flag_value(args, k) == v for k, v in change.items()):
            continue
        if label.startswith("--rank") and args.rank <= 8 or label.startswith("--train_batch_size") and args.train_batch_size == 1:
            continue
        if label == "--ema_on_cpu" and not args.use_ema:
            continue
        full = getattr(args, "full_finetune", False)
        if full and any(k in LORA_ONLY for k in change) or label.startswith("--fused") and (
                not full or args.gradient_accumulation_steps > 1):
            continue
        if label.startswith("--cache") and args.train_text_encoder and args.cache_latents:
            continue
        try:
            plan = simulate(argparse.Namespace(**{**vars(args), **change}), target)
        except (SimulationError, ImportError):
            continue
        out.append((label, plan))
        if sum(fits(p, vram) for _, p in out) == 2:
            break  # the two cheapest changes that fit are enough to choose from
    fitting = [(label, plan) for label, plan in out if fits(plan, vram)]
    if fitting:
        return sorted(fitting, key=lambda lp: lp[1].peak)
    combined, labels = copy.copy(args), []
    for label, plan in out:
        for k, v in next(c for l, c in CHANGES if l == label).items():
            setattr(combined, k, v)
        labels.append(label)
        plan = simulate(combined, target)
        if fits(plan, vram):
            return [(" ".join(labels), plan)]
    return [(" ".join(labels) + " (still too large)", plan)] if labels else []


# --- train.py's plan, before it loads anything ------------------------------------------------------

def plan_memory(args: argparse.Namespace, device: torch.device, log):
    """The simulator's prediction of every phase (minsdxl.memory), before anything is loaded; on CUDA the
    run stops here, with the table and the changes that would fit, if the peak is more than the GPU has free."""
    if args.memory_plan == "off" or (args.memory_plan == "auto" and device.type != "cuda"):
        return None
    try:
        plan = simulate(args, device.type)
    except (SimulationError, ImportError) as e:
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
    needed = (plan.peak - CUDA_CONTEXT) * (1 + FRAGMENTATION_MARGIN)
    if needed <= free:
        return
    lines = [f"the predicted peak, {needed / 2**30:.2f} GiB (with {FRAGMENTATION_MARGIN:.0%} for the allocator), "
             f"is more than the {free / 2**30:.2f} GiB this GPU has free; this run would run out of memory."]
    found = suggestions(args, free + CUDA_CONTEXT, "cuda")
    lines += [f"  {label}: predicted peak {(p.peak - CUDA_CONTEXT) / 2**30:.2f} GiB" for label, p in found] \
        or ["  (no single change found)"]
    msg = "\n".join(lines) + "\nChange the flags, or pass --ignore_memory_plan to try anyway."
    if args.ignore_memory_plan:
        log("warning: " + msg)
        return
    fail(msg)


# --- generation: sample.py ----------------------------------------------------------------------------

def _sample_module():
    """sample.py: the repository's `sample`, or the installed copy (minsdxl_scripts.sample)."""
    try:
        import sample
    except ModuleNotFoundError as e:
        if e.name != "sample":  # sample.py is there but needs something missing: say that
            raise
        from minsdxl_scripts import sample
    return sample


def _generation_models(args, dtype: torch.dtype, tracker: Tracker):
    """(base Models, refiner Models or None) as sample.py loads them, on meta: its own loaders for local
    sources (file headers only), SDXL 1.0's configs for Hub ids; weights counted on the device unless
    --lowvram keeps them in CPU memory."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from .config import UNetConfig
    from .fp8 import quantize_fp8
    from .generate import Models
    from .loading import CLIP_TOKENIZER_DIR, SDXL_VAE_CONFIG, load_text_encoders, load_tokenizers, load_unet, load_vae, sdxl_text_encoder_configs
    from .unet import UNet

    def load(source: str | None, expect: str):
        if source is not None and Path(source).exists():
            unet = load_unet(source, dtype=dtype, device="meta", variant=args.variant, expect=expect)
            tes = load_text_encoders(source, dtype=dtype, device="meta", variant=args.variant)
            return unet, tes, load_tokenizers(source)
        clip_l, clip_g = sdxl_text_encoder_configs()
        with torch.device("meta"):
            unet = UNet(UNetConfig.sdxl_refiner() if expect == "refiner" else UNetConfig.sdxl_base()).to(dtype)
            tes = (CLIPTextModel(clip_l), CLIPTextModelWithProjection(clip_g))[1 if expect == "refiner" else 0:]
        tokenizers = (CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)),
                      CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!"))[1 if expect == "refiner" else 0:]
        return unet, tuple(te.to(dtype).eval() for te in tes), tokenizers

    with tracker.paused():
        unet, tes, tokenizers = load(args.pretrained_model_name_or_path, "base")
        vae_source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
        vae_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.vae_dtype]
        if vae_source is not None and Path(vae_source).exists():
            vae = load_vae(vae_source, dtype=vae_dtype, device="meta")
        else:
            with torch.device("meta"):
                # (nn.Module.to: diffusers' own .to warns about fp32 modules, which this VAE has none of)
                vae = torch.nn.Module.to(AutoencoderKL.from_config(SDXL_VAE_CONFIG), vae_dtype).eval()
        refiner = load(args.refiner, "refiner") if args.refiner else None
    models = Models(unet, vae, tes, tokenizers)
    refiner = Models(*refiner[:1], None, *refiner[1:]) if refiner else None
    for m in [unet, *tes, vae, *([refiner.unet, *refiner.text_encoders] if refiner else [])]:
        if args.fp8_base and m in (unet, refiner and refiner.unet):
            quantize_fp8(m, dtype)  # (on meta: the float8 weights and their scales, as sample.py makes them)
        tracker.register(m, host=args.lowvram)
    return models, refiner


@contextlib.contextmanager
def _generation_seams(tracker: Tracker, target: str, chosen: dict):
    """generate's staging of models (--lowvram) as host/device bookkeeping, and SDPA as on `target`."""
    generate_module = sys.modules["minsdxl.generate"]  # (the package exports the function `generate` under that name)
    saved = (generate_module._on, F.scaled_dot_product_attention)

    @contextlib.contextmanager
    def on(module, device, lowvram):
        if lowvram:
            tracker.on_host(module, False)
        try:
            yield module
        finally:
            if lowvram:
                tracker.on_host(module, True)

    generate_module._on, F.scaled_dot_product_attention = on, attention_model(target, saved[1], chosen)
    try:
        yield
    finally:
        generate_module._on, F.scaled_dot_product_attention = saved


def simulate_sample(args: argparse.Namespace, target: str | None = None) -> Plan:
    """Predict the device memory of `sample.py` with these (parsed) flags, one image, phase by phase, on
    `target` ("cuda" by default, or "cpu"). Each denoising step needs the same memory, so each model runs
    one (2 steps; strength 1 and refiner_start 0.5 where they apply: the step counts are not memory)."""
    sample = _sample_module()
    args = copy.copy(args)
    if not args.demo:
        return _simulate_sample(sample, args, target)
    with tempfile.TemporaryDirectory(prefix="minsdxl-memory-") as tmp:  # the tiny demo model, written for the while
        args.output_dir = tmp
        sample.apply_demo_defaults(args)
        return _simulate_sample(sample, args, target)


def _simulate_sample(sample, args: argparse.Namespace, target: str | None) -> Plan:
    from .generate import generate
    target = target or (torch.device(args.device).type if args.device else "cuda")
    if target not in ("cuda", "cpu"):
        raise SimulationError(f"--device {args.device}: the simulator knows CUDA and the CPU")
    dtype = sample.pick_dtype(args, torch.device(target)) if args.dtype or target == "cpu" else torch.bfloat16
    width, height = args.width, args.height
    if args.init_image and Path(args.init_image).is_file() and not {"width", "height"} & getattr(args, "_explicit", set()):
        from PIL import Image
        with Image.open(args.init_image) as image:
            width, height = image.width - image.width % 8, image.height - image.height % 8
    tracker = Tracker("meta", block=CUDA_BLOCK if target == "cuda" else 1, cpu_conv_forward_scratch=target == "cpu")
    chosen: dict[str, int] = {}
    with _generation_seams(tracker, target, chosen), tracker:
        with tracker.phase("load", "weights"):
            models, refiner = _generation_models(args, dtype, tracker)
        init_image = torch.zeros(1, 3, height, width) if args.init_image else None
        with tracker.labelled("activations"):
            generate(models, [(args.prompt or ["a photo of a cat"])[0]], [args.negative_prompt], steps=2,
                     guidance_scale=args.guidance_scale, sampler=args.sampler, karras=args.karras, width=width,
                     height=height, device=torch.device("meta"), dtype=dtype, lowvram=args.lowvram,
                     vae_tiling=args.vae_tiling, prediction_type=args.prediction_type, init_image=init_image,
                     strength=1.0, refiner=refiner, refiner_start=0.5 if args.refiner_start > 0 else 0.0,
                     meter=_TrackerMeter(tracker))
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    title = (f"sample.py: {'demo (tiny)' if args.demo else Path(str(args.pretrained_model_name_or_path or 'SDXL base')).name}"
             f"{' + refiner ' + Path(str(args.refiner)).name if args.refiner else ''}, {target}, {width}x{height}, "
             f"{dtype_name}{' + fp8 UNets' if args.fp8_base else ''}{', lowvram' if args.lowvram else ''}"
             f"{', image to image' if args.init_image else ''}")
    notes = ["--lora adds its adapter weights to the denoise phase (not modelled)"] if args.lora else []
    if "math" in chosen and target == "cuda":
        notes.append("some attention runs SDPA's math kernel, which stores the (B, heads, L, S) scores")
    return Plan(title, target, tracker.phases, cuda_overheads() if target == "cuda" else [], chosen, notes)


def main_sample(argv: list[str]) -> int:
    """`python -m minsdxl.memory sample [sample.py's flags] [--vram SIZE] [--json]`."""
    sample = _sample_module()
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--vram")
    extra.add_argument("--json", action="store_true")
    ours, rest = extra.parse_known_args(argv)
    args = sample.parse_args(rest)
    try:
        vram = parse_size(ours.vram) if ours.vram else None
        plan = simulate_sample(args)
    except (SimulationError, ValueError) as e:
        sys.exit(f"minsdxl.memory: error: {e}")
    result = plan.to_json()
    if vram is not None:
        result["vram_bytes"], result["fits"] = vram, fits(plan, vram)
    if ours.json:
        print(json.dumps(result, indent=2))
        return 0
    print(plan.table())
    if vram is not None:
        print(f"\n{'fits' if result['fits'] else 'does NOT fit'} in {vram / GiB:.1f} GiB (predicted peak "
              f"{plan.peak / GiB:.2f} GiB + {FRAGMENTATION_MARGIN:.0%} kept for the allocator's fragmentation)"
              + ("" if result["fits"] or args.lowvram else "; --lowvram keeps only the model in use on the GPU"))
    return 0


# --- the command line -------------------------------------------------------------------------------------

# The 12 GB recipe (docs/memory.md): used for these flags when they are not given, unless --train_defaults.
RECIPE = {"train_batch_size": 1, "rank": 16, "gradient_checkpointing": "full"}


def parse_args(argv: list[str] | None):
    """train.py's flags (its own parser, --config included) plus --vram, --json and --train_defaults."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--vram", help="the card's memory, e.g. 12GB: says whether the run fits and what would make it fit")
    extra.add_argument("--json", action="store_true", help="print the plan as JSON")
    extra.add_argument("--train_defaults", action="store_true",
                       help="flags not given take train.py's defaults (batch 16, rank 4, no checkpointing), not the recipe's")
    ours, rest = extra.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__)
        print("memory-only flags:\n  --vram SIZE        the card's memory, e.g. 12GB\n  --json             the plan as JSON\n"
              "  --train_defaults   flags not given take train.py's defaults, not the 12 GB recipe's "
              f"({' '.join(f'--{k} {v}' for k, v in RECIPE.items())})\nand every flag of train.py (python train.py --help)")
        raise SystemExit(0)
    args = parse_args_of_train(rest)
    args._assumed = {}
    if not ours.train_defaults:
        for key, value in RECIPE.items():
            if key not in args._explicit and not (args.full_finetune and key in LORA_ONLY):
                setattr(args, key, value)
                args._assumed[key] = value
    if args.demo:  # train.py --demo's tiny model and settings, written to a temporary folder
        args.output_dir = tempfile.mkdtemp(prefix="minsdxl-memory-")
        for key in RECIPE:
            if key in args._assumed:
                setattr(args, key, build_parser().get_default(key))
        args._assumed = {}
        apply_demo_defaults(args)
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    try:
        check_full_finetune(args)  # its refusals, its optimizer and fused-step defaults
    except SystemExit as e:
        raise SystemExit(str(e).replace("train.py:", "minsdxl.memory:", 1)) from None
    if args.train_text_encoder:
        args.cache_text_embeddings = False
    return args, ours


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["sample"]:
        return main_sample(argv[1:])
    args, ours = parse_args(argv)
    try:
        vram = parse_size(ours.vram) if ours.vram else None
        plan = simulate(args)
    except (SimulationError, ValueError) as e:
        sys.exit(f"minsdxl.memory: error: {e}")
    result = plan.to_json()
    if vram is not None:
        result["vram_bytes"], result["fits"] = vram, fits(plan, vram)
        result["suggestions"] = [] if result["fits"] else [
            {"change": label, "peak_bytes": p.peak, "fits": fits(p, vram)} for label, p in suggestions(args, vram, plan.target)]
    if ours.json:
        print(json.dumps(result, indent=2))
        return 0
    print(plan.table())
    if vram is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        print(f"\n{verdict} in {vram / GiB:.1f} GiB (predicted peak {plan.peak / GiB:.2f} GiB + {FRAGMENTATION_MARGIN:.0%} "
              f"kept for the allocator's fragmentation)")
        for s in result.get("suggestions", []):
            print(f"  {s['change']}: peak {s['peak_bytes'] / GiB:.2f} GiB{'' if s['fits'] else ' (does not fit)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
