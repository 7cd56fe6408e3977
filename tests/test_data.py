"""The training data pipeline: sources, image modes and formats, caption encodings, exact crop/flip/time ids,
determinism, buckets, sampler, bad inputs and the report of what was skipped.

Everything here is built in tmp_path or in memory with tiny images; nothing is downloaded.
"""

import io
import json
import re
import struct
import warnings
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from minsdxl import data
from minsdxl.data import (Augmentation, BucketBatchSampler, DataError, Dataset, collate, drop_caption, make_buckets,
                          make_demo_dataset, nearest_bucket, sample_key)


def write_image(path, height, width, colour=(200, 30, 30), caption=None):
    """A solid-colour PNG (and its .txt caption when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def gradient(height, width, horizontal=True):
    """A grey image whose value is the column (or row) number, so a pixel tells where it came from."""
    image = Image.new("L", (width, height))
    image.putdata([(x if horizontal else y) for y in range(height) for x in range(width)])
    return image.convert("RGB")


def to_uint8(pixels):
    """Undo the [-1, 1] scaling: (3, H, W) floats -> (3, H, W) integers 0..255."""
    return torch.round((pixels + 1) * 127.5).to(torch.int64)


# ------------------------------------------------------------------------------------------ sources


def test_folder_with_txt_captions(tmp_path):
    write_image(tmp_path / "b.png", 80, 120, caption="a red box")
    write_image(tmp_path / "a.jpg", 100, 64, colour=(0, 0, 255), caption="a blue box")
    write_image(tmp_path / "sub" / "c.png", 64, 64, caption="  in a subfolder ")
    write_image(tmp_path / ".ipynb_checkpoints" / "a.png", 64, 64, caption="ignored")
    ds = Dataset(train_data_dir=tmp_path, resolution=64, center_crop=True)
    assert len(ds) == 3
    assert ds.captions == ["a blue box", "a red box", "in a subfolder"]  # sorted paths, stripped
    item = ds.get(0, 1)
    assert item["pixels"].shape == (3, 64, 64) and item["pixels"].dtype == torch.float32
    assert torch.equal(to_uint8(item["pixels"])[:, 0, 0], torch.tensor([200, 30, 30]))
    assert item["time_ids"].tolist() == [80.0, 120.0, 0.0, 16.0, 64.0, 64.0]  # resized to 64x96, centre crop
    assert item["caption"] == "a red box" and item["index"] == 1 and len(item["key"]) == 64


def test_folder_image_without_txt_gets_empty_caption(tmp_path):
    write_image(tmp_path / "a.png", 64, 64, caption="a")
    write_image(tmp_path / "b.png", 64, 64)
    with pytest.warns(UserWarning, match="1 of 2 images .* no .txt caption"):
        ds = Dataset(train_data_dir=tmp_path, resolution=64)
    assert ds.captions == ["a", ""]


def test_folder_with_metadata_jsonl(tmp_path):
    write_image(tmp_path / "imgs" / "x.png", 64, 64)
    write_image(tmp_path / "imgs" / "y.png", 64, 96)
    write_image(tmp_path / "not_listed.png", 64, 64)
    rows = [{"file_name": "imgs/y.png", "text": "why", "source": "me"}, {"file_name": "imgs/x.png", "text": "ex", "source": "me"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = Dataset(train_data_dir=tmp_path, resolution=64)
    assert ds.captions == ["why", "ex"]  # the metadata's order; unlisted files are not used
    assert ds.get(0, 0)["time_ids"][:2].tolist() == [64.0, 96.0]
    ds = Dataset(train_data_dir=tmp_path, resolution=64, caption_column="source")
    assert ds.captions == ["me", "me"]
    with pytest.raises(DataError, match=re.escape("caption_column='caption'") + ".*" + re.escape("['image', 'source', 'text']")):
        Dataset(train_data_dir=tmp_path, resolution=64, caption_column="caption")


def test_in_memory_hf_dataset():
    images = [Image.new("RGB", (96, 64), (10, 20, 30)), Image.new("RGB", (64, 64), (255, 255, 255))]
    hf = datasets.Dataset.from_dict({"image": images, "text": ["dark", "white"]})
    ds = Dataset(hf, resolution=64, center_crop=True)
    assert len(ds) == 2 and ds.captions == ["dark", "white"]
    assert torch.equal(to_uint8(ds.get(0, 0)["pixels"])[:, 5, 5], torch.tensor([10, 20, 30]))
    assert torch.equal(ds.get(0, 1)["pixels"], torch.ones(3, 64, 64))
    with pytest.raises(DataError, match=re.escape("image_column='img'") + ".*" + re.escape("['image', 'text']")):
        Dataset(hf, image_column="img", resolution=64)
    with pytest.raises(DataError, match=re.escape("['image', 'text']")):
        Dataset(hf, caption_column="caption", resolution=64)


def test_hub_name_goes_through_load_dataset(monkeypatch):
    hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64))], "text": ["t"]})
    calls = []
    monkeypatch.setattr(data.datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hf)
    assert len(Dataset("someone/naruto", resolution=64)) == 1
    assert calls == [(("someone/naruto", None), {"data_dir": None, "cache_dir": None, "split": "train"})]

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load dataset 'someone/naruto'.*no internet"):
        Dataset("someone/naruto", resolution=64)


def test_exif_rotation_and_transparency(tmp_path):
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6  # stored landscape, shown portrait
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (128, 64)).save(path, exif=exif)
    path.with_suffix(".txt").write_text("p")
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("c")
    ds = Dataset(train_data_dir=tmp_path, resolution=64)
    assert ds.get(0, 1)["time_ids"][:2].tolist() == [128.0, 64.0]  # (height, width) as displayed
    assert torch.equal(ds.get(0, 0)["pixels"], torch.ones(3, 64, 64))  # transparent -> white, not black


# ------------------------------------------------------------------------- crop, flip and time ids


def test_center_crop_time_ids_and_pixels_are_exact():
    hf = datasets.Dataset.from_dict({"image": [gradient(64, 160), gradient(200, 64, horizontal=False)], "text": ["w", "t"]})
    ds = Dataset(hf, resolution=64, center_crop=True)
    wide, tall = ds.get(0, 0), ds.get(0, 1)
    assert wide["time_ids"].tolist() == [64.0, 160.0, 0.0, 48.0, 64.0, 64.0]  # (160 - 64) / 2 = 48
    assert to_uint8(wide["pixels"])[0, 0].tolist() == list(range(48, 112))  # columns 48..111 of the original
    assert tall["time_ids"].tolist() == [200.0, 64.0, 68.0, 0.0, 64.0, 64.0]  # (200 - 64) / 2 = 68
    assert to_uint8(tall["pixels"])[0, :, 0].tolist() == list(range(68, 132))


def test_flip_happens_before_the_crop():
    width = 200
    hf = datasets.Dataset.from_dict({"image": [gradient(64, width)], "text": ["g"]})
    ds = Dataset(hf, resolution=64, random_flip=True)
    seen = set()
    for epoch in range(40):
        aug = ds.augmentation(epoch, 0)
        item = ds.get(epoch, 0)
        left = aug.crop_left
        assert item["time_ids"].tolist() == [64.0, 200.0, 0.0, float(left), 64.0, 64.0]
        columns = to_uint8(item["pixels"])[0, 0].tolist()
        if aug.flip:  # column c of the flipped image holds original column width - 1 - c
            assert columns == [width - 1 - (left + j) for j in range(64)]
        else:
            assert columns == [left + j for j in range(64)]
        seen.add((aug.flip, left))
    assert {flip for flip, _ in seen} == {True, False} and len({left for _, left in seen}) > 10


def test_random_crop_top_is_exact():
    hf = datasets.Dataset.from_dict({"image": [gradient(200, 64, horizontal=False)], "text": ["g"]})
    ds = Dataset(hf, resolution=64, random_flip=True)
    tops = set()
    for epoch in range(10):
        item = ds.get(epoch, 0)
        top = int(item["time_ids"][2])
        assert item["time_ids"].tolist() == [200.0, 64.0, float(top), 0.0, 64.0, 64.0]
        assert to_uint8(item["pixels"])[0, :, 0].tolist() == list(range(top, top + 64))
        tops.add(top)
    assert len(tops) > 5


def test_resize_covers_the_target():
    hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (200, 100))], "text": [""]})
    aug = Dataset(hf, resolution=64).augmentation(0, 0)
    assert aug.original_size == (100, 200) and aug.resized_size == (64, 128) and aug.target_size == (64, 64)
    assert aug.crop_top == 0 and 0 <= aug.crop_left <= 64


# ------------------------------------------------------------------------------ determinism, keys


def test_get_is_a_pure_function_of_seed_epoch_index(tmp_path):
    make_demo_dataset(tmp_path, n=4, resolution=96)
    a = Dataset(train_data_dir=tmp_path, resolution=64, random_flip=True, seed=3)
    b = Dataset(train_data_dir=tmp_path, resolution=64, random_flip=True, seed=3)
    b.get(5, 2)  # what ran before must not matter
    for epoch, index in [(0, 0), (1, 0), (7, 3)]:
        x, y = a.get(epoch, index), b.get(epoch, index)
        assert torch.equal(x["pixels"], y["pixels"]) and x["key"] == y["key"] == a.key(epoch, index)
    decisions = {a.augmentation(e, 1) for e in range(10)}
    assert len(decisions) > 1  # epochs differ
    other = Dataset(train_data_dir=tmp_path, resolution=64, random_flip=True, seed=4)
    assert [other.augmentation(e, 1) for e in range(10)] != [a.augmentation(e, 1) for e in range(10)]
    a.set_epoch(7)
    assert torch.equal(a[3]["pixels"], b.get(7, 3)["pixels"])


def test_key_changes_with_image_caption_resolution_and_decision(tmp_path):
    write_image(tmp_path / "a.png", 80, 80, caption="one")

    def key(**kwargs):
        return Dataset(train_data_dir=tmp_path, **{"resolution": 64, "center_crop": True, **kwargs}).key(0, 0)

    base = key()
    assert key() == base
    assert Dataset(train_data_dir=tmp_path, resolution=64, center_crop=True).key(9, 0) == base  # no randomness: one key
    assert key(resolution=72) != base
    (tmp_path / "a.txt").write_text("two")
    assert key() != base
    (tmp_path / "a.txt").write_text("one")
    assert key() == base
    write_image(tmp_path / "a.png", 80, 80, colour=(1, 2, 3))
    assert key() != base
    aug = Augmentation((80, 80), (64, 64), (64, 64), False, 0, 0)
    keys = {sample_key("d", "c", aug), sample_key("d", "c", Augmentation((80, 80), (64, 64), (64, 64), True, 0, 0)),
            sample_key("d", "c", Augmentation((80, 80), (72, 72), (64, 64), False, 4, 0))}
    assert len(keys) == 3


def test_max_train_samples_is_a_seeded_subset(tmp_path):
    for i in range(10):
        write_image(tmp_path / f"{i}.png", 64, 64, caption=str(i))
    a = Dataset(train_data_dir=tmp_path, resolution=64, max_train_samples=4, seed=1)
    assert len(a) == 4 and len(set(a.captions)) == 4
    assert Dataset(train_data_dir=tmp_path, resolution=64, max_train_samples=4, seed=1).captions == a.captions
    assert Dataset(train_data_dir=tmp_path, resolution=64, max_train_samples=4, seed=2).captions != a.captions


# ------------------------------------------------------------------------------------------ buckets


def test_make_buckets():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and (704, 1408) in buckets and (1408, 704) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and max(h, w) <= 2 * min(h, w)
        assert (w, h) in buckets
    assert make_buckets(64) == [(64, 64)]
    with pytest.raises(DataError, match="multiple of 64"):
        make_buckets(1000)


def test_nearest_bucket():
    buckets = make_buckets(1024)
    assert buckets[nearest_bucket(500, 500, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(500, 1000, buckets)] == (704, 1408)
    assert buckets[nearest_bucket(3000, 1000, buckets)] == (1408, 704)  # wider than 2:1: the 2:1 bucket
    assert buckets[nearest_bucket(1080, 1920, buckets)] == (768, 1344)  # 16:9 = 1.78, 1344 / 768 = 1.75


def test_bucketing_dataset_sizes_and_time_ids():
    images = [Image.new("RGB", (128, 64)), Image.new("RGB", (64, 128)), Image.new("RGB", (90, 90)), Image.new("RGB", (250, 100))]
    hf = datasets.Dataset.from_dict({"image": images, "text": ["w", "t", "s", "ww"]})
    ds = Dataset(hf, resolution=128, bucketing=True)
    assert ds.buckets == [(64, 128), (128, 64), (128, 128)]
    assert ds.bucket_ids == [0, 1, 2, 0]
    for index, (h, w) in enumerate([(64, 128), (128, 64), (128, 128), (64, 128)]):
        item = ds.get(0, index)
        assert item["pixels"].shape == (3, h, w) and item["time_ids"][4:].tolist() == [h, w]
    assert ds.augmentation(0, 3).resized_size == (64, 160)  # 100x250 scaled by 0.64
    with pytest.raises(DataError, match="multiple of 64"):
        Dataset(hf, resolution=100, bucketing=True)
    assert Dataset(hf, resolution=100).bucket_ids == [0, 0, 0, 0]  # no bucketing: one bucket


# ------------------------------------------------------------------------------------------ sampler

BUCKET_IDS = [0] * 9 + [1] * 6 + [2] * 1 + [0] * 3 + [3] * 4  # 23 images in 4 uneven buckets


def test_sampler_covers_every_index_once_with_one_bucket_per_batch():
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0)
    assert len(sampler) == 3 + 2 + 1 + 1  # 12, 6, 1 and 4 images
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKET_IDS)))
        assert all(len({BUCKET_IDS[i] for i in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
        orders.append(batches)
    assert orders[0] != orders[1] != orders[2]
    again = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0)
    again.set_epoch(1)
    assert list(again) == orders[1]
    assert BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=1).epoch_batches(1) != orders[1]


def test_sampler_drop_last():
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 1 + 0 + 1
    assert all(len(batch) == 4 for batch in batches)


def test_skip_batches_resumes_the_tail_of_the_epoch():
    full = BucketBatchSampler(BUCKET_IDS, batch_size=3, seed=5)
    full.set_epoch(4)
    uninterrupted = list(full)
    resumed = BucketBatchSampler(BUCKET_IDS, batch_size=3, seed=5)
    resumed.set_epoch(4, skip_batches=3)
    assert len(resumed) == len(uninterrupted) - 3
    assert list(resumed) == uninterrupted[3:]
    with pytest.raises(ValueError):
        resumed.set_epoch(4, skip_batches=len(uninterrupted) + 1)


def test_rank_sharding_is_disjoint_and_even():
    world = 3
    samplers = [BucketBatchSampler(BUCKET_IDS, batch_size=2, seed=0, rank=r, world_size=world) for r in range(world)]
    single = BucketBatchSampler(BUCKET_IDS, batch_size=2, seed=0)
    for epoch in range(2):
        shards = [s.epoch_batches(epoch) for s in samplers]
        assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) == len(samplers[0]) == len(single) // world
        seen = [i for shard in shards for batch in shard for i in batch]
        assert len(seen) == len(set(seen))  # no index on two ranks
        assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for shard in shards for batch in shard)
        # The shards deal out the unsharded epoch's batches, less its last len % world_size.
        dealt = single.epoch_batches(epoch)[: world * len(shards[0])]
        assert sorted(b for shard in shards for b in shard) == sorted(dealt)
    with pytest.raises(ValueError, match="fewer than one per rank"):
        BucketBatchSampler([0, 0], batch_size=2, world_size=2)


def test_dataloader_batches_from_buckets():
    images = [Image.new("RGB", (128, 64)), Image.new("RGB", (64, 128)), Image.new("RGB", (140, 70)), Image.new("RGB", (70, 140))]
    hf = datasets.Dataset.from_dict({"image": images, "text": ["a", "b", "c", "d"]})
    ds = Dataset(hf, resolution=128, bucketing=True, random_flip=True)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    ds.set_epoch(2)
    sampler.set_epoch(2)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        h, w = batch["pixels"].shape[2:]
        assert batch["pixels"].shape == (2, 3, h, w) and batch["time_ids"].shape == (2, 6)
        assert batch["time_ids"][:, 4:].tolist() == [[h, w], [h, w]]
        assert batch["key"] == [ds.key(2, int(i)) for i in batch["index"]] and len(batch["caption"]) == 2


def test_collate_refuses_mixed_sizes():
    items = [{"pixels": torch.zeros(3, 64, 64), "caption": "", "time_ids": torch.zeros(6), "index": 0, "key": ""},
             {"pixels": torch.zeros(3, 64, 128), "caption": "", "time_ids": torch.zeros(6), "index": 1, "key": ""}]
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate(items)


def test_drop_caption():
    captions = [f"c{i}" for i in range(2000)]
    assert drop_caption(captions, 0.0) == captions
    assert drop_caption(captions, 1.0) == [""] * 2000
    dropped = drop_caption(captions, 0.3, torch.Generator().manual_seed(0))
    assert 500 < dropped.count("") < 700
    assert dropped == drop_caption(captions, 0.3, torch.Generator().manual_seed(0))
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    with pytest.raises(ValueError):
        drop_caption(captions, 1.5)


# --------------------------------------------------------------------------------------- bad inputs


def test_no_source_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="give dataset_name .* or train_data_dir"):
        Dataset()
    with pytest.raises(DataError, match="no images in " + re.escape(str(tmp_path))):
        Dataset(train_data_dir=tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        Dataset(train_data_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="no rows"):
        Dataset(datasets.Dataset.from_dict({"image": [], "text": []}))
    write_image(tmp_path / "a.png", 64, 64)
    with pytest.raises(DataError, match="no captions"):
        Dataset(train_data_dir=tmp_path)


def test_unreadable_and_tiny_images_are_skipped_with_one_warning(tmp_path):
    write_image(tmp_path / "good.png", 64, 80, caption="good")
    write_image(tmp_path / "tiny.png", 32, 200, caption="tiny")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("garbage")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "truncated.txt").write_text("truncated")
    buffer = tmp_path / "photo.jpg"
    gradient(256, 256).save(buffer, quality=95)
    (tmp_path / "cut.jpg").write_bytes(buffer.read_bytes()[:400])
    buffer.unlink()
    (tmp_path / "cut.txt").write_text("cut")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Dataset(train_data_dir=tmp_path, resolution=64)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 4 of 5 images: 3 unreadable, 1 smaller than 64 px" in messages[0]
    assert "tiny.png (32x200)" in messages[0] and "garbage.png" in messages[0]
    assert ds.captions == ["good"]
    (tmp_path / "good.png").unlink()
    with pytest.raises(DataError, match="no usable images: skipped 4 of 4"):
        Dataset(train_data_dir=tmp_path, resolution=64)


def test_bad_arguments():
    hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64))], "text": ["t"]})
    with pytest.raises(DataError, match="resolution must be at least 64"):
        Dataset(hf, resolution=32)
    with pytest.raises(DataError, match="max_train_samples"):
        Dataset(hf, resolution=64, max_train_samples=0)
    with pytest.raises(DataError, match="a name or a datasets.Dataset"):
        Dataset(["not", "a", "dataset"], resolution=64)
    with pytest.raises(DataError, match=re.escape("pick a split: dataset['train']")):
        Dataset(datasets.DatasetDict({"train": hf}), resolution=64)
    with pytest.raises(DataError, match="not both"):
        Dataset(hf, train_data_dir=".", resolution=64)


def test_bad_metadata_jsonl(tmp_path):
    write_image(tmp_path / "a.png", 64, 64)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", text}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        Dataset(train_data_dir=tmp_path, resolution=64)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match="line 2 lacks 'file_name' or 'text'"):
        Dataset(train_data_dir=tmp_path, resolution=64)
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(DataError, match="lists no images"):
        Dataset(train_data_dir=tmp_path, resolution=64)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "gone.png", "text": "x"}\n')
    with pytest.warns(UserWarning, match="skipped 1 of 2 images: 1 unreadable.*gone.png"):
        assert Dataset(train_data_dir=tmp_path, resolution=64).captions == ["ok"]


# ------------------------------------------------------------------------------------------- demo


def test_demo_dataset(tmp_path):
    first = make_demo_dataset(tmp_path / "a", n=12, resolution=64, seed=0)
    second = make_demo_dataset(tmp_path / "b", n=12, resolution=64, seed=0)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) == 24
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    ds = Dataset(train_data_dir=first, resolution=64)
    shapes = set()
    for caption in ds.captions:
        match = re.fullmatch(r"a (\w+) (circle|square|triangle) on a (\w+) background", caption)
        assert match and match[1] != match[3] and match[1] in data.DEMO_COLOURS and match[3] in data.DEMO_COLOURS
        shapes.add(match[2])
    assert shapes == {"circle", "square", "triangle"}
    assert ds.get(0, 0)["pixels"].shape == (3, 64, 64)
    assert sum(p.stat().st_size for p in first.iterdir()) < 100_000
    other_seed = Dataset(train_data_dir=make_demo_dataset(tmp_path / "c", n=12, seed=1), resolution=64)
    assert other_seed.captions != ds.captions


# ------------------------------------------------------------------------- image modes and formats

SIDE = 64  # every test image is 64 x 64, so at resolution 64 the pixels come back unresized


def png_bytes(array, colour_type):
    """A 16-bit-per-channel PNG written by hand (PIL cannot write 48-bit RGB): array (H, W) or (H, W, C) uint16.

    colour_type 0 is greyscale, 2 RGB (PNG spec, table 11.1); each row is prefixed by filter byte 0 (none).
    """
    height, width = array.shape[:2]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)  # bit depth 16, no interlace
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)  # PNG stores big-endian samples
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def on_white(rgb, alpha):
    """Reference alpha compositing: (H, W, 3) colours over white with (H, W) alpha 0..255."""
    a = alpha[..., None] / 255.0
    return rgb * a + 255.0 * (1 - a)


def saved(image, fmt):
    """The bytes of `image` saved in format `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def mode_case(mode, rng):
    """(encoded bytes, file suffix, reference (H, W, 3) floats 0..255) of a random image in `mode`.

    The reference is what a user expects the 8-bit RGB picture to be, computed with numpy only.
    """
    grey8 = rng.integers(0, 256, (SIDE, SIDE)).astype(np.uint8)
    rgb8 = rng.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (SIDE, SIDE)).astype(np.uint8)
    grey16 = rng.integers(0, 65536, (SIDE, SIDE)).astype(np.uint16)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = rng.integers(0, 256, (SIDE, SIDE)).astype(np.uint8)
    grey3 = lambda g: np.repeat(g[..., None].astype(np.float64), 3, axis=2)  # noqa: E731
    if mode == "1":
        bits = grey8 > 127
        return saved(Image.fromarray(bits), "PNG"), ".png", grey3(bits * 255.0)
    if mode == "L":
        return saved(Image.fromarray(grey8), "PNG"), ".png", grey3(grey8)
    if mode == "LA":
        image = Image.fromarray(np.stack([grey8, alpha], axis=2), "LA")
        return saved(image, "PNG"), ".png", on_white(grey3(grey8), alpha)
    if mode in ("P", "PA"):
        image = Image.new(mode, (SIDE, SIDE))
        image.putpalette(palette.tobytes())
        if mode == "P":
            image.putdata(indices.flatten().tolist())
            return saved(image, "PNG"), ".png", palette[indices].astype(np.float64)
        image.putdata(list(zip(indices.flatten().tolist(), alpha.flatten().tolist())))
        return saved(image, "TIFF"), ".tif", on_white(palette[indices].astype(np.float64), alpha)  # PNG cannot hold PA
    if mode == "P+transparency":  # a palette colour marked transparent (PNG tRNS)
        image = Image.new("P", (SIDE, SIDE))
        image.putpalette(palette.tobytes())
        image.putdata(indices.flatten().tolist())
        buffer = io.BytesIO()
        image.save(buffer, "PNG", transparency=0)
        return buffer.getvalue(), ".png", np.where((indices == 0)[..., None], 255.0, palette[indices])
    if mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb8, alpha[..., None]], axis=2))
        return saved(image, "PNG"), ".png", on_white(rgb8.astype(np.float64), alpha)
    if mode == "CMYK":
        cmyk = rng.integers(0, 256, (SIDE, SIDE, 4)).astype(np.float64)
        image = Image.fromarray(cmyk.astype(np.uint8), "CMYK")
        # Naive CMYK: each ink and black take their share of the light, R = (255 - C) (255 - K) / 255.
        return saved(image, "TIFF"), ".tif", (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    if mode == "I;16":  # a 16-bit greyscale PNG
        return saved(Image.fromarray(grey16), "PNG"), ".png", grey3(grey16 / 257.0)  # 65535 / 255 = 257
    if mode == "I (16-bit data)":
        return saved(Image.fromarray(grey16.astype(np.int32)), "TIFF"), ".tif", grey3(grey16 / 257.0)
    if mode == "I (32-bit data)":
        grey32 = rng.integers(0, 2**31 - 1, (SIDE, SIDE)).astype(np.int32)
        return saved(Image.fromarray(grey32), "TIFF"), ".tif", grey3(grey32 / (2**31 - 1) * 255)
    if mode == "F (0..1)":
        unit = rng.random((SIDE, SIDE)).astype(np.float32)
        return saved(Image.fromarray(unit), "TIFF"), ".tif", grey3(unit * 255.0)
    if mode == "F (0..255)":
        values = (rng.random((SIDE, SIDE)) * 255).astype(np.float32)
        return saved(Image.fromarray(values), "TIFF"), ".tif", grey3(values)
    if mode == "RGB 48-bit PNG":
        rgb16 = rng.integers(0, 65536, (SIDE, SIDE, 3)).astype(np.uint16)
        return png_bytes(rgb16, colour_type=2), ".png", rgb16 / 257.0
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "P", "PA", "P+transparency", "RGBA", "CMYK", "I;16", "I (16-bit data)", "I (32-bit data)",
         "F (0..1)", "F (0..255)", "RGB 48-bit PNG"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_8_bit_rgb_by_its_real_range(tmp_path, mode):
    encoded, suffix, reference = mode_case(mode, np.random.default_rng(0))
    opened = Image.open(io.BytesIO(encoded)).mode
    assert opened == mode.split(" ")[0].split("+")[0]  # the file decodes to the mode the case names
    (tmp_path / f"image{suffix}").write_bytes(encoded)
    (tmp_path / "image.txt").write_text("x")
    pixels = to_uint8(Dataset(train_data_dir=tmp_path, resolution=SIDE).get(0, 0)["pixels"])  # (3, H, W)
    got = pixels.permute(1, 2, 0).numpy().astype(np.float64)  # (H, W, 3)
    assert abs(got.mean() - reference.mean()) < 0.5, (got.mean(), reference.mean())
    assert np.abs(got - reference).max() <= 1.0  # every pixel, within the rounding of one 8-bit step


def test_deep_modes_edge_values():
    floats = Image.fromarray(np.array([[-1.0, np.nan, np.inf, 0.5]], dtype=np.float32))
    assert np.asarray(data.to_rgb(floats))[0, :, 0].tolist() == [0, 0, 255, 128]  # 0..1 data: 0.5 -> 127.5 -> 128
    ints = Image.fromarray(np.array([[-5, 0, 257, 65535]], dtype=np.int32))
    assert np.asarray(data.to_rgb(ints))[0, :, 0].tolist() == [0, 0, 1, 255]  # 16-bit data in mode I
    with pytest.raises(DataError, match="mode La"):
        data.to_rgb(Image.new("La", (2, 2)))


def test_other_formats_and_the_first_frame_of_an_animation(tmp_path):
    colours = {"a.gif": (255, 0, 0), "b.bmp": (0, 255, 0), "c.webp": (0, 0, 255), "d.tiff": (9, 99, 199),
               "e.tga": (50, 60, 70), "f.ppm": (1, 2, 3)}
    for name, colour in colours.items():
        if name.endswith(".gif"):  # two frames: red, then blue
            frames = [Image.new("RGB", (SIDE, SIDE), c) for c in (colour, (0, 0, 255))]
            frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100)
            assert Image.open(tmp_path / name).n_frames == 2
        else:
            lossless = {"lossless": True} if name.endswith(".webp") else {}
            Image.new("RGB", (SIDE, SIDE), colour).save(tmp_path / name, **lossless)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    ds = Dataset(train_data_dir=tmp_path, resolution=SIDE)
    assert ds.captions == list(colours)
    for index, colour in enumerate(colours.values()):
        assert to_uint8(ds.get(0, index)["pixels"])[:, 10, 10].tolist() == list(colour), ds.names[index]


# --------------------------------------------------------------------------------- caption encodings


def test_captions_utf8_with_bom_utf16_and_legacy_encodings(tmp_path):
    texts = {"bom": ("\ufeffcafé au lait".encode("utf-8"), "café au lait"),  # Notepad's "UTF-8 with BOM"
             "utf16": ("naïve “quotes”".encode("utf-16"), "naïve “quotes”"),  # Notepad's "Unicode", with its BOM
             "cp1252": ("crème brûlée – “fine”".encode("cp1252"), "crème brûlée – “fine”"),
             "latin1": (b"odd \x81 byte \xe9", "odd \x81 byte é")}  # 0x81 is undefined in cp1252
    for name, (encoded, _) in texts.items():
        write_image(tmp_path / f"{name}.png", SIDE, SIDE)
        (tmp_path / f"{name}.txt").write_bytes(encoded)
    fallbacks = r"2 caption files .* not UTF-8.*cp1252\.txt \(cp1252\), latin1\.txt \(latin-1\)"
    with pytest.warns(UserWarning, match=fallbacks):
        ds = Dataset(train_data_dir=tmp_path, resolution=SIDE)
    assert ds.captions == [texts[name][1] for name in sorted(texts)]
    assert ds.report().splitlines()[1:] == ["  captions not UTF-8, read as cp1252 or latin-1 (2):",
                                            "    cp1252.txt (cp1252)", "    latin1.txt (latin-1)"]


def test_metadata_jsonl_with_bom_or_cp1252(tmp_path):
    write_image(tmp_path / "a.png", SIDE, SIDE)
    line = '{"file_name": "a.png", "text": "déjà vu"}\n'
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode("utf-8"))  # UTF-8 byte-order mark
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # UTF-8 with a BOM is read without a warning
        assert Dataset(train_data_dir=tmp_path, resolution=SIDE).captions == ["déjà vu"]
    (tmp_path / "metadata.jsonl").write_bytes(line.encode("cp1252"))
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'metadata.jsonl'} is not UTF-8; read it as cp1252")):
        ds = Dataset(train_data_dir=tmp_path, resolution=SIDE)
    assert ds.captions == ["déjà vu"] and "not UTF-8, read as cp1252 (1):\n    metadata.jsonl" in ds.report()
    (tmp_path / "metadata.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match="metadata.jsonl line 1 is not an object with a 'file_name'"):
        Dataset(train_data_dir=tmp_path, resolution=SIDE)


# ------------------------------------------------------------------------------------------ report


def test_report_counts_and_names_what_was_skipped(tmp_path):
    write_image(tmp_path / "good.png", SIDE, 80, caption="good")
    write_image(tmp_path / "sub" / "tiny.png", 32, 200, caption="tiny")
    (tmp_path / "garbage.gif").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("garbage")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "photo.heic").write_bytes(b"a format PIL does not open")
    with pytest.warns(UserWarning, match=r"skipped 2 of 3 images: 1 unreadable, 1 smaller than 64 px"):
        ds = Dataset(train_data_dir=tmp_path, resolution=SIDE)
    assert ds.names == ["good.png"]
    assert ds.report() == "\n".join([
        f"{tmp_path}: 3 images found, 1 used, 2 skipped",
        "  skipped, unreadable (1):",
        "    garbage.gif (not an image format PIL can read)",
        "  skipped, smaller than 64 px (1):",
        "    sub/tiny.png (32x200)",
        "  ignored, not an image format PIL opens (2):",
        "    notes.md",
        "    photo.heic"])
    assert ds.skipped == {"unreadable": ["garbage.gif (not an image format PIL can read)"],
                          "smaller than 64 px": ["sub/tiny.png (32x200)"]}


def test_report_of_a_hub_dataset_names_rows_and_caps_the_names():
    good = {"bytes": saved(Image.new("RGB", (SIDE, SIDE)), "PNG"), "path": None}
    images = [good] + [{"bytes": b"broken", "path": None}] * 12 + [good] * 3
    hf = datasets.Dataset.from_dict({"image": images, "text": [str(i) for i in range(16)]})
    hf = hf.cast_column("image", datasets.Image())
    with pytest.warns(UserWarning, match="skipped 12 of 16 images: 12 unreadable: row 1 "):
        report = Dataset(hf, resolution=SIDE).report()
    assert report.splitlines() == [
        "the datasets.Dataset: 16 images found, 4 used, 12 skipped",
        "  skipped, unreadable (12):",
        *[f"    row {row} (not an image format PIL can read)" for row in range(1, 1 + data.REPORT_NAMES)],
        "    ... and 2 more"]
    assert "BytesIO" not in report
    subset = Dataset(hf.select([0, 13, 14, 15]), resolution=SIDE, max_train_samples=2)
    assert subset.report() == ("the datasets.Dataset: 4 images found, 2 used, 0 skipped, "
                               "2 not read (max_train_samples=2)")


def test_image_that_breaks_after_the_scan_raises_data_error_naming_it(tmp_path):
    write_image(tmp_path / "a.png", SIDE, SIDE, caption="a")
    ds = Dataset(train_data_dir=tmp_path, resolution=SIDE)
    (tmp_path / "a.png").write_bytes(b"overwritten")
    with pytest.raises(DataError, match=r"a\.png \(in .*\): not an image format PIL can read"):
        ds.get(0, 0)
    write_image(tmp_path / "a.png", SIDE, 2 * SIDE)
    with pytest.raises(DataError, match=r"a\.png .*did the file change"):
        ds.get(0, 0)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png .*FileNotFoundError"):
        ds.get(0, 0)


def test_dataset_config_name_and_cache_dir_reach_load_dataset(tmp_path):
    """train.py's --dataset_config_name picks a configuration of a Hub-style dataset and --cache_dir is
    where `datasets` keeps it (a local dataset repo with two configurations, as on the Hub)."""
    root = tmp_path / "repo"

    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for name, n in (("small", 2), ("big", 3)):
        (root / name).mkdir(parents=True)
        rows = {"image": [png(i) for i in range(n)], "text": [f"{name} {i}" for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / name / "train.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/*.parquet\n" for name in ("small", "big")) + "---\n")
    small = Dataset(dataset_name=str(root), dataset_config_name="small", resolution=64, cache_dir=tmp_path / "cache")
    assert small.captions == ["small 0", "small 1"] and any((tmp_path / "cache").iterdir())
    assert Dataset(dataset_name=str(root), dataset_config_name="big", resolution=64).captions == ["big 0", "big 1", "big 2"]
    with pytest.raises(DataError, match="dataset_config_name 'small' picks a configuration"):
        Dataset(train_data_dir=root / "small", dataset_config_name="small", resolution=64)


BLOCK_DATASETS = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):  # as on a machine without the datasets package
    def find_spec(self, name, path, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_without_the_datasets_package_folders_work_and_hub_names_say_what_is_missing(tmp_path):
    """The GPU image this project is measured on has no `datasets`: train.py, the demo data and the
    memory simulator must not need it; only a Hub dataset does, and it says so."""
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    code = BLOCK_DATASETS + f"""
import train  # imports minsdxl.data
from minsdxl.data import DataError, Dataset
print(len(Dataset(train_data_dir={str(folder)!r}, resolution=64)))
try:
    Dataset(dataset_name="lambdalabs/naruto-blip-captions", resolution=64)
except DataError as e:
    print("DataError:", e)
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "1"
    assert lines[-1].startswith("DataError: dataset 'lambdalabs/naruto-blip-captions' needs the `datasets` package")


def test_dreambooth_folder_images_all_take_the_prompt_and_repeat(tmp_path):
    """--instance_prompt and --repeats of diffusers' DreamBooth script: every image of the folder trains on the
    prompt (its .txt captions are not read, and the report says so), each image n times in a row."""
    folder = tmp_path / "dog"
    folder.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (96, 64), colour).save(folder / f"{i:03d}.png")  # wider than 64x64: a random crop
        (folder / f"{i:03d}.txt").write_text("a caption DreamBooth does not read")
    ds = Dataset(train_data_dir=folder, caption_column=None, prompt="a photo of sks dog", resolution=64, repeats=2)
    assert len(ds) == 6 and ds.captions == ["a photo of sks dog"] * 6
    assert ds.names == ["000.png", "000.png", "001.png", "001.png", "002.png", "002.png"]  # each image n times in a row
    assert any(ds.augmentation(0, i) != ds.augmentation(0, i + 1) for i in (0, 2, 4))  # each copy its own crop
    report = ds.report()
    assert "3 images found, 3 used (each 2 times: --repeats), 0 skipped" in report
    assert "not read: every image trains on the one prompt (3)" in report


def test_hub_dataset_rows_take_their_caption_or_the_instance_prompt():
    """DreamBooth with --dataset_name: --caption_column names each row's prompt, --instance_prompt fills the empty ones."""
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    hf = datasets.Dataset.from_dict({"image": images, "prompt": ["a sks dog running", "", None]})
    assert Dataset(hf, caption_column=None, prompt="sks dog", resolution=64).captions == ["sks dog"] * 3
    assert Dataset(hf, caption_column="prompt", prompt="sks dog", resolution=64).captions == ["a sks dog running", "sks dog", "sks dog"]
