"""Corruptions: the shared contract for every registered name, then each formula's numbers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from PIL import Image

from fusionkit.corruptions import apply_corruption, corruption_rng, parse_corruption_spec
from fusionkit.corruptions.base import MODALITY_KINDS
from fusionkit.corruptions.text import QWERTY_NEIGHBOURS
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import build, registry

NAMES = registry("corruptions").names()
TEXT = (
    "The quick brown fox jumps over the lazy dog while a curious cat watches from the old\n"
    "wooden fence, and somewhere beyond the hills a train whistles twice before it rolls\n"
    "into the small station where three travellers wait with heavy bags and tired eyes, "
    "hoping the coffee stand is still open at this late hour of the evening."
)


def make(name: str, **params):
    return build("corruptions", {"name": name, **params})


def kinds_of(name: str) -> tuple[str, ...]:
    kinds = registry("corruptions").get(name).kinds
    return MODALITY_KINDS if "*" in kinds else kinds


def sample(kind: str):
    rng = np.random.default_rng(1234)
    if kind == "image":
        return rng.uniform(0.05, 0.95, size=(32, 32, 3)).astype(np.float32)  # (H, W, C)
    if kind == "text":
        return TEXT
    if kind == "audio":
        t = np.arange(8000) / 8000.0
        tone = np.sin(2 * np.pi * 220 * t) + 0.1 * rng.normal(size=t.shape)
        return np.stack([tone, 0.5 * tone]).astype(np.float32)  # (C, T)
    if kind == "video":
        return rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)  # (F, H, W, C)
    return rng.normal(size=256).astype(np.float32)  # vector (D,)


def levenshtein(a: str, b: str) -> int:
    """Edit distance, one numpy row per character of ``a``."""
    row = np.arange(len(b) + 1)
    codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    for i, ch in enumerate(a, start=1):
        subst = row[:-1] + (codes != ord(ch))  # (len(b),) diagonal moves
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(row[1:] + 1, subst)  # deletion or substitution
        # insertion: new[j] = min_k (new[k] + j - k), a running minimum of new[k] - k
        new = np.minimum.accumulate(new - np.arange(len(new))) + np.arange(len(new))
        row = new
    return int(row[-1])


def as_float(x) -> np.ndarray:
    arr = np.asarray(x)
    return arr / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def distance(kind: str, x, y) -> float:
    """How far ``y`` is from ``x``: 1 for a dropped modality, edit fraction for text, else mean |diff|."""
    if y is None:
        return 1.0
    if kind == "text":
        return levenshtein(x, y) / len(x)
    return float(np.mean(np.abs(as_float(x) - as_float(y))))


def same(x, y) -> bool:
    if x is None or y is None:
        return x is y
    if isinstance(x, str):
        return x == y
    if isinstance(x, Image.Image):
        return isinstance(y, Image.Image) and x.mode == y.mode and same(np.asarray(x), np.asarray(y))
    return (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
            and np.array_equal(x, y))


# -- the contract, for every registered corruption --------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity_and_a_new_value(name):
    corruption = make(name)
    for kind in kinds_of(name):
        x = sample(kind)
        y = corruption(x, 0.0, np.random.default_rng(0), kind)
        assert same(x, y), (name, kind)
        if isinstance(x, np.ndarray):
            assert not np.shares_memory(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_change_grows_with_severity(name):
    corruption = make(name)
    seeds = range(40) if corruption.drops_modality else range(6)
    for kind in kinds_of(name):
        x = sample(kind)
        mean_distance = {
            s: np.mean([distance(kind, x, apply_corruption(corruption, x, s, kind, seed, 0))
                        for seed in seeds])
            for s in (0.0, 0.3, 1.0)
        }
        assert mean_distance[0.0] == 0.0, (kind, mean_distance)
        assert 0.0 < mean_distance[0.3] < mean_distance[1.0], (kind, mean_distance)


@pytest.mark.parametrize("name", NAMES)
def test_seeded(name):
    corruption = make(name)
    for kind in kinds_of(name):
        x = sample(kind)
        first = [apply_corruption(corruption, x, 0.5, kind, seed=7, sample_index=i) for i in range(10)]
        again = [apply_corruption(corruption, x, 0.5, kind, seed=7, sample_index=i)
                 for i in reversed(range(10))][::-1]  # batch order must not matter
        other = [apply_corruption(corruption, x, 0.5, kind, seed=8, sample_index=i) for i in range(10)]
        assert all(same(a, b) for a, b in zip(first, again)), kind
        if corruption.stochastic:
            assert not all(same(a, b) for a, b in zip(first, other)), kind
        else:
            assert all(same(a, b) for a, b in zip(first, other)), kind


@pytest.mark.parametrize("name", NAMES)
def test_input_not_mutated(name):
    corruption = make(name)
    for kind in kinds_of(name):
        x = sample(kind)
        before = copy.deepcopy(x)
        for seed in range(3):
            y = corruption(x, 1.0, np.random.default_rng(seed), kind)
            if isinstance(y, np.ndarray):
                assert not np.shares_memory(x, y)
        assert same(x, before), kind


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("severity", [1.5, -0.1, math.nan, "high"])
def test_severity_outside_unit_interval_is_a_config_error(name, severity):
    kind = kinds_of(name)[0]
    with pytest.raises(ConfigError, match=rf"severity for corruption '{name}' must be a number in \[0, 1\]"):
        make(name)(sample(kind), severity, np.random.default_rng(0), kind)


@pytest.mark.parametrize("name", [n for n in NAMES if "*" not in registry("corruptions").get(n).kinds])
def test_wrong_kind_is_a_config_error(name):
    corruption = make(name)
    wrong = next(k for k in MODALITY_KINDS if k not in corruption.kinds)
    with pytest.raises(ConfigError, match=f"corruption '{name}' applies to .* not '{wrong}'"):
        corruption(sample(wrong), 0.5, np.random.default_rng(0), wrong)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_strict(name):
    with pytest.raises(ConfigError, match="unknown key"):
        make(name, not_a_param=1)


def test_only_missing_drops_the_modality():
    assert [n for n in NAMES if registry("corruptions").get(n).drops_modality] == ["missing"]


# -- CLI specs and reproducible generators ----------------------------------------------------
def test_parse_corruption_spec():
    assert parse_corruption_spec("image:gaussian_noise") == ("image", "gaussian_noise")
    assert parse_corruption_spec("missing:text") == ("text", "missing")
    assert parse_corruption_spec("audio:missing") == ("audio", "missing")
    with pytest.raises(ConfigError, match="did you mean 'gaussian_noise'"):
        parse_corruption_spec("image:gausian_noise")
    for bad in ("image", "image:", "a:b:c", ":typos"):
        with pytest.raises(ConfigError, match="MODALITY:CORRUPTION"):
            parse_corruption_spec(bad)


def test_rng_depends_on_seed_sample_and_name_only():
    draw = lambda *args: corruption_rng(*args).random(4)  # noqa: E731
    assert np.array_equal(draw("typos", 3, 5), draw("typos", 3, 5))
    assert not np.array_equal(draw("typos", 3, 5), draw("typos", 3, 6))
    assert not np.array_equal(draw("typos", 3, 5), draw("word_drop", 3, 5))
    with pytest.raises(ConfigError, match="must be >= 0"):
        corruption_rng("typos", -1, 0)
    # a name builds the corruption with its defaults
    assert apply_corruption("missing", TEXT, 1.0, "text", seed=0, sample_index=0) is None


# -- images: formats and formulas -------------------------------------------------------------
IMAGE_NAMES = [n for n in NAMES if "image" in registry("corruptions").get(n).kinds]


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_formats_are_preserved(name):
    rgb = (sample("image") * 255).astype(np.uint8)
    for x in (rgb, rgb[..., 0], Image.fromarray(rgb), Image.fromarray(rgb[..., 0]),
              sample("image")[..., 0].astype(np.float64)):
        y = make(name)(x, 0.7, np.random.default_rng(0), "image")
        assert type(y) is type(x)
        if isinstance(x, Image.Image):
            assert (y.mode, y.size) == (x.mode, x.size)
        else:
            assert (y.dtype, y.shape) == (x.dtype, x.shape)
            assert 0 <= y.min() and y.max() <= (255 if x.dtype == np.uint8 else 1.0)
        assert not same(x, y)
    with pytest.raises(DataError, match="uint8 pixels in 0..255 or floats"):
        make(name)(rgb.astype(np.uint16), 0.5, np.random.default_rng(0), "image")
    with pytest.raises(DataError, match=r"shape \(H, W\) or \(H, W, C\)"):
        make(name)(np.zeros((2, 4, 4, 3)), 0.5, np.random.default_rng(0), "image")


def test_gaussian_noise_image_is_clipped_vector_is_not():
    noise = make("gaussian_noise", image_std=0.4, scale=2.0)
    image = noise(np.full((64, 64), 0.5), 1.0, np.random.default_rng(0), "image")
    assert image.min() == 0.0 and image.max() == 1.0  # std 0.4 around 0.5 hits both bounds
    vector = np.zeros(20000)
    noisy = noise(vector, 0.5, np.random.default_rng(0), "vector")
    assert noisy.std() == pytest.approx(0.5 * 2.0, rel=0.03)  # std = severity * scale
    assert np.abs(noisy).max() > 1.0


def test_gaussian_blur_formula():
    blur = make("gaussian_blur", max_sigma=2.0)
    flat = np.full((16, 16, 3), 0.25)
    assert np.allclose(blur(flat, 1.0, np.random.default_rng(0), "image"), 0.25)  # kernel sums to 1
    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    out = blur(impulse, 0.5, np.random.default_rng(0), "image")  # sigma = 0.5 * 2 = 1 px
    rows = np.arange(41) - 20
    spread = np.sqrt(np.sum(out.sum(axis=1) * rows**2))
    assert out.sum() == pytest.approx(1.0) and spread == pytest.approx(1.0, rel=0.02)


def test_occlusion_formula():
    occlusion = make("occlusion", max_side=0.5)
    for severity, side in ((0.3, 5), (1.0, 16)):  # round(severity * 0.5 * 32)
        out = occlusion(np.ones((32, 40, 3)), severity, np.random.default_rng(1), "image")
        zero = (out == 0).all(axis=-1)
        rows, cols = np.nonzero(zero)
        assert zero.sum() == side * side
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side


def test_salt_pepper_formula():
    gray = np.full((100, 100, 3), 0.5)
    out = make("salt_pepper", max_fraction=0.3)(gray, 0.5, np.random.default_rng(0), "image")
    hit = (out != 0.5).all(axis=-1)
    assert abs(int(hit.sum()) - 1500) <= 1  # 0.5 * 0.3 * 100 * 100, stochastically rounded
    assert set(np.unique(out[hit])) == {0.0, 1.0}
    assert (out != 0.5).any(axis=-1).sum() == hit.sum()  # all channels of a pixel together


def test_contrast_formula():
    x = sample("image").astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    half = make("contrast")(x, 0.5, np.random.default_rng(0), "image")
    assert np.allclose(half, mean + 0.5 * (x - mean))
    flat = make("contrast")(x, 1.0, np.random.default_rng(0), "image")
    assert np.allclose(flat, np.broadcast_to(mean, x.shape))


# -- text -------------------------------------------------------------------------------------
def test_qwerty_map_is_symmetric_and_complete():
    assert sorted(QWERTY_NEIGHBOURS) == list("abcdefghijklmnopqrstuvwxyz")
    for key, neighbours in QWERTY_NEIGHBOURS.items():
        assert key not in neighbours
        assert all(key in QWERTY_NEIGHBOURS[n] for n in neighbours), key


def test_typos_formula():
    text = "Hello World " * 50
    out = make("typos", max_rate=0.4)(text, 0.5, np.random.default_rng(0), "text")
    letters = sum(ch.isalpha() for ch in text)
    changed = [(a, b) for a, b in zip(text, out) if a != b]
    assert len(out) == len(text)
    assert abs(len(changed) - 0.5 * 0.4 * letters) <= 1
    for a, b in changed:
        assert b.lower() in QWERTY_NEIGHBOURS[a.lower()] and a.isupper() == b.isupper()


def test_word_mask_formula():
    words = TEXT.split()
    out = make("word_mask", token="<unk>")(TEXT, 0.5, np.random.default_rng(0), "text")
    masked = out.split()
    assert len(masked) == len(words) and out.count("\n") == TEXT.count("\n")
    assert abs(masked.count("<unk>") - 0.5 * len(words)) <= 1
    assert all(m in ("<unk>", w) for m, w in zip(masked, words))


def test_word_drop_formula():
    words = TEXT.split()
    out = make("word_drop")(TEXT, 0.5, np.random.default_rng(0), "text")
    kept = out.split()
    assert abs(len(kept) - 0.5 * len(words)) <= 1
    remaining = iter(words)
    assert all(w in remaining for w in kept)  # kept words stay in order
    assert len(make("word_drop")("  one two  three ", 1.0, np.random.default_rng(3), "text").split()) == 1
    assert make("word_drop")("   ", 1.0, np.random.default_rng(0), "text") == "   "
    with pytest.raises(DataError, match="expects a str"):
        make("word_drop")(42, 0.5, np.random.default_rng(0), "text")


# -- audio, video, vectors, missing -----------------------------------------------------------
def test_white_noise_snr():
    wave = sample("audio")
    out = make("white_noise", max_snr=40.0, min_snr=0.0)(wave, 0.5, np.random.default_rng(0), "audio")
    snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean((out - wave).astype(np.float64) ** 2))
    assert out.dtype == wave.dtype and snr == pytest.approx(20.0, abs=0.2)  # 40 - 0.5 * 40
    with pytest.raises(ConfigError, match="min_snr .* must be below max_snr"):
        make("white_noise", min_snr=10.0, max_snr=5.0)


def test_time_dropout_formula():
    wave = sample("audio") + 2.0  # no sample is zero before the corruption
    out = make("time_dropout", chunks=20)(wave, 0.35, np.random.default_rng(0), "audio")
    zeroed = (out == 0).all(axis=0)
    assert (out == 0).any(axis=0).sum() == zeroed.sum()  # all channels of a time step together
    assert zeroed.mean() in (pytest.approx(0.35), pytest.approx(0.30), pytest.approx(0.40))
    assert (make("time_dropout")(wave[0], 1.0, np.random.default_rng(0), "audio") == 0).all()


def test_frame_drop_formula():
    video = sample("video")  # (8, 16, 16, 3), every frame distinct
    for seed in range(5):
        out = make("frame_drop")(video, 0.5, np.random.default_rng(seed), "video")
        source = [next(j for j in range(8) if np.array_equal(out[f], video[j])) for f in range(8)]
        assert source[0] == 0 and all(s <= f for f, s in enumerate(source))
        assert sum(s != f for f, s in enumerate(source)) in (3, 4)  # 0.5 * 7 frames
    frozen = make("frame_drop")(video, 1.0, np.random.default_rng(0), "video")
    assert all(np.array_equal(frame, video[0]) for frame in frozen)


def test_frame_noise_std():
    video = np.full((4, 32, 32, 3), 0.5, dtype=np.float32)
    out = make("frame_noise", max_std=0.1)(video, 0.5, np.random.default_rng(0), "video")
    assert out.dtype == np.float32 and (out - video).std() == pytest.approx(0.05, rel=0.03)


def test_feature_dropout_formula():
    vector = sample("vector")
    out = make("feature_dropout")(vector, 0.25, np.random.default_rng(0), "vector")
    assert abs(int((out == 0).sum()) - 64) <= 1  # 0.25 * 256
    assert np.array_equal(out[out != 0], vector[out != 0])


def test_missing_drops_with_probability_severity():
    missing = make("missing")
    drops = [missing(TEXT, 0.3, np.random.default_rng(s), "text") is None for s in range(2000)]
    assert np.mean(drops) == pytest.approx(0.3, abs=0.03)
    assert all(missing(np.ones(3), 1.0, np.random.default_rng(s), "anything") is None for s in range(50))
