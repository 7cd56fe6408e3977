"""Training data: captioned images in, SDXL-ready tensors out.

What one sample goes through (the steps of diffusers' `train_text_to_image_lora_sdxl.py`, plus
the aspect-ratio buckets of kohya-ss/sd-scripts and of the SDXL paper):

    file bytes --decode, EXIF rotation, RGB-->     image      (H0, W0)
               --resize until it covers the target-->        (Hr, Wr)
               --flip left-right (maybe)-->                  (Hr, Wr)
               --crop at (top, left)-->                      (Ht, Wt)
               --uint8 to [-1, 1]-->          pixels (3, Ht, Wt)
    time_ids = (H0, W0, top, left, Ht, Wt)

The time ids are SDXL's "micro-conditioning" (Podell et al. 2023, "SDXL", section 2.2): the UNet
is told the original size, where the crop started and the size it must produce, so that at
sampling time one can ask for "an uncropped 1024 x 1024 image" with (1024, 1024, 0, 0, 1024, 1024).
The flip comes before the crop (as in diffusers and Stability's generative-models), so
`crop_left` is measured in the flipped image.

Target size: without bucketing every image is cropped to (resolution, resolution). With
bucketing (`bucketing=True`) each image goes to the bucket, a (height, width) of about
resolution^2 pixels, whose aspect ratio is nearest its own, so a wide image loses little to the
crop; `BucketBatchSampler` then batches images of one bucket together.

Randomness: the flip and the crop of sample `index` in epoch `epoch` come from a generator seeded
with a hash of (seed, epoch, index), and the batch order of an epoch from one seeded with
(seed, epoch). `Dataset.get(epoch, index)` is therefore a pure function, and resuming a run needs
only the epoch and the number of batches already done (`BucketBatchSampler.set_epoch(e, skip_batches=k)`).

Where data comes from (as with diffusers' script):
- a Hub dataset by name, e.g. `lambdalabs/naruto-blip-captions` (columns `image`, `text`), loaded
  with `datasets.load_dataset` (offline mode, HF_HUB_OFFLINE=1, is respected); or an in-memory
  `datasets.Dataset`;
- a local folder: images with a caption in a `.txt` file of the same name beside them
  (kohya's layout), or a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` per line
  (the layout of diffusers' `imagefolder`).
Images may be of any format and mode PIL opens (`to_rgb` says how each becomes 8-bit RGB); text
files are read as UTF-8, with a warning naming any that is not (`read_text`). `Dataset.report()`
says what was found, used and skipped, and why.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

try:
    import datasets  # Hub datasets (--dataset_name) only: a folder of images, the demo and the memory simulator
except ImportError:  # need none, so a machine without it (a GPU image, say) can still run them
    datasets = None


def _need_datasets(what: str) -> None:
    if datasets is None:
        raise DataError(f"{what} needs the `datasets` package, which is not installed: pip install datasets "
                        f"(or give --train_data_dir, a folder of images)")

# Every extension of a format PIL can open (.png, .jpg, .webp, .gif, .bmp, .tif, .tga, ...); some,
# like .eps (which needs Ghostscript), may still fail to decode, and are then listed as unreadable.
IMAGE_EXTENSIONS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))
# Modes with an alpha channel, put on white. RGBa is premultiplied RGBA (TIFF), PA a palette with alpha.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
# Images with a side under 64 px are skipped: at SDXL's 1024 they would be upscaled 16x or
# more, so they are almost certainly thumbnails or icons rather than training images.
MIN_SIDE = 64
# Bucket sides are multiples of 64, the step of kohya's and the SDXL paper's bucket tables. The
# UNet itself needs multiples of 32: the VAE divides by 8 and the UNet's two downsamplings by 4.
BUCKET_STEP = 64
MAX_ASPECT = 2.0  # longest / shortest side of a bucket; wider images are cropped to 2:1
# Part of every sample key: bump it when the preprocessing changes, so that latent caches
# written by older code are not reused.
KEY_VERSION = "minsdxl-data-2"  # 2: 16-bit and float images scaled by their range, no longer clipped white
TEXT_FALLBACKS = ("cp1252", "latin-1")  # the encodings `read_text` tries when a file is not UTF-8
REPORT_NAMES = 10  # Dataset.report names at most this many files per reason
EXIF_ORIENTATION = 0x0112  # values 5-8 mean the camera was turned 90 degrees


class DataError(ValueError):
    """Data that cannot be trained on; the message says what was found and what was expected."""


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Everything that decides one sample's pixels besides the image itself: sizes, flip and crop."""

    original_size: tuple[int, int]  # (H0, W0) of the decoded, EXIF-rotated image
    resized_size: tuple[int, int]  # (Hr, Wr): the smallest size that covers the target, aspect kept
    target_size: tuple[int, int]  # (Ht, Wt): (resolution, resolution), or the image's bucket
    flip: bool  # mirrored left-right, before cropping
    crop_top: int  # the crop's top-left corner in the resized (and flipped) image
    crop_left: int

    def time_ids(self) -> list[float]:
        """SDXL's six size-conditioning numbers, in the UNet's order."""
        return [*map(float, self.original_size), float(self.crop_top), float(self.crop_left), *map(float, self.target_size)]


