"""What every fusion policy shares: unimodal heads, masks, the output record and the losses.

A fusion takes ``z: dict[str, Tensor]`` (each ``(B, d)``, already projected into the shared
width) and an optional presence mask ``(B, M)``, stacks the modalities in sorted-name order,
and returns a :class:`FusionOutput`. Every policy owns one small classification head per
modality, so unimodal accuracy and the auxiliary loss exist for DMS and baselines alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fusionkit.errors import ConfigError, DataError
from fusionkit.tasks.targets import has_label, is_soft


class FusionConfig(BaseModel):
    """Fields every fusion policy has."""

    model_config = ConfigDict(extra="forbid")

    aux_weight: float = Field(1.0, ge=0, description=(
        "mu: weight of the unimodal auxiliary losses; without them the heads that DMS scores "
        "with are untrained and their confidence means nothing"))
    head_hidden: int = Field(64, ge=1, description=(
        "width of each unimodal head's hidden layer; MC-dropout acts on this layer, so the T "
        "passes share the first matmul and stay cheap"))
    head_dropout: float = Field(0.2, ge=0, lt=1, description=(
        "dropout on the heads' hidden layer (also the MC-dropout rate)"))


@dataclass
class FusionOutput:
    """What a fusion returns.

    Attributes:
        fused: fused representation ``(B, d)``.
        weights: per-sample modality weights ``(B, M)`` in sorted-name order; rows sum to 1
            and are exactly 0 where a modality is missing. Policies without learned weights
            report the uniform weights over present modalities.
        unimodal_logits: each head's logits ``(B, M, K)``.
        mask: presence mask ``(B, M)`` used.
        z: stacked unimodal representations ``(B, M, d)``, missing rows zeroed.
        modalities: names in the stacking order.
        scores: quality signals by name, each ``(B, M)`` (empty for static policies).
        logits: class logits ``(B, K)`` when the policy decides at the decision level (late
            fusion, TMC); the model then skips its decoder.
        extra_losses: policy-specific loss terms, already weighted (e.g. ``mwcl``).
    """

    fused: Tensor
    weights: Tensor
    unimodal_logits: Tensor
    mask: Tensor
    z: Tensor
    modalities: list[str]
    scores: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    extra_losses: dict[str, Tensor] = field(default_factory=dict)


class UnimodalHeads(nn.Module):
    """M independent heads ``g_m: d -> hidden -> K`` evaluated in one batched einsum.

    Weights are stacked as ``(M, d, hidden)`` so all modalities run in a single call, and
    :meth:`sample` runs T stochastic passes at once for MC-dropout.

    Inside :meth:`mapped` every output (plain, sampled, hence what the scorers read) goes through
    a transform first: retrieval maps the K head outputs to similarities with the batch's
    candidates. Outside it (the default, and every classification or VQA run) outputs are the
    plain logits.
    """

    # buffers that checkpoints written before they existed may lack; their defaults are exact
    optional_state = ("temperature",)

    def __init__(self, num_modalities: int, dim: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        # per-head softmax temperature, fitted on the validation split after training
        # (fusionkit.training.calibration); 1 = uncalibrated. Scorers read calibrated logits.
        self.register_buffer("temperature", torch.ones(num_modalities))
        # eval-mode MC-dropout masks: a fixed bank of random bytes, the same for every sample (see
        # sample); not in the state dict, drawn from its own seed so the global RNG is untouched
        bank = random_bytes((EVAL_MASK_PASSES, num_modalities, hidden), torch.device("cpu"),
                            torch.Generator().manual_seed(EVAL_MASK_SEED))
        self.register_buffer("eval_mask_bytes", bank, persistent=False)  # (T_max, M, h) uint8
        self.w1 = nn.Parameter(torch.empty(num_modalities, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_modalities, hidden))
        self.w2 = nn.Parameter(torch.empty(num_modalities, hidden, num_classes))
        self.b2 = nn.Parameter(torch.zeros(num_modalities, num_classes))
        for w in (self.w1, self.w2):  # same init as nn.Linear, per modality
            for m in range(num_modalities):
                nn.init.kaiming_uniform_(w.data[m].T, a=math.sqrt(5))
        self.transform: Callable[[Tensor], Tensor] | None = None  # set only inside mapped()

    @contextmanager
    def mapped(self, transform: Callable[[Tensor], Tensor] | None) -> Iterator[None]:
        """Within the block, outputs ``(..., B, M, K)`` become ``transform(outputs)`` ``(..., B, M, N)``
        (None: unchanged). The model sets it per batch (see ``RetrievalDecoder.probe_transform``)."""
        previous, self.transform = self.transform, transform
        try:
            yield
        finally:
            self.transform = previous

    def hidden(self, z: Tensor) -> Tensor:
        """``z (B, M, d) -> (B, M, hidden)``: the deterministic part of every head."""
        return F.gelu(torch.einsum("bmd,mdh->bmh", z, self.w1) + self.b1)

    def output(self, a: Tensor) -> Tensor:
        """``a (..., B, M, hidden) -> (..., B, M, K)`` (``(..., B, M, N)`` inside :meth:`mapped`)."""
        logits = torch.einsum("...bmh,mhk->...bmk", a, self.w2) + self.b2
        return logits if self.transform is None else self.transform(logits)

    def calibrate(self, logits: Tensor) -> Tensor:
        """``(..., B, M, K)`` logits divided by each head's temperature (argmax unchanged)."""
        return logits / self.temperature.to(logits.dtype).unsqueeze(-1)

    def forward(self, z: Tensor) -> Tensor:
        """Logits ``(B, M, K)``; dropout follows the module's train/eval mode."""
        a = F.dropout(self.hidden(z), self.dropout, self.training)
        return self.output(a)

    def sample(self, z: Tensor, passes: int, dropout: float | None = None, hidden: Tensor | None = None,
               per_sample: bool = True) -> Tensor:
        """T stochastic passes with dropout always on: probabilities ``(T, B, M, K)``.

        Masks. Training with ``per_sample`` (the default) draws a new mask per sample and pass
        from the global RNG (T x B x M x h random bytes per call). Otherwise each pass t drops the
        same hidden units of head m for every sample of the batch (T masks per head): in training
        T fresh masks per call from the global RNG; in eval mode (always) the first T of a fixed
        bank (``eval_mask_bytes``, drawn once from ``EVAL_MASK_SEED``), so that a sample's
        uncertainty, and so its DMS weights, never depend on which samples share its batch, and
        eval draws nothing from the global RNG. Each sample's estimate is the variance of its own
        T passes either way.

        Shared masks fold into the output weights: pass t of head m is ``a_m @ (keep_tm * W2_m)``,
        so all T passes of head m are one matmul ``(T*K, h) @ (h, B)`` and no ``(T, B, M, h)``
        tensor of masked activations (nor its random bytes) is made.

        ``hidden`` (``(B, M, h)``) is the deterministic part if the caller already computed it.
        The dropout masks come from random bytes (rate rounded to a multiple of 1/256): on the
        CPU that is several times cheaper than drawing a float per element.

        Layout: the result is a ``(T, B, M, K)`` view of an ``(M, T, K, B)`` tensor (per sample:
        of ``(M, K, T, B)``), so that the softmax over K runs across contiguous rows (a softmax
        over a last dim of K = 10 costs as much as the matmul on the CPU).
        """
        p = self.dropout if dropout is None else dropout
        a = self.hidden(z) if hidden is None else hidden  # (B, M, h), shared by all passes
        B, M, H = a.shape
        drop = round(p * 256)
        if drop and per_sample and self.training:
            return self._sample_per_sample(a, passes, drop)
        K = self.w2.shape[-1]
        w2t = self.w2.transpose(1, 2)  # (M, K, h)
        if drop:
            if not self.training:  # the same T masks for every sample and every call: a fixed bank
                if passes > self.eval_mask_bytes.shape[0]:
                    raise ConfigError(f"mc_dropout: at most {EVAL_MASK_PASSES} passes (got {passes})")
                raw = self.eval_mask_bytes[:passes]  # (T, M, h)
            else:  # T fresh masks, shared by the batch's samples
                raw = random_bytes((passes, M, H), a.device)  # (T, M, h)
            # keep iff byte >= drop, times the inverted-dropout scale: 0 or 256 / (256 - drop)
            keep = torch.ge(raw, drop).to(w2t.dtype).mul_(256.0 / (256 - drop)).transpose(0, 1)  # (M, T, h)
            weights = keep.unsqueeze(2) * w2t.unsqueeze(1)  # (M, T, K, h): head m in pass t
        else:
            weights = w2t.unsqueeze(1).expand(M, passes, K, H)  # (M, T, K, h): every pass alike
        bias = self.b2.view(M, 1, K, 1).expand(M, passes, K, 1)  # (M, T, K, 1)
        # (M, T*K, h) @ (M, h, B) + b2: every pass of every sample, one matmul per head
        logits = torch.baddbmm(bias.reshape(M, passes * K, 1), weights.reshape(M, passes * K, H),
                               a.permute(1, 2, 0)).view(M, passes, K, B)  # (M, T, K, B)
        if self.transform is not None:
            return self.calibrate(self.transform(logits.permute(1, 3, 0, 2))).softmax(-1)  # (T, B, M, N)
        probs = logits.div_(self.temperature.to(logits.dtype).view(M, 1, 1, 1)).softmax(2)  # calibrated, over K
        return probs.permute(1, 3, 0, 2)  # (T, B, M, K) view

    def _sample_per_sample(self, a: Tensor, passes: int, drop: int) -> Tensor:
        """Training passes with a new mask per sample and pass (``sample``'s default):
        ``a (B, M, h)`` -> probabilities ``(T, B, M, K)``, a view of an ``(M, K, T, B)`` tensor.
        The masks are drawn by one call in ``(T, B, M, h)`` order."""
        B, M, H = a.shape
        # keep iff byte >= drop, written as 0/1 in a's dtype so that the multiply vectorises
        keep = torch.empty((passes, B, M, H), dtype=a.dtype, device=a.device)  # (T, B, M, h)
        torch.ge(random_bytes(keep.shape, a.device), drop, out=keep)
        x = keep * a if torch.is_grad_enabled() and a.requires_grad else keep.mul_(a)  # (T, B, M, h)
        scale = 256.0 / (256 - drop)  # inverted dropout, folded into the matmul
        x = x.reshape(passes * B, M, H).transpose(0, 1)  # (M, T*B, h), a view
        # (M, K, h) @ (M, h, T*B) + b2: every pass of every sample, one matmul per head
        logits = torch.baddbmm(self.b2.unsqueeze(-1), self.w2.transpose(1, 2), x.transpose(1, 2), alpha=scale)
        if self.transform is not None:
            logits = logits.view(M, -1, passes, B).permute(2, 3, 0, 1)  # (T, B, M, K)
            return self.calibrate(self.transform(logits)).softmax(-1)  # (T, B, M, N)
        probs = logits.div_(self.temperature.to(logits.dtype).view(M, 1, 1)).softmax(1)  # calibrated, (M, K, T*B)
        return probs.view(M, -1, passes, B).permute(2, 3, 0, 1)  # (T, B, M, K) view


