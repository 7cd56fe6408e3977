"""Load SDXL weights from either official layout, a Hub repo, or a fine-tune: UNet, text encoders, VAE.

The base and the refiner load the same way; `load_unet(..., expect=)` says which one the caller
needs, and a model of the other kind is refused by name. The refiner's pipeline has one text
encoder (OpenCLIP bigG: `text_encoder_2/` in diffusers' layout, `conditioner.embedders.0.model.*` in
its single file), so `load_text_encoders` and `load_tokenizers` return one of each for it.

Sources `load_unet` accepts:
  1. Stability's single file (`sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`:
     `model.diffusion_model.*` beside the other components, SGM names) or a bare SGM UNet state dict;
  2. a diffusers UNet file or folder (`diffusion_pytorch_model[.fp16].safetensors`, or shards with
     `diffusion_pytorch_model.safetensors.index.json`; `config.json` beside it is read);
  3. a diffusers pipeline folder (its `unet/`);
  4. a Hub repo id (only the needed files are fetched; `HF_HUB_OFFLINE=1` and the cache are honoured).
The model is built on the `meta` device and each tensor is read from the file in small chunks and
converted to the target dtype and device as it is assigned, so loading fp16 weights to bf16 never
holds more than the bf16 model plus a few MiB, and never an fp32 copy. Only safetensors files are
read: pickles (.ckpt, .bin, .pt) can run code when loaded and are refused.
"""

from __future__ import annotations

import gc
import io
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from . import convert
from .config import ConfigError, UNetConfig
from .unet import UNet

LATENT_SCALE = 0.13025  # SDXL VAE latents are multiplied by this (SD 1.5 used 0.18215)
# A single file holds no tokenizers; SDXL's two are CLIP's BPE vocabulary, shipped in minsdxl/clip_tokenizer/.
CLIP_TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
CONFIG_METADATA_KEY = "minsdxl.configs"  # JSON {"unet": ..., "text_encoder": ..., ...} in our tiny single files


class LoadError(ValueError):
    """A source that cannot be loaded; the message names the file and what to do."""


