"""Experiment loggers: where a run's per-epoch numbers go, through one interface (registry kind ``loggers``).

``train.loggers`` lists them, e.g. ``[jsonl, tensorboard]`` or ``[jsonl, {name: mlflow,
experiment: digits}]``. ``jsonl`` (the run folder's ``metrics.jsonl``, one JSON object per epoch)
is the run's own record: ``--resume`` and the benchmarks read it, so it is always written, listed
or not. The others are optional dependencies, imported only when listed:

- ``tensorboard``: event files under ``<run>/tensorboard`` (``tensorboard --logdir runs``);
- ``mlflow``: one MLflow run per training run, params = the flattened config, metrics per epoch.
  ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else a local file store in
  ``<run>/mlruns`` (MLflow 3 keeps file stores in maintenance mode; set a database or server URI
  for anything shared).

A logger sees flattened scalars: ``{"val": {"accuracy": 0.9, "mean_weights": {"image": 0.6}}}``
becomes ``val/accuracy`` and ``val/mean_weights/image``; strings, lists and ``None`` are left out.
Only rank 0 logs. A plugin adds a logger as it adds a fusion: ``@register("loggers", "name")`` on
a :class:`Logger` subclass with a ``Config``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusionkit.errors import ConfigError
from fusionkit.registry import register


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested record, keyed by their ``/``-joined path."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every leaf of a config mapping as ``dotted.key -> text`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


class LoggerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Logger:
    """Receives a run's config once, one record per epoch, the final result, then ``close``."""

    Config = LoggerConfig

    def __init__(self, config: LoggerConfig | None = None):
        self.config = config if config is not None else self.Config()

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int = 0) -> None:
        """Called before the first epoch; ``resumed_at`` is the last finished epoch of a resumed run."""

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_result(self, record: dict[str, Any]) -> None:
        """The final record (best epoch, best val, test); epoch-less loggers may ignore it."""

    def close(self, failed: bool = False) -> None:
        """Flush and release; called once, with ``failed`` when training stopped with an error."""


@register("loggers", "jsonl")
class JsonlLogger(Logger):
    """metrics.jsonl in the run folder: one JSON object per epoch (always written)."""

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        # allow_nan=False: a NaN or infinity must never reach the record (the trainer stops first)
        line = json.dumps(record, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoardConfig(LoggerConfig):
    log_dir: str | None = Field(None, description="event file folder; None = <run>/tensorboard")


@register("loggers", "tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files (scalars per epoch, the config as text); needs the tensorboard package."""

    Config = TensorBoardConfig

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.loggers: 'tensorboard' needs the tensorboard package "
                              "(pip install tensorboard), or leave it out of the list") from None
        log_dir = Path(self.config.log_dir) if self.config.log_dir else Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)
        if not resumed_at:
            text = "\n".join(f"    {k}: {v}" for k, v in sorted(flatten_config(config).items()))
            self.writer.add_text("config", text)

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for key, value in flatten(record).items():
            if key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_result(self, record: dict[str, Any]) -> None:
        step = int(record.get("best_epoch", 0))
        for key, value in flatten({"result": record}).items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class MlflowConfig(LoggerConfig):
    tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else a file store in <run>/mlruns"))
    experiment: str = Field("fusionkit", description="MLflow experiment name (created if missing)")
    run_name: str | None = Field(None, description="None = the run folder's name")


@register("loggers", "mlflow")
class MlflowLogger(Logger):
    """One MLflow run per training run: the flattened config as params, metrics per epoch; needs mlflow."""

    Config = MlflowConfig

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int = 0) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("train.loggers: 'mlflow' needs the mlflow package (pip install mlflow-skinny), "
                              "or leave it out of the list") from None
        run_dir = Path(run_dir)
        uri = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local store next to the run; MLflow 3 only opens file stores when told to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        if resumed_at and id_file.is_file():  # a resumed run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.config.experiment)
        run = self.client.create_run(experiment_id, run_name=self.config.run_name or run_dir.resolve().name)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id + "\n")
        for key, value in flatten_config(config).items():
            self.client.log_param(self.run_id, key, value[:6000])

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for key, value in flatten(record).items():
            if key != "epoch":
                self.client.log_metric(self.run_id, key, value, step=epoch)

    def log_result(self, record: dict[str, Any]) -> None:
        for key, value in flatten({"result": record}).items():
            self.client.log_metric(self.run_id, key, value)

    def close(self, failed: bool = False) -> None:
        if hasattr(self, "run_id"):
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def build_loggers(blocks: list[Any]) -> list[Logger]:
    """The configured loggers, ``jsonl`` first and always present."""
    from fusionkit.registry import build

    loggers = [build("loggers", block, f"train.loggers[{i}]") for i, block in enumerate(blocks)]
    names = [type(lg).__name__ for lg in loggers]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.loggers: a logger is listed twice ({blocks})")
    jsonl = [lg for lg in loggers if isinstance(lg, JsonlLogger)] or [JsonlLogger()]
    return jsonl + [lg for lg in loggers if not isinstance(lg, JsonlLogger)]


class RunLoggers:
    """The loggers of one run as a context: started on entry, closed on exit (``failed`` when an
    exception leaves the block). ``blocks=None`` (ranks other than 0) logs nothing."""

    def __init__(self, blocks: list[Any] | None, run_dir: Path, config: dict[str, Any], resumed_at: int = 0):
        self.loggers = build_loggers(blocks) if blocks is not None else []
        self.run_dir, self.config, self.resumed_at = Path(run_dir), config, resumed_at

    def __enter__(self) -> RunLoggers:
        for i, logger in enumerate(self.loggers):
            try:
                logger.start(self.run_dir, self.config, self.resumed_at)
            except BaseException:
                for started in self.loggers[:i]:
                    started.close(failed=True)
                raise
        return self

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_epoch(epoch, record)

    def log_result(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_result(record)

    def __exit__(self, exc_type, exc, tb) -> None:
        for logger in self.loggers:
            logger.close(failed=exc_type is not None)
