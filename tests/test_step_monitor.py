"""StepMonitor: the lazy (accelerator) bookkeeping reports what the eager (CPU) one reports."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkit.training.monitor import StepMonitor


def _feed(monitor: StepMonitor, losses: list[float], norms: list[float]) -> str | None:
    """Run the loop's calls; the first failure an eager monitor reports, else the epoch's."""
    for loss, norm in zip(losses, norms):
        terms = {"task": torch.tensor(loss / 2), "aux": torch.tensor(loss / 2, dtype=torch.bfloat16)}
        failed = monitor.step(terms, sum(terms.values()))
        if failed:
            return failed
        failed = monitor.grad_norm(torch.tensor(norm))
        if failed:
            return failed
    return monitor.failure()


@pytest.mark.parametrize("losses, norms, expected", [
    ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], None),
    ([1.0, float("nan"), float("inf")], [0.5, 0.5, 0.5], "step 2: the loss is nan"),
    ([1.0, 2.0, float("nan")], [0.5, float("inf"), 0.5], "step 2: the gradient norm is inf"),
    ([1.0, 2.0, 3.0, float("-inf")], [0.5, 0.5, 0.5, 0.5], "step 4: the loss is -inf"),
])
def test_lazy_and_eager_report_the_same_first_failure(losses, norms, expected):
    assert _feed(StepMonitor(lazy=False), losses, norms) == expected
    assert _feed(StepMonitor(lazy=True), losses, norms) == expected


def test_lazy_and_eager_give_the_same_means():
    eager, lazy = StepMonitor(lazy=False), StepMonitor(lazy=True)
    for m in (eager, lazy):
        _feed(m, [1.0, 2.0, 4.5], [1.0, 1.0, 1.0])
    # the aux term is bf16 (autocast): 2.25 is exact there, so both means are exact too
    assert eager.means() == pytest.approx({"task": 7.5 / 6, "aux": 7.5 / 6, "loss": 7.5 / 3}, rel=1e-6)
    assert lazy.means() == pytest.approx(eager.means(), rel=1e-6)
    assert eager.running_loss() == pytest.approx(2.5) and lazy.running_loss() is None


def test_lazy_mode_reads_nothing_per_step():
    # the point of lazy mode: no host read per step; here each step's values stay tensors
    m = StepMonitor(lazy=True)
    m.step({"task": torch.tensor(1.0)}, torch.tensor(1.0))
    m.grad_norm(torch.tensor(math.inf))
    assert isinstance(m._sums["loss"], torch.Tensor) and m.steps == 1
    assert m.failure() == "step 1: the gradient norm is inf"
