"""WebDataset tar shards as a data source: decoding, class scan, shuffling, rank/worker splitting,
the CLI (one process and DDP on two CPU processes), and bad input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from conftest import run_cli
from fusionkit.data.shards import plan
from fusionkit.errors import DataError
from fusionkit.registry import build

wds = pytest.importorskip("webdataset")
sf = pytest.importorskip("soundfile")
from PIL import Image  # noqa: E402

# tiny encoders; 18 train samples in batches of 6 never leave a batch of one (BatchNorm needs two)
TINY_CLI = ["--no-progress", "train.epochs=1", "train.batch_size=6", "model.dim=16", "runtime.accelerator=cpu"]
TINY_IMAGE = "model.encoders.image={name: timm, model_name: test_resnet, image_size: 32}"
LAYOUT = {"train": (3, 6), "val": (1, 4), "test": (2, 3)}  # split: (shards, samples per shard)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def wav(i: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full(800, 0.01 * (i + 1), dtype=np.float32), 8000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def write_shards(root) -> dict[str, str]:
    """Shards written by webdataset's ShardWriter into ``root``; returns the data block's shard
    patterns. Sample k has a PNG (pixel value k), a caption, a 4-float .npy (k, k+1, ...), a WAV
    and its class index k % 3 in ``.cls``; train sample 4 has no caption. Keys are global: train
    0-17 (3 shards), val 18-21 (1 shard), test 22-27 (2 shards)."""
    k = 0
    for split, (n_shards, per) in LAYOUT.items():
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=per, verbose=0) as writer:
            for _ in range(n_shards * per):
                sample = {"__key__": f"{k:06d}", "png": png(k), "npy": np.arange(k, k + 4, dtype=np.float32),
                          "wav": wav(k), "cls": str(k % 3)}
                if k != 4:
                    sample["txt"] = f"sample {k}"
                writer.write(sample)
                k += 1
    return {"train": f"{root}/train-{{000000..000002}}.tar", "val": f"{root}/val-000000.tar",
            "test": f"{root}/test-*.tar"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root)
    return root


def data(root, **extra) -> dict:
    return {"name": "webdataset", "train": f"{root}/train-{{000000..000002}}.tar", "val": f"{root}/val-000000.tar",
            "test": f"{root}/test-*.tar", **extra}


def load(root, **extra):
    ds = build("datasets", data(root, **extra), "data")
    return ds, ds.load()


def key(item) -> int:
    return int(item["id"].rsplit(":", 1)[1])


# -- reading --------------------------------------------------------------------------------------
def test_samples_decode_and_classes_come_from_the_scan(shards):
    ds, bundle = load(shards)
    specs = ds.modality_specs()
    assert {m: s.kind for m, s in specs.items()} == {"vector": "vector", "image": "image", "text": "text",
                                                      "audio": "audio"}
    assert specs["vector"].dim == 4 and bundle.classes == ["0", "1", "2"]
    assert bundle.info["summary"] == (
        "webdataset: vector <- .npy (vector, 4), image <- .png (image), text <- .txt (text), audio <- .wav (audio); "
        "label <- .cls (3 classes); train 18 samples in 3 shards, val 4 samples in 1 shards, test 6 samples in 2 shards")
    train = bundle.splits["train"]
    assert len(train) == 18 and train.counts == [6, 6, 6] and train.targets == [k % 3 for k in range(18)]
    items = list(train.partition(0, 1, 0, 1))  # in shard order, unshuffled
    assert [key(it) for it in items] == list(range(18)) and [it["index"] for it in items] == list(range(18))
    for it in items:
        k, x = key(it), it["inputs"]
        assert it["target"] == k % 3 and it["id"] == f"train-{k // 6:06d}.tar:{k:06d}"
        assert x["image"].mode == "L" and x["image"].size == (10, 8) and x["image"].getpixel((0, 0)) == k
        assert x["text"] == (None if k == 4 else f"sample {k}")
        np.testing.assert_array_equal(x["vector"], np.arange(k, k + 4, dtype=np.float32))
        assert x["audio"].shape == (1, 1600) and x["audio"].dtype == np.float32  # 8 kHz -> 16 kHz
    assert [key(it) for it in bundle.splits["test"]] == list(range(22, 28))


def test_classes_by_name_or_index(shards):
    """With data.classes, a label file's integer is an index into it; select restricts modalities."""
    _, bundle = load(shards, classes=["cat", "dog", "eel"], modalities={"image": "png"})
    assert bundle.classes == ["cat", "dog", "eel"] and list(bundle.modalities) == ["image"]
    items = list(bundle.splits["val"].select(["image"]))
    assert [it["target"] for it in items] == [k % 3 for k in range(18, 22)] and set(items[0]["inputs"]) == {"image"}


