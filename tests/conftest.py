"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FUSIONKIT = Path(sys.executable).with_name("fusionkit")

# vectors only: trains in about a second per epoch
TINY = ["train.epochs=1", "train.batch_size=128", "model.dim=32", "runtime.accelerator=cpu"]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``fusionkit`` console script; returns the completed process."""
    return subprocess.run([str(FUSIONKIT), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One 2-epoch DMS run on two vector views, shared by the eval/config tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                   *TINY, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