# --- safetensors files --------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
SAFETENSORS_ITEMSIZE = {k: v.itemsize for k, v in SAFETENSORS_DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """({name: (dtype, shape)}, metadata) from a safetensors header, with a clear error for bad files."""
    header, metadata, _ = _read_header(Path(path))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}, metadata


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(header {name: {dtype, shape, data_offsets}}, metadata, offset of the data) of a safetensors file.

    The format: 8 bytes little-endian header length N, N bytes of JSON, then the raw tensor data;
    each tensor's data_offsets count from the end of the JSON."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoadError(f"{path}: a pickle checkpoint ({path.suffix}). minsdxl loads only .safetensors, because "
                        f"unpickling can run arbitrary code. Convert it once, in an environment you trust, with "
                        f"`safetensors.torch.save_file(torch.load(p, weights_only=True)['state_dict'], 'model.safetensors')`, "
                        f"or download the .safetensors release.")
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise LoadError(f"{path}: the file is empty (an interrupted download?); download it again")
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            raise LoadError(f"{path}: not a safetensors file (bad header length). If it is a pickle checkpoint, "
                            f"convert it to safetensors first.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LoadError(f"{path}: not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            itemsize = SAFETENSORS_ITEMSIZE.get(entry["dtype"])
            ok = 0 <= start <= end and (itemsize is None or end - start == numel * itemsize)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LoadError(f"{path}: corrupted header: the entry for tensor '{name}' is inconsistent ({entry}); "
                            f"fetch the file again")
    data_size = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + data_size > size:
        raise LoadError(f"{path}: truncated: the header describes {8 + n + data_size:,} bytes but the file has "
                        f"{size:,}. The download or copy was interrupted; fetch the file again.")
    return header, metadata, 8 + n


def _metadata_config(metadata: dict, component: str) -> dict | None:
    return json.loads(metadata[CONFIG_METADATA_KEY]).get(component) if CONFIG_METADATA_KEY in metadata else None


class TensorSource:
    """The tensors of one or more safetensors files, read on demand with positioned reads.

    Nothing is read up front. `load` reads a tensor's bytes from the file (the page cache, once the
    file has been read before) chunk by chunk into a small per-thread buffer and converts each chunk
    into the tensor's final dtype, so loading fp16 weights to bf16 holds the bf16 model and a few
    MiB per thread, never a second copy of the file. Several threads may call `load` at once."""

    def __init__(self, files: list[Path]):
        self._open: dict[Path, io.FileIO] = {}  # opened on first read; closed when this source is freed
        self._lock = threading.Lock()
        self._buffers = threading.local()  # each thread's read chunk and fp32 staging chunk
        self.files, self.where, self.shapes, self.metadata, self.entries = files, {}, {}, {}, {}
        for f in files:
            header, meta, data_start = _read_header(Path(f))
            self.metadata.update(meta)
            for name, entry in header.items():
                start, end = entry["data_offsets"]
                self.where[name], self.shapes[name] = f, tuple(entry["shape"])
                self.entries[name] = (entry["dtype"], data_start + start, end - start)

    def _dtype(self, name: str) -> torch.dtype:
        dtype = self.entries[name][0]
        if dtype not in SAFETENSORS_DTYPES:
            raise LoadError(f"{self.where[name]}: tensor '{name}' has dtype {dtype}, which minsdxl cannot read")
        return SAFETENSORS_DTYPES[dtype]

    def _read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` with the bytes of `name` from byte `start` on."""
        path, offset = self.where[name], self.entries[name][1] + start
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with self._lock:
            if path not in self._open:
                self._open[path] = open(path, "rb", buffering=0)
            f = self._open[path]
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):  # a positioned read: the threads share the file without a lock
                n = os.preadv(f.fileno(), [view[done:]], offset + done)
            else:  # Windows: seek, then read, one thread at a time
                with self._lock:
                    f.seek(offset + done)
                    n = f.readinto(view[done:])
            if not n:
                raise LoadError(f"{path}: could not read tensor '{name}': the file ends early (was it changed "
                                f"or truncated while loading?)")
            done += n

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, in its file dtype, as a tensor of its own."""
        out = torch.empty(self.shapes[name], dtype=self._dtype(name))
        if out.numel():
            self._read_into(name, 0, out)
        return out

    def load(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """The tensor `name` converted to `dtype` (floating point tensors only) on `device`."""
        file_dtype = self._dtype(name)
        target = dtype if file_dtype.is_floating_point else file_dtype
        if torch.device(device).type == "meta":  # shapes only: a model to inspect, no bytes read
            return torch.empty(self.shapes[name], dtype=target, device="meta")
        if torch.device(device).type != "cpu":
            return self.get(name).to(device).to(target)  # convert on the device: fewer bytes cross the bus
        out = torch.empty(self.shapes[name], dtype=target)
        if out.numel() == 0:
            return out
        if target == file_dtype:
            self._read_into(name, 0, out)
            return out
        b = self._buffers
        if not hasattr(b, "raw"):
            # raw: one chunk's file bytes, sized for the widest dtype (8 bytes: F64, I64)
            b.raw, b.staging = torch.empty(CHUNK * 8, dtype=torch.uint8), torch.empty(CHUNK, dtype=torch.float32)
        flat, size = out.view(-1), file_dtype.itemsize
        for i in range(0, flat.numel(), CHUNK):
            n = min(CHUNK, flat.numel() - i)
            chunk = b.raw[: n * size].view(file_dtype)
            self._read_into(name, i * size, chunk)
            _convert_into(flat[i:i + n], chunk, b.staging[:n])
        return out


CHUNK = 2**18  # values per chunk: 1 MiB of fp32, which stays in the L2 cache


def _convert_into(dst: torch.Tensor, src: torch.Tensor, staging: torch.Tensor) -> None:
    """dst.copy_(src). PyTorch's CPU fp16 -> bf16 cast goes element by element (about 2.5x slower
    than its vectorised fp16 -> fp32 and fp32 -> bf16 casts), so that pair goes through `staging`."""
    if src.dtype == torch.float16 and dst.dtype == torch.bfloat16:
        staging.copy_(src)
        dst.copy_(staging)
    else:
        dst.copy_(src)


def _load_all(src: TensorSource, names: dict[str, str], dtype, device) -> dict[str, torch.Tensor]:
    """{model key: src.load(file key)} for every entry of `names`, one tensor per thread at a time.

    Most of a CPU load is the kernel handing out fresh pages for the new weights, one page fault per
    4 KiB; the dtype conversion is the rest. One Python thread per core, each converting whole tensors
    with PyTorch's intra-op parallelism set to 1 meanwhile, keeps every core busy with both; one thread
    with parallel copies spends much of its time in fork/join waits between the small chunks."""
    threads = torch.get_num_threads()
    if threads == 1 or torch.device(device).type != "cpu":
        return {k: src.load(v, dtype, device) for k, v in names.items()}
    torch.set_num_threads(1)  # new threads take this setting; the caller's is restored below
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            loaded = pool.map(lambda file_key: src.load(file_key, dtype, device), names.values())
            return dict(zip(names, loaded))
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _gc_paused():
    """No cyclic garbage collection meanwhile. Building a model creates thousands of objects, which
    sets off full collections over everything the process holds (with diffusers imported, 335K
    objects): 0.17 s of a 2.3 s UNet load. Nothing built here is cyclic garbage."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_",
                  "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextmanager
def _on_meta_without_init():
    """Build modules on the `meta` device, skipping their random initialisation.

    On `meta` the init writes nothing, yet each call still goes through the meta dispatch: 0.05-0.25 s
    for the full UNet's 1,168 init calls, up to a tenth of loading it. While building, torch.nn.init's
    functions are no-ops; the weights come from the file. (transformers' `no_init_weights` does the
    same; like it, this is not safe while another thread initialises layers.)"""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _materialize(model: torch.nn.Module, names: dict[str, str], src: TensorSource, dtype, device, where: str,
                 transform=None) -> torch.nn.Module:
    """Fill a meta-device `model` from `src`; `names` maps model keys to file keys. Checks keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{where}: keys do not match the model: {len(missing)} missing (first ten: {missing[:10]}), "
                        f"{len(unexpected)} unexpected (first ten: {[names[k] for k in unexpected[:10]]})")
    shapes = {k: src.shapes[names[k]] for k in expected} if transform is None else None
    wrong = [f"{names[k]}: file {shapes[k]} vs model {expected[k]}" for k in expected if shapes and shapes[k] != expected[k]]
    if wrong:
        raise LoadError(f"{where}: {len(wrong)} tensors have the wrong shape (first ten: {wrong[:10]})")
    if transform is not None:
        state = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in transform.items()}
    else:
        state = _load_all(src, {k: names[k] for k in expected}, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in any file and stay on `meta`; CLIP's position ids are the only
    # kind our models have, and they are just 0..L-1.
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise LoadError(f"{where}: buffer '{name}' is not in the file and cannot be rebuilt")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
    return model


# --- finding the files --------------------------------------------------------------------------

def _is_repo_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/"))


def _download(repo: str, patterns: list[str], what: str, hub: dict | None = None) -> Path:
    """The files of `repo` that match `patterns`, from the Hub or its cache. hub: `revision` (a branch,
    tag or commit) and `cache_dir`, as diffusers' from_pretrained takes them."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, **(hub or {})))
    except Exception as e:  # offline, no such repo, gated, network
        raise LoadError(f"{repo}: could not fetch the {what} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                        f"Check the repo id and your network or HF_TOKEN, or pass a local path. With "
                        f"HF_HUB_OFFLINE=1 only files already in the cache are used.") from None


def _hub(revision: str | None, cache_dir: str | None) -> dict:
    return {k: v for k, v in (("revision", revision), ("cache_dir", cache_dir)) if v is not None}


def _weights_in(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of a diffusers/transformers component folder, honouring `variant`."""
    for v in ([variant] if variant else [None, "fp16"]):
        name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
        index = folder / (name + ".index.json")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        read_header(folder / pickles[0])  # raises the pickle refusal
    raise LoadError(f"{folder}: no {stem}{'.' + variant if variant else ''}.safetensors (or sharded index) here; "
                    f"found {sorted(p.name for p in folder.iterdir())[:10]}")


def _component_dir(source: str, sub: str, files: list[str], variant: str | None, hub: dict | None = None) -> Path | None:
    """The folder of component `sub` for a pipeline folder or repo id, or None for a file source."""
    if _is_repo_id(source):
        stem = files[0].split(".")[0]
        patterns = [f"{sub}/{f}" for f in files] + [f"{sub}/{stem}*.safetensors*", "model_index.json"]
        return _download(source, patterns, sub, hub) / sub
    p = Path(source)
    if p.is_dir():
        return p / sub if (p / sub).is_dir() else p
    return None


# --- UNet ---------------------------------------------------------------------------------------

UNET_KINDS = ("base", "refiner", "any")


def _describe(cfg: UNetConfig) -> str:
    if cfg.takes_aesthetic_score:
        return (f"the SDXL refiner (5 time ids with the aesthetic score, text from OpenCLIP bigG alone: "
                f"cross-attention dim {cfg.cross_attention_dim}, channels {cfg.block_out_channels})")
    return (f"an SDXL base model (6 time ids with the target size, cross-attention dim {cfg.cross_attention_dim}, "
            f"channels {cfg.block_out_channels})")


def _check_kind(cfg: UNetConfig, expect: str, where: str) -> None:
    """The base given where the refiner is needed, or the other way round, is refused by name."""
    if expect == "base" and cfg.takes_aesthetic_score:
        raise LoadError(f"{where}: not an SDXL base UNet: found {_describe(cfg)}. The refiner finishes what a base "
                        f"model started (sample.py --refiner); load a base model here.")
    if expect == "refiner" and not cfg.takes_aesthetic_score:
        raise LoadError(f"{where}: not an SDXL refiner UNet: found {_describe(cfg)}. Load it as the base model; the "
                        f"refiner is stabilityai/stable-diffusion-xl-refiner-1.0 (or a fine-tune of it).")


def _refuse_non_sdxl(names: set[str], shapes: dict, where: str, expect: str) -> None:
    """SD 1.x/2.x and other UNets have no added size conditioning (label_emb / add_embedding)."""
    if not any(k.startswith(("label_emb.", "add_embedding.")) for k in names):
        ctx = [s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
        guess = {768: "SD 1.x", 1024: "SD 2.x"}.get(ctx[0] if ctx else None, "an unknown model")
        raise LoadError(f"{where}: not an SDXL {'refiner' if expect == 'refiner' else 'base'} UNet: no size "
                        f"conditioning (label_emb/add_embedding) and cross-attention dim {ctx[0] if ctx else 'none'}, "
                        f"which looks like {guess}.")


def _requires_aesthetics_score(unet_folder: Path) -> bool | None:
    """What the pipeline's model_index.json beside unet/ says (`requires_aesthetics_score`: true in the
    refiner's), or None where it says nothing (the base's has no such key) or is absent."""
    index = unet_folder.parent / "model_index.json"
    return json.loads(index.read_text()).get("requires_aesthetics_score") if index.is_file() else None


def load_unet(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None,
              revision: str | None = None, cache_dir: str | None = None, expect: str = "base") -> UNet:
    """Our UNet with the weights of `source` (see the module docstring for the accepted sources);
    `revision` and `cache_dir` are for Hub repo ids. `expect`: "base" (the default: training and
    generation start from a base model), "refiner", or "any"; a UNet of the other kind is a LoadError
    that says what it is."""
    if expect not in UNET_KINDS:
        raise ValueError(f"expect must be one of {UNET_KINDS}, got {expect!r}")
    source = str(source)
    folder = _component_dir(source, "unet", ["config.json"], variant, _hub(revision, cache_dir))
    config, aesthetic_score = None, None
    if folder is not None:
        files = _weights_in(folder, "diffusion_pytorch_model", variant)
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            aesthetic_score = _requires_aesthetics_score(folder)
    else:
        files = [Path(source)]
        if (Path(source).parent / "config.json").is_file() and Path(source).name.startswith("diffusion_pytorch_model"):
            config = json.loads((Path(source).parent / "config.json").read_text())
            aesthetic_score = _requires_aesthetics_score(Path(source).parent)
    src = TensorSource(files)
    where = str(files[0].parent if len(files) > 1 else files[0])

    # Which layout: SGM (single file or bare) or diffusers; the file keys of the UNet, by our names.
    keys = set(src.where)
    if any(k.startswith(convert.SGM_UNET_PREFIX) for k in keys):
        sgm = {k[len(convert.SGM_UNET_PREFIX):]: k for k in keys if k.startswith(convert.SGM_UNET_PREFIX)}
    elif any(k.startswith(("input_blocks.", "middle_block.")) for k in keys):
        sgm = {k: k for k in keys}
    else:
        sgm = None
    if sgm is not None:
        _refuse_non_sdxl(set(sgm), {k: src.shapes[v] for k, v in sgm.items()}, where, expect)
        try:
            names = {diff: sgm[k] for k, diff in convert.sgm_names_to_diffusers(sgm).items()}
        except convert.ConversionError as e:
            raise LoadError(f"{where}: {e}") from None
    elif "conv_in.weight" in keys or any(k.startswith("down_blocks.") for k in keys):
        _refuse_non_sdxl(keys, src.shapes, where, expect)
        names = {k: k for k in keys}
    else:
        raise LoadError(f"{where}: no UNet weights found (neither `model.diffusion_model.*`, SGM nor diffusers "
                        f"UNet names); first keys: {sorted(keys)[:10]}")

    # The config: config.json (with model_index.json's word on the time ids), our metadata, or inferred
    # from the shapes.
    try:
        if config is not None:
            cfg = UNetConfig.from_diffusers_config(config, aesthetic_score)
        elif (meta := _metadata_config(src.metadata, "unet")) is not None:
            index = _metadata_config(src.metadata, "model_index") or {}
            cfg = UNetConfig.from_diffusers_config(meta, index.get("requires_aesthetics_score"))
        else:
            cfg = convert.infer_unet_config({k: _Shape(src.shapes[v]) for k, v in names.items()})
    except (ConfigError, convert.ConversionError) as e:
        raise LoadError(f"{where}: not an SDXL {'refiner' if expect == 'refiner' else 'base'} UNet: {e}") from None
    _check_kind(cfg, expect, where)
    with _gc_paused():
        with _on_meta_without_init():
            model = UNet(cfg)
        return _materialize(model, names, src, dtype, device, where).eval().requires_grad_(False)


class _Shape:
    """Stands in for a tensor where only `.shape` is needed (config inference from a header)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


# --- text encoders, tokenizers, VAE ---------------------------------------------------------------

def load_text_encoders(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None,
                       revision: str | None = None, cache_dir: str | None = None):
    """The text encoders of an SDXL pipeline folder, repo id or single file: (CLIPTextModel,
    CLIPTextModelWithProjection) for the base, (CLIPTextModelWithProjection,) for the refiner, which has
    only OpenCLIP bigG (no `text_encoder/`; `conditioner.embedders.0.model.*` in its single file)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    source = str(source)
    models, folder = [], None
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        folder = _component_dir(source, sub, ["config.json"], variant, _hub(revision, cache_dir))
        if folder is None:
            break  # a single file
        if folder.name != sub or not folder.is_dir():
            continue  # the refiner's pipeline has no text_encoder/
        files = _weights_in(folder, "model", variant)
        src = TensorSource(files)
        config = CLIPTextConfig(**json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config)
        names = _align_names([k for k in src.where if not k.endswith("position_ids")], model)
        models.append(_materialize(model, names, src, dtype, device, str(folder)).eval().requires_grad_(False))
    if folder is not None:
        if not models:
            raise LoadError(f"{source}: no text_encoder/ or text_encoder_2/ folder: not an SDXL pipeline folder")
        return tuple(models)

    # Single file: text encoder 1 in transformers names under a prefix, text encoder 2 in OpenCLIP names
    # (the refiner's file has only the latter, as its embedder 0).
    path = Path(source)
    src = TensorSource([path])
    te1 = {k[len(convert.SGM_TE1_PREFIX):]: k for k in src.where if k.startswith(convert.SGM_TE1_PREFIX) and not k.endswith("position_ids")}
    te2_prefix = convert.SGM_TE2_PREFIX if te1 else convert.SGM_REFINER_TE2_PREFIX
    te2 = {k[len(te2_prefix):]: k for k in src.where if k.startswith(te2_prefix)}
    if not te2:
        raise LoadError(f"{path}: no text encoders in this file (the base's {convert.SGM_TE1_PREFIX}* and "
                        f"{convert.SGM_TE2_PREFIX}*, or the refiner's {convert.SGM_REFINER_TE2_PREFIX}*); pass the SDXL "
                        f"pipeline folder, repo id or full single file.")
    te2_state = convert.open_clip_to_transformers({k: src.get(v) for k, v in te2.items()})  # the UNet-sized part is small
    cfg2 = _metadata_config(src.metadata, "text_encoder_2") or convert.infer_clip_text_config(te2_state, with_projection=True)
    with torch.device("meta"):
        m2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg2))
    aligned2 = _align_names(list(te2_state), m2)
    m2 = _materialize(m2, aligned2, src, dtype, device, f"{path} (text encoder 2)",
                      transform={k: te2_state[v] for k, v in aligned2.items()})
    if not te1:
        return (m2.eval().requires_grad_(False),)
    shapes1 = {k: _Shape(src.shapes[v]) for k, v in te1.items()}
    cfg1 = _metadata_config(src.metadata, "text_encoder") or convert.infer_clip_text_config(shapes1, with_projection=False)
    with torch.device("meta"):
        m1 = CLIPTextModel(CLIPTextConfig(**cfg1))
    aligned1 = _align_names(list(te1), m1)
    m1 = _materialize(m1, {k: te1[v] for k, v in aligned1.items()}, src, dtype, device, f"{path} (text encoder 1)")
    return m1.eval().requires_grad_(False), m2.eval().requires_grad_(False)


def check_text_encoders(unet: UNet, text_encoders: tuple, where: str) -> None:
    """The text encoders give what this UNet reads: a context as wide as its cross-attention (the
    encoders' widths added up) and a pooled vector as wide as its pooled input. Raises LoadError."""
    cfg = unet.config
    widths = [te.config.hidden_size for te in text_encoders]
    pooled = text_encoders[-1].config.projection_dim
    if sum(widths) != cfg.cross_attention_dim or pooled != cfg.pooled_text_dim:
        raise LoadError(f"{where}: the text encoders give context {' + '.join(map(str, widths))} = {sum(widths)} and "
                        f"pooled {pooled} wide, but the UNet reads context {cfg.cross_attention_dim} and pooled "
                        f"{cfg.pooled_text_dim} ({_describe(cfg)}): they are not from the same model")


def _align_names(file_keys: list[str], model) -> dict[str, str]:
    """{model key: file key}. Files name CLIP weights `text_model.*`; transformers 5's CLIPTextModel
    drops that prefix from its own names (and renames on load), so we add or strip it as needed."""
    model_keys = set(model.state_dict())
    out = {}
    for k in file_keys:
        for candidate in (k, k.removeprefix("text_model."), "text_model." + k):
            if candidate in model_keys:
                out[candidate] = k
                break
        else:
            out[k] = k  # reported as unexpected by _materialize
    return out


def text_encoder_module_name(path: str) -> str:
    """A CLIP text-encoder module path as LoRA files name it (always under `text_model.`)."""
    return path if path.startswith(("text_model.", "text_projection")) else "text_model." + path


def load_tokenizers(source: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None):
    """(tokenizer, tokenizer_2) from a pipeline folder or repo id; (tokenizer_2,) for the refiner's, which
    has only the second. A single file has none, so it gets the official ones (two, or the second alone
    for a refiner's file) from the files shipped with minsdxl, without any network access."""
    from transformers import CLIPTokenizer
    source = str(source)
    if Path(source).is_file():
        # Tokenizer 2 pads with "!", id 0: SDXL was trained with open_clip.tokenize, which pads with zeros.
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!")
        names, _ = read_header(Path(source))
        if not any(k.startswith(convert.SGM_TE1_PREFIX) for k in names) and \
                any(k.startswith(convert.SGM_REFINER_TE2_PREFIX) for k in names):
            return (tokenizer_2,)  # the refiner's file: OpenCLIP bigG alone
        return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)), tokenizer_2
    out = []
    for sub in ("tokenizer", "tokenizer_2"):
        folder = _component_dir(source, sub, ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"], None,
                                _hub(revision, cache_dir))
        if folder.name != sub or not folder.is_dir():
            continue  # the refiner's pipeline has no tokenizer/
        try:
            out.append(CLIPTokenizer.from_pretrained(str(folder)))
        except Exception as e:
            raise LoadError(f"{folder}: could not load the tokenizer ({e})") from None
    if not out:
        raise LoadError(f"{source}: no tokenizer/ or tokenizer_2/ folder: not an SDXL pipeline folder")
    return tuple(out)


SDXL_VAE_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 1024, "scaling_factor": LATENT_SCALE,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def sdxl_text_encoder_configs(cross_attention_dim: int = 2048, pooled_dim: int = 1280):
    """transformers configs of SDXL's two text encoders: for the base UNet (context 2048 = 768 + 1280)
    CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 at full size; for a smaller UNet, 2-layer encoders whose
    widths add up to its context width."""
    from transformers import CLIPTextConfig
    if cross_attention_dim == 2048:
        return (CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               projection_dim=768, hidden_act="quick_gelu"),
                CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280, hidden_act="gelu"))
    w1, w2 = cross_attention_dim - pooled_dim, pooled_dim
    return (CLIPTextConfig(hidden_size=w1, intermediate_size=2 * w1, num_hidden_layers=2, num_attention_heads=2, projection_dim=w1),
            CLIPTextConfig(hidden_size=w2, intermediate_size=2 * w2, num_hidden_layers=2, num_attention_heads=2, projection_dim=w2))


def load_vae(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", revision: str | None = None,
             cache_dir: str | None = None):
    """diffusers AutoencoderKL from a pipeline folder (vae/), a VAE folder or repo (the fp16-fix VAE),
    or a single file (`first_stage_model.*`, or a bare LDM VAE file)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    source = str(source)
    if _is_repo_id(source):
        root = _download(source, ["config.json", "diffusion_pytorch_model*.safetensors", "vae/config.json",
                                  "vae/diffusion_pytorch_model*.safetensors"], "VAE", _hub(revision, cache_dir))
        source = str(root)
    p = Path(source)
    if p.is_dir():
        folder = p / "vae" if (p / "vae").is_dir() else p
        src = TensorSource(_weights_in(folder, "diffusion_pytorch_model", None))
        config = json.loads((folder / "config.json").read_text())
        names = {k: k for k in src.where}
        where = str(folder)
        with torch.device("meta"):
            model = AutoencoderKL.from_config(config)
        model = _materialize(model, names, src, dtype, device, where)
    else:
        src = TensorSource([p])
        keys = [k for k in src.where if k.startswith(convert.SGM_VAE_PREFIX)] or \
               [k for k in src.where if k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))]
        if not keys:
            raise LoadError(f"{p}: no VAE weights in this file (no `first_stage_model.*` or `encoder.*`/`decoder.*` keys)")
        config = _metadata_config(src.metadata, "vae") or SDXL_VAE_CONFIG
        # diffusers' own converter for the LDM VAE names (the VAE is a frozen part we take from diffusers)
        state = convert_ldm_vae_checkpoint({k: src.get(k) for k in keys}, config)
        with torch.device("meta"):
            model = AutoencoderKL.from_config(config)
        model = _materialize(model, {k: k for k in state}, src, dtype, device, str(p), transform=state)
    return model.eval().requires_grad_(False)


# --- text conditioning --------------------------------------------------------------------------

def encode_text(text_encoders, tokenizers, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: context (B, 77, 768 + 1280 = 2048), pooled (B, 1280).

    Both encoders' penultimate hidden states (the last layer is tuned for CLIP's contrastive loss,
    the one before keeps more token detail), concatenated along features; the pooled vector is
    text encoder 2's projected end-of-text embedding."""
    contexts, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(next(encoder.parameters()).device)  # (B, 77)
        out = encoder(ids, output_hidden_states=True)
        contexts.append(out.hidden_states[-2])  # (B, 77, hidden)
        pooled = out[0]  # for encoder 2: text_embeds (B, proj); overwritten until the last encoder
    return torch.cat(contexts, dim=-1), pooled
