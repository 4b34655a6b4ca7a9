"""Temperature scaling of the unimodal heads (``train.calibrate``), fitted on the validation split.

DMS reads each head's confidence as "how likely is this head to be right". A head trained with
cross-entropy is usually over-confident, so after training each head m gets one temperature
T_m > 0 minimising the negative log-likelihood of ``softmax(logits_m / T_m)`` over the
validation samples that have modality m (Guo et al., 2017). Argmax predictions do not change;
the temperatures live in the checkpoint as the buffer ``fusion.heads.temperature``, and the
scorers read the scaled logits from then on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.evaluation import expected_calibration_error

T_MIN, T_MAX = 0.05, 20.0  # bounds on the fitted temperature


def fit_temperature(logits: Tensor, target: Tensor, steps: int = 100) -> float:
    """One temperature for ``logits (N, K)`` minimising NLL against ``target``: ``(N,)`` classes or
    soft ``(N, K)`` rows (soft NLL ``-sum_k y_k log p_k``); 1 if N = 0."""
    if len(target) == 0:
        return 1.0
    logits = logits.detach().double()
    if target.is_floating_point():
        target = target.to(logits.dtype)  # cross_entropy reads float targets as probabilities
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if t == t else 1.0  # NaN guard


def calibrate_heads(unimodal_logits: Tensor, mask: Tensor, target: Tensor,
                    modalities: list[str]) -> tuple[Tensor, dict[str, dict[str, float]]]:
    """Temperatures ``(M,)`` for heads with logits ``(N, M, K)`` and a report per modality.

    The report holds ``temperature``, ``ece_before`` and ``ece_after`` (on the same samples the
    temperature was fitted on, so "after" is optimistic; test-split ECE is in the eval record).
    """
    temps, report = [], {}
    for j, m in enumerate(modalities):
        have = mask[:, j]
        logits, y = unimodal_logits[have, j].float(), target[have]
        t = fit_temperature(logits, y)
        temps.append(t)
        if len(y):
            report[m] = {"temperature": t,
                         "ece_before": expected_calibration_error(logits.softmax(-1), y),
                         "ece_after": expected_calibration_error((logits / t).softmax(-1), y)}
        else:
            report[m] = {"temperature": t, "ece_before": None, "ece_after": None}
    return torch.tensor(temps), report
