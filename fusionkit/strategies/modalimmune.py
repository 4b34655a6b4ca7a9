"""ModalImmune: collapse a chosen modality on purpose during training, so that losing it later hurts less.

Each step (with the controller on), for the representations ``z_m`` ``(B, d)`` the fusion received:

1. **Information gain** of every modality m present in at least 2 samples:
   ``IG_m = L_task(fuse(z with z_m -> mu_m)) - L_task(fuse(z))`` (no gradient), how much worse the
   model does when m says nothing; ``G_m <- beta G_m + (1 - beta) IG_m``. The controller draws the
   modality to collapse, ``m* ~ softmax(G / tau)`` over the available ones, so the modalities the
   model leans on most are collapsed most often (controller off: uniformly).
2. **Collapse target** of m* (spectrum-adaptive): over the samples that have m*,
   ``Z_c = Z - mu`` (mu the batch mean, detached), ``Z_c = U diag(s) V^T``, effective rank
   ``r = exp(-sum_k p_k log p_k)`` with ``p = s / sum(s)``, ``P = V_k V_k^T`` the projector on the
   top ``k = floor(r)`` directions (detached), and

       ``T_lambda(Z) = mu + (1 - lambda) Z_c P``,

   i.e. the informative directions (within the effective rank) shrink by ``1 - lambda`` and the
   tail beyond it is removed; ``lambda = 1`` leaves the uninformative ``mu``.
   **Immune term** ``immune = w_imm * L_task(fuse(z with z_m* -> T_lambda))`` on the samples that
   also have another modality (a sample left with nothing keeps its z).
3. **Spectrum-adaptive collapse regulariser** (``regularizer``): pulls the clean representation's
   spectrum toward the target's,
   ``collapse = w_reg * ||Z_c - (1 - lambda) sg(Z_c P)||_F^2 / sg(||Z_c||_F^2)``
   ``= w_reg * (lambda^2 sum_{k<=r} s_k^2 + sum_{k>r} s_k^2) / sum_k s_k^2``.
4. **Curvature-aware gradient masking** (``grad_mask``): with g_c the gradient of
   ``immune + collapse`` and ``g_clean = grad - g_c``, an entry keeps only its clean gradient where
   its diagonal curvature (AdamW's ``exp_avg_sq``, an EMA of squared gradients = the diagonal
   empirical Fisher) exceeds ``kappa`` times its tensor's mean AND ``g_c * g_clean < 0`` (the
   destructive update would raise the clean loss there).
5. **Truncated-Neumann hyper-gradient** (``hypergrad``) for ``lambda_m = sigmoid(phi_m)``: the batch
   is split into a training part S and a held-out part V (the last ``holdout`` of it); with w the
   fusion and decoder parameters and z fixed,
   ``d L_V / d phi = - (d^2 L_S / d phi dw) H^-1 grad_w L_V``, ``H = d^2 L_S / dw^2``,
   ``H^-1 v ~ alpha sum_{j<K} (I - alpha H)^j v`` (Hessian-vector products by double backward;
   ``alpha = 0.5 / lambda_max(H)`` from a few power iterations unless set), and phi takes an Adam
   step on it. The update is skipped (counted) when the series does not contract (last term larger
   than the first), our stand-in for the paper's certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.strategies.base import (FusionInputs, Strategy, StrategyConfig, TrainContext, decode_tensor,
                                       encode_optimizer, encode_tensor, load_optimizer_json, optimizer_state,
                                       take_rows, task_loss, trainable)
from fusionkit.strategies.hypergrad import hypergradient


class ModalImmuneConfig(StrategyConfig):
    modalities: list[str] | None = Field(None, description="modalities that may be collapsed; None = all")
    strength: float = Field(0.5, gt=0, lt=1, description=(
        "initial collapse strength lambda of every modality (0 = none, 1 = to the batch mean)"))
    immune_weight: float = Field(1.0, ge=0, description="w_imm: weight of the task loss on the collapsed pass")
    regularizer: bool = Field(True, description="add the spectrum-adaptive collapse regulariser")
    reg_weight: float = Field(0.1, ge=0, description="w_reg: its weight (it reshapes the encoder: keep it small)")
    controller: bool = Field(True, description="pick the modality by information gain (false: uniformly)")
    temperature: float = Field(0.5, gt=0, description="tau of the controller's softmax over gains (nats)")
    gain_ema: float = Field(0.9, ge=0, lt=1, description="beta: EMA of the information gains across steps")
    grad_mask: bool = Field(True, description="curvature-aware masking of the collapse gradient")
    curvature_ratio: float = Field(1.0, gt=0, description="kappa: 'high curvature' = above kappa x the tensor's mean")
    hypergrad: bool = Field(True, description="adapt lambda by the truncated-Neumann hyper-gradient")
    neumann_terms: int = Field(5, ge=1, description="K: terms of the Neumann series for H^-1 v")
    neumann_alpha: float | None = Field(None, gt=0, description=(
        "alpha: step of the series (it contracts for alpha < 2 / lambda_max(H)); None = 0.5 / lambda_max "
        "estimated by power_steps power iterations"))
    power_steps: int = Field(3, ge=1, description="power iterations (HVPs) for the automatic alpha")
    meta_lr: float = Field(0.05, gt=0, description="Adam learning rate of phi = logit(lambda)")
    holdout: float = Field(0.25, gt=0, lt=1, description="share of each batch held out for the hyper-gradient")
    hypergrad_every: int = Field(10, ge=1, description="steps between hyper-gradient updates (each costs K HVPs)")


@dataclass
class Collapse:
    """The collapse target of one modality: ``target`` ``(B, d)`` (rows outside ``rows`` unchanged),
    the regulariser value ``penalty`` (a scalar) and the effective rank ``rank``."""

    target: Tensor
    penalty: Tensor
    rank: float


def collapse_target(z: Tensor, rows: Tensor, strength: Tensor) -> Collapse:
    """Spectrum-adaptive collapse target of ``z`` ``(B, d)`` over the samples ``rows`` ``(B,)`` bool
    (see the module docstring); ``strength`` is lambda (a 0-dim tensor, differentiable)."""
    zf = z.float()
    present = zf[rows]  # (n, d)
    if present.shape[0] < 2:  # no spread to collapse
        return Collapse(z, zf.sum() * 0.0, 0.0)
    mu = present.mean(0, keepdim=True).detach()  # (1, d)
    centred = present - mu  # (n, d)
    s, vh = torch.linalg.svd(centred.detach(), full_matrices=False)[1:]  # (r0,), (r0, d)
    total = s.sum()
    if not total > 1e-8 * max(1.0, float(present.detach().abs().max())):
        return Collapse(z, zf.sum() * 0.0, 0.0)
    p = s / total
    rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
    keep = max(1, int(math.floor(rank + 1e-6)))
    proj = vh[:keep].T @ vh[:keep]  # (d, d), the top-k right singular subspace
    kept = centred @ proj  # (n, d)
    shrunk = (1 - strength) * kept  # (n, d)
    penalty = (centred - (1 - strength) * kept.detach()).pow(2).sum() / centred.detach().pow(2).sum()
    target = zf.clone()
    target[rows] = mu + shrunk
    return Collapse(target.to(z.dtype), penalty, rank)


@register("strategies", "modalimmune")
class ModalImmune(Strategy):
    """ModalImmune: collapse the modality chosen by information gain, with a spectral regulariser,
    curvature-aware gradient masking and a Neumann hyper-gradient on the collapse strength."""

    Config = ModalImmuneConfig

    @classmethod
    def check(cls, config: ModalImmuneConfig, modalities: list[str], path: str) -> None:
        for m in config.modalities or ():
            if m not in modalities:
                raise ConfigError(f"{path}.modalities: '{m}' is not among the run's modalities {sorted(modalities)}")

    def on_train_start(self, model: nn.Module, optimizer, context: TrainContext) -> None:
        cfg = self.config
        if cfg.grad_mask and (context.precision == "16-mixed" or context.world_size > 1):
            raise ConfigError("train.strategies: modalimmune grad_mask needs one process and no fp16 loss scaling "
                              "(it separates the collapse gradient from the clean one); set grad_mask: false")
        self.modalities = list(model.modalities)
        device = next(model.parameters()).device
        self.phi = torch.full((len(self.modalities),), math.log(cfg.strength / (1 - cfg.strength)), device=device,
                              requires_grad=True)  # its gradient is the hyper-gradient alone
        self.meta_opt = torch.optim.Adam([self.phi], lr=cfg.meta_lr)
        self.gain = torch.zeros(len(self.modalities), dtype=torch.float64)  # G_m
        self.seen = torch.zeros(len(self.modalities), dtype=torch.bool)
        self.picks = torch.zeros(len(self.modalities), dtype=torch.float64)
        self.masked, self.entries, self.skipped = 0, 0, 0
        self.allowed = [m in (cfg.modalities or self.modalities) for m in self.modalities]
        self.inputs = FusionInputs(model)
        self.optimizer, self.autocast = optimizer, context.autocast
        self.params = trainable(model)
        self.meta_params = trainable(model.fusion) + trainable(model.decoder)
        self._step: dict[str, Any] | None = None

    # -- per step -----------------------------------------------------------------------------------
    def _rows(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per modality: present rows ``(B, M)`` and rows that have another modality too."""
        mask = batch["mask"].bool()  # (B, M)
        others = (mask.sum(1, keepdim=True) - mask.long()) > 0  # (B, M)
        return mask, mask & others

    def _pick(self, model, out, batch, z: dict[str, Tensor], rows: Tensor) -> int | None:
        present = rows.sum(0)  # (M,) samples whose m can be collapsed
        avail = torch.tensor([a and int(n) >= 2 for a, n in zip(self.allowed, present.tolist())])
        if len(self.modalities) < 2 or not avail.any():
            return None
        if self.config.controller:
            with torch.no_grad(), self.autocast():
                clean = float(task_loss(model, out, batch))
                for j, m in enumerate(self.modalities):
                    if not avail[j]:
                        continue
                    col = rows[:, j].to(z[m].device)
                    mu = z[m][batch["mask"][:, j].to(z[m].device)].mean(0, keepdim=True)  # (1, d)
                    gone = {**z, m: torch.where(col.unsqueeze(1), mu.expand_as(z[m]), z[m])}
                    gain = float(task_loss(model, model.fuse(gone, out.tokens, batch), batch)) - clean
                    beta = self.config.gain_ema if self.seen[j] else 0.0
                    self.gain[j] = beta * self.gain[j] + (1 - beta) * gain
                    self.seen[j] = True
            logits = (self.gain / self.config.temperature).masked_fill(~avail, float("-inf"))
            probs = torch.softmax(logits, 0)
        else:
            probs = avail.double() / avail.sum()
        return int(torch.multinomial(probs.float(), 1))  # the CPU generator: restored by --resume

    def _collapsed(self, model, z, tokens, batch, j: int, rows: Tensor, lam: Tensor, target_only: bool = False):
        m = self.modalities[j]
        col = collapse_target(z[m], batch["mask"][:, j].to(z[m].device).bool(), lam)
        use = rows[:, j].to(z[m].device).unsqueeze(1)  # (B, 1)
        changed = {**z, m: torch.where(use, col.target, z[m])}
        return col, (None if target_only else model.fuse(changed, tokens, batch))

    def loss_terms(self, out, batch: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
        cfg = self.config
        z = self.inputs.z
        zero = out.fusion.fused.float().sum() * 0.0
        terms = {"immune": zero, **({"collapse": zero} if cfg.regularizer else {})}
        if z is None:
            return terms
        _, rows = self._rows(batch)
        j = self._pick(model, out, batch, z, rows)
        if j is None:
            return terms
        self.picks[j] += 1
        lam = torch.sigmoid(self.phi[j].detach())  # the training loss does not move lambda; the hyper-gradient does
        with self.autocast():
            col, collapsed = self._collapsed(model, z, out.tokens, batch, j, rows, lam)
            terms["immune"] = cfg.immune_weight * task_loss(model, collapsed, batch)
        if cfg.regularizer:
            terms["collapse"] = cfg.reg_weight * col.penalty
        grads = None
        if cfg.grad_mask:
            destructive = sum(terms.values())
            grads = torch.autograd.grad(destructive, self.params, retain_graph=True, allow_unused=True)
        self._step = {"pick": j, "grads": grads, "batch": batch, "tokens": out.tokens,
                      "z": {m: v.detach() for m, v in z.items()}, "rows": rows}
        return terms

    def after_backward(self, model: nn.Module, step: int) -> None:
        if not self.config.grad_mask or self._step is None or self._step["grads"] is None:
            return
        state = optimizer_state(self.optimizer)
        with torch.no_grad():
            for p, g_c in zip(self.params, self._step["grads"]):
                curv = state.get(p, {}).get("exp_avg_sq") if p.grad is not None and g_c is not None else None
                if curv is None:  # first step (no curvature yet), or not reached by the collapse
                    continue
                clean = p.grad - g_c
                sel = (g_c * clean < 0) & (curv > self.config.curvature_ratio * curv.mean())
                p.grad.copy_(torch.where(sel, clean, p.grad))
                self.masked += int(sel.sum())
                self.entries += sel.numel()

    def after_step(self, model: nn.Module, step: int) -> None:
        cfg = self.config
        if cfg.hypergrad and self._step is not None and (step + 1) % cfg.hypergrad_every == 0:
            self._adapt(model)
        self._step = None
        self.inputs.clear()

    def _adapt(self, model: nn.Module) -> None:
        """One hyper-gradient step on phi of the modality collapsed this step."""
        cfg, st = self.config, self._step
        j, z, rows, batch = st["pick"], st["z"], st["rows"], st["batch"]
        B = batch["mask"].shape[0]
        n_out = max(1, math.ceil(cfg.holdout * B))
        if B - n_out < 2 or not self.meta_params:
            return
        idx_in, idx_out = torch.arange(B - n_out), torch.arange(B - n_out, B)
        parts = []
        for idx in (idx_in, idx_out):
            sub = take_rows(batch, idx)
            tok = {m: type(t)(t.tokens[idx.to(t.tokens.device)].detach(), t.mask[idx.to(t.mask.device)])
                   for m, t in st["tokens"].items()}
            parts.append((sub, tok, {m: v[idx.to(v.device)] for m, v in z.items()}, rows[idx]))
        phi = self.phi.detach().clone().requires_grad_(True)
        (s_batch, s_tok, s_z, s_rows), (v_batch, v_tok, v_z, _) = parts

        def inner() -> Tensor:
            with self.autocast():
                clean = task_loss(model, model.fuse(s_z, s_tok, s_batch), s_batch)
                if int(s_rows[:, j].sum()) < 2:
                    return clean
                _, collapsed = self._collapsed(model, s_z, s_tok, s_batch, j, s_rows, torch.sigmoid(phi[j]))
                return clean + cfg.immune_weight * task_loss(model, collapsed, s_batch)

        def outer() -> Tensor:
            with self.autocast():
                return task_loss(model, model.fuse(v_z, v_tok, v_batch), v_batch)

        grad, norms = hypergradient(inner, outer, self.meta_params, phi, cfg.neumann_terms, cfg.neumann_alpha,
                                    cfg.power_steps)
        if grad is None or not norms or norms[-1] > norms[0] or not bool(torch.isfinite(grad).all()):
            self.skipped += 1
            return
        self.meta_opt.zero_grad(set_to_none=True)
        self.phi.grad = grad.to(self.phi)
        self.meta_opt.step()

    # -- epochs, state ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        total = max(float(self.picks.sum()), 1.0)
        info = {"strength": {m: float(torch.sigmoid(self.phi[j].detach())) for j, m in enumerate(self.modalities)},
                "picked": {m: float(self.picks[j]) / total for j, m in enumerate(self.modalities)},
                "gain": {m: float(self.gain[j]) for j, m in enumerate(self.modalities)},
                "masked": self.masked / max(self.entries, 1), "hypergrad_skipped": self.skipped}
        self.picks.zero_()
        self.masked, self.entries, self.skipped = 0, 0, 0
        return info

    def on_train_end(self, model: nn.Module) -> None:
        self.inputs.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"phi": encode_tensor(self.phi), "meta_opt": encode_optimizer(self.meta_opt),
                "gain": encode_tensor(self.gain), "seen": encode_tensor(self.seen),
                "picks": encode_tensor(self.picks), "masked": self.masked, "entries": self.entries,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.phi.copy_(decode_tensor(state["phi"]))
        load_optimizer_json(self.meta_opt, state["meta_opt"])
        self.gain, self.seen, self.picks = (decode_tensor(state[k]) for k in ("gain", "seen", "picks"))
        self.masked, self.entries, self.skipped = state["masked"], state["entries"], state["skipped"]