EVAL_MASK_SEED = 0  # the MC-dropout masks of eval mode (see UnimodalHeads.sample)
EVAL_MASK_PASSES = 256  # the most MC-dropout passes eval mode supports


def random_bytes(shape: torch.Size | tuple[int, ...], device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """Uniform random uint8 tensor of ``shape``, drawn 8 bytes per 64-bit sample (4x cheaper).

    ``generator`` is passed on only when given: ``randint``'s overload with a generator takes no
    symbolic sizes, so under ``torch.compile`` with a symbolic batch size (``dynamic=True``, or
    the automatic recompile after the batch size changed) it would fail to trace.
    """
    n = math.prod(shape)
    extra = {} if generator is None else {"generator": generator}
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device, **extra)
    raw = words.view(torch.uint8)  # (8 * ceil(n / 8),)
    return (raw if n % 8 == 0 else raw[:n]).view(shape)


def stack_modalities(z: dict[str, Tensor], modalities: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Stack ``z`` in ``modalities`` order into ``(B, M, d)`` and build/check the mask.

    Missing entries are zeroed (``torch.where``, so a NaN in a missing row cannot leak) and a
    sample with no modality at all is an error: a :class:`DataError` naming the rows in eager
    mode, a ``RuntimeError`` raised by the compiled graph under ``torch.compile`` (which cannot
    branch on tensor values). A given mask is always applied, even when it is all True.
    """
    names = sorted(z)
    if names != modalities:
        raise DataError(f"fusion expects modalities {modalities}, got {names}")
    stacked = torch.stack([z[m] for m in modalities], dim=1)  # (B, M, d)
    B, M, _ = stacked.shape
    if mask is None:
        return stacked, torch.ones(B, M, dtype=torch.bool, device=stacked.device)
    mask = mask.to(device=stacked.device, dtype=torch.bool)
    if mask.shape != (B, M):
        raise DataError(f"mask must have shape (B, M) = {(B, M)}, got {tuple(mask.shape)}")
    if torch.compiler.is_compiling():
        torch._assert_async(mask.any(dim=1).all(),
                            "a sample of the batch has no modality present; drop it before fusion")
    else:
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()[:10]
            raise DataError(f"sample(s) {rows} of the batch have no modality present; drop them before fusion")
    stacked = torch.where(mask.unsqueeze(-1), stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
    return stacked, mask


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over dim 1 restricted to ``mask``; masked entries are exactly 0, never NaN."""
    missing = ~mask
    w = torch.softmax(logits.masked_fill(missing, float("-inf")), dim=1)  # (B, M)
    return w.masked_fill(missing, 0.0)  # a row can be all -inf (NaN) only when nothing is present


def uniform_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Equal weight on every present modality: ``(B, M)``."""
    m = mask.to(dtype)
    return m / m.sum(dim=1, keepdim=True)


def masked_unimodal_loss(unimodal_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """sum_m of the mean cross-entropy of head m over the samples that have modality m.

    ``target`` is ``(B,)`` class indices (-100: outside the task's probe space) or a soft
    ``(B, K)`` distribution (soft cross-entropy ``-sum_k y_k log p_k``); samples without a label
    (-100, an all-zero row) are left out.
    """
    B, M, K = unimodal_logits.shape
    if is_soft(target):
        logp = unimodal_logits.float().log_softmax(-1)  # (B, M, K)
        ce = -(target.to(logp.dtype).unsqueeze(1) * logp).sum(-1)  # (B, M)
    else:
        ce = F.cross_entropy(unimodal_logits.reshape(B * M, K).float(),
                             target.repeat_interleave(M), reduction="none", ignore_index=-100).view(B, M)  # (B, M)
    mask = mask & has_label(target).unsqueeze(1)  # (B, M)
    ce = torch.where(mask, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    per_modality = ce.sum(0) / mask.sum(0).clamp(min=1)  # (M,)
    return per_modality.sum()


class Fusion(nn.Module):
    """Base class of fusion policies; subclasses implement :meth:`combine`.

    Args:
        modalities: modality names (any order; stored sorted).
        dim: width d of every ``z_m`` and of the fused vector.
        num_classes: K, for the unimodal heads.
        config: the policy's Config; keyword arguments override its fields.
    """

    Config = FusionConfig

    def __init__(self, modalities: list[str], dim: int, num_classes: int,
                 config: BaseModel | None = None, **overrides):
        super().__init__()
        if not modalities:
            raise ConfigError("a fusion needs at least one modality")
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"duplicate modality names in {list(modalities)}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self.modalities = sorted(modalities)
        self.dim = dim
        self.num_classes = num_classes
        self.heads = UnimodalHeads(len(self.modalities), dim, config.head_hidden, num_classes,
                                   config.head_dropout)

    @classmethod
    def from_config(cls, config: BaseModel, *, modalities: list[str], dim: int, num_classes: int):
        return cls(modalities, dim, num_classes, config=config)

    def forward(self, z: dict[str, Tensor], mask: Tensor | None = None) -> FusionOutput:
        """Fuse ``z`` (each ``(B, d)``) under ``mask`` ``(B, M)`` (None = all present)."""
        stacked, mask = stack_modalities(z, self.modalities, mask)  # (B, M, d), (B, M)
        unimodal_logits = self.heads(stacked)  # (B, M, K)
        return self.combine(stacked, mask, unimodal_logits)

    def combine(self, z: Tensor, mask: Tensor, unimodal_logits: Tensor) -> FusionOutput:
        raise NotImplementedError

    def loss(self, out: FusionOutput, target: Tensor) -> Tensor:
        """Everything the fusion adds to the task loss: ``mu * aux + policy terms``."""
        return sum(self.loss_terms(out, target).values())

    def loss_terms(self, out: FusionOutput, target: Tensor) -> dict[str, Tensor]:
        """The same terms as :meth:`loss`, by name, for logging."""
        terms = {"aux": self.config.aux_weight * masked_unimodal_loss(out.unimodal_logits, target, out.mask)}
        terms.update(out.extra_losses)
        return terms
