"""bench/gpu.sh's work: every figure only a GPU can show, in one prepared run of under 8 minutes.

    bash bench/gpu.sh                          # on the GPU machine (H100/H200 class): one markdown table
    bash bench/gpu.sh --device cpu --dry-run   # the same code path on the tiny config, on the CPU
    bash bench/gpu.sh --rows bf16,sample       # only some rows (a rerun on a short lease)

What it measures (SDXL base UNet with random weights: speed and memory do not depend on the
values; 1024x1024 pixels = 128x128 latents, batch 1, LoRA rank 16 on to_q/to_k/to_v/to_out.0 with
fp32 adapters, gradient checkpointing, cached latents and text, AdamW):

    bf16        bench/train_step.py, ours and diffusers + peft: seconds per step, peak VRAM, MFU
    selective, channels_last, compile, all_options
                ours with a speed option (bench/train_step.py's OPTIONS): selective checkpointing, channels-last,
                channels-last + compiled blocks, all three
    no_ckpt     no checkpointing on either side; no_ckpt_compile ours with channels-last and compiled blocks
    cuda_graph  both sides' step recorded once as a CUDA graph and replayed (bench/train_step.py
                graphed_step_fn: what a batch-1 step takes without Python launching each kernel); the
                peak allocated leaves out the graph's own pool, which the reserved figure includes
    fp16        the same in fp16, the loss scaled by a GradScaler
    fp8_base    ours with the frozen weights in float8_e4m3fn (minsdxl.fp8), bf16 compute
    adamw8bit   bitsandbytes' 8-bit AdamW, both sides
    sample      sample.py at 1024x1024, 30 Euler steps, from a full-size random pipeline on disk
    load        the UNet from a single file (SGM names, fp16) to bf16 on the GPU, ours and diffusers

Beside every measured peak, `python -m minsdxl.memory` predicts the same train.py run from its
flags: its "train step" phase beside each training row, its "load UNet" and validation phases
beside the load and sample rows (the nearest phases of train.py, another program than sample.py).

Each measurement is a subprocess with its own time limit inside the run's budget, so a crash, a
missing package or a hang costs that row, not the table; rows whose package is missing are skipped
with the reason. The CPU-only work (the FLOP count, the simulator) runs in background threads
while the GPU rows run one at a time. The table is printed and, with `--out DIR` or $OUT, written
to DIR/gpu_results.md with the raw numbers in DIR/gpu_results.json and every child's output in
DIR/gpu_log.txt.

The time cell of a training row on a GPU also gives (host ...): the seconds until the step's Python
code returns, before synchronizing. Near the step's time, the GPU was waiting for kernels to be launched
(bench/train_step.py --config overhead measures that side on the CPU); well below it, the GPU was busy.

MFU = (FLOPs of one step) / (seconds per step) / (the GPU's dense bf16 peak). The FLOPs are
counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward + MSE + backward
of our UNet with its adapters on the `meta` device (shapes only, no data), which counts matrix
products, convolutions and attention and nothing elementwise. Without checkpointing's recomputation
(the model FLOPs, for MFU); HFU counts the recomputed forward too. The peak is the datasheet's dense
bf16 figure (fp16 is the same), `PEAK_BF16_TFLOPS` below: 989 TFLOP/s for the H100 SXM and the
H200 (the same chip); this workplace measured 769-798 TFLOP/s for an 8192^3 bf16 matmul on its H200
(/work/.library/device/KINDS.md), which is the practical ceiling.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.load import read_through  # noqa: E402  (standard library only at import)

PACKAGES = ["torch", "safetensors", "transformers", "diffusers", "peft", "bitsandbytes"]
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peak (no sparsity), NVIDIA datasheets; first matching name wins
    "H200": 989, "GH200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "H800": 989, "A100": 312,
}
PROMPT, NEGATIVE = "a photo of a corgi on a beach", "blurry"
# Training rows: (row, what, bench/train_step.py flags, train.py flags for the simulator, sides)
# {dtype} is bf16 on CUDA; on the CPU (the dry run) fp32, as bf16 matmuls are slow there. The rows after
# bf16 each change one speed option of our side (bench/train_step.py's OPTIONS), then all of them, then
# the same without checkpointing on both sides.
TRAIN_ROWS = [
    ("bf16", "train step, {dtype}", [], [], ("ours", "reference")),
    ("selective", "train step, {dtype}, --gradient_checkpointing selective", ["--option", "selective checkpointing"],
     ["--gradient_checkpointing", "selective"], ("ours",)),
    ("channels_last", "train step, {dtype}, channels-last", ["--option", "channels-last"], [], ("ours",)),
    ("compile", "train step, {dtype}, channels-last + compiled blocks", ["--option", "channels-last + compiled"], [],
     ("ours",)),
    ("all_options", "train step, {dtype}, channels-last + compiled + selective", ["--option",
     "channels-last + compiled + selective"],
     ["--gradient_checkpointing", "selective"], ("ours",)),
    ("no_ckpt", "train step, {dtype}, no checkpointing", ["--no-checkpointing"], ["--gradient_checkpointing", "none"],
     ("ours", "reference")),
    ("no_ckpt_compile", "train step, {dtype}, no checkpointing, channels-last + compiled", ["--no-checkpointing", "--option",
     "channels-last + compiled"], ["--gradient_checkpointing", "none"], ("ours",)),
    ("cuda_graph", "train step, {dtype}, the whole step replayed as a CUDA graph (bench only)", ["--cuda-graph"], [],
     ("ours", "reference")),
    ("fp16", "train step, fp16 + GradScaler", ["--dtype", "fp16"], ["--mixed_precision", "fp16"], ("ours", "reference")),
    ("fp8_base", "train step, {dtype}, fp8 base weights", ["--fp8-base"], ["--fp8_base"], ("ours",)),
    ("adamw8bit", "train step, {dtype}, 8-bit AdamW", ["--optimizer", "adamw8bit"], ["--optimizer", "adamw8bit"], ("ours", "reference")),
]
COMPILED_ROWS = {"compile", "all_options", "no_ckpt_compile"}  # their own time limit: the first steps compile
# The recomputation each row's checkpointing does, for its HFU (FLOPs counted with that policy)
ROW_POLICY = {"selective": "selective", "all_options": "selective", "no_ckpt": "none", "no_ckpt_compile": "none"}
TRAIN_IDS = [r[0] for r in TRAIN_ROWS]
ROW_IDS = TRAIN_IDS + ["sample", "load"]
SIDE_NAMES = {"ours": "ours", "reference": "diffusers + peft"}


@dataclass
class Plan:
    """What one run measures: the full-size figures, or the dry run's tiny stand-ins for them."""

    config: str  # "base" (SDXL) or "tiny" (UNetConfig.tiny(), the same topology at 3M parameters)
    latent: int  # latent side; the image side is 8x that (the VAE's factor): 128 = 1024 pixels
    steps: int  # sample.py's sampler steps
    warmup: int  # untimed training steps (the optimizer state exists after the first)
    repeats: int  # timed training steps; the table shows their median
    budget: float  # seconds for the whole run
    limits: dict = field(default_factory=dict)  # seconds allowed to each kind of child

    @property
    def size(self) -> int:
        return self.latent * 8


