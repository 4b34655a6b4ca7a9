"""Metrics that are plain functions of predictions and references (no model, no tensors).

- :mod:`fusionkit.metrics.vqa`: the VQA answer normalisation, per-question VQA score and a
  report with accuracy, exact match and per-type accuracy.
"""

from fusionkit.metrics.vqa import normalize_answer, vqa_report, vqa_score

__all__ = ["normalize_answer", "vqa_report", "vqa_score"]
