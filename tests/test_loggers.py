"""Experiment loggers: flattening, the JSONL record, TensorBoard event files and an MLflow file store."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

from fusionkit.errors import ConfigError
from fusionkit.registry import build
from fusionkit.training.loggers import JsonlLogger, MlflowLogger, TensorBoardLogger, build_loggers, flatten, flatten_config

RECORD = {"epoch": 2, "train_loss": 0.5, "lr": 1e-3, "val": {"accuracy": 0.75, "nll": None, "per_type": "x",
                                                              "mean_weights": {"image": 0.6, "text": 0.4}}}


def test_flatten_keeps_finite_numbers_by_path():
    assert flatten(RECORD) == {"epoch": 2.0, "train_loss": 0.5, "lr": 1e-3, "val/accuracy": 0.75,
                               "val/mean_weights/image": 0.6, "val/mean_weights/text": 0.4}
    assert flatten({"a": float("nan"), "b": float("inf"), "c": True, "d": [1, 2]}) == {}
    assert flatten_config({"train": {"lr": 0.001, "augment": []}, "modalities": ["image", "text"], "seed": 0}) == {
        "train.lr": "0.001", "train.augment": "[]", "modalities": '["image", "text"]', "seed": "0"}


def test_build_loggers_puts_jsonl_first_and_always():
    loggers = build_loggers(["tensorboard"])
    assert [type(lg) for lg in loggers] == [JsonlLogger, TensorBoardLogger]
    assert [type(lg) for lg in build_loggers([{"name": "mlflow", "experiment": "e"}, "jsonl"])] == [JsonlLogger, MlflowLogger]
    with pytest.raises(ConfigError, match="listed twice"):
        build_loggers(["tensorboard", "tensorboard"])
    with pytest.raises(ConfigError, match=r"train.loggers\[0\].name: 'wandb' is not a logger"):
        build_loggers(["wandb"])
    with pytest.raises(ConfigError, match="log_dirr"):
        build("loggers", {"name": "tensorboard", "log_dirr": "x"}, "train.loggers[0]")


def test_jsonl_appends_one_object_per_epoch_and_refuses_nan(tmp_path):
    lg = JsonlLogger()
    lg.start(tmp_path, {})
    lg.log_epoch(1, {"epoch": 1, "loss": 0.25})
    lg.log_epoch(2, {"epoch": 2, "loss": 0.125})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 1, "loss": 0.25}, {"epoch": 2, "loss": 0.125}]
    with pytest.raises(ValueError):
        lg.log_epoch(3, {"epoch": 3, "loss": float("nan")})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = build("loggers", "tensorboard")
    lg.start(tmp_path, {"train": {"lr": 0.001}})
    lg.log_epoch(1, {**RECORD, "epoch": 1, "val": {**RECORD["val"], "accuracy": 0.5}})
    lg.log_epoch(2, RECORD)
    lg.log_result({"best_epoch": 2, "test": {"accuracy": 0.7}})
    lg.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/accuracy")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/mean_weights/image")] == [(1, 0.6), (2, 0.6)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("result/test/accuracy")] == [(2, 0.7)]
    assert "epoch" not in acc.Tags()["scalars"]


def test_mlflow_file_store_gets_params_metrics_and_status(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lg = build("loggers", {"name": "mlflow", "experiment": "digits"})
    (tmp_path / "run").mkdir()
    lg.start(tmp_path / "run", {"train": {"lr": 0.001}, "modalities": ["image", "text"]})
    lg.log_epoch(1, {"epoch": 1, "val": {"accuracy": 0.5}})
    lg.log_epoch(2, RECORD)
    lg.log_result({"best_epoch": 2, "test": {"accuracy": 0.7}})
    lg.close()
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == {"train.lr": "0.001", "modalities": '["image", "text"]'}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/accuracy")] == [(1, 0.5), (2, 0.75)]
    assert run.data.metrics["result/test/accuracy"] == 0.7
    # a resumed run continues the same MLflow run; a failure marks it FAILED
    again = build("loggers", {"name": "mlflow", "experiment": "digits"})
    again.start(tmp_path / "run", {}, resumed_at=2)
    assert again.run_id == run_id
    again.log_epoch(3, {"val": {"accuracy": 0.8}})
    again.close(failed=True)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")] == [1, 2, 3]


def test_training_writes_every_configured_logger(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fusionkit.cli.main import main

    out = tmp_path / "run"
    main(["train", "--out", str(out), "--no-progress", "--modalities", "fou,kar", *TINY, "train.epochs=2",
          "train.loggers=[jsonl, tensorboard, {name: mlflow, experiment: tiny}]"])  # returns: exit 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("val/accuracy")] == [round(r["val"]["accuracy"], 6) for r in rows]
    test = json.loads((out / "results.json").read_text())["test"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert run.data.metrics["result/test/accuracy"] == pytest.approx(test["accuracy"])


def test_a_bad_logger_is_one_line_before_the_run_folder(tmp_path, capsys):
    from fusionkit.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), "--modalities", "fou", *TINY, "train.loggers=[tensorbord]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tensorbord' is not a logger; did you mean 'tensorboard'?" in err[0]
    assert not (tmp_path / "run").exists()