FULL = Plan("base", 128, 30, 2, 5, 580,  # 10 minutes less a margin
            {"env": 90, "prepare": 180, "train": 90, "compile": 240, "flops": 240, "simulator": 300, "sample": 150, "load": 60})
DRY = Plan("tiny", 8, 2, 1, 1, 300,
           {"env": 90, "prepare": 90, "train": 90, "compile": 90, "flops": 90, "simulator": 120, "sample": 90, "load": 60})


# --- children: each runs in its own process and prints one JSON object last ------------------------

def child_env(args) -> dict:
    """Which packages are there (and their versions), whether torch sees a GPU, whether minsdxl.fp8 is
    there. torch, bitsandbytes and minsdxl.fp8 are imported (they can fail at import, on CUDA libraries
    that do not match); the pure-Python ones are looked up, which costs no seconds of imports, and a
    broken one shows as its rows' failure."""
    out = {"python": sys.version.split()[0], "packages": {}}
    for name in PACKAGES:
        try:
            if name in ("torch", "bitsandbytes"):
                out["packages"][name] = str(importlib.import_module(name).__version__)
            elif importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named '{name}'")
            else:
                out["packages"][name] = importlib.metadata.version(name)
        except Exception as e:  # not installed, or installed but broken
            out["packages"][name] = None
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}".splitlines()[0]
    try:
        from minsdxl.fp8 import quantize_fp8  # noqa: F401
    except Exception as e:
        out.setdefault("errors", {})["minsdxl.fp8"] = f"{type(e).__name__}: {e}".splitlines()[0]
    if out["packages"]["torch"]:
        import torch
        out.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out.update(device_name=props.name, capability=f"{props.major}.{props.minor}", device_memory=props.total_memory)
    return out


