"""Evaluation of a model on a loader: fused and unimodal accuracy, mean weights, calibration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def expected_calibration_error(probs: Tensor, target: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / n.

    ``target``: ``(N,)`` classes, or soft ``(N, K)`` rows (right = the argmax has mass).
    """
    from fusionkit.tasks.targets import probe_correct

    conf, pred = probs.max(1)
    if not len(conf):
        return 0.0
    correct = probe_correct(pred, target).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    # bin b holds edges[b] < conf <= edges[b + 1]; conf = 0 falls in no bin
    which = torch.bucketize(conf, edges) - 1  # (N,), -1 for conf = 0
    inside = which >= 0
    which, conf, correct = which[inside], conf[inside], correct[inside]
    gap = torch.zeros(bins, dtype=conf.dtype).index_add_(0, which, correct - conf)  # per bin: sum(right - conf)
    return float(gap.abs().sum() / len(inside))  # sum_b n_b / n * |acc_b - conf_b|


@torch.no_grad()
def collect(model, loader, fabric=None, seed: int = 0, predict: bool = True,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``model`` over ``loader`` in eval mode; gather weights, masks, probe outputs, targets and
    (with ``predict``) the task's predictions (class probabilities, generated text, ...).
    ``progress`` is told the number of samples after each batch (a progress bar's advance).

    MC-dropout stays stochastic in eval mode, so the RNG is seeded with ``seed`` (inside a
    forked RNG state, leaving the caller's untouched): evaluating a checkpoint twice, during
    training or later with ``fusionkit eval``, gives identical numbers.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _collect(model, loader, fabric, predict, progress)


def _unwrap(model):
    return getattr(model, "module", model)  # Fabric / DDP wrappers keep the model as .module


def forward_call(model) -> Callable[[Any], Any]:
    """``model``'s forward; for a Lightning Fabric module, the same call without Fabric's hooks.

    Fabric's wrapper converts the inputs to its precision, runs the module under its autocast
    context and converts the outputs, and then registers a backward hook on every output tensor
    that needs a gradient: they only warn when ``loss.backward()`` is called instead of
    ``fabric.backward(loss)`` (the trainer always calls the latter). Walking the model's nested
    output records to register them costs about 0.3 ms per training step. The call returned does
    the conversions and the autocast, through the same (DDP, FSDP or plain) forward module, and
    skips the hooks. Anything else (a plain module, a Fabric without these attributes) is called
    as it is.
    """
    module = getattr(model, "_forward_module", None)
    precision = getattr(getattr(model, "_strategy", None), "precision", None)
    if module is None or precision is None:
        return model

    def forward(batch):
        batch = precision.convert_input(batch)
        with precision.forward_context():
            out = module(batch)
        return precision.convert_output(out)

    return forward


def _collect(model, loader, fabric, predict: bool, progress) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    core = _unwrap(model)
    task = getattr(core, "task", None)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("unimodal", "unimodal_logits", "unimodal_probs",
                                                      "weights", "mask", "target", "index")}
    listed: dict[str, list[Any]] = {}  # task predictions that are not tensors (generated text ...)
    scores: dict[str, list[Tensor]] = {}
    lm_loss = [0.0, 0]  # sum of the batches' LM loss weighted by their size, samples
    heads = getattr(core.fusion, "heads", None)
    forward = forward_call(model)
    for batch in loader:
        out = forward(batch)
        uni = out.fusion.unimodal_logits.float()  # (B, M, K)
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
        if out.lm_loss is not None:
            lm_loss[0] += float(out.lm_loss) * len(batch["target"])
            lm_loss[1] += len(batch["target"])
        if predict:
            preds = task.predict(core, batch, out) if task is not None else {"probs": out.logits.float().softmax(-1)}
            for key, value in preds.items():
                if isinstance(value, Tensor):
                    parts.setdefault(key, []).append(value)
                else:
                    listed.setdefault(key, []).extend(value)
        if progress is not None:
            progress(len(batch["mask"]) + len(batch.get("skipped", ())))  # skipped samples count as done
    model.train(was_training)
    result: dict[str, Any] = {k: _cat(v, k).cpu() if v else torch.zeros(0) for k, v in parts.items()}
    result.update({f"score.{k}": torch.cat(v).cpu() for k, v in scores.items()})
    if fabric is not None and fabric.world_size > 1:
        result, listed, lm_loss = _gather(result, listed, lm_loss, fabric)
    result.update(listed)
    result["lm_loss"] = lm_loss[0] / lm_loss[1] if lm_loss[1] else None
    return result


def _gather(result: dict[str, Tensor], listed: dict[str, list[Any]], lm_loss: list, fabric):
    """Every process's samples, each exactly once, in split order (``index``).

    Under DDP each process evaluates its share of the split, and ``DistributedSampler`` pads the
    shares to equal length with samples of the split's start, which therefore come back twice.
    Of each sample this keeps the copy its owner evaluated (rank ``index % world``, where the
    sampler puts it first), else any (a stream's short rank repeats its own samples). The LM
    loss is the size-weighted mean over all batches of all processes. Shares may differ in
    length (skipped samples) and width (retrieval's in-batch probes), so they travel as objects.
    """
    import torch.distributed as dist

    world = fabric.world_size
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (fabric.global_rank, result, listed, lm_loss))
    lm_loss = [sum(s[3][0] for s in shares), sum(s[3][1] for s in shares)]
    shares = [s for s in shares if len(s[1]["index"])]  # a process with nothing to evaluate adds nothing
    if not shares:
        return result, listed, lm_loss
    index = torch.cat([s[1]["index"] for s in shares])  # (N_all,), repeats included
    rank = torch.cat([torch.full((len(s[1]["index"]),), s[0]) for s in shares])  # (N_all,)
    order = torch.argsort(index * 2 + (index % world != rank).long(), stable=True)  # by index, owner's copy first
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = index[order][1:] != index[order][:-1]
    rows = order[first]  # (N,): one row per sample, in index order
    merged = {}
    for key in result:
        values = [s[1][key] for s in shares]
        cat = _cat(values, key)
        merged[key] = cat[rows] if len(cat) == len(index) else cat
    rows_list = rows.tolist()
    listed = {k: [x for s in shares for x in s[2][k]] for k in listed}
    listed = {k: [v[i] for i in rows_list] if len(v) == len(index) else v for k, v in listed.items()}
    return merged, listed, lm_loss


# Padding when batches' probe spaces differ in size (retrieval: the in-batch candidates): logits get
# a value no softmax picks (finite, so temperature fitting stays NaN-free), probabilities and
# soft targets get 0.
_PAD = {"unimodal_logits": -1e4}


def _cat(values: list[Tensor], key: str) -> Tensor:
    """``torch.cat`` over batches; tensors of 2+ dims whose last dim differs are right-padded."""
    if values[0].dim() >= 2 and len({v.shape[-1] for v in values}) > 1:
        width = max(v.shape[-1] for v in values)
        values = [torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=_PAD.get(key, 0.0)) for v in values]
    return torch.cat(values)


def evaluate(model, loader, fabric=None, seed: int = 0) -> dict[str, Any]:
    """The evaluation record of ``model``'s task on ``loader`` (``fusionkit eval --json``)."""
    c = collect(model, loader, fabric, seed)
    core = _unwrap(model)
    return summarize(c, core.modalities, getattr(core, "task", None))


def summarize(c: dict[str, Any], modalities: list[str], task=None) -> dict[str, Any]:
    """The stable evaluation record: accuracy (the task's main metric), unimodal_accuracy,
    mean_weights, n, plus the task's own metrics (classification: nll, ece, unimodal_ece)."""
    if task is None:
        from fusionkit.tasks.classification import ClassificationTask

        task = ClassificationTask()
    return task.summarize(c, modalities)


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
