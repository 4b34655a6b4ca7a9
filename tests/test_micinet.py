"""MICINet (fusion ``micinet``): each core computation on a hand-computed example."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_helpers import B, NAMES, fix_heads, make_fusion, make_inputs
from fusionkit.fusions.micinet import (compensate, mixture_responsibilities, pair_gaussians, pair_probabilities,
                                       relative_power, remove_confusion, remove_distribution, shared_alignment)

# parameters MICINet must train beyond the unimodal heads in the default configuration (gici: paper);
# tests/test_qadm_micinet.py checks their gradients
LEARNED = ("spec_w", "spec_b", "shared_w", "shared_b", "dec_w", "dec_b", "spec_head", "comp_w", "comp_b")


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
    fusion = make_fusion("micinet", ["a"], dim=2, classes=2, gici="direction").eval()
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




# -- global ICI learning (gici: paper) ----------------------------------------------------
def test_micinet_pair_gaussians_are_the_moment_matched_class_mixtures():
    # K = 3, r = 1: class means (0, 2, 4), variances (1, 1, 4)
    mu, var = pair_gaussians(torch.tensor([[0.0], [2.0], [4.0]]), torch.tensor([[1.0], [1.0], [4.0]]))
    # (0,1): mean 1, var 1 + 1^2; (0,2): mean 2, var 2.5 + 2^2; (1,2): mean 3, var 2.5 + 1^2
    assert mu.flatten().tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert var.flatten().tolist() == pytest.approx([2.0, 6.5, 3.5])


def test_micinet_mixture_weights_from_known_confusion_degrees():
    code = torch.zeros(1, 1, 1)  # (B, M, r) at the common mean 0
    mu, var = torch.zeros(1, 2, 1), torch.tensor([[[1.0], [4.0]]])
    # alpha = (0.75, 0.25); densities 1 : 1/2 (sd 1 vs 2) -> 0.75 : 0.125 = 6/7, 1/7
    gamma = mixture_responsibilities(code, torch.tensor([[3.0, 1.0]]), mu, var)
    assert gamma.flatten().tolist() == pytest.approx([6 / 7, 1 / 7])
    # far from the first mean, the second component takes it: exp(-(9 - 9/4) / 2) * 2 ~ 0.068 : 0.25
    far = mixture_responsibilities(torch.full((1, 1, 1), 3.0), torch.tensor([[3.0, 1.0]]), mu, var)
    assert far[0, 0, 1].item() == pytest.approx(0.25 / (0.25 + 0.75 * math.exp(-3.375) * 2))
    # a pair that is never confused keeps a finite weight of ~0, never NaN
    zero = mixture_responsibilities(code, torch.tensor([[0.0, 1.0]]), mu, var)
    assert torch.isfinite(zero).all() and zero.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-9)


def test_micinet_removal_of_a_known_distribution_from_a_2d_sample():
    z = torch.tensor([[[2.0, 3.0]]])  # (B=1, M=1, d=2)
    mu = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (M=1, P=2, r=2)
    gamma, amount = torch.tensor([[[0.75, 0.25]]]), torch.tensor([[0.5]])
    # expected code 0.75 (1, 0) + 0.25 (0, 2) = (0.75, 0.5); half of it removed
    assert remove_distribution(z, amount, gamma, mu, torch.eye(2).unsqueeze(0))[0, 0].tolist() == \
        pytest.approx([1.625, 2.75])
    # decoded through C = [[1, 1], [0, 2]]: (0.75, 0.5) C = (0.75, 1.75)
    dec = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    assert remove_distribution(z, amount, gamma, mu, dec)[0, 0].tolist() == pytest.approx([1.625, 2.125])
    # a confident head (Gini 0) removes nothing
    assert torch.equal(remove_distribution(z, torch.zeros(1, 1), gamma, mu, dec), z)


def test_micinet_shared_alignment_is_the_between_class_share_of_the_scatter():
    # M = 1, r = 1: class 0 codes 0, 2; class 1 codes 4, 6 -> between 16, total 20
    code = torch.tensor([[[0.0]], [[2.0]], [[4.0]], [[6.0]], [[100.0]], [[-50.0]]])  # (B=6, M=1, r=1)
    target = torch.tensor([0, 0, 1, 1, 1, -100])
    keep = torch.tensor([[True], [True], [True], [True], [False], [True]])  # sample 4 missing, 5 unlabeled
    keep = keep & (target >= 0).unsqueeze(1)
    assert shared_alignment(code, target, keep, 2).item() == pytest.approx(0.8)
    # identical class means: nothing to align
    assert shared_alignment(torch.tensor([[[0.0]], [[2.0]], [[0.0]], [[2.0]]]), torch.tensor([0, 0, 1, 1]),
                            torch.ones(4, 1, dtype=torch.bool), 2).item() == pytest.approx(0.0)


def _paper_fusion(classes, **params):
    """One modality, d = r = 2, identity shared encoder and shared decoder block."""
    fusion = make_fusion("micinet", ["a"], dim=2, classes=classes, gici_dim=2, **params)
    with torch.no_grad():
        fusion.shared_w.copy_(torch.eye(2).unsqueeze(0))
        fusion.shared_b.zero_()
        fusion.dec_w[:, 2:].copy_(torch.eye(2))
    return fusion


def test_micinet_global_guided_removal_through_the_fusion():
    fusion = _paper_fusion(2).eval()
    fix_heads(fusion, [[0.0, 0.0]])  # q = (0.5, 0.5): Gini 0.5, one pair so gamma = 1
    with torch.no_grad():
        fusion.class_mean.copy_(torch.tensor([[[1.0, 0.0], [1.0, 2.0]]]))  # pair mean (1, 1)
    out = fusion({"a": torch.tensor([[2.0, 3.0]])})
    assert out.fused[0].tolist() == pytest.approx([1.5, 2.5])  # alone: rho = 1, no compensation
    assert out.scores["confusion"][0, 0].item() == pytest.approx(0.5)
    fix_heads(fusion, [[math.log(9), 0.0]])  # q = (0.9, 0.1): Gini 0.18
    assert fusion({"a": torch.tensor([[2.0, 3.0]])}).fused[0].tolist() == pytest.approx([1.82, 2.82])
    assert _paper_fusion(2, removal=False).eval()({"a": torch.tensor([[2.0, 3.0]])}).fused[0].tolist() == \
        pytest.approx([2.0, 3.0])


def test_micinet_global_distribution_follows_the_training_batches():
    fusion = _paper_fusion(3, gici_momentum=0.5).train()
    fix_heads(fusion, [[math.log(5), math.log(3), math.log(2)]])  # q = (0.5, 0.3, 0.2): pi = (0.3, 0.2, 0.12)
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 2.0], [100.0, 100.0]])
    target = torch.tensor([0, 0, 1, -100])  # no class 2; an unlabeled sample moves nothing
    out = fusion({"a": z})
    terms = fusion.loss_terms(out, target)
    assert set(terms) == {"aux", "gici_rec", "gici_spec", "gici_share"}
    assert all(torch.isfinite(t) for t in terms.values())
    # class 0 batch moments: mean (1, 0), var (1, 0); class 1: mean (4, 2), var 0; momentum 0.5 from (0, 1)
    assert fusion.class_mean[0].tolist() == [[0.5, 0.0], [2.0, 1.0], [0.0, 0.0]]
    assert fusion.class_var[0].tolist() == [[1.0, 0.5], [0.5, 0.5], [1.0, 1.0]]
    # every pair has samples of one of its classes: halfway from 2/9 to pi
    assert fusion.confusion[0].tolist() == pytest.approx([0.5 * (2 / 9 + p) for p in (0.3, 0.2, 0.12)])
    before = fusion.class_mean.clone()
    fusion.eval().loss_terms(fusion({"a": z}), target)  # evaluation never moves the global statistics
    assert torch.equal(fusion.class_mean, before)


def test_micinet_gici_switches():
    z, y = make_inputs(), torch.arange(B) % 4
    for params, names in [({}, {"aux", "gici_rec", "gici_spec", "gici_share"}), ({"gici": "direction"}, {"aux"}),
                          ({"removal": False}, {"aux"}), ({"gici_weight": 0.0}, {"aux"})]:
        fusion = make_fusion("micinet", **params).train()
        assert set(fusion.loss_terms(fusion(z), y)) == names, params
    assert not hasattr(make_fusion("micinet"), "directions")
    assert not hasattr(make_fusion("micinet", gici="direction"), "class_mean")


def test_micinet_paper_gici_at_ten_classes_six_modalities():
    names = [f"m{i}" for i in range(6)]
    fusion = make_fusion("micinet", names, dim=128, classes=10).train()
    g = torch.Generator().manual_seed(0)
    z = {m: torch.randn(64, 128, generator=g, requires_grad=True) for m in names}
    mask = torch.rand(64, 6, generator=g) > 0.5
    mask[:, 0] = True
    out = fusion(z, mask)
    y = torch.arange(64) % 10
    loss = out.fused[:, :10].logsumexp(-1).mean() + fusion.loss(out, y)
    loss.backward()
    assert torch.isfinite(loss) and fusion.confusion.shape == (6, 45) and fusion.class_mean.shape == (6, 10, 32)
    assert all(torch.isfinite(z[m].grad).all() for m in names)
