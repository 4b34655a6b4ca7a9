"""Classification: one class per sample; the probes predict over the same classes."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.tasks.base import IGNORE, Task, TaskConfig, as_long, probe_summary


@register("tasks", "classification")
class ClassificationTask(Task):
    """Class labels: cross-entropy on the decoder's logits; accuracy, NLL and ECE of the fused prediction."""

    Config = TaskConfig

    def setup(self, bundle) -> None:
        if len(bundle.classes) < 2:
            raise ConfigError(f"classification needs at least 2 classes, the data has {len(bundle.classes)}")
        self.probe_classes = list(bundle.classes)

    def collate_targets(self, targets: list[Any]) -> dict[str, Any]:
        """Class indices ``(B,)``; a None target (an unlabelled row, ``fusionkit predict``) is IGNORE."""
        return {"target": as_long([IGNORE if t is None else t for t in targets])}

    def loss(self, out, batch) -> Tensor:
        return F.cross_entropy(out.logits.float(), batch["target"])

    def predict(self, model, batch, out) -> dict[str, Any]:
        return {"probs": out.logits.float().softmax(-1)}

    def summarize(self, c, modalities) -> dict[str, Any]:
        from fusionkit.evaluation import expected_calibration_error

        target = c["target"]
        pred = c["probs"].argmax(1)
        fused = {"accuracy": float((pred == target).float().mean()) if len(target) else 0.0}
        summary = probe_summary(c, modalities)
        nll = float(-c["probs"].clamp_min(1e-12).log().gather(1, target[:, None]).mean()) if len(target) else 0.0
        return {**fused, "unimodal_accuracy": summary["unimodal_accuracy"], "mean_weights": summary["mean_weights"],
                "n": int(len(target)), "nll": nll, "ece": expected_calibration_error(c["probs"], target),
                "unimodal_ece": summary["unimodal_ece"]}
