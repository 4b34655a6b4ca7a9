"""QADM-Net / Multi-QuAD (fusion ``qadm``): each core computation on a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_helpers import GELU_1, make_fusion
from fusionkit.fusions.base import Fusion
from fusionkit.fusions.qadm import (class_orthogonality, exit_distribution, informativeness, noise_free_update,
                                    prototype_confidence, prototype_logits)

# parameters QADM must train beyond the unimodal heads (tests/test_qadm_micinet.py checks their gradients);
# the default noise-free prototypes are running means, not parameters
LEARNED = ("layer_w", "layer_b", "lgp_w", "lgp_b", "weigher.weight")

# scale ln 9, prototypes e1, e2: cos = (1, 0) gives q = (0.9, 0.1), c = 0.8; z on the diagonal: c = 0;
# cos0 - cos1 = 1/2 (the angle THETA) gives q = (0.75, 0.25), c = 0.5
THETA = math.acos(0.5 / math.sqrt(2)) - math.pi / 4


def _qadm_2d(names: list[str], scale: float, layer_bias: float, depth: int = 3, **params) -> Fusion:
    """K = 2, d = 2, prototypes e1, e2; refinement layers add ``gelu(layer_bias)`` each (times LGP's gamma)."""
    fusion = make_fusion("qadm", names, dim=2, classes=2, proto_scale=scale, depth=depth, **params)
    with torch.no_grad():
        fusion.prototypes.copy_(torch.eye(2).expand(len(names), 2, 2))
        fusion.layer_w.zero_()
        fusion.layer_b.fill_(layer_bias)
    return fusion


# -- confidence-guided depth (v1, gcnd: false) and the exit gate -------------------------------
def test_qadm_depth_follows_prototype_confidence_without_gcnd():
    # v1: n* = 1 + 2 (1 - c): c = 0.8 -> 1.4 -> exit 1; c = 0.5 -> 2; c = 0 -> 3
    z = torch.tensor([[1.0, 0.0], [math.cos(THETA), math.sin(THETA)], [1.0, 1.0]])
    fusion = _qadm_2d(["a"], math.log(9), 1.0, gcnd=False).eval()
    out = fusion({"a": z})
    assert out.scores["confidence"][:, 0].tolist() == pytest.approx([0.8, 0.5, 0.0], abs=1e-5)
    assert out.scores["depth"][:, 0].tolist() == [1.0, 2.0, 3.0]
    # each layer adds gelu(1) per feature (W = 0, b = 1), LGP's gammas start at 1, M = 1: h = z + n gelu(1)
    expected = z + torch.tensor([[1.0], [2.0], [3.0]]) * GELU_1
    assert torch.allclose(out.fused, expected, atol=1e-6)
    # straight-through: training forward is exactly the hard exit too
    assert torch.equal(fusion.train()({"a": z}).fused, out.fused)
    # soft gate in training: h = z + E_pi[n] gelu(1), pi_n ~ exp(-(n - n*)^2 / 0.5)
    soft = _qadm_2d(["a"], math.log(9), 1.0, gcnd=False, depth_gate="soft").train()
    n = torch.arange(1.0, 4.0)
    e_n = [float((torch.softmax(-(n - t) ** 2 / 0.5, 0) * n).sum()) for t in (1.4, 2.0, 3.0)]
    assert e_n[1] == pytest.approx(2.0)  # symmetric around n* = 2
    assert torch.allclose(soft({"a": z}).fused, z + torch.tensor(e_n).unsqueeze(1) * GELU_1, atol=1e-5)
    assert torch.equal(soft.eval()({"a": z}).fused, out.fused)  # hard in evaluation


def test_qadm_exit_distribution_and_straight_through_gradient():
    pi, hard = exit_distribution(torch.tensor([[0.0, 0.5, 1.0, 0.25]]), depth=3, temperature=0.5)
    assert hard.argmax(-1).tolist() == [[0, 1, 2, 0]]  # n* = 1, 2, 3, 1.5 (a tie: the shallower exit)
    assert pi.sum(-1)[0].tolist() == pytest.approx([1.0] * 4)
    assert prototype_confidence(torch.tensor([0.25, 0.25, 0.25, 0.25])).item() == 0.0
    assert prototype_confidence(torch.tensor([1.0, 0.0, 0.0])).item() == 1.0
    # learned prototypes (v1): the task loss reaches them through the straight-through gate alone
    fusion = _qadm_2d(["a"], math.log(9), 1.0, prototypes="learned", gcnd=False, lgp=False, proto_weight=0.0).train()
    fusion({"a": torch.tensor([[1.0, 0.2], [0.3, 1.0]])}).fused.sum().backward()
    assert fusion.prototypes.grad.abs().sum() > 0
    # noise-free prototypes are running means: a buffer, saved with the model, never a parameter
    default = _qadm_2d(["a"], math.log(9), 1.0)
    assert "prototypes" in default.state_dict() and "prototypes" not in dict(default.named_parameters())


# -- NFCE: noise-free prototypes and their training terms ----------------------------------------
def test_noise_free_prototype_update_on_2d_features():
    protos = torch.eye(2).unsqueeze(0)  # (1, 2, 2): e1, e2
    seen = torch.tensor([[True, False]])  # class 1 has no prototype yet
    z = torch.tensor([[4.0, 3.0],  # y 0, nearest e1: kept, zhat = (0.8, 0.6)
                      [1.0, 3.0],  # y 0, nearest e2: misclassified, left out as noise
                      [3.0, 4.0],  # y 1, class 1 unseen: kept, (0.6, 0.8)
                      [0.0, -2.0],  # y 1, unseen: kept whatever its nearest prototype, (0, -1)
                      [5.0, 5.0],  # y 1 but this modality is missing
                      [-7.0, 1.0]]).unsqueeze(1)  # no label (-100)
    y = torch.tensor([0, 0, 1, 1, 1, -100])
    present = torch.tensor([True, True, True, True, False, True]).unsqueeze(1)
    new, seen_after = noise_free_update(protos, seen, z, y, present, momentum=0.1)
    # class 0: e1 + 0.1 ((0.8, 0.6) - e1) = (0.98, 0.06); class 1, first sight: the mean (0.3, -0.1)
    assert new[0].tolist() == [pytest.approx([0.98, 0.06]), pytest.approx([0.3, -0.1])]
    assert seen_after.tolist() == [[True, True]]
    # a class absent from the batch keeps its prototype
    kept, _ = noise_free_update(protos, seen, z[:2], y[:2], present[:2], momentum=0.1)
    assert kept[0, 1].tolist() == [0.0, 1.0]


def test_class_orthogonality_on_2d_features():
    # class means (unit features): class 0 e1, class 1 the diagonal: cos^2 = 1/2 for each ordered pair
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).unsqueeze(1)
    y = torch.tensor([0, 0, 1, 2])
    present = torch.tensor([True, True, True, False]).unsqueeze(1)  # class 2 only in a missing row
    assert class_orthogonality(z, y, present, 3).item() == pytest.approx(0.5)
    # with class 2 (e2): pairs (0,1) 1/2, (0,2) 0, (1,2) 1/2 -> mean 1/3
    assert class_orthogonality(z, y, torch.ones(4, 1, dtype=torch.bool), 3).item() == pytest.approx(1 / 3)


