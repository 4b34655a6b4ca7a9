"""The command line end to end: train, eval --json, list, config show, and bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, TINY, run_cli


def test_train_writes_a_complete_run_folder(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    for name in ("best/model.safetensors", "best/meta.json", "last/model.safetensors", "last/optim.safetensors",
                 "last/meta.json"):
        assert (tiny_run / "checkpoints" / name).is_file(), name
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["best", "last"]  # no temp left
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results["test"]["unimodal_accuracy"]) == {"fou", "kar"}
    # train.calibrate (default): one temperature per head, fitted on val and stored in best
    from safetensors.torch import load_file

    cal = results["calibration"]
    assert set(cal) == {"fou", "kar"} and all(0.05 <= c["temperature"] <= 20 for c in cal.values())
    assert all(c["ece_after"] <= c["ece_before"] + 1e-6 for c in cal.values())
    stored = load_file(str(tiny_run / "checkpoints" / "best" / "model.safetensors"))["fusion.heads.temperature"]
    assert stored.tolist() == pytest.approx([cal["fou"]["temperature"], cal["kar"]["temperature"]])
    assert json.loads((tiny_run / "checkpoints" / "best" / "meta.json").read_text())["calibration"] == cal


def test_eval_json_is_stable_and_matches_training(tiny_run):
    proc = run_cli("eval", str(tiny_run), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"accuracy", "unimodal_accuracy", "mean_weights", "n"} <= set(data)
    assert data["n"] == 400 and data["split"] == "test"
    assert set(data["mean_weights"]) == {"fou", "kar"}
    assert sum(data["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    # evaluating the best checkpoint again reproduces the test numbers written at the end of training
    results = json.loads((tiny_run / "results.json").read_text())["test"]
    assert data["accuracy"] == pytest.approx(results["accuracy"])
    assert data["unimodal_accuracy"] == pytest.approx(results["unimodal_accuracy"])
    assert data["unimodal_ece"] == pytest.approx(results["unimodal_ece"])  # calibrated heads, as trained


def test_config_show_prints_the_resolved_config(tiny_run):
    proc = run_cli("config", "show", str(tiny_run))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["modalities"] == ["fou", "kar"]
    sched = cfg["model"]["fusion"]["scheduler"]
    assert sched["name"] == "softmax" and sched["standardize"] is True and sched["temperature"] == 1.0
    assert cfg["model"]["encoders"]["fou"]["name"] == "mlp"
    proc = run_cli("config", "show", str(REPO / "configs" / "digits.yaml"), "model.fusion.mwcl_weight=0.5")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["fusion"]["mwcl_weight"] == 0.5


def test_list_shows_every_kind_and_the_example_plugin():
    proc = run_cli("list")
    assert proc.returncode == 0, proc.stderr
    for word in ("fusions", "scorers", "schedulers", "encoders", "decoders", "datasets",
                 "dms", "mc_dropout", "hf_text", "digits", "margin", "top1"):
        assert word in proc.stdout, word
    proc = run_cli("list", "scorers")
    assert "confidence" in proc.stdout and "fusions" not in proc.stdout


def test_existing_run_folder_is_not_overwritten(tiny_run):
    before = (tiny_run / "checkpoints" / "best" / "model.safetensors").read_bytes()
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(tiny_run), *TINY)
    assert proc.returncode == 2
    assert "already exists; pass --overwrite" in proc.stderr
    assert (tiny_run / "checkpoints" / "best" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["train", "--modalities", "image,txt"], "'txt' is not a modality of dataset 'digits'; did you mean 'text'?"),
    (["train", "--fusion", "atention"], "'atention' is not a fusion"),
    (["train", "train.epochz=3"], "train.epochz: unknown key"),
    (["train", "train.epochs=many"], "train.epochs: Input should be a valid integer"),
    (["train", "model.fusion.alpha=1"], "model.fusion.alpha: unknown key"),
    (["train", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["train", "data.root=/does/not/exist", "--modalities", "fou"], "digits data file not found: /does/not/exist/mfeat-"),
    (["eval", "/no/such/run"], "'/no/such/run' is not a run folder (no config.yaml)"),
    (["list", "fusion"], "'fusion' is not a component kind; did you mean 'fusions'?"),
    (["--plugins", "no_such_plugin_mod", "list"], "plugin module 'no_such_plugin_mod' cannot be imported"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, message, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_of_a_run_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("modalities: [fou]\n")
    proc = run_cli("eval", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "has no checkpoint 'best'" in proc.stderr


def test_image_text_run_end_to_end(tmp_path):
    """The README's main command, shrunk: image (tiny timm CNN) + text (bundled MiniLM)."""
    out = tmp_path / "it"
    proc = run_cli("train", "--modalities", "image,text", "--out", str(out), "--no-progress", *TINY,
                   "model.encoders.image.model_name=test_resnet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused" in proc.stdout and "image head" in proc.stdout and "text head" in proc.stdout
    data = json.loads(run_cli("eval", str(out), "--json").stdout)
    assert set(data["unimodal_accuracy"]) == {"image", "text"}
    assert 0.0 <= data["accuracy"] <= 1.0
