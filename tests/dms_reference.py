"""Frozen reference: the DMS forward pass and losses as they were before the issue-12 speed work.

A verbatim copy of the arithmetic of ``fusionkit/fusions/dms.py``, ``fusions/base.py`` (heads,
masks, losses), ``scorers/*`` and ``schedulers/*`` at commit b80adc4, rewritten as functions that
read a (deep-copied) ``DMSFusion``'s parameters, buffers and configs. Do not "fix" or speed up
this file: ``tests/test_dms_speed_equivalence.py`` checks the live implementation against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.tasks.targets import has_label, is_soft, probe_correct


# -- fusions/base.py ----------------------------------------------------------------------
def random_bytes(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device, generator=generator)
    return words.view(torch.uint8)[:n].view(shape)


def heads_hidden(heads, z: Tensor) -> Tensor:
    return F.gelu(torch.einsum("bmd,mdh->bmh", z, heads.w1) + heads.b1)


def heads_output(heads, a: Tensor) -> Tensor:
    logits = torch.einsum("...bmh,mhk->...bmk", a, heads.w2) + heads.b2
    return logits if heads.transform is None else heads.transform(logits)


def heads_calibrate(heads, logits: Tensor) -> Tensor:
    return logits / heads.temperature.to(logits.dtype).unsqueeze(-1)


def heads_sample(heads, z: Tensor, passes: int, dropout: float | None = None, hidden: Tensor | None = None,
                 per_sample: bool = True) -> Tensor:
    p = heads.dropout if dropout is None else dropout
    a = heads_hidden(heads, z) if hidden is None else hidden
    a = a.unsqueeze(0).expand(passes, *a.shape)  # (T, B, M, h)
    drop = round(p * 256)
    if not drop:
        return heads_calibrate(heads, heads_output(heads, a)).softmax(-1)
    if heads.training and not per_sample:
        # added after b80adc4 with the option of shared training masks (mc_dropout.per_sample_masks: false):
        # T masks drawn in (T, M, h) order, the same for every sample of the batch
        T, B, M, H = a.shape
        keep = (random_bytes((T, M, H), a.device) >= drop).unsqueeze(1)
    elif heads.training:
        keep = random_bytes(a.shape, a.device) >= drop
    else:  # eval: T masks shared by every sample, from a fixed seed (not the global RNG)
        T, B, M, H = a.shape
        bank = random_bytes((256, M, H), torch.device("cpu"), torch.Generator().manual_seed(0))
        keep = (bank[:T] >= drop).unsqueeze(1).to(a.device)
    scale = 256.0 / (256 - drop)
    logits = torch.einsum("...bmh,mhk->...bmk", a * keep, heads.w2) * scale + heads.b2
    if heads.transform is not None:
        logits = heads.transform(logits)
    return heads_calibrate(heads, logits).softmax(-1)


def stack_modalities(z: dict[str, Tensor], modalities: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    stacked = torch.stack([z[m] for m in modalities], dim=1)  # (B, M, d)
    B, M, _ = stacked.shape
    if mask is None:
        mask = torch.ones(B, M, dtype=torch.bool, device=stacked.device)
    else:
        mask = mask.to(device=stacked.device, dtype=torch.bool)
    if not bool(mask.all()):
        stacked = torch.where(mask.unsqueeze(-1), stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
    return stacked, mask


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=1)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def masked_unimodal_loss(unimodal_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    B, M, K = unimodal_logits.shape
    if is_soft(target):
        logp = unimodal_logits.float().log_softmax(-1)
        ce = -(target.to(logp.dtype).unsqueeze(1) * logp).sum(-1)
    else:
        ce = F.cross_entropy(unimodal_logits.reshape(B * M, K).float(),
                             target.repeat_interleave(M), reduction="none", ignore_index=-100).view(B, M)
    mask = mask & has_label(target).unsqueeze(1)
    ce = torch.where(mask, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    per_modality = ce.sum(0) / mask.sum(0).clamp(min=1)
    return per_modality.sum()


# -- scorers/* ------------------------------------------------------------------------------
def normalized_confidence(probs: Tensor) -> Tensor:
    K = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return 1.0 - entropy / math.log(K)


def mc_variance(probs: Tensor) -> Tensor:
    return (probs.square().mean(0) - probs.mean(0).square()).clamp_min(0).mean(-1)


def alignment(z: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(z.dtype)
    total = torch.einsum("bm,bmd->bd", m, z)
    zz = z.square().sum(-1)
    zs = torch.einsum("bmd,bd->bm", z, total)
    ss = total.square().sum(-1, keepdim=True)
    dot = zs - zz
    oo = (ss - 2 * zs + zz).clamp_min(0)
    s = dot / (zz.sqrt() * oo.sqrt()).clamp_min(1e-8)
    others = mask.sum(1, keepdim=True) - mask.long()
    valid = mask & (others > 0)
    return torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))


def agreement(probs: Tensor, mask: Tensor) -> Tensor:
    c = normalized_confidence(probs) * mask.to(probs.dtype) + 1e-6 * mask.to(probs.dtype)
    total = torch.einsum("bm,bmk->bk", c, probs)
    others = total.unsqueeze(1) - c.unsqueeze(-1) * probs
    vote = others.argmax(-1, keepdim=True)
    a = probs.gather(-1, vote).squeeze(-1)
    valid = mask & ((mask.sum(1, keepdim=True) - mask.long()) > 0)
    return torch.where(valid, a, torch.zeros((), dtype=a.dtype, device=a.device))


def score(scorer, z: Tensor, mask: Tensor, logits: Tensor, heads, hidden: Tensor | None) -> Tensor:
    """One scorer's signal ``(B, M)``, by its signal name."""
    if scorer.signal == "confidence":
        return normalized_confidence(logits.float().softmax(-1))
    if scorer.signal == "uncertainty":
        probs = heads_sample(heads, z, scorer.config.passes, scorer.config.dropout, hidden,
                             per_sample=scorer.config.per_sample_masks)
        return mc_variance(probs.float())
    if scorer.signal == "alignment":
        return alignment(z.float(), mask)
    if scorer.signal == "agreement":
        return agreement(logits.float().softmax(-1), mask)
    raise ValueError(f"no reference for signal {scorer.signal!r}")


