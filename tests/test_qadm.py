"""QADM-Net (fusion ``qadm``): each core computation on a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_helpers import GELU_1, make_fusion
from fusionkit.fusions.base import Fusion
from fusionkit.fusions.qadm import exit_distribution, informativeness, prototype_confidence, prototype_logits

# parameters QADM must train beyond the unimodal heads (tests/test_qadm_micinet.py checks their gradients)
LEARNED = ("prototypes", "layer_w", "layer_b", "hyper.weight")


# -- QADM-Net -----------------------------------------------------------------------------
def _qadm_2d(names: list[str], scale: float, layer_bias: float, **params) -> Fusion:
    """K = 2, d = 2, prototypes e1, e2; refinement layers add ``gelu(layer_bias)`` each."""
    fusion = make_fusion("qadm", names, dim=2, classes=2, proto_scale=scale, depth=3, **params)
    with torch.no_grad():
        fusion.prototypes.copy_(torch.eye(2).expand(len(names), 2, 2))
        fusion.layer_w.zero_()
        fusion.layer_b.fill_(layer_bias)
    return fusion


def test_qadm_depth_follows_prototype_confidence():
    # scale ln 9: cos = (1, 0) gives q = (0.9, 0.1), c = (0.9 - 1/2) / (1/2) = 0.8, n* = 1 + 2 * 0.2 = 1.4 -> 1
    # cos0 - cos1 = 1/2 gives q = (0.75, 0.25), c = 0.5, n* = 2 -> 2;  z on the diagonal: c = 0, n* = 3 -> 3
    theta = math.acos(0.5 / math.sqrt(2)) - math.pi / 4  # cos(theta) - sin(theta) = 1/2
    z = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)], [1.0, 1.0]])
    fusion = _qadm_2d(["a"], math.log(9), 1.0).eval()
    out = fusion({"a": z})
    assert out.scores["confidence"][:, 0].tolist() == pytest.approx([0.8, 0.5, 0.0], abs=1e-5)
    assert out.scores["depth"][:, 0].tolist() == [1.0, 2.0, 3.0]
    # each layer adds gelu(1) per feature (W = 0, b = 1), the gates start at 1, M = 1: h = z + n gelu(1)
    expected = z + torch.tensor([[1.0], [2.0], [3.0]]) * GELU_1
    assert torch.allclose(out.fused, expected, atol=1e-6)
    # straight-through: training forward is exactly the hard exit too
    assert torch.equal(fusion.train()({"a": z}).fused, out.fused)
    # soft gate in training: h = z + E_pi[n] gelu(1), pi_n ~ exp(-(n - n*)^2 / 0.5)
    soft = _qadm_2d(["a"], math.log(9), 1.0, depth_gate="soft").train()
    n = torch.arange(1.0, 4.0)
    e_n = [float((torch.softmax(-(n - t) ** 2 / 0.5, 0) * n).sum()) for t in (1.4, 2.0, 3.0)]
    assert e_n[1] == pytest.approx(2.0)  # symmetric around n* = 2
    assert torch.allclose(soft({"a": z}).fused, z + torch.tensor(e_n).unsqueeze(1) * GELU_1, atol=1e-5)
    assert torch.equal(soft.eval()({"a": z}).fused, out.fused)  # hard in evaluation


def test_qadm_exit_distribution_and_straight_through_gradient():
    pi, hard = exit_distribution(torch.tensor([[1.0, 0.5, 0.0, 0.75]]), depth=3, temperature=0.5)
    assert hard.argmax(-1).tolist() == [[0, 1, 2, 0]]  # n* = 1, 2, 3, 1.5 (a tie: the shallower exit)
    assert pi.sum(-1)[0].tolist() == pytest.approx([1.0] * 4)
    assert prototype_confidence(torch.tensor([0.25, 0.25, 0.25, 0.25])).item() == 0.0
    assert prototype_confidence(torch.tensor([1.0, 0.0, 0.0])).item() == 1.0
    # the task loss reaches the prototypes through the straight-through gate alone
    fusion = _qadm_2d(["a"], math.log(9), 1.0, proto_weight=0.0).train()
    fusion({"a": torch.tensor([[1.0, 0.2], [0.3, 1.0]])}).fused.sum().backward()
    assert fusion.prototypes.grad.abs().sum() > 0


def test_qadm_dynamic_weights_from_known_informativeness():
    # scale ln 3, prototypes e1, e2: z_a = (1, 0) has q = (0.75, 0.25), a = 2 * (1, 0) * (0.75, 0.25) = (1.5, 0);
    # z_b = (0, 2) has q = (0.25, 0.75), a = (0, 1.5). The mean of a is the expected cosine, 0.75.
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])}
    fusion = _qadm_2d(["a", "b"], math.log(3), 0.0).eval()  # gelu(0) = 0: refinement is the identity
    stacked = torch.stack([z["a"], z["b"]], dim=1)  # (1, 2, 2)
    probs = prototype_logits(stacked, fusion.prototypes, math.log(3)).softmax(-1)
    assert probs[0].tolist() == [pytest.approx([0.75, 0.25]), pytest.approx([0.25, 0.75])]
    info = informativeness(stacked, probs, fusion.prototypes)
    assert info[0].tolist() == [pytest.approx([1.5, 0.0]), pytest.approx([0.0, 1.5])]
    # hypernetwork: gate logits (a_1, 0), fusion logit a_1 - a_2
    with torch.no_grad():
        fusion.hyper.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]]))
    out = fusion(z)
    w_a = math.exp(1.5) / (math.exp(1.5) + math.exp(-1.5))
    assert out.weights[0].tolist() == pytest.approx([w_a, 1 - w_a], abs=1e-6)
    g = 2 / (1 + math.exp(-1.5))  # 2 sigmoid(1.5): feature 1 of modality a
    assert out.fused[0].tolist() == pytest.approx([w_a * g * 1.0, (1 - w_a) * 2.0], abs=1e-6)
    # b missing: a takes all the weight, b contributes exactly nothing
    out = fusion(z, torch.tensor([[True, False]]))
    assert out.weights[0].tolist() == [1.0, 0.0]
    assert out.fused[0].tolist() == pytest.approx([g, 0.0], abs=1e-6)
    # the prototype loss: cross-entropy of s * cos summed over modalities; class 1: -log 0.25 (a), -log 0.75 (b)
    terms = fusion.loss_terms(fusion(z), torch.tensor([1]))
    assert terms["proto"].item() == pytest.approx(-math.log(0.25) - math.log(0.75), abs=1e-5)


