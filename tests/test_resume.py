"""``fusionkit train --resume`` and runs that diverge: a stopped run continues to exactly the run
never interrupted, and a NaN loss stops a run without touching its good checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from fusionkit.config import load_raw, resolve
from fusionkit.errors import ConfigError
from fusionkit.model import MultimodalModel
from fusionkit.training.checkpoint import find_checkpoint, read_meta
from fusionkit.training.trainer import prepare_run_dir, train
from test_checkpoints import cli

AUGMENT = 'train.augment=[{corrupt: "fou:gaussian_noise", p: 0.5}]'


def _cfg(*overrides: str):
    return resolve(load_raw(None, ["modalities=[fou, zer]", *TINY, "train.epochs=4", *overrides]))


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def _stopped(cfg, out: Path, epoch: int, monkeypatch) -> Path:
    """Train ``cfg`` into ``out`` and stop it (like Ctrl-C) right after epoch ``epoch`` is saved."""
    monkeypatch.setenv("FUSIONKIT_STOP_AFTER_EPOCH", str(epoch))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, prepare_run_dir(out, False), show_progress=False)
    monkeypatch.delenv("FUSIONKIT_STOP_AFTER_EPOCH")
    return out


@pytest.mark.parametrize("extra", [[], [AUGMENT]], ids=["plain", "augment"])
def test_a_resumed_run_equals_the_run_never_interrupted(extra, tmp_path, monkeypatch):
    full = train(_cfg(*extra), prepare_run_dir(tmp_path / "full", False), show_progress=False)
    cut = _stopped(_cfg(*extra), tmp_path / "cut", 2, monkeypatch)
    assert [r["epoch"] for r in _rows(cut)] == [1, 2] and not (cut / "results.json").exists()
    # a kill after the checkpoint of epoch 2 but before its metrics row, mid-way through the line
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    resumed = train(_cfg(*extra), cut, show_progress=False, resume=True)
    assert _rows(cut) == _rows(tmp_path / "full")  # every epoch once, with the very same numbers
    assert resumed.test == full.test and resumed.best_epoch == full.best_epoch
    results = [json.loads((run / "results.json").read_text()) for run in (cut, tmp_path / "full")]
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A 3-epoch run stopped after epoch 1."""
    out = tmp_path_factory.mktemp("resume") / "stopped"
    mp = pytest.MonkeyPatch()
    try:
        _stopped(_cfg("train.epochs=3"), out, 1, mp)
    finally:
        mp.undo()
    return out


def test_resume_through_the_cli_refuses_what_would_change_the_run(stopped, tmp_path, capsys, monkeypatch):
    before = (stopped / "metrics.jsonl").read_text()
    cases = [
        (["model.dim=64"], "--resume continues the run as"),
        (["train.lr=0.01"], "train.lr cannot change (0.001 -> 0.01); only runtime.accelerator"),
        (["--epochs", "5"], "train.epochs cannot change (3 -> 5)"),
        (["--out", str(tmp_path / "x")], "leave out --config, --out and --overwrite"),
        (["--overwrite"], "leave out --config, --out and --overwrite"),
    ]
    for args, message in cases:
        code, err = cli(capsys, monkeypatch, "train", "--resume", str(stopped), "--no-progress", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (stopped / "metrics.jsonl").read_text() == before and not (tmp_path / "x").exists()
    # a change of where it runs is fine; the run is then complete and says so
    code, err = cli(capsys, monkeypatch, "train", "--resume", str(stopped), "--no-progress", "runtime.threads=1")
    assert code == 0 and "resuming after epoch 1 of 3" in err, err
    assert [json.loads(r)["epoch"] for r in (stopped / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    code, err = cli(capsys, monkeypatch, "train", "--resume", str(stopped), "--no-progress")
    assert code == 2 and f"run '{stopped}' is complete (results.json exists); nothing to resume" in err, err


def test_resume_of_a_folder_without_checkpoint_or_config_is_one_line(stopped, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((stopped / "config.yaml").read_text())
    code, err = cli(capsys, monkeypatch, "train", "--resume", str(empty), "--no-progress")
    assert code == 2 and err.strip() == (f"error: run folder '{empty}' has no checkpoint to resume from (no epoch "
                                         f"finished); train it again with --out {empty} --overwrite"), err
    code, err = cli(capsys, monkeypatch, "train", "--resume", str(tmp_path / "nothing"), "--no-progress")
    assert code == 2 and "is not a run folder (no config.yaml)" in err, err


def test_an_existing_stopped_run_says_it_can_be_resumed(tmp_path, capsys, monkeypatch):
    cut = _stopped(_cfg("train.epochs=2"), tmp_path / "cut", 1, monkeypatch)
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou,zer", "--out", str(cut), *TINY)
    assert code == 2 and err.strip().endswith(f"; it stopped after epoch 1: --resume {cut} continues it"), err


# -- 6. non-finite losses --------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = MultimodalModel.loss_terms

    def poisoned(self, out, batch):  # epoch 2, step 3 (10 steps per epoch)
        terms = real(self, out, batch)
        calls["n"] += 1
        return {**terms, "task": terms["task"] * float("nan")} if calls["n"] == 13 else terms

    monkeypatch.setattr(MultimodalModel, "loss_terms", poisoned)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^epoch 2, step 3: the loss is nan: training diverged and stopped "
                                          r"\(the checkpoints of epoch 1 in .* are kept\); lower train.lr"):
        train(_cfg(), prepare_run_dir(run, False), show_progress=False)
    assert [r["epoch"] for r in _rows(run)] == [1]
    for name in ("best", "last"):
        found = find_checkpoint(run / "checkpoints", name)
        assert read_meta(found.weights)["epoch"] == 1
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(found.weights)).values())
    assert not (run / "results.json").exists()


def test_a_learning_rate_that_blows_up_is_one_line_and_no_nan_reaches_the_files(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou,zer", "--out", str(run), "--no-progress", *TINY,
                    "train.lr=1e30")
    assert code == 2 and len(err.strip().splitlines()) == 2, err  # "run folder ..." and the error
    assert "error: epoch 1, step 2: the loss is nan: training diverged and stopped (no epoch finished, so nothing " \
           "was saved); lower train.lr (now 1e+30)" in err
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert "NaN" not in path.read_text() and "Infinity" not in path.read_text(), path
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou,zer", "--out", str(tmp_path / "r2"),
                    "--no-progress", *TINY, "train.lr=1e300")
    assert code == 2 and "train.lr=1e+300 is beyond float32" in err, err


def test_metrics_never_hold_nan(tmp_path):
    from fusionkit.training.checkpoint import dumps

    assert json.loads(dumps({"nll": float("nan"), "v": [float("inf"), 1.5]})) == {"nll": None, "v": [None, 1.5]}
