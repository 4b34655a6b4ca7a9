"""Retrieval metrics: recall at k and median rank in both directions, from a similarity matrix.

Queries and targets come in pairs (sample i's fused query and its target text). A retrieved
item is a hit when its target text equals the query's own (so a text that several samples share,
e.g. "a red circle", is a right answer for each of them), in both directions:

- query -> target: for query i, the rank of the best-scored target whose text equals text_i
  among all N targets;
- target -> query: for target j, the rank of the best-scored query whose text equals text_j
  among all N queries.

rank = 1 + the number of non-matching items scored strictly higher (ties go to the hit).
``R@k`` is the share of ranks <= k; the median rank is numpy's (mean of the two middle ranks
for an even count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

KS = (1, 5, 10)


def same_text(texts_a: Sequence[str], texts_b: Sequence[str]) -> Tensor:
    """``(len(a), len(b))`` bool: ``a_i == b_j``."""
    ids: dict[str, int] = {}
    a = torch.tensor([ids.setdefault(t, len(ids)) for t in texts_a], dtype=torch.long)
    b = torch.tensor([ids.setdefault(t, len(ids)) for t in texts_b], dtype=torch.long)
    return a[:, None] == b[None, :]


def hit_ranks(sim: Tensor, positive: Tensor) -> Tensor:
    """Rank (from 1) of each row's best positive among its row: ``(N, C)`` -> ``(N,)`` long.

    Every row needs at least one positive.
    """
    best = sim.masked_fill(~positive, float("-inf")).max(1).values  # (N,)
    return 1 + ((sim > best[:, None]) & ~positive).sum(1)  # (N,)


def retrieval_metrics(sim: Tensor, texts: Sequence[str], ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k and median rank, query -> target and target -> query, and their mean R@1 (``accuracy``).

    Args:
        sim: ``(N, N)`` similarities, row i = query i against every target.
        texts: the target text of each of the N pairs.
        ks: the cut-offs.

    Returns:
        ``{q2t_r1, q2t_r5, q2t_r10, q2t_median_rank, t2q_..., accuracy}`` (all 0 for N = 0).
    """
    n = len(texts)
    if sim.shape != (n, n):
        raise ValueError(f"similarity matrix of shape {tuple(sim.shape)} for {n} texts")
    if n == 0:
        return {**{f"{d}_{name}": 0.0 for d in ("q2t", "t2q") for name in [*(f"r{k}" for k in ks), "median_rank"]},
                "accuracy": 0.0}
    positive = same_text(texts, texts)  # (N, N), symmetric; the diagonal is always a hit
    out: dict[str, float] = {}
    top1 = []
    for direction, matrix in (("q2t", sim), ("t2q", sim.T)):
        ranks = hit_ranks(matrix.float().cpu(), positive)  # (N,)
        for k in ks:
            out[f"{direction}_r{k}"] = float((ranks <= k).float().mean())
        out[f"{direction}_median_rank"] = float(np.median(ranks.numpy()))
        top1.append(float((ranks == 1).float().mean()))
    out["accuracy"] = sum(top1) / 2  # mean R@1 of the two directions
    return out