def test_noise_free_terms_and_the_prototype_step_in_training():
    fusion = _qadm_2d(["a"], math.log(3), 0.0).train()
    fusion.proto_seen.fill_(True)
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    terms = fusion.loss_terms(fusion({"a": z}), torch.tensor([0, 0]))
    # q = (0.75, 0.25) and (0.25, 0.75): CE = (-log 0.75 - log 0.25) / 2; one class only: no orthogonality pair
    assert terms["proto"].item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-5)
    assert terms["ortho"].item() == 0.0
    terms["proto"].backward()  # the mutual-information term trains the features (encoders)
    assert z.grad.abs().sum() > 0
    # the prototypes took one step: only (1, 0) is classified right, so P_0 = e1 + 0.1 (e1 - e1) and P_1 is untouched
    assert fusion.prototypes[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    fusion.loss_terms(fusion({"a": torch.tensor([[1.0, 1.0]])}), torch.tensor([0]))  # tie -> class 0: right
    assert fusion.prototypes[0, 0].tolist() == pytest.approx([0.9 + 0.1 / math.sqrt(2), 0.1 / math.sqrt(2)])
    before = fusion.prototypes.clone()
    fusion.eval().loss_terms(fusion({"a": torch.tensor([[0.0, 1.0]])}), torch.tensor([1]))
    assert torch.equal(fusion.prototypes, before)  # evaluation never moves them


# -- GCND -----------------------------------------------------------------------------------
def test_gcnd_normalises_confidence_over_modalities_and_samples():
    # confidences 0.8 (a, sample 0), 0 (b, sample 0), 0.5 (a, sample 1); b is missing in sample 1
    z = {"a": torch.tensor([[1.0, 0.0], [math.cos(THETA), math.sin(THETA)]]),
         "b": torch.tensor([[1.0, 1.0], [9.0, 0.0]])}
    mask = torch.tensor([[True, True], [True, False]])
    fusion = _qadm_2d(["a", "b"], math.log(9), 1.0).train()
    out = fusion(z, mask)
    mu = 1.3 / 3
    sd = math.sqrt(((0.8 - mu) ** 2 + mu ** 2 + (0.5 - mu) ** 2) / 3)
    chat = [1 / (1 + math.exp(-(c - mu) / sd)) for c in (0.8, 0.0, 0.5)]  # 0.752, 0.212, 0.550
    assert out.scores["normalized_confidence"].tolist() == [pytest.approx(chat[:2], abs=1e-4),
                                                            pytest.approx([chat[2], 0.0], abs=1e-4)]
    # n* = 1 + 2 chat = 2.50, 1.42, 2.10: the most confident modality goes deepest (positive correlation)
    assert out.scores["depth"].tolist() == [[3.0, 1.0], [2.0, 0.0]]
    # the batch moments moved the running ones (0.5, 0.1) by momentum 0.1; evaluation uses those
    assert fusion.conf_mean.item() == pytest.approx(0.5 + 0.1 * (mu - 0.5))
    assert fusion.conf_var.item() == pytest.approx(0.1 + 0.1 * (sd ** 2 - 0.1))
    ev = fusion.eval()(z, mask).scores["normalized_confidence"]
    m, s = fusion.conf_mean.item(), math.sqrt(fusion.conf_var.item() + 1e-6)
    assert ev[0, 0].item() == pytest.approx(1 / (1 + math.exp(-(0.8 - m) / s)), abs=1e-5)


# -- LGP and the fusion weights --------------------------------------------------------------
def test_lgp_generates_layer_parameters_from_known_feature_quality():
    # scale ln 3, prototypes e1, e2: z_a = (1, 0) has q = (0.75, 0.25), a = 2 * (1, 0) * (0.75, 0.25) = (1.5, 0);
    # z_b = (0, 2) has a = (0, 1.5); the cross-modal mean is abar = (0.75, 0.75)
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])}
    fusion = _qadm_2d(["a", "b"], math.log(3), 1.0, depth=1).eval()
    stacked = torch.stack([z["a"], z["b"]], dim=1)  # (1, 2, 2)
    both = torch.ones(1, 2, dtype=torch.bool)
    assert fusion.quality(stacked, both, fusion.prototypes)[0].tolist() == [
        pytest.approx([1.5, 0.0, 0.75, 0.75]), pytest.approx([0.0, 1.5, 0.75, 0.75])]
    # gamma logits = (a_1, abar_1): a -> (1.5, 0.75), b -> (0, 0.75); the one layer adds gamma * gelu(1)
    with torch.no_grad():
        fusion.lgp_w[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        fusion.weigher.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # e = a_1: 1.5 for a, 0 for b
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r_a = [1.0 + 2 * sig(1.5) * GELU_1, 2 * sig(0.75) * GELU_1]
    r_b = [2 * sig(0.0) * GELU_1, 2.0 + 2 * sig(0.75) * GELU_1]
    out = fusion(z)
    w_a = sig(1.5)  # both confidences are 0.5, so the log-confidence prior cancels
    assert out.weights[0].tolist() == pytest.approx([w_a, 1 - w_a], abs=1e-6)
    assert out.fused[0].tolist() == pytest.approx([w_a * r_a[i] + (1 - w_a) * r_b[i] for i in range(2)], abs=1e-5)
    # b missing: the cross-modal mean is a_a alone, abar = (1.5, 0), so gamma_a's logits become (1.5, 1.5)
    out = fusion(z, torch.tensor([[True, False]]))
    assert out.weights[0].tolist() == [1.0, 0.0]
    assert out.fused[0].tolist() == pytest.approx([1.0 + 2 * sig(1.5) * GELU_1, 2 * sig(1.5) * GELU_1], abs=1e-5)


def test_weights_start_proportional_to_modality_confidence():
    # zero-init hypernetworks: w = c / sum c; c = 0.8 (a) and 0.5 (b)
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[math.cos(THETA), math.sin(THETA)]])}
    for lgp in (True, False):
        out = _qadm_2d(["a", "b"], math.log(9), 0.0, lgp=lgp).eval()(z)
        assert out.weights[0].tolist() == pytest.approx([0.8 / 1.3, 0.5 / 1.3], abs=1e-5)


def test_qadm_dynamic_weights_from_known_informativeness_without_lgp():
    # v1 hypernetwork on a (lgp: false): same a = (1.5, 0) and (0, 1.5) as above, equal confidences
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])}
    fusion = _qadm_2d(["a", "b"], math.log(3), 0.0, lgp=False).eval()  # gelu(0) = 0: refinement is the identity
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
    out = fusion(z, torch.tensor([[True, False]]))
    assert out.weights[0].tolist() == [1.0, 0.0]
    assert out.fused[0].tolist() == pytest.approx([g, 0.0], abs=1e-6)