def write_pipeline(config: str, folder: Path, device: str) -> None:
    """Around the unet/ of bench/load.py's diffusers folder, the rest of a random diffusers pipeline:
    both text encoders (full size for the base config), SDXL's two tokenizers (the ones shipped in
    minsdxl/clip_tokenizer) and the VAE. Written once; `device` draws the weights."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from bench.common import random_init_, sdxl_text_encoder_configs
    from minsdxl import UNetConfig
    from minsdxl.loading import CLIP_TOKENIZER_DIR, SDXL_VAE_CONFIG

    if (folder / "vae/config.json").is_file():  # the VAE is written last
        return
    cfg = UNetConfig.sdxl_base() if config == "base" else UNetConfig.tiny()
    te_configs = sdxl_text_encoder_configs(cfg.cross_attention_dim, cfg.pooled_text_dim)
    for seed, sub, cls, te_cfg in zip((1, 2), ("text_encoder", "text_encoder_2"), (CLIPTextModel, CLIPTextModelWithProjection), te_configs):
        with torch.device("meta"):  # no init work; random_init_ fills it (position ids are not saved)
            te = cls(te_cfg)
        random_init_(te.to_empty(device=device), seed).half().cpu().save_pretrained(folder / sub)
    for sub, pad in (("tokenizer", None), ("tokenizer_2", "!")):  # tokenizer 2 pads with "!", as SDXL's
        shutil.copytree(CLIP_TOKENIZER_DIR, folder / sub, dirs_exist_ok=True)
        if pad:
            path = folder / sub / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": pad}))
    # The tiny pipeline's VAE (minsdxl/tiny.py) for the tiny config; SDXL's for the base.
    vae_cfg = SDXL_VAE_CONFIG if config == "base" else {
        **SDXL_VAE_CONFIG, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_cfg)
    random_init_(vae.to_empty(device=device), 3).cpu().save_pretrained(folder / "vae")


def child_prepare(args) -> dict:
    """The files the rows read: the UNet (needs no diffusers), then the pipeline around it (needs diffusers)."""
    from bench.load import write_checkpoints
    single, folder = write_checkpoints(args.config, Path(args.cache), args.device)
    out = {"single": str(single), "folder": str(folder), "pipeline": None}
    try:
        write_pipeline(args.config, folder, args.device)
        out["pipeline"] = str(folder)
    except Exception as e:
        out["pipeline_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def child_flops(args) -> dict:
    """FLOPs of one training step of our UNet with its adapters: forward + MSE + backward under
    FlopCounterMode, without checkpointing (the model FLOPs) and with each policy's recomputation. The
    full model runs on the meta device (shapes only), its attention as the GPU's fused kernel (the
    simulator's model of SDPA, whose FLOPs the counter knows, and which the selective policy sees as one
    op, as on the GPU); the tiny one on real CPU tensors (faster than meta's Python shape functions)
    with SDPA's math kernel, two matmuls the counter sees (the CPU's fused kernel is not counted)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import lora
    from bench.train_step import TARGETS
    from bench.unet import make_inputs
    from minsdxl import UNet, UNetConfig, memory

    cfg = UNetConfig.sdxl_base() if args.config == "base" else UNetConfig.tiny()
    where = torch.device("meta" if args.config == "base" else "cpu")
    with where:  # FLOPs do not depend on the dtype: fp32 everywhere, no autocast
        model = UNet(cfg).requires_grad_(False)
        lora.inject(model, TARGETS, rank=args.rank, alpha=args.rank, init="gaussian", dtype=torch.float32)
    x, t, context, pooled, time_ids = make_inputs(cfg, 1, args.latent, torch.float32, where)
    if where.type == "meta":
        F.scaled_dot_product_attention = memory.attention_model("cuda", F.scaled_dot_product_attention, {})
    attention = contextlib.nullcontext if where.type == "meta" else lambda: sdpa_kernel(SDPBackend.MATH)
    out = {"counted_on": str(where)}
    for key, checkpointing in (("flops", "none"), ("flops_with_recompute", "full"), ("flops_selective", "selective")):
        model.set_gradient_checkpointing(checkpointing)
        counter = FlopCounterMode(display=False)
        with attention(), counter:
            F.mse_loss(model(x, t, context, pooled, time_ids), torch.zeros_like(x)).backward()
        out[key] = counter.get_total_flops()
        out[key + "_by_op"] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return out


