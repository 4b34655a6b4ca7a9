"""Shared helpers of the fusion tests that need fixed heads and every presence pattern
(tests/test_fusion_zoo.py, test_qadm_micinet.py, test_qadm.py, test_micinet.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionkit.fusions.base import Fusion
from fusionkit.registry import build

NAMES = ["a", "b", "c"]
B, D, K = 5, 8, 4
# every pattern of presence over three modalities, including single-modality rows
MASK = torch.tensor([[True, True, True], [True, False, False], [False, True, False],
                     [False, False, True], [False, True, True]])
GELU_1 = F.gelu(torch.tensor(1.0)).item()


def make_fusion(name: str, names: list[str] = NAMES, dim: int = D, classes: int = K, **params) -> Fusion:
    torch.manual_seed(0)
    return build("fusions", {"name": name, **params}, modalities=names, dim=dim, num_classes=classes)


def make_inputs(names: list[str] = NAMES, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, D, generator=g, requires_grad=True) for m in names}


def fix_heads(fusion: Fusion, logits: list[list[float]]) -> None:
    """Make head m output ``logits[m]`` whatever z is (W = 0, bias = logits)."""
    with torch.no_grad():
        for p in fusion.heads.parameters():
            p.zero_()
        fusion.heads.b2.copy_(torch.tensor(logits))