# -- schedulers/* ---------------------------------------------------------------------------
def signal_norm(norm, feats: Tensor, mask: Tensor) -> Tensor:
    if norm.training:
        m = mask.unsqueeze(-1).to(feats.dtype)
        n = m.sum().clamp_min(1)
        mean = (feats * m).sum((0, 1)) / n
        var = ((feats - mean).square() * m).sum((0, 1)) / n
        with torch.no_grad():
            rate = max(norm.momentum, 1.0 / float(norm.batches + 1))
            norm.running_mean.lerp_(mean.detach().to(norm.running_mean.dtype), rate)
            norm.running_var.lerp_(var.detach().to(norm.running_var.dtype), rate)
            norm.batches += 1
    else:
        mean, var = norm.running_mean.to(feats.dtype), norm.running_var.to(feats.dtype)
    return (feats - mean) / (var + 1e-8).sqrt()


def features(scheduler, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
    feats = torch.stack([scores[s].float() for s in scheduler.signals], dim=-1)
    return signal_norm(scheduler.norm, feats, mask) if scheduler.norm is not None else feats


def schedule(scheduler, scores: dict[str, Tensor], mask: Tensor) -> Tensor:
    if hasattr(scheduler, "mlp"):  # learned
        if scheduler.signals:
            feats = features(scheduler, scores, mask)
        else:
            feats = mask.unsqueeze(-1).float()
        feats = feats.to(scheduler.mlp[0].weight.dtype)
        logit = scheduler.mlp(feats).squeeze(-1)
        return masked_softmax(logit.float(), mask)
    if not scheduler.signals:  # softmax rule without signals
        return masked_softmax(mask.float() * 0.0, mask)
    logit = features(scheduler, scores, mask) @ scheduler.coef_vector.float()
    return masked_softmax(logit / scheduler.config.temperature, mask)


# -- fusions/dms.py -------------------------------------------------------------------------
def mwcl(fused: Tensor, z: Tensor, weights: Tensor) -> Tensor:
    return ((weights * z.square().sum(-1)).sum(1) - fused.square().sum(-1)).clamp_min(0).mean()


def route_loss(weights: Tensor, unimodal_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    right = probe_correct(unimodal_logits.detach().argmax(-1), target) & mask
    n_right = right.sum(1)
    informative = ((n_right > 0) & (n_right < mask.sum(1))).float()
    goal = right.float() / n_right.clamp_min(1).unsqueeze(1)
    ce = -(goal * weights.float().clamp_min(1e-8).log()).sum(1)
    return (ce * informative).sum() / informative.sum().clamp_min(1)


def dms_forward(f, z: dict[str, Tensor], mask: Tensor | None, use_values: dict[str, Tensor] | None = None) -> dict:
    """``DMSFusion.forward`` + ``combine`` of commit b80adc4 on module ``f``: the output's fields.

    ``use_values``: signals whose *values* replace the ones computed here from then on (the
    gradient still flows through this function's own computation); ``computed_scores`` keeps
    what was computed. Used to compare the steps after a signal from the same input value.
    """
    stacked, mask = stack_modalities(z, f.modalities, mask)
    heads = f.heads
    hidden = heads_hidden(heads, stacked)
    unimodal_logits = heads_output(heads, F.dropout(hidden, heads.dropout, f.training))
    detach = f.config.detach_scores
    if detach:
        hidden = hidden.detach()
    scored = heads_calibrate(heads, unimodal_logits)
    zc = stacked.detach() if detach else stacked
    lc = scored.detach() if detach else scored
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        scores = {s.signal: score(s, zc, mask, lc, heads, hidden) for s in f.scorers}
    computed = dict(scores)
    for name, value in (use_values or {}).items():
        scores[name] = scores[name] + (value - scores[name]).detach()
    weights = schedule(f.scheduler, scores, mask)
    fused = torch.einsum("bm,bmd->bd", weights.to(stacked.dtype), stacked)
    losses = {}
    if f.config.mwcl_weight > 0:
        losses["mwcl"] = f.config.mwcl_weight * mwcl(fused.float(), stacked.float(), weights.float())
    return {"fused": fused, "weights": weights, "unimodal_logits": unimodal_logits, "mask": mask,
            "z": stacked, "scores": scores, "computed_scores": computed, "extra_losses": losses}


def dms_loss_terms(f, out: dict, target: Tensor) -> dict[str, Tensor]:
    """``DMSFusion.loss_terms`` of commit b80adc4."""
    terms = {"aux": f.config.aux_weight * masked_unimodal_loss(out["unimodal_logits"], target, out["mask"])}
    terms.update(out["extra_losses"])
    if f.routes:
        terms["route"] = f.config.route_weight * route_loss(out["weights"], out["unimodal_logits"], target, out["mask"])
    return terms
