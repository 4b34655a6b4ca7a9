"""The on-disk feature cache of frozen encoders: hits, misses, invalidation, exactness, tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit import build
from fusionkit.data.cache import (
    CacheStats,
    CachedSplit,
    PrecomputedEncoder,
    content_key,
    encoder_key,
    precompute,
)
from fusionkit.data.feature_packs import PackStore
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import EncoderOutput, ModalitySpec


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
    assert (stats.hits, stats.misses) == (1, 2)  # the repeated text is computed once
    assert torch.equal(feats[0], feats[3])
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


TEXTS = ["a seven", None, "a handwritten seven on a scanned form", "two", "a seven"]


def test_token_cache_round_trip_equals_the_live_encoder(tmp_path):
    enc = build("encoders", "hf_text", spec=ModalitySpec("text"))
    block = {"name": "hf_text"}
    split = MultimodalSplit({"text": TEXTS}, list(range(len(TEXTS))))
    stats = CacheStats()
    feats = precompute(enc, block, split, "text", tmp_path, stats, batch_size=2, tokens=True)
    assert feats[1] is None and (stats.hits, stats.misses) == (1, 3)  # the repeated text hits the first batch
    enc.eval()
    with torch.no_grad():
        for text, feat in zip(TEXTS, feats):
            if text is None:
                continue
            live = enc.encode(enc.collate([text]))
            pooled, tokens = feat
            assert torch.allclose(pooled, live.pooled[0], atol=1e-5)
            assert tokens.shape == (int(live.token_mask.sum()), 384)  # real tokens only
            assert torch.allclose(tokens, live.tokens[0][live.token_mask[0]], atol=1e-5)
    # a second pass reads every entry back, unchanged
    stats2 = CacheStats()
    again = precompute(enc, block, split, "text", tmp_path, stats2, tokens=True)
    assert (stats2.hits, stats2.misses) == (4, 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, feats) if a is not None)
    # through CachedSplit and PrecomputedEncoder: the same batch as encoding the texts together
    present = [i for i, t in enumerate(TEXTS) if t is not None]
    cached = CachedSplit(split, {"text": again})
    stand_in = PrecomputedEncoder(enc.out_dim, token_dim=enc.token_dim)
    batch = stand_in.collate([stand_in.preprocess(cached[i]["inputs"]["text"]) for i in present])
    with torch.no_grad():
        live = enc.encode(enc.collate([TEXTS[i] for i in present]))
    assert isinstance(batch, EncoderOutput)
    assert batch.tokens.shape == live.tokens.shape == (4, 10, 384)  # right-padded to the longest text
    assert torch.equal(batch.token_mask, live.token_mask)
    assert torch.allclose(batch.pooled, live.pooled, atol=1e-5)
    assert torch.allclose(batch.tokens, live.tokens, atol=1e-5)  # zeros on padding in both


def test_token_and_pooled_entries_of_one_encoder_never_collide(tmp_path):
    torch.manual_seed(0)
    enc = build("encoders", {"name": "mlp", "trainable": False}, spec=ModalitySpec("vector", dim=3))
    block = {"name": "mlp"}
    split_v = MultimodalSplit({"v": [np.arange(3, dtype=np.float32), np.ones(3, dtype=np.float32)]}, [0, 1])
    pooled_stats, token_stats = CacheStats(), CacheStats()
    pooled = precompute(enc, block, split_v, "v", tmp_path, pooled_stats)
    tokens = precompute(enc, block, split_v, "v", tmp_path, token_stats, tokens=True)
    assert (pooled_stats.misses, token_stats.hits, token_stats.misses) == (2, 0, 2)  # no cross-reads
    assert isinstance(pooled[0], torch.Tensor) and isinstance(tokens[0], tuple)
    assert tokens[0][1].shape == (1, 256)  # mlp: the pooled vector as its one token
    assert all(torch.equal(p, t[0]) and torch.equal(p, t[1][0]) for p, t in zip(pooled, tokens))
    folder = tmp_path / encoder_key(enc, block)
    # one file per split and kind, never one per sample
    assert sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) == ["pooled.safetensors", "tokens.safetensors"]
    keys = [content_key(split_v[i]["inputs"]["v"]) for i in range(2)]
    assert PackStore(folder, tokens=True).path(keys) != PackStore(folder).path(keys)
    # each kind still reads back as itself, and a damaged token pack is detected and recomputed
    entry = PackStore(folder, tokens=True).path(keys)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again_stats = CacheStats()
    again = precompute(enc, block, split_v, "v", tmp_path, again_stats, tokens=True)
    assert (again_stats.hits, again_stats.misses) == (0, 2)
    assert all(torch.allclose(a[0], t[0], atol=1e-6) for a, t in zip(again, tokens))
    assert all(isinstance(f, torch.Tensor) for f in precompute(enc, block, split_v, "v", tmp_path, CacheStats()))


def test_precomputed_encoder_pads_tokens_only_when_asked():
    plain = PrecomputedEncoder(4)
    assert torch.equal(plain.collate([torch.zeros(4), torch.ones(4)]), torch.stack([torch.zeros(4), torch.ones(4)]))
    stand_in = PrecomputedEncoder(4, token_dim=3)
    out = stand_in.collate([(torch.zeros(4), torch.ones(2, 3)), (torch.ones(4), torch.full((5, 3), 2.0))])
    assert out.pooled.shape == (2, 4) and out.tokens.shape == (2, 5, 3)
    assert out.token_mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert out.tokens[0, 2:].abs().sum() == 0 and (out.tokens[1] == 2).all()


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


def test_default_feature_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from fusionkit.data.cache import default_root

    monkeypatch.setenv("FUSIONKIT_FEATURE_CACHE", str(tmp_path / "features-here"))
    assert default_root() == tmp_path / "features-here"
    monkeypatch.delenv("FUSIONKIT_FEATURE_CACHE")
    monkeypatch.setenv("FUSIONKIT_CACHE", str(tmp_path / "all"))
    assert default_root() == tmp_path / "all" / "features"
