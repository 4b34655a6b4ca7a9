"""MICINet (fusion ``micinet``): each core computation on a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_helpers import B, NAMES, fix_heads, make_fusion, make_inputs
from fusionkit.fusions.micinet import compensate, pair_probabilities, relative_power, remove_confusion

# parameters MICINet must train beyond the unimodal heads (tests/test_qadm_micinet.py checks their gradients)
LEARNED = ("directions", "degree", "comp_w", "comp_b")


def test_micinet_single_modality_without_removal_is_the_identity():
    fusion = make_fusion("micinet", ["only"], removal=False).eval()
    z = make_inputs(["only"])
    out = fusion(z)
    assert out.weights.tolist() == [[1.0]] * B
    assert torch.equal(out.fused, z["only"])  # rho = 1: nothing to compensate with


# -- MICINet ------------------------------------------------------------------------------
def test_micinet_pair_probabilities_sum_to_the_gini_impurity():
    q = torch.tensor([0.5, 0.3, 0.2])
    assert pair_probabilities(q).tolist() == pytest.approx([0.3, 0.2, 0.12])  # pairs (0,1), (0,2), (1,2)
    assert pair_probabilities(q).sum().item() == pytest.approx(1 - (q ** 2).sum().item())
    assert pair_probabilities(torch.tensor([1.0, 0.0, 0.0])).tolist() == [0.0, 0.0, 0.0]


def test_micinet_confusion_removal_on_a_2d_example():
    z = torch.tensor([[[2.0, 3.0]]])  # (B=1, M=1, d=2)
    # one pair, direction (3, 0) -> unit (1, 0), strength 0.25: z - 0.25 * 2 * (1, 0)
    out = remove_confusion(z, torch.tensor([[[0.25]]]), torch.tensor([[[3.0, 0.0]]]))
    assert out[0, 0].tolist() == pytest.approx([1.5, 3.0])
    # three pairs (K = 3), strengths 2 q_c q_c' for q = (0.5, 0.3, 0.2) = (0.3, 0.2, 0.12):
    # (0.6, 0) + (0, 0.6) + 0.12 * (5 / sqrt 2) * (1, 1) / sqrt 2 = (0.9, 0.9) removed
    dirs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    strength = pair_probabilities(torch.tensor([0.5, 0.3, 0.2])).view(1, 1, 3)
    assert remove_confusion(z, strength, dirs)[0, 0].tolist() == pytest.approx([1.1, 2.1])
    # through the fusion: an undecided head (q = (0.5, 0.5)): pi = 0.5, beta = sigmoid(0) = 0.5
    fusion = make_fusion("micinet", ["a"], dim=2, classes=2).eval()
    fix_heads(fusion, [[0.0, 0.0]])
    with torch.no_grad():
        fusion.directions.copy_(torch.tensor([[[1.0, 0.0]]]))
    out = fusion({"a": torch.tensor([[2.0, 3.0]])})
    assert out.fused[0].tolist() == pytest.approx([1.5, 3.0])
    assert out.scores["confusion"][0, 0].item() == pytest.approx(0.25)
    fix_heads(fusion, [[math.log(9), 0.0]])  # q = (0.9, 0.1): pi = 0.18, strength 0.09
    assert fusion({"a": torch.tensor([[2.0, 3.0]])}).fused[0].tolist() == pytest.approx([1.82, 3.0])


def test_micinet_compensation_weights_from_known_margins():
    # K = 2: p = ((1 + m) / 2, (1 - m) / 2) has margin m; margins 0.6, 0.2, 0 -> rho = (0.75, 0.25, 0)
    def two_class(m):
        return [(1 + m) / 2, (1 - m) / 2]

    probs = torch.tensor([[two_class(0.6), two_class(0.2), two_class(0.0)]] * 3)  # (3, 3, 2)
    mask = torch.tensor([[True, True, True], [True, True, False], [False, True, True]])
    margin, rho = relative_power(probs, mask)
    assert margin[0].tolist() == pytest.approx([0.6, 0.2, 0.0])
    assert rho[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert rho[1].tolist() == pytest.approx([0.75, 0.25, 0.0]) and rho[1, 2].item() == 0.0
    assert rho[2].tolist() == pytest.approx([0.0, 1.0, 0.0]) and rho[2, 0].item() == 0.0
    _, flat = relative_power(torch.full((1, 3, 2), 0.5), torch.tensor([[True, False, True]]))
    assert flat.tolist() == [[0.5, 0.0, 0.5]]  # no margin anywhere: uniform over the present
    # compensation: zhat_m = z_m + W sum_{j != m} rho_j z_j + (1 - rho_m) b
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    zhat = compensate(z, rho[:1], torch.eye(2), torch.tensor([1.0, -1.0]))
    # a: (1, 0) + 0.25 (0, 1) + 0.25 (1, -1); b: (0, 1) + 0.75 (1, 0) + 0.75 (1, -1); c: the same sum + (1, -1)
    assert zhat[0].tolist() == [pytest.approx([1.25, 0.0], abs=1e-6), pytest.approx([1.5, 0.25]),
                                pytest.approx([3.75, 1.25])]
    # through the fusion (removal off, T = identity): h = 0.75 (z_a + 0.25 z_b) + 0.25 (z_b + 0.75 z_a)
    fusion = make_fusion("micinet", NAMES, dim=2, classes=2, removal=False).eval()
    fix_heads(fusion, [[math.log(1.6), math.log(0.4)], [math.log(1.2), math.log(0.8)], [0.0, 0.0]])
    zs = {"a": z[:, 0], "b": z[:, 1], "c": z[:, 2]}
    out = fusion(zs)
    assert out.weights[0].tolist() == pytest.approx([0.75, 0.25, 0.0], abs=1e-6)
    assert out.scores["margin"][0].tolist() == pytest.approx([0.6, 0.2, 0.0], abs=1e-6)
    assert out.fused[0].tolist() == pytest.approx((0.9375 * z[0, 0] + 0.4375 * z[0, 1]).tolist(), abs=1e-6)
    no_comp = make_fusion("micinet", NAMES, dim=2, classes=2, removal=False, compensation=False).eval()
    fix_heads(no_comp, [[math.log(1.6), math.log(0.4)], [math.log(1.2), math.log(0.8)], [0.0, 0.0]])
    assert no_comp(zs).fused[0].tolist() == pytest.approx((0.75 * z[0, 0] + 0.25 * z[0, 1]).tolist(), abs=1e-6)


