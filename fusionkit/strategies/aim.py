"""AIM, adaptive intra-network modulation: train the dominant modality's under-optimised units with the weak ones.

Depths. A modality's depths are its encoder's trainable ``Linear``/``Conv`` layers (at most
``max_depths - 1``, evenly spaced, in module order) followed by its projector's ``Linear``; a frozen
or cached encoder contributes none. At depth l a unit is an output channel c (a weight row).

Per step:

1. **Dominant modality**: the one whose unimodal head has the lowest loss EMA (or ``dominant``);
   the others are the weak ones.
2. **Under-optimised units** (``after_backward``): ``u_lc = EMA of ||grad W_lc|| / ||W_lc||``, the
   gradient relative to the weight, per unit; the ``under_fraction`` of units of each depth with
   the largest u are under-optimised (the loss is still sensitive to them for their size), the
   rest well-optimised.
3. **Imbalance per depth**: a linear probe q_ml on every depth's pooled, detached activations,
   trained with its own Adam (``after_step``) on the task's probe targets; with E_ml the EMA of its
   cross-entropy and j(l) the weak modality's depth at the same relative position
   (``ceil((l + 1) / L_dom * L_w) - 1``),

       ``rho_l = mean_w E_{w, j(l)} / E_{dom, l}``,  ``s_l = tanh(gamma * max(0, rho_l - 1))``:

   no modulation where the dominant modality is not ahead at that depth.
4. **Auxiliary block** (``loss_terms``): the dominant encoder and projector run again with each
   depth's output scaled by the gate ``g_lc = 1`` (under-optimised c) or ``1 - s_l`` (others): a
   performance-degraded copy made of its under-optimised units. Its ``z~_dom`` is fused with the
   weak modalities' ``z`` (same mask) and ``aim = weight * L_task(fuse(z_weak, z~_dom))``, so the
   weak modalities must carry the prediction next to a weakened dominant one, and the dominant
   modality's gradient from this term reaches mainly its under-optimised units (the others'
   outputs are scaled by ``1 - s_l``). The ordinary forward pass is left as it is: the dominant
   modality is not held back. The auxiliary pass leaves batch-norm statistics untouched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.registry import register
from fusionkit.strategies.base import (FusionInputs, Strategy, StrategyConfig, TrainContext, decode_tensor,
                                       encode_optimizer, encode_tensor, load_optimizer_json, task_loss)
from fusionkit.tasks.targets import has_label, is_soft

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class AIMConfig(StrategyConfig):
    dominant: str | None = Field(None, description="dominant modality; None = the lowest unimodal-head loss EMA")
    weight: float = Field(1.0, ge=0, description="weight of the auxiliary joint loss 'aim'")
    under_fraction: float = Field(0.5, gt=0, lt=1, description="share of each depth's units counted as under-optimised")
    gamma: float = Field(1.0, gt=0, description="slope of s_l = tanh(gamma * max(0, rho_l - 1))")
    ema: float = Field(0.9, ge=0, lt=1, description="EMA factor of the gradient ratios and losses")
    probe_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the per-depth probes")
    max_depths: int = Field(8, ge=1, description="depths per modality (the projector included)")


def modulation_strength(dominant: Tensor, weak: list[Tensor], gamma: float) -> Tensor:
    """``s_l = tanh(gamma * max(0, rho_l - 1))``, ``rho_l = mean_w weak_w[j(l)] / dominant[l]``
    for per-depth probe losses ``dominant`` ``(L,)`` and each weak modality's ``(L_w,)``; NaN (not
    measured yet) gives 0."""
    L = dominant.shape[0]
    if not weak:
        return torch.zeros(L)
    matched = torch.stack([w[[min(len(w), math.ceil((l + 1) / L * len(w))) - 1 for l in range(L)]]
                           for w in weak]).mean(0)  # (L,)
    rho = matched / dominant
    return torch.nan_to_num(torch.tanh(gamma * (rho - 1).clamp_min(0)), nan=0.0)


def unit_gates(ratio: Tensor, fraction: float, strength: float) -> Tensor:
    """Gate per unit: 1 for the ``fraction`` with the largest gradient ratio (under-optimised),
    ``1 - strength`` for the others."""
    n = max(1, math.ceil(fraction * ratio.numel()))
    under = torch.argsort(ratio, descending=True, stable=True)[:n]
    gates = torch.full_like(ratio, 1.0 - strength)
    gates[under] = 1.0
    return gates


def probe_loss(logits: Tensor, target: Tensor) -> Tensor | None:
    """Mean cross-entropy over the labelled samples (hard or soft targets); None without any."""
    labelled = has_label(target)
    if not bool(labelled.any()):
        return None
    logits, target = logits[labelled].float(), target[labelled]
    if is_soft(target):
        return -(target.to(logits.dtype) * logits.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(logits, target)


def depth_modules(model: nn.Module, m: str, max_depths: int) -> list[nn.Module]:
    enc = model.encoders[m]
    layers = [] if m in model.precomputed else [
        mod for mod in enc.modules() if isinstance(mod, LAYERS) and mod.weight.requires_grad]
    keep = max_depths - 1
    if len(layers) > keep:
        layers = [layers[round(i * (len(layers) - 1) / max(keep - 1, 1))] for i in range(keep)] if keep else []
    return [*layers, model.projectors[m][0]]


def _pool(a: Tensor, layer: nn.Module) -> Tensor:
    """Activations -> ``(N, C)``: channels last for Linear, dim 1 for Conv; the rest averaged."""
    if isinstance(layer, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1]).mean(1)
    return a.flatten(2).mean(2)


@register("strategies", "aim")
class AIM(Strategy):
    """AIM: the dominant modality's under-optimised units form an auxiliary block trained with the
    weak modalities, modulated per depth by the imbalance measured there."""

    Config = AIMConfig

    @classmethod
    def check(cls, config: AIMConfig, modalities: list[str], path: str) -> None:
        if config.dominant is not None and config.dominant not in modalities:
            raise ConfigError(f"{path}.dominant: '{config.dominant}' is not among the run's modalities "
                              f"{sorted(modalities)}")

    def on_train_start(self, model: nn.Module, optimizer, context: TrainContext) -> None:
        if getattr(model.decoder, "retrieval", False):
            raise ConfigError("train.strategies: aim's depth probes need a fixed probe space; the retrieval task's "
                              "probes are the in-batch candidates. Use aim with classification, vqa or captioning")
        self.modalities, self.autocast = list(model.modalities), context.autocast
        device = next(model.parameters()).device
        K = model.fusion.num_classes
        self.depths = {m: depth_modules(model, m, self.config.max_depths) for m in self.modalities}
        # built on the meta device and zeroed: a uniform first prediction, and no draw from the RNG
        self.probes = nn.ModuleDict({m: nn.ModuleList([nn.Linear(self._width(d), K, device="meta") for d in ds])
                                     for m, ds in self.depths.items()}).to_empty(device=device)
        for p in self.probes.parameters():
            nn.init.zeros_(p)
        self.probe_opt = torch.optim.Adam(self.probes.parameters(), lr=self.config.probe_lr)
        self.ratio = {m: [torch.zeros(self._width(d), device=device) for d in ds] for m, ds in self.depths.items()}
        self.probe_ema = {m: torch.full((len(ds),), float("nan")) for m, ds in self.depths.items()}
        self.head_ema = torch.full((len(self.modalities),), float("nan"))
        self.acts: dict[tuple[str, int], Tensor] = {}
        self.gates: dict[int, Tensor] | None = None  # id(layer) -> gate, only during the auxiliary pass
        self.inputs = FusionInputs(model)
        self.handles = [d.register_forward_hook(self._hook(m, l)) for m, ds in self.depths.items()
                        for l, d in enumerate(ds)]
        self._probe_loss: Tensor | None = None

    @staticmethod
    def _width(layer: nn.Module) -> int:
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def _hook(self, m: str, l: int):
        def hook(layer: nn.Module, args, output: Tensor):
            if self.gates is not None:  # the auxiliary pass: scale the well-optimised units
                gate = self.gates.get(id(layer))
                if gate is None:
                    return None
                shape = [1] * output.dim()
                shape[-1 if isinstance(layer, nn.Linear) else 1] = -1
                return output * gate.to(output.dtype).view(shape)
            if layer.training and (m, l) not in self.acts:
                self.acts[(m, l)] = _pool(output.detach(), layer).float()  # (N, C)
            return None
        return hook

    # -- which modality dominates, and how much at each depth ---------------------------------------
    def dominant(self) -> str | None:
        if self.config.dominant is not None:
            return self.config.dominant
        if torch.isnan(self.head_ema).all() or len(self.modalities) < 2:
            return None
        return self.modalities[int(torch.nan_to_num(self.head_ema, nan=float("inf")).argmin())]

    def strengths(self, dom: str) -> Tensor:
        weak = [self.probe_ema[w] for w in self.modalities if w != dom]
        return modulation_strength(self.probe_ema[dom], weak, self.config.gamma)

    def _ema(self, old: Tensor, new: Tensor) -> Tensor:
        return torch.where(torch.isnan(old), new, self.config.ema * old + (1 - self.config.ema) * new)

    # -- per step -----------------------------------------------------------------------------------
    def loss_terms(self, out, batch: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
        dom, z = self.dominant(), self.inputs.z  # from the steps before this one
        s = self.strengths(dom) if dom is not None else None
        self._measure(out, batch, batch["target"])  # this batch's losses: for the next steps
        aim = out.fusion.fused.float().sum() * 0.0
        if dom is None or z is None or batch["inputs"].get(dom) is None:
            return {"aim": aim}
        weak_present = batch["mask"][:, [j for j, m in enumerate(self.modalities) if m != dom]].any()
        if not bool(weak_present) or float(s.max()) <= 0:
            return {"aim": aim}
        self.gates = {id(d): unit_gates(self.ratio[dom][l], self.config.under_fraction, float(s[l]))
                      for l, d in enumerate(self.depths[dom])}
        aux_batch = {**batch, "inputs": {m: (x if m == dom else None) for m, x in batch["inputs"].items()}}
        # the degraded pass must not move batch-norm running statistics: it updates copies, and the
        # originals (which the ordinary pass's graph saved for its backward) are put back untouched
        norms = [(bn, dict(bn.named_buffers(recurse=False))) for bn in model.encoders[dom].modules()
                 if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
        for bn, buffers in norms:
            for k, v in buffers.items():
                setattr(bn, k, v.clone())
        try:
            with self.autocast():
                degraded, _ = model.encode(aux_batch)
                aux = model.fuse({**z, dom: degraded[dom]}, out.tokens, batch)
                aim = self.config.weight * task_loss(model, aux, batch)
        finally:
            self.gates = None
            for bn, buffers in norms:
                for k, v in buffers.items():
                    setattr(bn, k, v)
        return {"aim": aim}

    def _measure(self, out, batch: dict[str, Any], target: Tensor) -> None:
        """Head-loss EMAs (which modality dominates) and the probes' losses on this batch."""
        with torch.no_grad():
            logits = out.fusion.unimodal_logits  # (B, M, K)
            for j, m in enumerate(self.modalities):
                rows = batch["mask"][:, j].to(logits.device).bool()
                loss = probe_loss(logits[rows, j], target[rows.to(target.device)]) if rows.any() else None
                if loss is not None:
                    self.head_ema[j] = self._ema(self.head_ema[j], loss.cpu())
        total = None
        for (m, l), a in self.acts.items():
            rows = batch["rows"][m] if batch["inputs"].get(m) is not None else None
            if rows is None or a.shape[0] != rows.shape[0]:  # a layer run on other rows (frames ...)
                continue
            loss = probe_loss(self.probes[m][l](a), target[rows.to(target.device)])
            if loss is None:
                continue
            self.probe_ema[m][l] = self._ema(self.probe_ema[m][l], loss.detach().cpu())
            total = loss if total is None else total + loss
        self._probe_loss = total

    def after_backward(self, model: nn.Module, step: int) -> None:
        b = self.config.ema
        with torch.no_grad():
            for m, ds in self.depths.items():
                for l, layer in enumerate(ds):
                    g = layer.weight.grad
                    if g is None:
                        continue
                    r = g.flatten(1).norm(dim=1) / (layer.weight.flatten(1).norm(dim=1) + 1e-12)  # (C,)
                    self.ratio[m][l].mul_(b).add_((1 - b) * r.float())

    def after_step(self, model: nn.Module, step: int) -> None:
        if self._probe_loss is not None:
            self.probe_opt.zero_grad(set_to_none=True)
            self._probe_loss.backward()
            self.probe_opt.step()
        self._probe_loss = None
        self.acts.clear()
        self.inputs.clear()

    # -- epochs, state ------------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        dom = self.dominant()
        finite = lambda t: [None if math.isnan(v) else v for v in t.tolist()]  # noqa: E731
        return {"dominant": dom, "strength": self.strengths(dom).tolist() if dom else [],
                "probe_loss": {m: finite(e) for m, e in self.probe_ema.items()}}

    def on_train_end(self, model: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        self.inputs.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"probes": {k: encode_tensor(v) for k, v in self.probes.state_dict().items()},
                "probe_opt": encode_optimizer(self.probe_opt),
                "ratio": {m: [encode_tensor(r) for r in rs] for m, rs in self.ratio.items()},
                "probe_ema": {m: encode_tensor(e) for m, e in self.probe_ema.items()},
                "head_ema": encode_tensor(self.head_ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probes.load_state_dict({k: decode_tensor(v) for k, v in state["probes"].items()})
        load_optimizer_json(self.probe_opt, state["probe_opt"])
        self.ratio = {m: [decode_tensor(r, self.ratio[m][0].device) for r in rs] for m, rs in state["ratio"].items()}
        self.probe_ema = {m: decode_tensor(e) for m, e in state["probe_ema"].items()}
        self.head_ema = decode_tensor(state["head_ema"])
