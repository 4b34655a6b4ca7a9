"""Trainer: determinism, checkpoints, run-folder safety, DDP on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli
from fusionkit.config import load_raw, resolve
from fusionkit.errors import RunDirError
from fusionkit.training.checkpoint import load_weights, save_checkpoint
from fusionkit.training.trainer import lr_lambda, next_free_dir, prepare_run_dir, train


def _cfg(*overrides: str):
    return resolve(load_raw(None, ["modalities=[fou, zer]", *TINY, *overrides]))


def test_same_seed_gives_identical_results(tmp_path):
    r1 = train(_cfg("seed=3"), prepare_run_dir(tmp_path / "a", False), show_progress=False)
    r2 = train(_cfg("seed=3"), prepare_run_dir(tmp_path / "b", False), show_progress=False)
    r3 = train(_cfg("seed=4"), prepare_run_dir(tmp_path / "c", False), show_progress=False)
    m1 = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
    m2 = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    m3 = json.loads((tmp_path / "c" / "metrics.jsonl").read_text())
    assert m1["train_loss"] == m2["train_loss"]
    assert r1.test == r2.test
    assert m1["train_loss"] != m3["train_loss"]


def test_fusion_beats_chance_and_learns(tmp_path):
    r = train(_cfg("train.epochs=3"), prepare_run_dir(tmp_path / "r", False), show_progress=False)
    assert r.test["accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert all(a > 0.4 for a in r.test["unimodal_accuracy"].values())


def test_checkpoint_roundtrip_is_exact(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, "ck", model, {"epoch": 7}, optimizer=opt)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    meta = load_weights(other, tmp_path / "ck")
    assert meta["epoch"] == 7 and "param_groups" in meta["optimizer"]
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "ck", "ck/meta.json", "ck/model.safetensors", "ck/optim.safetensors"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, "ck", torch.nn.Linear(3, 4), {})
    with pytest.raises(RunDirError, match="does not fit this model"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 4)), path)


def test_run_folders_are_never_silently_reused(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, False)
    (run / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(RunDirError, match="already exists; pass --overwrite"):
        prepare_run_dir(run, False)
    assert (run / "metrics.jsonl").read_text() == "precious\n"
    assert next_free_dir(run) == tmp_path / "run-2"
    prepare_run_dir(run, True)
    assert not (run / "metrics.jsonl").exists()


def test_warmup_then_cosine_schedule():
    f = lr_lambda(_cfg("train.epochs=4", "train.warmup_epochs=1"), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(25) == pytest.approx(0.5) and f(39) < 0.01


def test_ddp_two_cpu_processes(tmp_path):
    """The multi-GPU code path (Fabric DDP) on two CPU processes with gloo."""
    out = tmp_path / "ddp"
    proc = run_cli("train", "--config", str(Path(__file__).parents[1] / "configs/presets/ddp-cpu.yaml"),
                   "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written by rank 0 only
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n"] >= 400  # both ranks' shards gathered


def test_a_last_training_batch_of_one_sample_is_left_out_when_the_model_has_batchnorm(tmp_path):
    # the digits train split has 1,200 samples: batch 1,199 leaves one, which BatchNorm (the
    # ResNet's last stage works on 1x1 maps at 16 px) cannot normalise in training mode
    cfg = resolve(load_raw(None, ["modalities=[image]", *TINY, "train.batch_size=1199",
                                  "model.encoders.image={name: timm, model_name: test_resnet, image_size: 16}"]))
    train(cfg, prepare_run_dir(tmp_path / "bn", False), show_progress=False)
    row = json.loads((tmp_path / "bn" / "metrics.jsonl").read_text())
    assert row["train_samples"] == 1199
    # without BatchNorm the sample of the last batch is trained on
    train(_cfg("train.batch_size=1199"), prepare_run_dir(tmp_path / "mlp", False), show_progress=False)
    assert json.loads((tmp_path / "mlp" / "metrics.jsonl").read_text())["train_samples"] == 1200