def child_sample(args) -> dict:
    """sample.py's own main() on the pipeline folder, two images; the time of each generate() call
    (text encoding, the sampler steps with guidance, the VAE decode) and the peak memory of the run."""
    import torch

    from bench.common import PeakMemory, sync
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")  # not bench/sample.py
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    times, generate = [], sample.generate

    def timed(*a, **k):
        start = time.perf_counter()
        images = generate(*a, **k)
        sync(args.device)
        times.append(time.perf_counter() - start)
        return images

    sample.generate = timed  # sample.main looks the name up when it calls it
    with tempfile.TemporaryDirectory(prefix="gpu-sample-") as images:
        argv = ["--pretrained_model_name_or_path", args.model, "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                "--steps", str(args.steps), "--width", str(args.size), "--height", str(args.size), "--num_images", "2",
                "--device", args.device, "--dtype", args.dtype, "--output_dir", images]
        start = time.perf_counter()
        with PeakMemory(args.device) as mem:
            sample.main(sample.parse_args(argv))
    out = {"seconds_total": time.perf_counter() - start, "image_seconds": times, "peak_bytes": mem.peak}
    if torch.device(args.device).type == "cuda":
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(args.device)
    return out


CHILDREN = {"env": child_env, "prepare": child_prepare, "flops": child_flops, "sample": child_sample}


# --- the parent: runs the children, one row at a time, inside the budget --------------------------

def last_line(text: str) -> str:
    """The error message of a failed child: its last non-empty line (a traceback's exception, argparse's error)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def parse_json(stdout: str):
    """A child's result: the JSON object that ends its output (one line, or indented as the simulator
    prints it), after whatever the child printed before it."""
    lines = stdout.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return None


class Runner:
    """Runs each child as a subprocess with its own time limit, never past the run's deadline, and
    keeps every child's output for gpu_log.txt."""

    def __init__(self, budget: float, threads: int | None = None):
        self.start = time.monotonic()
        self.threads = threads
        self.deadline = self.start + budget
        self.logs: list[str] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:4.0f} s] {message}", flush=True)

    def run(self, name: str, cmd: list[str], limit: float, threads: int | None = None) -> dict:
        left = self.deadline - time.monotonic() - 3
        if left < 5:
            return {"status": "skipped", "reason": "out of time (the run's budget was spent)"}
        timeout = min(limit, left)
        threads = self.threads or threads  # the run-wide setting (the CPU: 1) wins
        env = {**self.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        start = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            stdout, stderr, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, rc = e.stdout, e.stderr, None
            stdout, stderr = (s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (stdout, stderr))
        wall = time.monotonic() - start
        self.logs.append(f"=== {name}: {' '.join(cmd)}\n--- exit {rc}, {wall:.1f} s\n{stdout[-20000:]}\n--- stderr\n{stderr[-20000:]}\n")
        if rc is None:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "wall": wall}
        if rc:
            return {"status": "failed", "reason": f"exit {rc}: {last_line(stderr)}", "wall": wall}
        result = parse_json(stdout)
        if result is None:
            return {"status": "failed", "reason": f"no JSON result: {last_line(stdout)}", "wall": wall}
        return {"status": "ok", "result": result, "wall": wall}


def missing(needs: list[str], env: dict, device: str) -> str | None:
    """Why a row cannot run here, or None."""
    packages, errors = env.get("packages", {}), env.get("errors", {})
    for need in needs:
        if need == "cuda-only" and not device.startswith("cuda"):
            return "runs on CUDA only (bitsandbytes' 8-bit optimizers)"
        if need == "compiles-on-cuda" and not device.startswith("cuda"):
            return "compiles on CUDA only (on the CPU inductor spends minutes in the C++ compiler; tests cover the path)"
        if need == "device" and device.startswith("cuda") and not env.get("cuda_available"):
            return f"torch {packages.get('torch')} sees no CUDA device (CUDA build: {env.get('torch_cuda')})"
        if need == "minsdxl.fp8" and need in errors:
            return f"minsdxl.fp8 not importable ({errors[need]})"
        if need in PACKAGES and not packages.get(need):
            return f"{need} not importable ({errors.get(need, 'the environment check failed')})"
    return None


