"""Evaluation of a model on a loader: fused and unimodal accuracy, mean weights, calibration."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def expected_calibration_error(probs: Tensor, target: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / n."""
    conf, pred = probs.max(1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs()
    return float(ece)


@torch.no_grad()
def collect(model, loader, fabric=None, seed: int = 0) -> dict[str, Tensor]:
    """Run ``model`` over ``loader`` in eval mode; gather logits, weights, masks and targets.

    MC-dropout stays stochastic in eval mode, so the RNG is seeded with ``seed`` (inside a
    forked RNG state, leaving the caller's untouched): evaluating a checkpoint twice, during
    training or later with ``fusionkit eval``, gives identical numbers.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _collect(model, loader, fabric)


def _collect(model, loader, fabric) -> dict[str, Tensor]:
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("probs", "unimodal", "unimodal_logits", "unimodal_probs",
                                                      "weights", "mask", "target", "index")}
    scores: dict[str, list[Tensor]] = {}
    heads = getattr(getattr(model, "fusion", None), "heads", None)  # Fabric forwards attributes
    for batch in loader:
        out = model(batch)
        uni = out.fusion.unimodal_logits.float()  # (B, M, K)
        parts["probs"].append(out.logits.float().softmax(-1))
        parts["unimodal"].append(uni.argmax(-1))
        parts["unimodal_logits"].append(uni)
        # the heads' probabilities as the scorers see them (temperature-scaled when calibrated)
        parts["unimodal_probs"].append((heads.calibrate(uni) if heads is not None else uni).softmax(-1))
        for name, value in out.fusion.scores.items():
            scores.setdefault(name, []).append(value.float())
        parts["weights"].append(out.fusion.weights.float())
        parts["mask"].append(out.fusion.mask)
        parts["target"].append(batch["target"])
        parts["index"].append(batch["index"])
    model.train(was_training)
    result = {k: torch.cat(v).cpu() for k, v in parts.items()}
    result.update({f"score.{k}": torch.cat(v).cpu() for k, v in scores.items()})
    if fabric is not None and fabric.world_size > 1:
        result = {k: fabric.all_gather(v).flatten(0, 1).cpu() for k, v in result.items()}
    return result


def summarize(c: dict[str, Tensor], modalities: list[str]) -> dict[str, Any]:
    """The stable evaluation record (``fusionkit eval --json``): accuracy, unimodal_accuracy,
    mean_weights, n, plus nll, ece and unimodal_ece (each head's ECE, calibrated if fitted)."""
    target, mask = c["target"], c["mask"]
    pred = c["probs"].argmax(1)
    uni_acc, uni_ece, mean_w = {}, {}, {}
    for j, m in enumerate(modalities):
        have = mask[:, j]
        uni_acc[m] = float((c["unimodal"][have, j] == target[have]).float().mean()) if have.any() else None
        uni_ece[m] = expected_calibration_error(c["unimodal_probs"][have, j], target[have]) if have.any() else None
        mean_w[m] = float(c["weights"][:, j].mean())
    nll = float(-c["probs"].clamp_min(1e-12).log().gather(1, target[:, None]).mean())
    return {
        "accuracy": float((pred == target).float().mean()),
        "unimodal_accuracy": uni_acc,
        "mean_weights": mean_w,
        "n": int(len(target)),
        "nll": nll,
        "ece": expected_calibration_error(c["probs"], target),
        "unimodal_ece": uni_ece,
    }


def signal_stats(c: dict[str, Tensor], modalities: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std of each quality signal per modality over the samples that have it:
    ``{signal: {modality: {"mean", "std"}}}`` (empty for policies without signals)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in c.items():
        if not key.startswith("score."):
            continue
        per = {}
        for j, m in enumerate(modalities):
            v = value[c["mask"][:, j], j]
            if len(v):
                per[m] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0}
        out[key.removeprefix("score.")] = per
    return out
