"""Metrics that are plain functions of predictions and references (no model, no tensors).

- :mod:`fusionkit.metrics.vqa`: the VQA answer normalisation, per-question VQA score and a
  report with accuracy, exact match and per-type accuracy.
- :mod:`fusionkit.metrics.captions`: BLEU-1..4, METEOR, ROUGE-L and CIDEr through pycocoevalcap.
- :mod:`fusionkit.metrics.retrieval`: recall at k and median rank, both directions, from a
  similarity matrix (same target text = a hit).
"""

from fusionkit.metrics.captions import caption_scores
from fusionkit.metrics.retrieval import retrieval_metrics
from fusionkit.metrics.vqa import normalize_answer, vqa_report, vqa_score

__all__ = ["caption_scores", "normalize_answer", "retrieval_metrics", "vqa_report", "vqa_score"]
