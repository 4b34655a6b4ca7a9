"""Retrieval: a fused multimodal query embedding against target-text embeddings (CLIP style).

Targets are ``{"text": str}``, or ``{"captions": [...]}`` of a captioning dataset, whose first
(canonical) caption is then the target text. The decoder ``retrieval``
(:mod:`fusionkit.decoders.retrieval`) embeds the fused vector ``h`` (the query) and the batch's
target texts into one ``embed_dim``-wide space, both L2-normalised, with a learnable temperature.

Loss: symmetric InfoNCE over the batch with *multi-positive* rows: every in-batch pair whose
target texts are equal is a positive (a caption shared by several samples is right for all of
them). For query i with positives P_i: ``-log sum_{j in P_i} softmax_j(s * q_i . t_j)``, and the
same over queries for each target; the loss is the mean of the two directions.

Probe space: the in-batch candidates. Each unimodal head outputs ``embed_dim`` values; for each
batch the model maps them to logits over the batch's targets (normalised head output . target
embedding * scale; :meth:`fusionkit.decoders.retrieval.RetrievalDecoder.probe_transform`), so
confidence, MC-dropout and agreement read "which target does this modality point at". The probe
target of sample i is soft: uniform over the in-batch samples with the same text as i (one-hot
at i when its text is unique in the batch).

Metrics (:func:`fusionkit.metrics.retrieval.retrieval_metrics`) over the whole evaluated split:
every query against every target by cosine similarity, R@1/5/10 and median rank in both
directions (same text = a hit); ``accuracy`` is the mean of the two R@1.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register
from fusionkit.tasks.base import Task, TaskConfig, probe_summary


class RetrievalTaskConfig(TaskConfig):
    embed_dim: int = Field(256, ge=2, description=(
        "E: width of the shared query/target embedding space; the unimodal heads output E values "
        "that are compared with the batch's target embeddings (so E is also the heads' K)"))


def target_text(target: Any, where: str) -> str:
    """The text a sample is retrieved by: ``target["text"]`` or its first caption."""
    if isinstance(target, dict) and "text" in target:
        text = target["text"]
    elif isinstance(target, dict) and isinstance(target.get("captions"), list):
        if not target["captions"]:
            raise DataError(f"retrieval: {where} has no reference caption")
        text = target["captions"][0]
    else:
        raise ConfigError(f"task retrieval needs targets {{text: ...}} or {{captions: [...]}}, but this dataset's "
                          f"targets look like {target!r:.80} ({where}); use a captioning dataset, e.g. "
                          f"data.task=captioning with easy_vqa, digits or a manifest")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"retrieval: {where} has an empty target text ({text!r:.60})")
    return text.strip()


def positives(texts: list[str]) -> Tensor:
    """``(B, B)`` bool: the pairs whose target texts are equal (the diagonal included)."""
    from fusionkit.metrics.retrieval import same_text

    return same_text(texts, texts)


def info_nce(logits: Tensor, positive: Tensor) -> Tensor:
    """Symmetric multi-positive InfoNCE for similarity logits ``(B, B)`` (queries x targets).

    Per query i: ``logsumexp_j l_ij - logsumexp_{j in P_i} l_ij``; per target j the same over
    column j; the result is the mean of the two directions' means.
    """
    logits = logits.float()
    none = torch.tensor(float("-inf"), device=logits.device)
    q2t = logits.logsumexp(1) - torch.where(positive, logits, none).logsumexp(1)  # (B,)
    t2q = logits.logsumexp(0) - torch.where(positive, logits, none).logsumexp(0)  # (B,)
    return (q2t.mean() + t2q.mean()) / 2


@register("tasks", "retrieval")
class RetrievalTask(Task):
    """Match the fused inputs to their target text (symmetric InfoNCE); R@1/5/10, median rank."""

    Config = RetrievalTaskConfig

    def setup(self, bundle) -> None:
        split = bundle.splits["train"]
        texts = {target_text(t, f"training sample {split.ids[i]!r}") for i, t in enumerate(split.targets)}
        if len(texts) < 2:
            raise ConfigError(f"retrieval: the training split has {len(texts)} distinct target text(s); "
                              f"contrastive training needs at least 2")
        self.probe_classes = []  # the probe space is the batch's candidates, not a fixed list

    @property
    def num_probe_classes(self) -> int:
        return self.config.embed_dim  # what the heads output; the probe transform maps it to candidates

    def collate_targets(self, targets: list[Any]) -> dict[str, Any]:
        """Soft probe targets over the batch ``(B, B)`` (uniform over same-text samples) and the
        target texts (only when every sample has one)."""
        if any(t is None for t in targets):  # queries only (fusionkit retrieve): nothing to match
            return {"target": torch.zeros(len(targets), len(targets))}
        texts = [target_text(t, "a sample") for t in targets]
        same = positives(texts).float()  # (B, B)
        return {"target": same / same.sum(1, keepdim=True), "target_text": texts}

    def loss(self, out, batch) -> Tensor:
        if out.query is None:
            raise ConfigError("task retrieval needs the retrieval decoder (model.decoder={name: retrieval})")
        return info_nce(out.logits, batch["target"] > 0)

    def predict(self, model, batch, out) -> dict[str, Any]:
        return {"query": out.query.float(), "target_embedding": out.targets.float(), "texts": batch["target_text"]}

    def summarize(self, c, modalities) -> dict[str, Any]:
        """``accuracy`` is the mean R@1 of the two directions; over the whole split, not per batch."""
        from fusionkit.metrics.retrieval import retrieval_metrics

        texts = c.get("texts", [])
        query = c.get("query", torch.zeros(0, self.config.embed_dim))
        target = c.get("target_embedding", torch.zeros(0, self.config.embed_dim))
        report = retrieval_metrics(query @ target.T, texts)  # cosine: both sides are unit vectors
        summary = probe_summary(c, modalities)
        return {**report, "unimodal_accuracy": summary["unimodal_accuracy"], "mean_weights": summary["mean_weights"],
                "n": int(len(c["target"])), "nll": None, "ece": None, "unimodal_ece": summary["unimodal_ece"]}


def embed_queries(model, batch: dict[str, Any], candidates: Tensor):
    """Query embeddings ``(B, E)`` and the fusion output of ``batch`` (inputs only), with the
    probes scored against ``candidates`` ``(N, E)`` (e.g. a gallery) instead of in-batch targets."""
    z, _ = model.encode(batch)
    with model.fusion.heads.mapped(model.decoder.probe_transform(candidates)):
        fused = model.fusion(z, batch["mask"])
    return model.decoder(fused.fused), fused
