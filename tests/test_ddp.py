"""DDP on two CPU processes (gloo): the LR schedule and evaluation agree with one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SPLITS = {"train": 62, "val": 21, "test": 23}  # val and test not divisible by the 2 processes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Two noisy vector views of 3 classes, with fixed split sizes."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in SPLITS.items():
        for i in range(n):
            label = int(rng.integers(3))
            a = np.eye(3)[label] + rng.normal(0, 0.8, 3)
            b = np.eye(3)[label] + rng.normal(0, 1.2, 3)
            rows.append({"a": a.round(4).tolist(), "b": b.round(4).tolist(), "label": f"c{label}", "split": split})
    path = tmp_path_factory.mktemp("ddp-data") / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(manifest: Path, out: Path, processes: int) -> None:
    placement = ["runtime.devices=2", "runtime.strategy=ddp"] if processes == 2 else []
    proc = run_cli("train", "--data", str(manifest), "--out", str(out), "--no-progress", "--fusion", "mean",
                   "--epochs", "3", "train.batch_size=8", "model.dim=16", "runtime.accelerator=cpu",
                   "runtime.threads=1", *placement)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_lr_schedule_and_evaluation_match_one_process(manifest, tmp_path):
    _train(manifest, tmp_path / "one", 1)
    _train(manifest, tmp_path / "two", 2)
    lrs = {run: [json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
           for run in ("one", "two")}
    # each process's cosine schedule spans its own share of the steps: 8 per epoch alone, 4 with two
    assert lrs["two"] == pytest.approx(lrs["one"], abs=1e-12)
    assert lrs["one"][-1] == pytest.approx(0.0, abs=1e-12) and lrs["one"][0] > 1e-4
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["val"]["n"] == SPLITS["val"] and results["test"]["n"] == SPLITS["test"]  # each sample once
    # one process evaluating the same checkpoint finds the same numbers
    proc = run_cli("eval", str(tmp_path / "two"), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(proc.stdout)
    assert single["n"] == SPLITS["test"]
    assert single["accuracy"] == results["test"]["accuracy"]
    assert single["unimodal_accuracy"] == results["test"]["unimodal_accuracy"]
    assert single["nll"] == pytest.approx(results["test"]["nll"], abs=1e-5)


def test_ddp_resume_equals_the_uninterrupted_run(manifest, tmp_path):
    # exact: the DistributedSampler's epoch continues (Fabric counts loader iterations, which restart
    # at 0 in a new process), and the random state saved by rank 0 is every rank's: all ranks are
    # seeded alike and draw the same amounts (equal padded shares, the same batch shapes)
    common = ["--data", str(manifest), "--no-progress", "--fusion", "dms", "--epochs", "3", "train.batch_size=8",
              "model.dim=16", "runtime.accelerator=cpu", "runtime.threads=1", "runtime.devices=2",
              "runtime.strategy=ddp", "train.calibrate=false"]
    whole = run_cli("train", "--out", str(tmp_path / "whole"), *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = run_cli("train", "--out", str(tmp_path / "cut"), *common, env={"FUSIONKIT_STOP_AFTER_EPOCH": "1"})
    assert cut.returncode != 0 and not (tmp_path / "cut" / "results.json").exists()
    resumed = run_cli("train", "--resume", str(tmp_path / "cut"), "--no-progress")
    assert resumed.returncode == 0 and "resuming after epoch 1 of 3" in resumed.stderr, resumed.stderr[-3000:]
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("whole", "cut")}
    assert [r["epoch"] for r in rows["cut"]] == [1, 2, 3]
    for a, b in zip(rows["whole"], rows["cut"]):
        assert a["train_loss"] == b["train_loss"] and a["val"]["accuracy"] == b["val"]["accuracy"], (a, b)
        assert a["val"]["nll"] == b["val"]["nll"]
    results = {run: json.loads((tmp_path / run / "results.json").read_text())["test"] for run in ("whole", "cut")}
    assert results["cut"]["nll"] == results["whole"]["nll"]
