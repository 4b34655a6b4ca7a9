"""Corruption-aware training (train.augment): identity at p = 0, seeded, validated, and it
teaches the heads and scheduler to move weight off a corrupted modality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, run_cli
from fusionkit.config import load_raw, resolve
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError
from fusionkit.training.augment import AugmentConfig, AugmentedSplit, resolve_augment

SPECS = {"img": ModalitySpec("image", channels=1), "txt": ModalitySpec("text"), "vec": ModalitySpec("vector", dim=4)}


def _split(n=40):
    rng = np.random.default_rng(0)
    return MultimodalSplit({"img": [rng.random((8, 8)) for _ in range(n)],
                            "txt": [f"a caption number {i}" for i in range(n)],
                            "vec": [rng.standard_normal(4).astype(np.float32) for _ in range(n)]},
                           [i % 3 for i in range(n)])


def _aug(*entries):
    return resolve_augment([AugmentConfig(**e) for e in entries], SPECS)


def _items(ds):
    return [ds[i]["inputs"] for i in range(len(ds))]


def _same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and np.array_equal(np.asarray(x), np.asarray(y)))
               for u, v in zip(a, b) for x, y in ((u[m], v[m]) for m in u))


def test_p_zero_is_the_identity():
    split = _split()
    ds = AugmentedSplit(split, _aug({"corrupt": "img:gaussian_noise", "p": 0.0},
                                    {"corrupt": "missing:any", "p": 0.0}), seed=3)
    ds.set_epoch(5)
    assert _same(_items(ds), _items(split))


def test_augmentation_is_seeded_and_changes_with_the_epoch():
    split = _split()
    augs = _aug({"corrupt": "img:gaussian_noise", "p": 0.5, "severity": [0.5, 1.0]},
                {"corrupt": "txt:typos", "p": 0.5}, {"corrupt": "missing:any", "p": 0.3})
    a, b = AugmentedSplit(split, augs, seed=1), AugmentedSplit(split, augs, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _same(_items(a), _items(b))  # same seed and epoch: identical draws
    first = _items(a)
    a.set_epoch(3)
    assert not _same(_items(a), first)  # another epoch: other draws
    changed = sum(not np.array_equal(x["img"], y["img"]) for x, y in zip(first, _items(split)) if x["img"] is not None)
    dropped = sum(v is None for x in first for v in x.values())
    assert 0 < changed < len(split) and 0 < dropped < len(split)
    assert all(any(v is not None for v in x.values()) for x in first)  # never all missing
    assert _same(_items(split), _items(_split()))  # the wrapped split is untouched


def test_missing_any_never_drops_the_last_modality():
    split = MultimodalSplit({"img": [None] * 10, "txt": ["x"] * 10}, [0] * 10)
    ds = AugmentedSplit(split, _aug({"corrupt": "missing:any", "p": 1.0}, {"corrupt": "missing:txt", "p": 1.0}), seed=0)
    assert all(item["txt"] == "x" for item in _items(ds))


@pytest.mark.parametrize("entry, message", [
    ({"corrupt": "img:gausian_noise", "p": 0.3}, "'gausian_noise' is not a corruption; did you mean 'gaussian_noise'"),
    ({"corrupt": "audio:white_noise", "p": 0.3}, "'audio' is not a modality of this run"),
    ({"corrupt": "txt:gaussian_noise", "p": 0.3}, "applies to image, vector data, not 'text'"),
])
def test_bad_entries_name_the_fix(entry, message):
    with pytest.raises(ConfigError, match=message):
        _aug(entry)


def test_bad_entries_from_the_command_line_exit_2(tmp_path):
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(tmp_path / "r"), *TINY,
                   'train.augment=[{corrupt: "fou:typos", p: 0.3}]')
    assert proc.returncode == 2 and "train.augment.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(tmp_path / "r"), *TINY,
                   'train.augment=[{corrupt: "fou:gaussian_noise", p: 1.5}]')
    assert proc.returncode == 2 and "train.augment.0.p" in proc.stderr


def test_augmented_training_moves_weight_off_the_corrupted_modality(tmp_path):
    """Tiny six-epoch run on two views, one of them noised in training; then only that view is
    corrupted at test time and its mean weight must fall clearly."""
    out = tmp_path / "aug"
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(out), "--no-progress", *TINY,
                   "train.epochs=6", "train.batch_size=64",
                   "model.fusion.scorers=[confidence,mc_dropout,agreement]",
                   "model.fusion.scheduler={name: softmax, standardize: true, temperature: 1.0}",
                   'train.augment=[{corrupt: "fou:gaussian_noise", p: 0.4}, {corrupt: "kar:gaussian_noise", p: 0.4}]')
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "w"
    proc = run_cli("weights", str(out), "--corrupt", "fou:gaussian_noise", "--levels", "0,1", "--out", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((report / "weights.json").read_text())
    levels = data["mean_weights"]
    clean, noisy = levels[0]["mean_weights"]["fou"], levels[-1]["mean_weights"]["fou"]
    assert noisy < clean - 0.12 and noisy < 0.6 * clean, (clean, noisy)
    # the report gives each signal's scale: per modality, and the scheduler's running statistics
    assert set(data["signal_scale"]) == {"confidence", "uncertainty", "agreement"}
    assert all(v["std"] > 0 for v in data["signal_scale"].values())
    conf = [lv["signals"]["confidence"]["fou"]["mean"] for lv in levels]
    assert conf[-1] < conf[0]  # the noised view's head is less confident
    assert "quality signals" in proc.stdout and "standardised by" in proc.stdout
