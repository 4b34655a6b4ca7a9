"""Visual question answering: a generated answer per sample, scored with VQA accuracy.

Targets are ``{"answers": [str, ...], "type": str | None}`` (one or several reference answers).
The probes that DMS scores with predict over the answer vocabulary of the training split: the
``top_answers`` most frequent normalised answers (each sample's label is its most frequent
normalised reference; a sample whose label is outside the vocabulary is ignored by the probes'
loss and accuracy). The language model itself generates free text, so VQA accuracy also counts
answers outside that vocabulary.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field
from torch import Tensor

from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.tasks.base import IGNORE, Task, TaskConfig, as_long, probe_summary


class VQAConfig(TaskConfig):
    top_answers: int = Field(1000, ge=2, description=(
        "N: the probes predict over the N most frequent training answers (VQA-v2 practice: 3,129; "
        "easy_vqa has 13, so everything fits)"))


def label_answer(answers: list[str]) -> str:
    """The answer a sample is trained towards: its most frequent normalised reference (first on ties)."""
    from fusionkit.metrics.vqa import normalize_answer

    normalised = [normalize_answer(a) for a in answers]
    return Counter(normalised).most_common(1)[0][0]


@register("tasks", "vqa")
class VQATask(Task):
    """Answer a question about the other inputs; VQA accuracy of the generated answers."""

    Config = VQAConfig
    generative = True

    def setup(self, bundle) -> None:
        counts: Counter[str] = Counter()
        for target in bundle.splits["train"].targets:
            if not isinstance(target, dict) or not isinstance(target.get("answers"), list):
                raise ConfigError(f"task vqa needs targets {{answers: [...]}}, but this dataset's targets look like "
                                  f"{target!r} (class labels?); use task=classification or a VQA dataset "
                                  f"(e.g. data=easy_vqa)")
            if target["answers"]:
                counts[label_answer(target["answers"])] += 1
        vocab = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: self.config.top_answers]
        if len(vocab) < 2:
            raise ConfigError(f"vqa: the training answers give a vocabulary of {len(vocab)} answer(s) "
                              f"({vocab}); the probes need at least 2 distinct answers")
        self.probe_classes = vocab

    def collate_targets(self, targets: list[Any]) -> dict[str, Any]:
        """Probe labels, the text the LM is taught (only when every sample has answers: unlabelled
        rows, as in ``fusionkit generate``, are answered but not trained on) and the references."""
        index = {a: i for i, a in enumerate(self.probe_classes)}
        labels = [label_answer(t["answers"]) if t and t.get("answers") else None for t in targets]
        out = {"target": as_long([index.get(a, IGNORE) if a is not None else IGNORE for a in labels]),
               "answers": [list(t["answers"]) if t else [] for t in targets],
               "types": [t.get("type") if t else None for t in targets]}
        if all(a is not None for a in labels):
            out["answer_text"] = labels  # what the language model is taught to generate
        return out

    def loss(self, out, batch) -> Tensor:
        if out.lm_loss is None:
            raise ConfigError("task vqa needs a generative decoder (e.g. decoder: {name: llava}); "
                              "the configured decoder returns no language-model loss")
        return out.lm_loss

    def predict(self, model, batch, out) -> dict[str, Any]:
        return {"predictions": model.generate(batch, out),
                "answers": batch["answers"], "types": batch["types"]}

    def summarize(self, c, modalities) -> dict[str, Any]:
        from fusionkit.metrics.vqa import vqa_report

        report = vqa_report(c["predictions"], c["answers"], c["types"])
        summary = probe_summary(c, modalities)
        return {"accuracy": report["accuracy"], "unimodal_accuracy": summary["unimodal_accuracy"],
                "mean_weights": summary["mean_weights"], "n": int(len(c["target"])),
                # mean teacher-forced NLL of the reference answer's tokens (picks the best epoch with monitor: loss)
                "nll": c.get("lm_loss"), "ece": None,
                "unimodal_ece": summary["unimodal_ece"], "vqa_accuracy": report["accuracy"],
                "exact_match": report["exact_match"], "per_type": report.get("per_type", {})}