def simulator_cmd(plan: Plan, model: str, device: str, dtype: str, extra: list[str]) -> list[str]:
    """`python -m minsdxl.memory` with train.py's flags for the run a training row measures (later flags win)."""
    return [sys.executable, "-m", "minsdxl.memory", "--pretrained_model_name_or_path", model,
            "--resolution", str(plan.size), "--rank", "16", "--lora_targets", "attn", "--gradient_checkpointing",
            "--train_batch_size", "1", "--optimizer", "adamw", "--mixed_precision", {"fp32": "no"}.get(dtype, dtype),
            "--device", device, *extra, "--json"]


def phase_bytes(sim: dict, pick) -> tuple[int | None, str]:
    """(peak bytes, phase names) of the simulator's phases that `pick(name)` selects, the largest."""
    if sim["status"] != "ok":
        return None, f"n/a (simulator {sim['status']}: {sim['reason']})"
    try:
        phases = [p for p in sim["result"]["phases"] if pick(p["phase"].lower())]
        best = max(phases, key=lambda p: p["peak_bytes"]) if phases else None
    except (KeyError, TypeError) as e:
        return None, f"n/a (simulator output without {e})"
    if best is None:
        return None, f"n/a (no such phase among {[p.get('phase') for p in sim['result']['phases']]})"
    return int(best["peak_bytes"]), best["phase"]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def flop_text(n: float) -> str:
    return f"{n / 1e12:,.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:,.2f} GFLOP"


def train_cells(r: dict, sim: dict, flops: dict, peak_tflops: float | None, cuda: bool, row: str = "bf16") -> dict:
    """time / peak / simulator / MFU cells of one measured training row."""
    s = r["seconds_per_step"]
    peak = r["peak_bytes"]
    host = r.get("host_seconds_per_step")  # the Python side's share: near the step's time = launch-bound
    cells = {"time": f"{s:.3f} s/it" + (f" (host {host:.3f})" if host is not None and cuda else ""), "peak": mib(peak) + (f" (reserved {mib(r['peak_reserved_bytes'])})" if cuda else " RSS")}
    predicted, note = phase_bytes(sim, lambda name: "step" in name)
    cells["sim"] = mib(predicted) if predicted else note
    cells["ratio"] = f"{peak / predicted:.2f}" if predicted and cuda else ""
    if not cuda:
        cells["mfu"] = "n/a (CPU)"
    elif flops.get("status") != "ok":
        cells["mfu"] = f"n/a (FLOP count {flops.get('status')}: {flops.get('reason')})"
    elif not peak_tflops:
        cells["mfu"] = "n/a (no peak TFLOP/s known for this device; pass --peak-tflops)"
    else:
        recompute = {"none": "flops", "selective": "flops_selective"}.get(ROW_POLICY.get(row), "flops_with_recompute")
        mfu, hfu = (flops["result"][k] / s / (peak_tflops * 1e12) for k in ("flops", recompute))
        cells["mfu"] = f"{100 * mfu:.1f}% (HFU {100 * hfu:.1f}%)"
        r["mfu"], r["hfu"] = mfu, hfu
    return cells