@dataclasses.dataclass
class _Record:
    """One usable image: where its bytes are, its caption, its size and a hash of its bytes."""

    source: Path | int  # a file, or a row of the datasets.Dataset
    caption: str
    size: tuple[int, int]  # (H0, W0)
    digest: str  # sha256 of the encoded image bytes


# ------------------------------------------------------------------------------------- randomness


def seeded_generator(*parts) -> torch.Generator:
    """A torch.Generator seeded by a hash of `parts`, e.g. ("augment", seed, epoch, index).

    Hashing gives unrelated streams for neighbouring tuples ((0, 1, 2) and (0, 2, 1) share nothing),
    and the stream depends on nothing else: not on worker processes, not on what ran before.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # 63-bit seed


# ---------------------------------------------------------------------------------------- buckets


def make_buckets(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of at most resolution^2 pixels, sides multiples of 64, aspect <= 2.

    Like kohya-ss/sd-scripts' `make_bucket_resolutions`: walk the width down from `resolution` in
    steps of 64 and give each width the tallest height (a multiple of 64) that keeps the pixel
    count; stop at the first 1:2 bucket. Each bucket also appears transposed. For 1024:
    1024x1024, 1088x960, 1152x896, 1216x832, 1344x768, 1408x704 and their transposes.
    """
    if resolution % BUCKET_STEP:
        raise DataError(f"bucketing needs a resolution that is a multiple of {BUCKET_STEP}, got {resolution}")
    area = resolution * resolution
    buckets = set()
    for width in range(resolution, 0, -BUCKET_STEP):
        height = min(area // width // BUCKET_STEP * BUCKET_STEP, int(MAX_ASPECT * width) // BUCKET_STEP * BUCKET_STEP)
        buckets.update({(height, width), (width, height)})
        if height >= MAX_ASPECT * width:  # narrower widths would only repeat 1:2 with fewer pixels
            break
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's.

    Ratios are compared as log(h / w), so that 2:1 and 1:2 are equally far from 1:1; a tie goes
    to the first bucket in the list.
    """
    image = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - image))


# ------------------------------------------------------------------------------ images and pixels


def open_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB PIL image, upright (EXIF rotation applied).

    Any format PIL opens; of an animated one (GIF, APNG, WebP) the first frame, which is what
    `Image.open` decodes.
    """
    return to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image of any mode PIL decodes, each mode scaled by its real range.

    - one channel of more than 8 bits (I;16, I, F): scaled to 0..255 by `_deep_to_l`;
    - with alpha (RGBA, RGBa, LA, PA, or P with a transparent colour): put on white, since
      `convert("RGB")` alone keeps whatever colour the transparent pixels happen to store, often black;
    - the rest (1, L, P, RGB, CMYK, YCbCr, LAB, HSV): PIL's `convert("RGB")`, exact for 8-bit data.
      (48-bit RGB and 64-bit RGBA PNGs already decode to RGB and RGBA, taking each value's high byte.)
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # I;16, I;16B, I;16L, I;16N
        image = _deep_to_l(image)
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # RGBa (premultiplied, from TIFF) is un-premultiplied here
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode PIL cannot convert, e.g. "La"
        raise DataError(f"cannot convert an image of mode {image.mode} to RGB: {error}") from error


def _deep_to_l(image: Image.Image) -> Image.Image:
    """An 8-bit "L" image from a one-channel image of more than 8 bits, by the range its mode implies.

    PIL's own conversion clips every value above 255 to white, so a 16-bit greyscale PNG would
    train as a blank white image. Here the value that maps to 255 is:
    - I;16 (16-bit PNG and TIFF greyscale): 65535, so 8-bit = value / 257;
    - I (32-bit signed integers): 65535 when no value exceeds it (Pillow before 10 opened 16-bit
      PNGs as I, and many tools store 16-bit data in 32-bit TIFFs), else 2^31 - 1, the top of the range;
    - F (32-bit floats): 1.0 when no value exceeds it (the usual range of float images), else 255
      (8-bit values stored as floats).
    Values below 0 become black, as do NaNs; +inf becomes white.
    """
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    top = values[np.isfinite(values)].max(initial=0.0)
    if image.mode == "F":
        full_scale = 1.0 if top <= 1.0 else 255.0
    elif image.mode == "I" and top > 65535:
        full_scale = 2**31 - 1
    else:
        full_scale = 65535.0
    scaled = np.nan_to_num(values * (255.0 / full_scale), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))  # (H, W) uint8: mode L


def _probe(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image after EXIF rotation; raises if the file does not decode to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        rotated = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
        image.draft("RGB", (width // 8, height // 8))  # JPEG: decode at 1/8 scale, enough to prove the file is whole
        image.load()
        to_rgb(image.crop((0, 0, 1, 1)))  # one pixel proves that the mode converts
    return (width, height) if rotated else (height, width)


def _why(error: Exception) -> str:
    """What went wrong reading an image, for a message that names the file itself.

    PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names only the in-memory buffer.
    """
    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(error, DataError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def apply_augmentation(image: Image.Image, aug: Augmentation) -> torch.Tensor:
    """Resize, flip, crop and scale one RGB image as `aug` says. Returns pixels (3, Ht, Wt) in [-1, 1]."""
    (h0, w0), (hr, wr), (ht, wt) = aug.original_size, aug.resized_size, aug.target_size
    if image.size != (w0, h0):  # PIL sizes are (width, height)
        raise DataError(f"image is {image.size[1]}x{image.size[0]} but the augmentation was planned for {h0}x{w0} "
                        "(did the file change after the dataset was built?)")
    image = image.resize((wr, hr), Image.Resampling.BILINEAR)  # as diffusers; PIL widens the filter when shrinking
    if aug.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # before the crop
    image = image.crop((aug.crop_left, aug.crop_top, aug.crop_left + wt, aug.crop_top + ht))
    array = np.array(image, dtype=np.uint8)  # (Ht, Wt, 3)
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, Ht, Wt), 0 -> -1, 255 -> 1


def sample_key(image_digest: str, caption: str, aug: Augmentation) -> str:
    """sha256 naming one sample's content: the image bytes, the caption and every size/flip/crop choice.

    Two samples with the same key have the same pixels and caption, so it can name an entry of a
    latent or text cache; a changed image, caption, resolution, bucket, flip or crop gives
    another key. With random crop or flip an image has one key per decision it gets.
    """
    content = json.dumps([KEY_VERSION, image_digest, caption, dataclasses.astuple(aug)])
    return hashlib.sha256(content.encode()).hexdigest()


def _image_bytes(value, where: str) -> bytes:
    """The encoded bytes of one image-column value: datasets' {"bytes", "path"} dict, a path, bytes or a PIL image."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    if isinstance(value, dict) and value.get("path") is not None:
        return Path(value["path"]).read_bytes()
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise DataError(f"{where}: cannot read an image from a {type(value).__name__}")


# ---------------------------------------------------------------------------------------- sources


def _load_hub_dataset(name: str, data_dir: str | None, config_name: str | None = None,
                      cache_dir: str | None = None) -> datasets.Dataset:
    """The train split of a Hub (or local `datasets`-loadable) dataset, as diffusers' script loads it:
    `config_name` picks one of its configurations, `cache_dir` where downloads go."""
    _need_datasets(f"dataset {name!r}")
    try:
        return datasets.load_dataset(name, config_name, data_dir=data_dir, cache_dir=cache_dir, split="train")
    except Exception as error:  # network, missing dataset, no train split: all mean "no data"
        offline = " (offline mode is on, so it must already be in the local cache)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"could not load dataset {name!r}{offline}: {type(error).__name__}: {error}") from error


def _hub_entries(hf: datasets.Dataset, image_column: str, caption_column: str | None, prompt: str | None = None):
    """(the image column, undecoded, and [(row, caption)]) after checking the column names. With a DreamBooth
    `prompt`: every row's caption is the prompt (caption_column None), or the row's caption where it has one."""
    for role, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name is not None and name not in hf.column_names:
            raise DataError(f"{role}={name!r} is not a column of the dataset; its columns are {hf.column_names}")
    if len(hf) == 0:
        raise DataError("the dataset has no rows")
    if isinstance(hf.features[image_column], datasets.Image):
        hf = hf.cast_column(image_column, datasets.Image(decode=False))  # keep the encoded bytes: we hash them
    if caption_column is None:
        captions = [prompt] * len(hf)
    else:  # (an empty caption falls back to the prompt, as in diffusers' DreamBooth script)
        captions = [("" if c is None else str(c)) or (prompt or "") for c in hf[caption_column]]
    return hf.select_columns([image_column]), list(enumerate(captions))  # rows are then read for their image only


def read_text(path: Path) -> tuple[str, str]:
    """(the text of a file, the encoding it was read in): UTF-8, else cp1252, else latin-1.

    A UTF-8 byte-order mark is dropped (Windows editors write one), and a UTF-16 one means UTF-16
    (Notepad's "Unicode"). Bytes that are not UTF-8 are almost never valid UTF-8 by accident, so
    the fallbacks only see other encodings: most often cp1252, what Windows wrote before UTF-8
    (e with an acute accent as the one byte 0xE9); latin-1, which gives every byte a character,
    takes the files with one of the five bytes cp1252 leaves undefined. Callers warn about those two.
    """
    data = path.read_bytes()
    encodings = ["utf-8-sig", "cp1252", "latin-1"]  # utf-8-sig: UTF-8, without a leading byte-order mark
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings.insert(0, "utf-16")  # the codec reads the byte order from the mark and drops it
    for encoding in encodings:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _relative(path: Path, root: Path) -> str:
    """`path` as it is named inside the data folder `root` (sub/cat.png), or whole if it is outside."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _folder_entries(root: Path, image_column: str, caption_column: str):
    """([(image path, caption)], notes) of a folder: from metadata.jsonl if there is one, else from .txt files.

    `notes` maps a heading of `Dataset.report` to the files it is about: text that was not UTF-8,
    files that are not images.
    """
    if not root.is_dir():
        raise DataError(f"train_data_dir {str(root)!r} is not a folder")
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        return _metadata_entries(metadata, image_column, caption_column)
    return _caption_file_entries(root, image_column, caption_column)


def _metadata_entries(metadata: Path, image_column: str, caption_column: str):
    """([(image path, caption)], notes) from diffusers' imagefolder layout: one JSON object per line."""
    text, encoding = read_text(metadata)
    notes = {}
    if encoding in TEXT_FALLBACKS:
        notes[f"not UTF-8, read as {encoding}"] = [metadata.name]
        warnings.warn(f"{metadata} is not UTF-8; read it as {encoding}: check its captions, or save it as UTF-8",
                      stacklevel=4)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows += [(number, json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(f"{metadata} line {number} is not JSON: {error}") from error
    if not rows:
        raise DataError(f"{metadata} lists no images")
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{metadata} line {number} is not an object with a 'file_name' string: {row}")
    columns = ["image"] + sorted({key for _, row in rows for key in row} - {"file_name"})
    for role, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in columns:
            raise DataError(f"{role}={name!r} is not a column of {metadata}; its columns are {columns}")
    for number, row in rows:
        if caption_column not in row:
            raise DataError(f"{metadata} line {number} lacks 'file_name' or {caption_column!r}: {row}")
    return [(metadata.parent / row["file_name"], str(row[caption_column])) for _, row in rows], notes


def image_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(the image files under `root` at any depth, the other files), each sorted; hidden files and folders
    (.ipynb_checkpoints, a write in progress) are left out."""
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _listed_images(root: Path) -> tuple[list[Path], list[str], dict]:
    """(image files, other files' names, notes) of a folder of images, refused when it has none."""
    images, other_files = image_files(root)
    others = [_relative(p, root) for p in other_files if p.suffix.lower() != ".txt"]
    notes = {"ignored, not an image format PIL opens": others} if others else {}
    if not images:
        seen = f"; it has {len(others)} other files, e.g. {others[0]}" if others else ""
        raise DataError(f"no images in {root} (looked for the {len(IMAGE_EXTENSIONS)} file extensions PIL opens, "
                        f"e.g. .png .jpg .webp .gif, in subfolders too{seen})")
    return images, [_relative(p, root) for p in other_files if p.suffix.lower() == ".txt"], notes


def _prompt_entries(root: Path, prompt: str):
    """([(image path, prompt)], notes) of a DreamBooth folder: every image trains on the one prompt, as in
    diffusers' train_dreambooth_lora_sdxl.py; captions in .txt files are not read, and the report names them."""
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder")
    images, texts, notes = _listed_images(root)
    if texts:
        notes["not read: every image trains on the one prompt"] = texts
    return [(p, prompt) for p in images], notes


def _caption_file_entries(root: Path, image_column: str, caption_column: str):
    """([(image path, caption)], notes) from kohya's layout: cat.png with its caption in cat.txt, at any depth."""
    images, _, notes = _listed_images(root)
    columns = ["image", "text"]  # what diffusers' imagefolder calls the image and the caption
    for role, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in columns:
            raise DataError(f"{role}={name!r} is not a column of {root} (image files with .txt captions); "
                            f"its columns are {columns}")
    captions = [p.with_suffix(".txt") for p in images]
    missing = [p for p in captions if not p.is_file()]
    if len(missing) == len(images):
        raise DataError(f"{root} has {len(images)} images but no captions: put the caption of cat.png in cat.txt "
                        'beside it, or write a metadata.jsonl with lines like {"file_name": "cat.png", "text": "a cat"}')
    if missing:
        warnings.warn(f"{len(missing)} of {len(images)} images in {root} have no .txt caption and get an empty one "
                      f"(e.g. {missing[0].name})", stacklevel=4)
    texts = [read_text(c) if c.is_file() else ("", "utf-8") for c in captions]  # [(caption, encoding)]
    fallbacks = [f"{_relative(c, root)} ({encoding})" for c, (_, encoding) in zip(captions, texts) if encoding in TEXT_FALLBACKS]
    if fallbacks:
        notes["captions not UTF-8, read as cp1252 or latin-1"] = fallbacks
        warnings.warn(f"{len(fallbacks)} caption files in {root} are not UTF-8; read them as cp1252 or latin-1, so "
                      f"check them, or save them as UTF-8: {', '.join(fallbacks[:REPORT_NAMES])}", stacklevel=4)
    return [(p, text.strip()) for p, (text, _) in zip(images, texts)], notes


# ---------------------------------------------------------------------------------------- dataset


class Dataset(torch.utils.data.Dataset):
    """Captioned images as SDXL training samples; sample `index` of epoch `epoch` is a pure function of (seed, epoch, index).

    The arguments mean what the flags of the same names mean in diffusers'
    `train_text_to_image_lora_sdxl.py`, and `prompt` and `repeats` what --instance_prompt (or
    --class_prompt) and --repeats mean in its `train_dreambooth_lora_sdxl.py`: with a prompt, a folder's
    images all train on it, and a Hub dataset's rows too unless caption_column (then None by default)
    names their captions; with repeats each image is n samples in a row, each with its own crop and flip.
    `bucketing` and `seed` (of the crops, flips and the max_train_samples subset) are ours. Every image is read once here, to learn its size and
    hash and to skip the unreadable and the tiny ones.
    """

    def __init__(
        self,
        dataset_name: str | datasets.Dataset | None = None,
        train_data_dir: str | Path | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int = 1024,
        center_crop: bool = False,
        random_flip: bool = False,
        bucketing: bool = False,
        max_train_samples: int | None = None,
        seed: int = 0,
        dataset_config_name: str | None = None,
        cache_dir: str | Path | None = None,
        prompt: str | None = None,
        repeats: int = 1,
    ):
        if resolution < MIN_SIDE:
            raise DataError(f"resolution must be at least {MIN_SIDE}, got {resolution}")
        if max_train_samples is not None and max_train_samples < 1:
            raise DataError(f"max_train_samples must be at least 1, got {max_train_samples}")
        if repeats < 1:
            raise DataError(f"repeats must be at least 1, got {repeats}")
        if caption_column is None and prompt is None:
            raise DataError("caption_column None means every image trains on the prompt: give the prompt")
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.buckets = make_buckets(resolution) if bucketing else [(resolution, resolution)]
        self.epoch = 0  # used by __getitem__; see set_epoch

        # Where the images are: rows of a datasets.Dataset, or files. As in diffusers' script, a
        # Hub name together with train_data_dir loads that folder of the Hub dataset (data_dir).
        self._hf, self._root, notes = None, None, {}
        self.source = f"dataset {dataset_name!r}" if isinstance(dataset_name, str) else "the datasets.Dataset"
        if isinstance(dataset_name, str):
            dataset_name = _load_hub_dataset(dataset_name, None if train_data_dir is None else str(train_data_dir),
                                             dataset_config_name, None if cache_dir is None else str(cache_dir))
        elif dataset_config_name is not None:
            raise DataError(f"dataset_config_name {dataset_config_name!r} picks a configuration of a Hub dataset; "
                            f"give it with dataset_name")
        elif dataset_name is not None and train_data_dir is not None:
            raise DataError("give a datasets.Dataset or train_data_dir, not both")
        if dataset_name is not None:
            _need_datasets("a datasets.Dataset")
            if not isinstance(dataset_name, datasets.Dataset):
                hint = " (pick a split: dataset['train'])" if isinstance(dataset_name, datasets.DatasetDict) else ""
                raise DataError(f"dataset_name must be a name or a datasets.Dataset, got {type(dataset_name).__name__}{hint}")
            self._hf, entries = _hub_entries(dataset_name, image_column, caption_column, prompt)
        elif train_data_dir is not None:
            self._root = Path(train_data_dir)
            self.source = str(self._root)
            entries, notes = (_prompt_entries(self._root, prompt) if prompt is not None
                              else _folder_entries(self._root, image_column, caption_column))
        else:
            raise DataError("no data: give dataset_name (a Hub dataset) or train_data_dir (a folder of images)")
        self.image_column = image_column

        # Which entries to use: all, or max_train_samples of them in a seeded random order (as diffusers).
        order = list(range(len(entries)))
        if max_train_samples is not None:
            order = torch.randperm(len(entries), generator=seeded_generator("subset", seed)).tolist()
        records, self.skipped = self._scan([entries[i] for i in order], max_train_samples)
        self._found, self._notes, self._limit = len(entries), notes, max_train_samples  # for report()
        # --repeats: each image n times in a row (diffusers' order); each copy is a sample of its own
        self.repeats = repeats
        self._records = [r for r in records for _ in range(repeats)]
        self.bucket_ids = [nearest_bucket(*r.size, self.buckets) for r in self._records]
        # A name per image for messages and --debug_loss: its path in the folder, or the dataset row.
        self.names = [self._name(r.source) for r in self._records]

    def _scan(self, entries: list, limit: int | None) -> tuple[list[_Record], dict[str, list[str]]]:
        """Read and check each image once (size, decodability, hash); warn once about the ones skipped.

        Returns the usable images and {reason: ["name (detail)", ...]} for the others.
        """
        records, skipped = [], {"unreadable": [], f"smaller than {MIN_SIDE} px": []}
        for source, caption in entries:
            if limit is not None and len(records) == limit:
                break
            try:
                data = self._read_bytes(source)
                height, width = _probe(data)
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                skipped["unreadable"].append(f"{self._name(source)} ({_why(error)})")
                continue
            if min(height, width) < MIN_SIDE:
                skipped[f"smaller than {MIN_SIDE} px"].append(f"{self._name(source)} ({height}x{width})")
                continue
            records.append(_Record(source, caption, (height, width), hashlib.sha256(data).hexdigest()))
        skipped = {reason: names for reason, names in skipped.items() if names}
        if skipped:
            names = [name for reason_names in skipped.values() for name in reason_names]
            message = (f"skipped {len(names)} of {len(records) + len(names)} images: "
                       + ", ".join(f"{len(v)} {reason}" for reason, v in skipped.items())
                       + ": " + "; ".join(names[:5]) + ("; ..." if len(names) > 5 else ""))
            if not records:
                raise DataError(f"no usable images: {message} (in {self.source})")
            warnings.warn(message, stacklevel=3)
        return records, skipped

    def _name(self, source: Path | int) -> str:
        """How messages name an image: its path inside train_data_dir, or "row 12" of a datasets.Dataset."""
        return _relative(source, self._root) if isinstance(source, Path) else f"row {source}"

    def _read_bytes(self, source: Path | int) -> bytes:
        """The encoded bytes of one image: a file's contents or a row's image value."""
        if isinstance(source, Path):
            return source.read_bytes()
        return _image_bytes(self._hf[source][self.image_column], f"row {source}")

    def report(self) -> str:
        """What reading the data found, for the training log: images found, used and skipped, by reason.

        One line of counts, then a heading per reason (and per note: text that was not UTF-8, files
        that are not images) with at most REPORT_NAMES of its files, by their path in the folder, or
        by row for a datasets.Dataset.
        """
        skipped, used = sum(len(names) for names in self.skipped.values()), len(self) // self.repeats
        lines = [f"{self.source}: {self._found} images found, {used} used"
                 + (f" (each {self.repeats} times: --repeats)" if self.repeats > 1 else "") + f", {skipped} skipped"]
        if unread := self._found - used - skipped:
            lines[0] += f", {unread} not read (max_train_samples={self._limit})"
        headings = {**{f"skipped, {reason}": names for reason, names in self.skipped.items()}, **self._notes}
        for heading, names in headings.items():
            lines.append(f"  {heading} ({len(names)}):")
            lines += [f"    {name}" for name in names[:REPORT_NAMES]]
            if len(names) > REPORT_NAMES:
                lines.append(f"    ... and {len(names) - REPORT_NAMES} more")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def captions(self) -> list[str]:
        """The caption of every sample, in index order (e.g. to cache the text encoders' outputs)."""
        return [r.caption for r in self._records]

    def augmentation(self, epoch: int, index: int) -> Augmentation:
        """The size, flip and crop decision for sample `index` in `epoch`; needs no image decoding."""
        h0, w0 = self._records[index].size
        ht, wt = self.buckets[self.bucket_ids[index]]
        scale = max(ht / h0, wt / w0)  # the smallest scale at which the image covers the target
        hr, wr = max(ht, round(h0 * scale)), max(wt, round(w0 * scale))
        generator = seeded_generator("augment", self.seed, epoch, index)
        flip = self.random_flip and torch.rand((), generator=generator).item() < 0.5
        if self.center_crop:
            top, left = round((hr - ht) / 2), round((wr - wt) / 2)  # diffusers: int(round((h - resolution) / 2.0))
        else:
            top = int(torch.randint(0, hr - ht + 1, (), generator=generator))
            left = int(torch.randint(0, wr - wt + 1, (), generator=generator))
        return Augmentation((h0, w0), (hr, wr), (ht, wt), flip, top, left)

    def key(self, epoch: int, index: int) -> str:
        """The sample key `get(epoch, index)` returns, computed without reading the image."""
        record = self._records[index]
        return sample_key(record.digest, record.caption, self.augmentation(epoch, index))

    def get(self, epoch: int, index: int) -> dict:
        """Sample `index` as it is in `epoch`: pixels (3, Ht, Wt) in [-1, 1], caption, time_ids (6,), index, key."""
        record = self._records[index]
        aug = self.augmentation(epoch, index)
        try:
            data = self._read_bytes(record.source)
            pixels = apply_augmentation(open_image(data), aug)
        except Exception as error:  # it was read when the dataset was built: the file changed or went
            raise DataError(f"{self.names[index]} (in {self.source}): {_why(error)}") from error
        return {
            "pixels": pixels,
            "caption": record.caption,
            "time_ids": torch.tensor(aug.time_ids()),  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
            "index": index,
            "key": sample_key(hashlib.sha256(data).hexdigest(), record.caption, aug),
        }

    def set_epoch(self, epoch: int) -> None:
        """The epoch `dataset[i]` reads. A DataLoader copies the dataset into its workers when an
        epoch's iteration starts, so call this before iterating (and keep persistent_workers=False)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return self.get(self.epoch, index)


# ---------------------------------------------------------------------------------------- batches


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket, in an order that is a pure function of (seed, epoch); shardable over ranks."""

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.batch_size, self.seed, self.drop_last, self.rank, self.world_size = batch_size, seed, drop_last, rank, world_size
        self.members: dict[int, list[int]] = {}  # bucket id -> the dataset indices in it
        for index, bucket in enumerate(bucket_ids):
            self.members.setdefault(bucket, []).append(index)
        per_bucket = [len(m) // batch_size if drop_last else math.ceil(len(m) / batch_size) for m in self.members.values()]
        total = sum(per_bucket)
        self.batches_per_epoch = total // world_size  # per rank; the same in every epoch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(bucket_ids)} images make {total} batches of {batch_size}: "
                             f"fewer than one per rank for {world_size} ranks")
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Iterate over `epoch`'s batches, leaving out the first `skip_batches` (those done before a resume)."""
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} is not in [0, {self.batches_per_epoch}]")
        self.epoch, self.skip_batches = epoch, skip_batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in training order."""
        generator = seeded_generator("batches", self.seed, epoch)
        batches = []
        for bucket in sorted(self.members):
            members = self.members[bucket]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]  # mix the buckets
        # Deal the batches round-robin; the last len % world_size are left out this epoch, so that
        # every rank takes the same number of steps and no image is seen twice.
        batches = batches[: self.batches_per_epoch * self.world_size]
        return batches[self.rank :: self.world_size]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.skip_batches:]

    def __len__(self) -> int:
        """Batches the next iteration yields: the epoch's, less those skipped."""
        return self.batches_per_epoch - self.skip_batches


def collate(items: list[dict]) -> dict:
    """Stack samples into a batch with the same keys: pixels (B, 3, H, W), time_ids (B, 6), index (B,), caption and key lists."""
    sizes = sorted({tuple(item["pixels"].shape[1:]) for item in items})
    if len(sizes) > 1:
        raise ValueError(f"a batch mixes image sizes {sizes}: with bucketing, batch with BucketBatchSampler")
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),  # (B, 3, H, W)
        "caption": [item["caption"] for item in items],
        "time_ids": torch.stack([item["time_ids"] for item in items]),  # (B, 6)
        "index": torch.tensor([item["index"] for item in items]),  # (B,)
        "key": [item["key"] for item in items],
    }


def drop_caption(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by "" with probability p (caption dropout).

    The empty caption is the unconditional input of classifier-free guidance (Ho & Salimans
    2022); training on it now and then teaches the model what "no prompt" means.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    drop = torch.rand(len(captions), generator=generator) < p  # (B,)
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]


# ------------------------------------------------------------------------------------ demo dataset

DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220),
                "yellow": (240, 200, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
DEMO_SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(directory: str | Path, n: int = 16, resolution: int = 64, seed: int = 0) -> Path:
    """Write n captioned pictures of coloured shapes (000.png + 000.txt, ...) into `directory`.

    Generated by code, so the demo needs no download and no licence: "a red circle on a blue
    background" and so on, the shapes cycling and the colours, size and position drawn from
    `seed`. The same arguments write the same files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(DEMO_COLOURS)
    for i in range(n):
        generator = seeded_generator("demo", seed, i)
        shape = DEMO_SHAPES[i % len(DEMO_SHAPES)]
        colour, background = (names[j] for j in torch.randperm(len(names), generator=generator)[:2].tolist())
        u = torch.rand(3, generator=generator).tolist()
        half = resolution * (0.2 + 0.15 * u[0])  # half the shape's size: 20% to 35% of the picture
        cx = half + (resolution - 2 * half) * u[1]  # centre, kept inside the picture
        cy = half + (resolution - 2 * half) * u[2]
        image = Image.new("RGB", (resolution, resolution), DEMO_COLOURS[background])
        draw = ImageDraw.Draw(image)
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            draw.ellipse(box, fill=DEMO_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=DEMO_COLOURS[colour])
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=DEMO_COLOURS[colour])
        image.save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    return directory
