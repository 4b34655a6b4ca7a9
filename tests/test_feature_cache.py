"""The on-disk feature cache of frozen encoders: hits, misses, invalidation, exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit import build
from fusionkit.data.cache import CacheStats, CachedSplit, content_key, encoder_key, precompute
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import ModalitySpec


def _split(texts):
    return MultimodalSplit({"text": texts, "v": [np.ones(3, dtype=np.float32)] * len(texts)}, [0] * len(texts))


def test_content_and_encoder_keys():
    assert content_key("a") == content_key("a") != content_key("b")
    a = np.zeros((2, 3), dtype=np.float32)
    assert content_key(a) != content_key(a.reshape(3, 2)) != content_key(a.astype(np.float64))
    spec = ModalitySpec("vector", dim=3)
    torch.manual_seed(0)
    e1 = build("encoders", {"name": "mlp", "trainable": False}, spec=spec)
    torch.manual_seed(1)
    e2 = build("encoders", {"name": "mlp", "trainable": False}, spec=spec)
    block = {"name": "mlp"}
    assert encoder_key(e1, block) == encoder_key(e1, block)
    assert encoder_key(e1, block) != encoder_key(e2, block)  # other weights
    assert encoder_key(e1, block) != encoder_key(e1, {"name": "mlp", "hidden": 5})  # other config


def test_precompute_hits_misses_and_invalidation(tmp_path):
    enc = build("encoders", "hf_text", spec=ModalitySpec("text"))
    block = {"name": "hf_text"}
    texts = ["a handwritten seven", None, "a handwritten two", "a handwritten seven"]
    split = MultimodalSplit({"text": texts}, [0, 1, 2, 3])
    stats = CacheStats()
    feats = precompute(enc, block, split, "text", tmp_path, stats)
    assert feats[1] is None and feats[0].shape == (384,)
    assert (stats.hits, stats.misses) == (0, 3)  # the repeated text is stored once but computed in one pass
    enc.eval()  # no dropout: the frozen encoder's features are a function of the text
    direct = enc._encode(enc.collate(["a handwritten two"]))[0]
    assert torch.allclose(feats[2], direct, atol=1e-5)
    stats2 = CacheStats()
    again = precompute(enc, block, split, "text", tmp_path, stats2)
    assert (stats2.hits, stats2.misses) == (3, 0)
    assert all(torch.equal(a, b) for a, b in zip(again, feats) if a is not None)
    # the content of sample 2 changes: only it is recomputed
    changed = MultimodalSplit({"text": ["a handwritten seven", None, "a handwritten nine", "a handwritten seven"]},
                              [0, 1, 2, 3])
    stats3 = CacheStats()
    new = precompute(enc, block, changed, "text", tmp_path, stats3)
    assert (stats3.hits, stats3.misses) == (2, 1)
    assert not torch.allclose(new[2], feats[2])


def test_cached_split_serves_features_and_keeps_other_modalities():
    split = _split(["x", "y"])
    feats = {"text": [torch.zeros(4), torch.ones(4)]}
    cached = CachedSplit(split, feats)
    item = cached[1]
    assert torch.equal(item["inputs"]["text"], torch.ones(4))
    assert np.array_equal(item["inputs"]["v"], np.ones(3))
    assert len(cached) == 2


def test_cached_training_gives_the_same_model_and_hits_on_the_second_run(tmp_path):
    """A frozen text encoder: training with the cache equals training without it, and run 2 hits."""
    from fusionkit.config import load_raw, resolve
    from fusionkit.training.trainer import prepare_run_dir, train

    base = ["modalities=[fou, text]", "train.epochs=1", "train.batch_size=128", "model.dim=16",
            "runtime.accelerator=cpu"]
    plain = train(resolve(load_raw(None, base)), prepare_run_dir(tmp_path / "plain", False), show_progress=False)
    cached_args = [*base, "train.cache_features=true", f"train.cache_dir={tmp_path / 'cache'}"]
    first = train(resolve(load_raw(None, cached_args)), prepare_run_dir(tmp_path / "c1", False), show_progress=False)
    second = train(resolve(load_raw(None, cached_args)), prepare_run_dir(tmp_path / "c2", False), show_progress=False)
    text = first.cache["by_modality"]["text"]
    assert text["misses"] + text["hits"] == 2000  # every caption of every split, once
    assert 0 < text["misses"] < 2000  # repeated captions hit entries written earlier in the same pass
    assert second.cache["misses"] == 0 and second.cache["hits"] == 2000
    assert "fou" not in first.cache["by_modality"]  # trainable encoders are never cached
    assert first.test["accuracy"] == pytest.approx(plain.test["accuracy"], abs=0.005)
    assert second.test == first.test