def test_train_is_shuffled_per_epoch_val_is_not(shards):
    _, bundle = load(shards, shuffle_buffer=4)
    train, val = bundle.splits["train"], bundle.splits["val"]
    first, second = [key(it) for it in train], [key(it) for it in train]
    assert sorted(first) == sorted(second) == list(range(18)) and first != second and first != list(range(18))
    assert [key(it) for it in val] == [key(it) for it in val] == [18, 19, 20, 21]


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 1), (2, 2), (4, 1), (3, 2)])
def test_ranks_and_workers_read_disjoint_parts_that_cover_every_sample(shards, world, workers):
    """Every (rank, worker) part is disjoint from the others and together they hold every sample;
    with at least as many shards as ranks each rank reads only its own shards; every rank yields
    the same number of samples (short ranks repeat some of their own)."""
    _, bundle = load(shards)
    train = bundle.splits["train"]
    parts = {(r, w): [key(it) for it in train.partition(r, world, w, workers)]
             for r in range(world) for w in range(workers)}
    firsts = {p: list(dict.fromkeys(keys)) for p, keys in parts.items()}  # without the padding repeats
    seen = [k for keys in firsts.values() for k in keys]
    assert sorted(seen) == list(range(18))  # disjoint and complete
    per_rank = [sum(len(parts[(r, w)]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1  # DDP ranks stay in lockstep
    for w in range(workers):
        assert len({len(parts[(r, w)]) for r in range(world)}) == 1  # same batches per worker on every rank
    if world <= 3:  # 3 shards: shard-level split
        for r in range(world):
            shards_of_rank = {k // 6 for w in range(workers) for k in parts[(r, w)]}
            assert shards_of_rank == set(range(r, 3, world))


def test_plan_deals_shards_then_samples():
    assert plan(5, 1, 2, 0, 1) == ([1, 3], 1, 0)  # shards 1, 3 to rank 1
    assert plan(5, 1, 2, 1, 2) == ([3], 1, 0)  # its second worker gets shard 3
    assert plan(5, 1, 2, 1, 3) == ([1, 3], 3, 1)  # 2 shards, 3 workers: every third sample
    assert plan(2, 3, 4, 0, 1) == ([0, 1], 4, 3)  # fewer shards than ranks


def test_size_skips_counting_and_fixes_each_ranks_share(shards, monkeypatch):
    import fusionkit.datasets.webdataset as module

    def no_scan(*args, **kwargs):
        raise AssertionError("the shards were scanned")

    ds = build("datasets", data(shards, classes=["0", "1", "2"], size={"train": 18, "val": 4, "test": 6}), "data")
    ds.modality_specs()  # reads the first train shard's headers only
    monkeypatch.setattr(module, "scan_shards", no_scan)
    bundle = ds.load()
    train = bundle.splits["train"]
    assert len(train) == 18 and train.targets == [] and "train 18 samples (data.size)" in bundle.info["summary"]
    assert len(list(train.partition(0, 1, 0, 1))) == 18
    assert [len(list(train.partition(r, 2, 0, 1))) for r in range(2)] == [9, 9]  # ceil(18 / 2) each


# -- the command line ------------------------------------------------------------------------------
def test_cli_trains_on_streamed_shards(shards, tmp_path):
    config = tmp_path / "wds.yaml"
    config.write_text(f"data: {{name: webdataset, train: '{shards}/train-{{000000..000002}}.tar',\n"
                      f"       val: '{shards}/val-000000.tar', test: '{shards}/test-*.tar',\n"
                      "       modalities: {image: png, feat: npy}, label: cls, shuffle_buffer: 8}\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(config), "--out", str(out), *TINY_CLI, TINY_IMAGE,
                   "train.num_workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = json.loads((out / "metrics.jsonl").read_text())
    assert epoch["train_samples"] == 18 and epoch["val"]["n"] == 4
    test = json.loads((out / "results.json").read_text())["test"]
    assert test["n"] == 6 and set(test["mean_weights"]) == {"feat", "image"}


def test_cli_ddp_two_cpu_processes_split_the_shards(shards, tmp_path):
    """DDP on gloo: rank 0 reads train shards 0 and 2 (12 samples), rank 1 shard 1 (6, repeated to
    12); evaluation gathers both ranks: the 6 test samples, 3 per rank."""
    out = tmp_path / "ddp"
    proc = run_cli("train", f"data={json.dumps(data(shards, modalities={'feat': 'npy'}))}", "--out", str(out),
                   *TINY_CLI, "runtime.devices=2", "runtime.strategy=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.jsonl").read_text())["train_samples"] == 12  # rank 0's count
    assert json.loads((out / "results.json").read_text())["test"]["n"] == 6


# -- bad input ------------------------------------------------------------------------------------
def write_tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


def test_bad_input_is_one_data_error(shards, tmp_path):
    def error(**extra) -> str:
        with pytest.raises(DataError) as err:
            ds = build("datasets", {**data(shards), **extra}, "data")
            ds.modality_specs()
            ds.load()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error(train=f"{tmp_path}/nope-{{000..003}}.tar") == (
        f"data.train: no shard matches '{tmp_path}/nope-{{000..003}}.tar' (looked for {tmp_path}/nope-000.tar)")
    assert error(train=f"{shards}/train-{{000000..000004}}.tar") == (
        f"data.train: 2 of the 5 shards of '{shards}/train-{{000000..000004}}.tar' do not exist "
        f"(first: {shards}/train-000003.tar)")
    no_label = write_tar(tmp_path / "no-label.tar", {"a.txt": b"x", "a.cls": b"0", "b.txt": b"y"})
    assert error(train=str(no_label)) == (
        "webdataset split 'train' shard 'no-label.tar' sample 'b': has no '.cls' file (data.label)")
    assert error(classes=["cat", "dog"]) == (
        "webdataset split 'train' shard 'train-000000.tar' sample '000002': label '2' is not one of the "
        "classes (cat, dog); list every class in data.classes")
    assert error(modalities={"image": "jpg"}) == (
        "data.modalities.image: no sample of the train shards has a '.jpg' file (extensions found: cls, npy, png, "
        "txt, wav)")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    assert error(train=str(tmp_path / "junk.tar")) == (
        f"webdataset shard '{tmp_path}/junk.tar' cannot be read: not a tar file, or a truncated one")


def test_bad_samples_while_streaming(shards, tmp_path):
    """Without a scan (data.size) a missing label is found while reading: one line naming shard and
    sample, or a reported skip; a broken image likewise; no random access."""
    bad = write_tar(tmp_path / "bad.tar", {"a.png": png(1), "a.cls": b"1", "b.png": png(2),
                                           "c.png": b"\x89PNG broken", "c.cls": b"0"})
    extra = {"train": str(bad), "classes": ["0", "1"], "size": {"train": 3, "val": 4, "test": 6},
             "modalities": {"image": "png"}}
    train = build("datasets", data(shards, **extra), "data").load().splits["train"]
    with pytest.raises(DataError, match=rf"^webdataset shard '{bad}' sample 'b': has no '.cls' file \(data.label\); "
                                        r"its files: png$"):
        list(train.partition(0, 1, 0, 1))  # in order
    with pytest.raises(DataError, match=r"random access"):
        train[0]
    skipping = build("datasets", data(shards, **extra, on_bad_sample="skip"), "data").load().splits["train"]
    items = list(skipping.partition(0, 1, 0, 1))
    assert items[0]["target"] == 1 and [it["id"] for it in items[1:]] == ["bad.tar:b", "bad.tar:c"]
    assert items[1]["skip"] == "has no '.cls' file (data.label); its files: png"
    assert items[2]["skip"].startswith("image 'bad.tar:c.png' cannot be decoded")
