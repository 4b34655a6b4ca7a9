"""DMS numbers against values computed by hand (DESIGN.md, "DMS, exactly")."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkit import DMSFusion
from fusionkit.fusions.base import masked_softmax
from fusionkit.fusions.dms import mwcl
from fusionkit.scorers.alignment import alignment
from fusionkit.scorers.confidence import normalized_confidence
from fusionkit.scorers.mc_dropout import mc_variance


def test_confidence_by_hand():
    # p = (0.8, 0.2): H = -(0.8 ln 0.8 + 0.2 ln 0.2) = 0.500402; c = 1 - H / ln 2 = 0.278072
    # p = (0.5, 0.5): H = ln 2, c = 0;  p = (1, 0): H = 0, c = 1
    c = normalized_confidence(torch.tensor([[0.8, 0.2], [0.5, 0.5], [1.0, 0.0]]))
    assert c.tolist() == pytest.approx([0.278072, 0.0, 1.0], abs=1e-5)


def test_mc_variance_by_hand():
    # two passes (0.6, 0.4) and (0.8, 0.2): per-class population variance 0.01 and 0.01 -> u = 0.01
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2]]).view(2, 1, 1, 2)  # (T, B, M, K)
    assert mc_variance(probs).item() == pytest.approx(0.01, abs=1e-7)


def test_alignment_by_hand():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (1, 3, 2)
    # m=0: others' mean (0.5, 1) -> cos = 0.5 / sqrt(1.25) = 0.447214; same for m=1;
    # m=2: others' mean (0.5, 0.5) is parallel to (1, 1) -> 1
    s = alignment(z, torch.ones(1, 3, dtype=torch.bool))
    assert s[0].tolist() == pytest.approx([0.447214, 0.447214, 1.0], abs=1e-5)
    # modality 2 missing: the others are orthogonal -> 0, the missing one -> 0
    s = alignment(z, torch.tensor([[True, True, False]]))
    assert s[0].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    # a single present modality has nobody to agree with -> 0
    assert alignment(z, torch.tensor([[False, True, False]]))[0].tolist() == [0.0, 0.0, 0.0]


def test_mwcl_by_hand():
    # h = (0.75, 0.25) from w = (0.75, 0.25), z = e1, e2:
    # 0.75 * (0.25^2 + 0.25^2) + 0.25 * (0.75^2 + 0.75^2) = 0.09375 + 0.28125 = 0.375
    z = torch.eye(2).unsqueeze(0)
    w = torch.tensor([[0.75, 0.25]])
    h = (w.unsqueeze(-1) * z).sum(1)
    assert mwcl(h, z, w).item() == pytest.approx(0.375)


def _fixed_heads(fusion: DMSFusion, logits: list[list[float]]) -> None:
    """Make head m output ``logits[m]`` whatever z is (W = 0, bias = logits)."""
    with torch.no_grad():
        for p in fusion.heads.parameters():
            p.zero_()
        fusion.heads.b2.copy_(torch.tensor(logits))


def test_full_dms_forward_by_hand():
    fusion = DMSFusion(["b", "a"], dim=2, num_classes=2, head_dropout=0.0, mwcl_weight=1.0,
                       scorers=["confidence", "mc_dropout", "alignment"],  # the paper's three signals
                       scheduler={"name": "softmax", "alpha": 1, "beta": 1, "gamma": 1, "temperature": 0.5})
    _fixed_heads(fusion, [[math.log(0.8), math.log(0.2)], [0.0, 0.0]])  # a: p=(.8,.2); b: p=(.5,.5)
    fusion.eval()
    out = fusion({"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])})
    # c = (0.278072, 0); u = (0, 0) (no dropout); s = (0, 0) (orthogonal)
    # w = softmax((c - u + s) / 0.5) = softmax(0.556144, 0) = (0.635560, 0.364440)
    # h = (0.635560, 0.364440); MWCL = 2 * w_a * w_b = 0.463247
    assert out.modalities == ["a", "b"]
    assert out.scores["confidence"][0].tolist() == pytest.approx([0.278072, 0.0], abs=1e-5)
    assert out.scores["uncertainty"][0].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert out.scores["alignment"][0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert out.weights[0].tolist() == pytest.approx([0.635560, 0.364440], abs=1e-5)
    assert out.fused[0].tolist() == pytest.approx([0.635560, 0.364440], abs=1e-5)
    assert out.extra_losses["mwcl"].item() == pytest.approx(0.463247, abs=1e-5)


def test_masked_softmax_zero_and_no_nan():
    logits = torch.tensor([[1.0, float("nan"), 2.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    w = masked_softmax(logits, mask)
    assert not torch.isnan(w).any()
    assert w[0, 1].item() == 0.0 and w[1, 0].item() == 0.0 and w[1, 1].item() == 0.0
    assert w.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert w[1, 2].item() == 1.0
