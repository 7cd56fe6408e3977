"""The training data pipeline: sources, exact crop/flip/time ids, determinism, buckets, sampler, bad inputs.

Everything here is built in tmp_path or in memory with tiny images; nothing is downloaded.
"""

import json
import re
import warnings

import datasets
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
    assert calls == [(("someone/naruto",), {"data_dir": None, "split": "train"})]

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
