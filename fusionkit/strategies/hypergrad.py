"""Hyper-gradients by the implicit function theorem, with a truncated Neumann series for H^-1 v.

For an inner loss ``L_in(w, phi)`` minimised in w and an outer loss ``L_out(w)``, at a w where
``grad_w L_in = 0``: ``dL_out/dphi = -(d^2 L_in / dphi dw) H^-1 grad_w L_out`` with
``H = d^2 L_in / dw^2`` (Lorraine et al., 2020). ``H^-1 v = alpha sum_j (I - alpha H)^j v`` for
``0 < alpha < 2 / lambda_max(H)``; K terms truncate it. Hessian-vector products come from double
backward, so H is never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _norm(xs: list[Tensor]) -> float:
    return float(torch.sqrt(sum((x.float() ** 2).sum() for x in xs)))


def neumann_inverse_hvp(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], terms: int,
                        alpha: float) -> tuple[list[Tensor], list[float]]:
    """``H^-1 v ~ alpha sum_{j<terms} (I - alpha H)^j v``; returns it and the norm of each term."""
    term = [x.detach() for x in v]
    total = [x.clone() for x in term]
    norms = [_norm(term)]
    for _ in range(terms - 1):
        hv = hvp(term)
        term = [t - alpha * h for t, h in zip(term, hv)]
        total = [a + t for a, t in zip(total, term)]
        norms.append(_norm(term))
    return [alpha * x for x in total], norms


def top_eigenvalue(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], steps: int) -> float:
    """``|lambda_max(H)|`` by ``steps`` power iterations from ``v`` (a lower bound; 0 for H v = 0)."""
    u, value = v, 0.0
    for _ in range(steps):
        n = _norm(u)
        if not n > 0:
            return value
        hu = hvp([x / n for x in u])
        value, u = _norm(hu), hu
    return value


def hypergradient(inner: Callable[[], Tensor], outer: Callable[[], Tensor], params: list[Tensor], meta: Tensor,
                  terms: int, alpha: float | None, power_steps: int = 3) -> tuple[Tensor | None, list[float]]:
    """``dL_outer/dmeta = -(d^2 L_inner / dmeta dw) H^-1 grad_w L_outer`` (implicit function theorem
    at the current w, H = the inner loss's Hessian in w, its inverse by a truncated Neumann series
    of step ``alpha``; None: ``0.5 / lambda_max(H)`` by ``power_steps`` power iterations).

    Returns ``(hypergradient, norms of the series' terms)``; None when ``meta`` does not reach the
    inner gradient.
    """
    v = torch.autograd.grad(outer(), params, allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, v)]
    g_in = torch.autograd.grad(inner(), params, create_graph=True, allow_unused=True)
    live = [(p, g) for p, g in zip(params, g_in) if g is not None and g.requires_grad]
    if not live:
        return None, []
    idx = [i for i, g in enumerate(g_in) if g is not None and g.requires_grad]
    ps, gs = [p for p, _ in live], [g for _, g in live]

    def hvp(u: list[Tensor]) -> list[Tensor]:
        out = torch.autograd.grad(gs, ps, grad_outputs=u, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x) if h is None else h.detach() for x, h in zip(u, out)]

    v = [v[i] for i in idx]
    if alpha is None:
        top = top_eigenvalue(hvp, v, power_steps)
        if not top > 0:
            return None, []
        alpha = 0.5 / top
    inv, norms = neumann_inverse_hvp(hvp, v, terms, alpha)
    mixed = torch.autograd.grad(gs, meta, grad_outputs=inv, allow_unused=True)[0]
    return (None if mixed is None else -mixed.detach()), norms
