"""The training loop's per-step bookkeeping: running sums of the loss terms and divergence checks.

On the CPU reading a loss value costs nothing, so every step is checked at once (``lazy=False``):
a non-finite loss stops the run before its backward pass. On an accelerator each read of a value
(``float(loss)``, ``if not torch.isfinite(norm)``) waits for the device to finish the step, so the
host cannot queue the next step's kernels meanwhile: small models there are bound by that wait.
With ``lazy=True`` the sums and the first bad step are kept in device tensors and read once per
epoch (:meth:`StepMonitor.failure`); the run then stops at the end of the epoch instead of at the
step, with the same message, and nothing of that epoch is saved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSS, GRAD_NORM = 1, 2  # what went non-finite first
_WHAT = {LOSS: "the loss", GRAD_NORM: "the gradient norm"}


class StepMonitor:
    """Sums of the loss terms over an epoch's steps and the first non-finite loss or gradient norm.

    Args:
        lazy: keep everything on the device and read it in :meth:`failure` / :meth:`means`
            (accelerators); otherwise check every step as it comes (:meth:`step` returns the
            failure at once).
    """

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self.steps = 0
        self._sums: dict[str, float | Tensor] = {}
        self._first_bad: Tensor | None = None  # (3,) on the device: step (1-based; 0 = none), kind, value
        self._step: Tensor | None = None  # lazy: the step count on the device (no host-to-device copies)

    def step(self, terms: dict[str, Tensor], loss: Tensor) -> str | None:
        """Record one step's loss terms (before its backward pass). Eager mode: the failure
        message if ``loss`` is not finite (the caller stops before the backward pass)."""
        self.steps += 1
        if not self.lazy:
            value = float(loss.detach())
            if not math.isfinite(value):
                return f"step {self.steps}: the loss is {value}"
            for k, v in terms.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
            self._sums["loss"] = self._sums.get("loss", 0.0) + value
            return None
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()] + [loss.detach().float()])
        self._step = torch.ones_like(values[-1]) if self._step is None else self._step + 1
        for k, v in zip([*terms, "loss"], values.unbind()):
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._watch(values[-1], LOSS)
        return None

    def grad_norm(self, norm: Tensor) -> str | None:
        """Record the step's gradient norm (after clipping computed it). Eager mode: the failure
        message if it is not finite."""
        if not self.lazy:
            if not torch.isfinite(norm):
                return f"step {self.steps}: the gradient norm is {float(norm)}"
            return None
        self._watch(norm.detach().float(), GRAD_NORM)
        return None

    def _watch(self, value: Tensor, kind: int) -> None:
        bad = ~torch.isfinite(value)
        here = torch.stack([self._step, torch.full_like(value, kind), value])
        if self._first_bad is None:
            self._first_bad = torch.where(bad, here, torch.zeros_like(here))
        else:  # keep the first one: only a still-clean record takes this step's values
            self._first_bad = torch.where(bad & (self._first_bad[0] == 0), here, self._first_bad)

    def failure(self) -> str | None:
        """The first non-finite loss or gradient norm of the epoch, as ``"step N: the loss is nan"``,
        or None. Lazy mode reads the device here (one wait per epoch)."""
        if not self.lazy or self._first_bad is None:
            return None
        step, kind, value = self._first_bad.tolist()
        if step == 0:
            return None
        return f"step {int(step)}: {_WHAT[int(kind)]} is {value}"

    def means(self) -> dict[str, float]:
        """Each term's mean over the steps so far (``loss`` is their sum)."""
        steps = max(self.steps, 1)
        if self.lazy and self._sums:
            names = list(self._sums)
            totals = torch.stack([self._sums[k] for k in names]).tolist()  # one read
            return {k: v / steps for k, v in zip(names, totals)}
        return {k: float(v) / steps for k, v in self._sums.items()}

    def running_loss(self) -> float | None:
        """The mean loss so far for a progress bar; lazy mode answers None (no read per step)."""
        if self.lazy or "loss" not in self._sums:
            return None
        return float(self._sums["loss"]) / self.steps
