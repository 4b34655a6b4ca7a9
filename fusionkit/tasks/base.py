"""What every task owns, so the trainer, evaluation, robustness and the CLI never branch on it.

A task (registry kind ``tasks``) owns everything that depends on the target:

- the space the unimodal DMS heads ("probes") predict over (:attr:`Task.probe_classes`): the
  classes for classification, the top-N training answers for VQA;
- how targets are read from dataset items and collated (:meth:`Task.collate_targets`), always
  including ``batch["target"]``: the probe label per sample, ``(B,)`` long, ``IGNORE`` (-100)
  where the sample's target is outside the probe space, or a soft ``(B, K)`` float
  distribution over it (all-zero row = no label; see :mod:`fusionkit.tasks.targets`);
- the task loss (:meth:`Task.loss`) and the decoding + metrics of an evaluation
  (:meth:`Task.predict`, :meth:`Task.summarize`).

The evaluation record always has ``accuracy`` (the task's main metric), ``unimodal_accuracy``
(probe accuracy per modality), ``mean_weights`` and ``n``; tasks add their own keys.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from fusionkit.datasets.base import DatasetBundle
from fusionkit.tasks.targets import IGNORE, has_label, probe_correct  # noqa: F401  (IGNORE: re-exported)


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task:
    """Base class of registered tasks.

    Lifecycle: built from its config, then :meth:`setup` on the loaded data (or
    :meth:`load_state` from a checkpoint's metadata, so a run always reuses the probe space it
    was trained with), then used by the model, the trainer and evaluation.
    """

    Config = TaskConfig
    generative = False  # True: predictions are strings decoded by the model (``model.generate``)

    def __init__(self, config: BaseModel | None = None):
        self.config = config or self.Config()
        self.probe_classes: list[str] = []

    @classmethod
    def from_config(cls, config: BaseModel):
        return cls(config)

    # -- probe space --------------------------------------------------------------------------
    def setup(self, bundle: DatasetBundle) -> None:
        """Derive the probe space from the data (training split only)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON-able state stored in checkpoint metadata (the probe space)."""
        return {"probe_classes": list(self.probe_classes)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.probe_classes = list(state["probe_classes"])

    @property
    def num_probe_classes(self) -> int:
        return len(self.probe_classes)

    # -- batches ------------------------------------------------------------------------------
    def collate_targets(self, targets: list[Any]) -> dict[str, Any]:
        """Dataset targets of one batch -> batch entries; must include ``target`` ``(B,)`` long."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------
    def loss(self, out, batch: dict[str, Any]) -> Tensor:
        """The task term of the loss for a model output (:class:`fusionkit.model.ModelOutput`)."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------
    def predict(self, model, batch: dict[str, Any], out) -> dict[str, Any]:
        """Per-batch predictions to gather: tensors (concatenated) or lists (extended)."""
        return {}

    def summarize(self, c: dict[str, Any], modalities: list[str]) -> dict[str, Any]:
        """The evaluation record from gathered outputs (see :func:`fusionkit.evaluation.collect`)."""
        raise NotImplementedError


def probe_summary(c: dict[str, Any], modalities: list[str]) -> dict[str, Any]:
    """What every task reports about the fusion: probe accuracy, probe ECE and mean weights per
    modality (probe metrics over the samples that have the modality and a label in the probe space;
    with soft targets a probe is right when its argmax is one of the sample's entries)."""
    from fusionkit.evaluation import expected_calibration_error

    target, mask = c["target"], c["mask"]
    labelled = has_label(target)  # hard labels or soft (multi-label) rows: tasks.targets
    uni_acc, uni_ece, mean_w = {}, {}, {}
    for j, m in enumerate(modalities):
        have = mask[:, j] & labelled
        uni_acc[m] = float(probe_correct(c["unimodal"][have, j], target[have]).float().mean()) if have.any() else None
        uni_ece[m] = expected_calibration_error(c["unimodal_probs"][have, j], target[have]) if have.any() else None
        mean_w[m] = float(c["weights"][:, j].mean()) if len(target) else 0.0
    return {"unimodal_accuracy": uni_acc, "mean_weights": mean_w, "unimodal_ece": uni_ece}


def as_long(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.long)
