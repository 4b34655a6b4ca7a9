"""What makes a warm feature-cache run fast, and keeps it exact: encoders that are never built,
checkpoints without frozen weights (checked on load), one file per split, damaged files redone;
and media decoding that is fast without changing a pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fusionkit import build
from fusionkit.config import load_raw, resolve
from fusionkit.data.cache import CacheStats, encoder_key, precompute
from fusionkit.data.cached_encoders import CachedEncoder, build_key, rng_states
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import Encoder, ModalitySpec, weights_digest
from fusionkit.encoders.timm_image import TimmImageEncoder
from fusionkit.errors import ConfigError, RunDirError
from fusionkit.training.trainer import load_data, load_run, prepare_run_dir, seed_and_build, train

LITE0 = ["model.encoders.image.model_name=efficientnet_lite0", "model.encoders.image.pretrained=bundled",
         "model.encoders.image.trainable=false", "model.encoders.image.image_size=32",
         "model.encoders.image.in_chans=3"]


def _cfg(tmp_path, *overrides):
    return resolve(load_raw(None, ["modalities=[fou, image]", "train.epochs=1", "train.batch_size=256",
                                   "model.dim=16", "runtime.accelerator=cpu", "train.cache_features=true",
                                   f"train.cache_dir={tmp_path / 'cache'}", *LITE0, *overrides]))


@pytest.fixture(scope="module")
def cold_and_warm(tmp_path_factory):
    """A cached run on digits fou (trained) + image (frozen bundled EfficientNet-Lite0), twice."""
    tmp = tmp_path_factory.mktemp("cache-speed")
    cfg = _cfg(tmp)
    bundle = load_data(cfg)
    cold_model = seed_and_build(cfg, bundle)
    initial = {k: v.clone() for k, v in cold_model.state_dict().items()}  # training changes the model
    cold = train(cfg, prepare_run_dir(tmp / "cold", False), show_progress=False, bundle=bundle, model=cold_model)
    return tmp, cfg, initial, cold


def test_warm_run_never_builds_the_cached_encoder_and_trains_the_same_model(cold_and_warm, tmp_path, monkeypatch):
    tmp, cfg, initial, cold = cold_and_warm
    assert cold.cache["by_modality"]["image"]["misses"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("the cached encoder was built")

    monkeypatch.setattr(TimmImageEncoder, "__init__", refuse)
    bundle = load_data(cfg)
    warm_model = seed_and_build(cfg, bundle)
    assert isinstance(warm_model.encoders["image"], CachedEncoder)
    assert warm_model.encoders["image"].out_dim == 1280
    # the RNG is where building the encoder leaves it: every other module starts the same
    warm_state = warm_model.state_dict()
    assert not any(k.startswith("encoders.image.") for k in warm_state)  # no weights at all
    assert {k: v for k, v in initial.items() if not k.startswith("encoders.image.")}.keys() == warm_state.keys()
    for name, p in warm_state.items():
        assert torch.equal(p, initial[name]), name
    warm = train(cfg, prepare_run_dir(tmp_path / "warm", False), show_progress=False, bundle=bundle, model=warm_model)
    assert warm.cache["misses"] == 0 and warm.cache["hits"] == cold.cache["hits"] + cold.cache["misses"]
    assert warm.test == cold.test and warm.val == cold.val
    lines = [(tmp / "cold" / "metrics.jsonl").read_text(), (tmp_path / "warm" / "metrics.jsonl").read_text()]
    assert [json.loads(x)["train_loss"] for x in lines[0].splitlines()] == \
        [json.loads(x)["train_loss"] for x in lines[1].splitlines()]


def test_another_seed_builds_the_encoder_but_reads_its_features(cold_and_warm, tmp_path):
    tmp, cfg, _, cold = cold_and_warm
    cfg = cfg.model_copy(update={"seed": cfg.seed + 1})
    model = seed_and_build(cfg, load_data(cfg))
    assert isinstance(model.encoders["image"], TimmImageEncoder)  # another RNG state: another build record
    result = train(cfg, prepare_run_dir(tmp_path / "seed", False), show_progress=False, model=model)
    assert result.cache["misses"] == 0  # the features are keyed by the weights, which are the same


def test_checkpoints_leave_frozen_weights_out_and_loading_checks_them(cold_and_warm):
    tmp, cfg, _, cold = cold_and_warm
    best = tmp / "cold" / "checkpoints" / "best"
    with safe_open(str(best / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("encoders.image.") for k in keys)
    assert any(k.startswith("encoders.fou.") for k in keys)  # the trained encoder is saved
    meta = json.loads((best / "meta.json").read_text())
    digest = meta["rebuilt_encoders"]["image"]
    _, _, model = load_run(tmp / "cold")
    assert isinstance(model.encoders["image"], TimmImageEncoder) and weights_digest(model.encoders["image"]) == digest
    meta["rebuilt_encoders"]["image"] = "0" * 64  # as if the weights file had changed since training
    (best / "meta.json").write_text(json.dumps(meta))
    try:
        with pytest.raises(RunDirError, match="encoder 'image' built from the run's config.yaml has other weights") \
                as err:
            load_run(tmp / "cold")
        assert "\n" not in str(err.value)
    finally:
        meta["rebuilt_encoders"]["image"] = digest
        (best / "meta.json").write_text(json.dumps(meta))


def test_a_stand_in_materializes_the_encoder_it_replaces(cold_and_warm):
    tmp, cfg, _, _ = cold_and_warm
    stand_in = seed_and_build(cfg, load_data(cfg)).encoders["image"]
    real = stand_in.materialize()
    assert isinstance(real, TimmImageEncoder) and weights_digest(real) == stand_in.digest
    with pytest.raises(ConfigError, match="features come from the feature cache"):
        stand_in(torch.zeros(1, 3, 32, 32))
    stand_in.digest = "0" * 64  # as if the weights file had changed during the run
    with pytest.raises(ConfigError, match="has other weights than when its features were cached"):
        stand_in.materialize()


def test_build_key_follows_the_weights_file_and_the_rng(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"1" * 10)
    block, spec, rng = {"name": "timm"}, ModalitySpec("image", channels=3), rng_states()
    first = build_key(TimmImageEncoder, block, spec, [weights], rng)
    assert build_key(TimmImageEncoder, block, spec, [weights], rng) == first
    weights.write_bytes(b"2" * 11)  # another file at the same path
    assert build_key(TimmImageEncoder, block, spec, [weights], rng) != first
    torch.rand(1)  # the RNG moved on: an encoder built now is another build
    assert build_key(TimmImageEncoder, block, spec, [weights], rng_states()) != \
        build_key(TimmImageEncoder, block, spec, [weights], rng)


def _vectors(n: int = 5):
    rng = np.random.default_rng(0)
    return MultimodalSplit({"v": [rng.normal(size=3).astype(np.float32) for _ in range(n)]}, list(range(n)))


def test_one_file_per_split_and_damaged_files_are_recomputed(tmp_path):
    torch.manual_seed(0)
    enc = build("encoders", {"name": "mlp", "trainable": False}, spec=ModalitySpec("vector", dim=3))
    block, split = {"name": "mlp"}, _vectors()
    first = precompute(enc, block, split, "v", tmp_path, CacheStats())
    folder = tmp_path / encoder_key(enc, block)
    (pack,) = folder.iterdir()
    assert pack.name.endswith(".pooled.safetensors")
    with safe_open(str(pack), "pt") as f:
        assert f.get_tensor("features").shape == (5, 256)
    for damage in ("flip", "truncate", "garbage"):
        data = bytearray(pack.read_bytes())
        if damage == "flip":
            data[-7] ^= 0xFF  # one feature value changes: the checksum no longer matches
        elif damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data = bytearray(b"not a safetensors file")
        pack.write_bytes(bytes(data))
        stats = CacheStats()
        again = precompute(enc, block, split, "v", tmp_path, stats)
        assert (stats.hits, stats.misses) == (0, 5), damage
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again, first))
    stats = CacheStats()
    precompute(enc, block, split, "v", tmp_path, stats)
    assert (stats.hits, stats.misses) == (5, 0)  # the rewritten file is whole


def test_a_changed_split_reuses_the_rows_of_other_packs(tmp_path):
    torch.manual_seed(0)
    enc = build("encoders", {"name": "mlp", "trainable": False}, spec=ModalitySpec("vector", dim=3))
    block, split = {"name": "mlp"}, _vectors()
    precompute(enc, block, split, "v", tmp_path, CacheStats())
    grown = MultimodalSplit({"v": [*split.columns["v"], np.zeros(3, dtype=np.float32)]}, list(range(6)))
    stats = CacheStats()
    precompute(enc, block, grown, "v", tmp_path, stats)
    assert (stats.hits, stats.misses) == (5, 1)
    assert len(list((tmp_path / encoder_key(enc, block)).iterdir())) == 2  # each split its own file
    assert precompute(None, block, _vectors(4), "v", tmp_path, CacheStats(), key=encoder_key(enc, block)) is not None
    unseen = MultimodalSplit({"v": [np.full(3, 7.0, dtype=np.float32)]}, [0])
    assert precompute(None, block, unseen, "v", tmp_path, CacheStats(), key=encoder_key(enc, block)) is None


class _DeviceSpy(Encoder):
    """Records where its weights and inputs are when it encodes."""

    kinds = ("vector",)
    out_dim = 2

    def __init__(self):
        super().__init__(spec=ModalitySpec("vector", dim=3))
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.seen: list[tuple[str, str]] = []

    def preprocess(self, raw):
        return torch.as_tensor(raw)

    def forward(self, x):
        self.seen.append((x.device.type, self.w.device.type))
        return torch.zeros(x.shape[0], 2)


def test_precompute_encodes_on_the_run_device(tmp_path):
    spy = _DeviceSpy()
    feats = precompute(spy, {"name": "spy"}, _vectors(3), "v", tmp_path, CacheStats(), key="spy", device="meta")
    assert spy.seen == [("meta", "meta")]  # one batch, weights and inputs on the requested device
    assert [f.shape for f in feats] == [(2,)] * 3
    cpu = _DeviceSpy()
    precompute(cpu, {"name": "spy"}, _vectors(4), "v", tmp_path, CacheStats(), key="spy-cpu")
    assert cpu.seen == [("cpu", "cpu")]  # default: where the encoder is


def test_fast_video_decoding_gives_the_plain_decoders_frames(tmp_path):
    import av

    from fusionkit.data import media
    from test_data_layer import mp4

    mp4(tmp_path / "v.mp4", frames=10, height=32, width=48, fps=5)
    with av.open(str(tmp_path / "v.mp4")) as container:  # FFmpeg's defaults: its own threads, one converter per frame
        plain = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    frames, _ = media.load_video(tmp_path / "v.mp4")
    assert frames.shape == plain.shape == (10, 32, 48, 3) and np.array_equal(frames, plain)
    few, _ = media.load_video(tmp_path / "v.mp4", max_frames=4)
    assert np.array_equal(few, plain[[0, 3, 6, 9]])