def peak_figure(env: dict, override: float | None) -> float | None:
    if override:
        return override
    name = env.get("device_name") or ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def render(rows: list[dict], head: list[str], notes: list[str]) -> str:
    cols = ["row", "side", "what", "status", "time", "peak", "sim", "ratio", "mfu"]
    titles = ["row", "side", "what", "status", "time", "peak memory", "simulator predicts", "measured / predicted", "MFU"]
    lines = head + ["", "| " + " | ".join(titles) + " |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines + [""] + notes) + "\n"


@dataclass
class Row:
    """One line of the table: what it measures, what it needs, and the child that measures it."""

    row: str  # one of ROW_IDS
    side: str  # ours, diffusers + peft, diffusers
    what: str
    needs: list[str]  # packages, or "device" (CUDA if asked for), "cuda-only", "minsdxl.fp8"
    cmd: list[str]
    kind: str  # which of Plan.limits applies
    reason: str | None = None  # why it cannot run, known before it runs
    before: object = None  # called just before the child starts
    cells: dict = field(default_factory=dict)  # status, time, peak, sim, ratio, mfu for the table
    result: dict = field(default_factory=dict)  # the runner's answer


def table_rows(plan: Plan, device: str, dtype: str, files: dict, model: str | None) -> list[Row]:
    """Every row of the table, in order, with the command that measures it."""
    py, me = sys.executable, str(Path(__file__).resolve())
    train = [py, str(ROOT / "bench/train_step.py"), "--config", plan.config, "--latent", str(plan.latent),
             "--rank", "16", "--batch", "1", "--dtype", dtype, "--device", device, "--warmup", str(plan.warmup),
             "--repeats", str(plan.repeats)]
    rows = []
    for row, what, flags, _, sides in TRAIN_ROWS:
        for side in sides:
            needs = ["device", "torch"] + {"fp8_base": ["minsdxl.fp8"], "adamw8bit": ["cuda-only", "bitsandbytes"]}.get(row, [])
            needs += ["diffusers", "peft"] if side == "reference" else []
            needs += ["compiles-on-cuda"] if row in COMPILED_ROWS else []
            rows.append(Row(row, SIDE_NAMES[side], what.format(dtype=dtype), needs, train + ["--side", side, *flags],
                            "compile" if row in COMPILED_ROWS else "train"))
    no_files = f"no files on disk ({files.get('error') or files.get('pipeline_error')})"
    rows.append(Row("sample", "ours", f"sample.py {plan.size}x{plan.size}, {plan.steps} Euler steps, CFG, {dtype}",
                    ["device", "torch", "transformers", "diffusers"],
                    [py, me, "--child", "sample", "--model", str(model), "--device", device, "--dtype", dtype,
                     "--size", str(plan.size), "--steps", str(plan.steps)], "sample",
                    reason=None if files.get("pipeline") else no_files))
    for side in ("ours", "reference"):
        rows.append(Row("load", {"reference": "diffusers"}.get(side, side), f"UNet single file (fp16) to bf16 on {device}",
                        ["device", "torch"] + (["diffusers"] if side == "reference" else []),
                        [py, str(ROOT / "bench/load.py"), "--dtype", "bf16", "--device", device, "--child", side, "single",
                         str(files.get("single")), str(files.get("folder"))], "load",
                        reason=None if files.get("single") else no_files,
                        before=lambda: read_through(Path(files["single"]))))  # page cache warm: reading the disk is not what is timed
    return rows


def measured_cells(r: Row, sims: dict, flops: dict, peak_tflops: float | None, cuda: bool) -> dict:
    """The time, peak, simulator and MFU cells of a row that ran."""
    res = r.result["result"]
    no_sim = {"status": "skipped", "reason": "the dry run predicts its first row only"}
    if r.row in TRAIN_IDS:
        return train_cells(res, sims.get(r.row, no_sim), flops, peak_tflops, cuda, r.row)
    reserved = f" (reserved {mib(res['peak_reserved_bytes'])})" if cuda else " RSS"
    if r.row == "sample":
        t = res["image_seconds"]
        cells = {"time": f"{t[-1]:.2f} s/image (first {t[0]:.2f} s; whole run with loading {res['seconds_total']:.1f} s)",
                 "peak": mib(res["peak_bytes"]) + reserved}
        sim, pick, measured = sims.get("sample", no_sim), (lambda n: n.startswith("validation")), res["peak_bytes"]
    else:
        cells = {"time": f"{res['seconds']:.2f} s", "peak": (f"{mib(res['peak_vram'])} VRAM, " if cuda else "") + f"RSS +{mib(res['peak_rss'])}"}
        sim, pick, measured = sims.get("bf16", no_sim), (lambda n: n == "load unet"), res.get("peak_vram")
    predicted, note = phase_bytes(sim, pick)
    cells["sim"] = f"{mib(predicted)} (train.py's '{note}' phase)" if predicted else note
    cells["ratio"] = f"{measured / predicted:.2f}" if predicted and cuda else ""
    return cells


def main(args) -> int:
    plan = DRY if args.dry_run else FULL
    if args.budget:
        plan.budget = args.budget
    selected = set(args.rows.split(",")) if args.rows else set(ROW_IDS)
    device, py, me = args.device, sys.executable, str(Path(__file__).resolve())
    cuda = device.startswith("cuda")
    dtype = "bf16" if cuda else "fp32"
    # On the CPU one thread per child, two children at a time: their timings are not the point there.
    # On CUDA one child at a time, with the CPU's threads: nothing else runs on the device.
    runner = Runner(plan.budget, threads=None if cuda else 1)
    jobs = args.jobs or (1 if cuda else 2)
    scratch = Path(tempfile.mkdtemp(prefix="minsdxl-gpu-")) if args.dry_run and not args.cache else None
    cache = Path(args.cache) if args.cache else scratch or ROOT / "bench/cache"
    runner.say(f"bench/gpu.py: {'dry run, tiny config' if args.dry_run else 'SDXL base'}, device {device}, "
               f"budget {plan.budget:.0f} s, cache {cache}")

    # 1. What is installed, and the files the sample and load rows read (both at once)
    with ThreadPoolExecutor(2) as pool:
        env_job = pool.submit(runner.run, "env", [py, me, "--child", "env"], plan.limits["env"])
        prep_job = pool.submit(runner.run, "prepare", [py, me, "--child", "prepare", "--config", plan.config,
                                                       "--device", device, "--cache", str(cache)], plan.limits["prepare"])
        env_run, prep = env_job.result(), prep_job.result()
    env = env_run.get("result", {})
    if env_run["status"] != "ok":
        runner.say(f"environment check {env_run['status']}: {env_run['reason']}")
    for name in PACKAGES:
        runner.say(f"  {name}: {env.get('packages', {}).get(name) or 'MISSING: ' + env.get('errors', {}).get(name, '?')}")
    runner.say(f"  minsdxl.fp8: {env.get('errors', {}).get('minsdxl.fp8', 'ok')}")
    runner.say(f"  CUDA: {env.get('device_name', 'none')} (torch CUDA build {env.get('torch_cuda')})")
    files = prep.get("result", {"error": f"preparing them {prep['status']}: {prep.get('reason')}"})
    runner.say(f"files: {files.get('error') or 'ok'}; pipeline: {files.get('pipeline') or files.get('pipeline_error')}")
    model = files.get("pipeline") or files.get("folder")

    # 2. In the background (CPU only): the FLOP count and the simulator's predictions. The sample row's
    # is train.py's validation (the nearest thing it runs to sample.py). The dry run predicts its first
    # row only: each prediction costs seconds of CPU even on the tiny model.
    background = ThreadPoolExecutor(max(1, min(5, (os.cpu_count() or 2) // 4)))
    flops_job = background.submit(runner.run, "flops", [py, me, "--child", "flops", "--config", plan.config,
                                                         "--latent", str(plan.latent)], plan.limits["flops"], 2)
    validation = ["--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", str(plan.steps)]
    predictions = [(row, flags) for row, _, _, flags, _ in TRAIN_ROWS] + [("sample", validation)]
    sim_jobs = {row: background.submit(runner.run, f"simulator {row}", simulator_cmd(plan, model, device, dtype, flags),
                                       plan.limits["simulator"], 2)
                for row, flags in predictions[:1 if args.dry_run else None] if model and row in selected}

    # 3. The measurements, in their own processes
    rows = table_rows(plan, device, dtype, files, model)

    def measure(r: Row) -> None:
        reason = "not selected (--rows)" if r.row not in selected else missing(r.needs, env, device) or r.reason
        if not reason and r.before:
            r.before()
        r.result = {"status": "skipped", "reason": reason} if reason else runner.run(f"{r.row} {r.side}", r.cmd, plan.limits[r.kind])
        r.cells["status"] = "measured" if r.result["status"] == "ok" else f"{r.result['status']}: {r.result['reason']}"
        runner.say(f"{r.row} / {r.side}: {r.cells['status']}" + (f" ({r.result['wall']:.0f} s)" if "wall" in r.result else ""))

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(measure, rows))

    # 4. The background results beside the measurements, then the table
    flops = flops_job.result()
    sims = {row: job.result() for row, job in sim_jobs.items()}
    background.shutdown()
    runner.say(f"FLOP count: {flops['status']}; simulator: " + ", ".join(f"{k} {v['status']}" for k, v in sims.items()))
    peak_tflops = peak_figure(env, args.peak_tflops)
    for r in rows:
        if r.result["status"] == "ok":
            r.cells.update(measured_cells(r, sims, flops, peak_tflops, cuda))
    head, notes = header(plan, env, device, flops, peak_tflops, cuda)
    table = render([{"row": r.row, "side": r.side, "what": r.what, **r.cells} for r in rows], head, notes)
    print("\n" + table, flush=True)
    raw = {"env": env_run, "prepare": prep, "flops": flops, "simulator": sims, "peak_bf16_tflops": peak_tflops,
           "plan": plan.__dict__, "device": device,
           "rows": [{"row": r.row, "side": r.side, "what": r.what, "cmd": r.cmd, **r.result} for r in rows]}
    out = args.out or os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_results.md").write_text(table)
        (Path(out) / "gpu_results.json").write_text(json.dumps(raw, indent=1, default=str))
        (Path(out) / "gpu_log.txt").write_text("\n".join(runner.logs))
        runner.say(f"wrote {out}/gpu_results.md, gpu_results.json, gpu_log.txt")
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def header(plan: Plan, env: dict, device: str, flops: dict, peak_tflops: float | None, cuda: bool) -> tuple[list[str], list[str]]:
    """The lines above the table (where and what) and below it (how each figure was taken)."""
    pk = env.get("packages", {})
    where = env.get("device_name", "no CUDA device") if cuda else f"CPU ({os.cpu_count()} cores)"
    head = [f"## bench/gpu.sh{' --dry-run' if plan is DRY else ''}: {where}, torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}), "
            f"diffusers {pk.get('diffusers')}, peft {pk.get('peft')}, transformers {pk.get('transformers')}, bitsandbytes {pk.get('bitsandbytes')}",
            "",
            f"UNet {'SDXL base (2.57B parameters)' if plan.config == 'base' else 'tiny (UNetConfig.tiny())'}, random weights, "
            f"{plan.size}x{plan.size} ({plan.latent}x{plan.latent} latents), batch 1, LoRA rank 16 on to_q/to_k/to_v/to_out.0 "
            f"(fp32 adapters), gradient checkpointing, cached inputs, AdamW unless the row says otherwise; "
            f"{plan.warmup} warm-up + {plan.repeats} timed steps per training row (median shown)."]
    f = flops.get("result")
    notes = [
        "- peak memory: " + ("torch.cuda.max_memory_allocated over the timed steps, weights included (what has to fit "
                             "the card; the CUDA context is not in it), and the caching allocator's max reserved"
                             if cuda else "peak RSS above the level before the model was built (the CPU's stand-in)") + ".",
        "- simulator: `python -m minsdxl.memory <train.py flags> --json`, the peak of its 'train step' phase (its modelled "
        "CUDA context and workspaces included); measured / predicted compares it with the allocated peak.",
        (f"- FLOPs per step (FlopCounterMode on {f['counted_on']}, forward + backward, matmul/conv/attention): "
         f"{flop_text(f['flops'])} without recomputation (MFU), {flop_text(f['flops_with_recompute'])} with full "
         f"checkpointing's recomputed forward, {flop_text(f['flops_selective'])} with selective's (HFU)"
         if f else f"- FLOPs: not counted ({flops.get('reason')})") +
        (f"; peak {peak_tflops:g} TFLOP/s dense bf16 (datasheet)." if peak_tflops else "; no peak figure for this device."),
        "- sample: seconds of the second image's generate() call (text encoding, sampler steps with guidance 5, VAE "
        "decode in fp32), peak over the whole sample.py run including loading; the simulator's figure beside it is "
        "train.py's validation phase, a different program.",
        "- load: ours `minsdxl.load_unet(file, bf16, device)`, diffusers `from_single_file(...).to(device)`, each in a "
        "fresh process with the page cache warm; beside it the simulator's 'load UNet' phase of train.py.",
    ]
    if plan is DRY:
        notes.insert(0, "- dry run: the tiny model, tiny latents and one or two steps check the code path; "
                        "its figures measure nothing.")
    return head, notes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the point of this script), or cpu for --dry-run")
    p.add_argument("--dry-run", action="store_true", help="the tiny config, tiny latents, a few steps: checks the code path")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROW_IDS)}")
    p.add_argument("--out", help="write gpu_results.md/.json and gpu_log.txt here (default: $OUT if set)")
    p.add_argument("--cache", help="where the random checkpoints go (default: bench/cache; a temporary folder for --dry-run)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 470; dry run 300)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if PEAK_BF16_TFLOPS does not know it")
    p.add_argument("--jobs", type=int, help="children measured at once (default: 1 on CUDA, where timings matter; 2 on the CPU)")
    # The children's own flags (bench/gpu.py runs itself with --child NAME).
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--config", default="base", help=argparse.SUPPRESS)
    p.add_argument("--latent", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args), default=str))
    else:
        sys.exit(main(args))
