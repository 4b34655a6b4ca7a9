"""Probe targets: the two shapes ``batch["target"]`` takes, and the few questions asked of them.

- hard: ``(B,)`` long, one class of the probe space per sample, ``IGNORE`` (-100) where the
  sample's target lies outside it (classification, VQA);
- soft: ``(B, K)`` float, a distribution over the probe space per sample (uniform over the
  sample's correct entries), an all-zero row where none is in it (captioning: the caption's
  concepts; retrieval: the in-batch candidates with the same target text).

A probe prediction is *right* when it is the class (hard) or one of the entries with mass (soft).
This module imports nothing from the rest of fusionkit, so fusions and tasks can both use it.
"""

from __future__ import annotations

from torch import Tensor

IGNORE = -100  # hard label of a sample whose target is outside the probe space (cross-entropy's ignore_index)


def is_soft(target: Tensor) -> bool:
    """True for ``(B, K)`` float distributions, False for ``(B,)`` class indices."""
    return target.is_floating_point()


def has_label(target: Tensor) -> Tensor:
    """``(B,)`` bool: the sample has a label in the probe space."""
    return target.sum(-1) > 0 if is_soft(target) else target != IGNORE


def probe_correct(pred: Tensor, target: Tensor) -> Tensor:
    """Whether predicted classes ``pred`` ``(B, ...)`` are right for ``target``: ``(B, ...)`` bool.

    Hard: ``pred == target``; soft: the target puts mass on ``pred``. Unlabelled samples are
    never right.
    """
    B = pred.shape[0]
    if is_soft(target):
        return target.gather(1, pred.reshape(B, -1)).view(pred.shape) > 0  # (B, ...)
    return pred == target.view(B, *([1] * (pred.dim() - 1)))  # (B, ...)
