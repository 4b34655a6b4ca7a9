"""Masks, order invariance, gradients and scheduler behaviour of the fusion layer."""

from __future__ import annotations

import pytest
import torch

from fusionkit import DMSFusion, build
from fusionkit.errors import ConfigError, DataError

B, D, K = 6, 8, 5


def _z(names, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, D, generator=g) for m in names}


@pytest.mark.parametrize("fusion", ["dms", "mean", "concat"])
def test_missing_modality_gets_exact_zero_weight(fusion):
    f = build("fusions", fusion, modalities=["a", "b", "c"], dim=D, num_classes=K).eval()
    z = _z("abc")
    z["b"][1] = float("nan")  # garbage in a missing row must not leak
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[1, 1] = False
    mask[2, [0, 2]] = False
    out = f(z, mask)
    assert out.weights.shape == (B, 3)
    assert out.weights[1, 1].item() == 0.0
    assert out.weights[2, 0].item() == 0.0 and out.weights[2, 2].item() == 0.0
    assert out.weights[2, 1].item() == pytest.approx(1.0)
    assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B)
    assert not torch.isnan(out.fused).any() and not torch.isnan(out.weights).any()
    assert out.fused.shape == (B, D)


def test_all_missing_sample_is_a_clear_error():
    f = DMSFusion(["a", "b"], dim=D, num_classes=K)
    mask = torch.ones(B, 2, dtype=torch.bool)
    mask[3] = False
    with pytest.raises(DataError, match=r"sample\(s\) \[3\] of the batch have no modality present"):
        f(_z("ab"), mask)


def test_order_of_modalities_does_not_matter():
    torch.manual_seed(0)
    f1 = DMSFusion(["text", "image", "audio"], dim=D, num_classes=K).eval()
    torch.manual_seed(0)
    f2 = DMSFusion(["audio", "image", "text"], dim=D, num_classes=K).eval()
    z = _z(["image", "text", "audio"])
    reordered = {m: z[m] for m in ["text", "audio", "image"]}
    torch.manual_seed(1)
    o1 = f1(z)
    torch.manual_seed(1)
    o2 = f2(reordered)
    assert o1.modalities == o2.modalities == ["audio", "image", "text"]
    assert torch.allclose(o1.weights, o2.weights)
    assert torch.allclose(o1.fused, o2.fused)


def test_single_modality_gets_weight_one():
    f = DMSFusion(["only"], dim=D, num_classes=K)
    out = f(_z(["only"]))
    assert out.weights.tolist() == [[1.0]] * B
    assert torch.allclose(out.fused, _z(["only"])["only"])


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("scheduler", ["softmax", "mlp"])
def test_gradients_finite_and_reach_the_right_parameters(detach, scheduler):
    f = DMSFusion(["a", "b", "c"], dim=D, num_classes=K, detach_scores=detach, scheduler={"name": scheduler})
    z = {m: v.requires_grad_() for m, v in _z("abc").items()}
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[0, 2] = False
    y = torch.randint(0, K, (B,))
    out = f(z, mask)
    loss = out.fused.square().sum() + f.loss(out, y)
    loss.backward()
    for m in "abc":
        assert torch.isfinite(z[m].grad).all()
    assert torch.isfinite(f.heads.w1.grad).all() and f.heads.w1.grad.abs().sum() > 0
    if scheduler == "mlp":  # the learned scheduler is trained through the weights
        grads = [p.grad for p in f.scheduler.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_detach_scores_controls_gradient_from_weights_to_heads():
    """With detach_scores=false the weights' gradient reaches the heads; with true it does not."""
    grads = {}
    for detach in (True, False):
        torch.manual_seed(0)
        f = DMSFusion(["a", "b"], dim=D, num_classes=K, detach_scores=detach, head_dropout=0.0,
                      scorers=["confidence"])
        out = f(_z("ab"))
        if out.weights.requires_grad:
            out.weights[:, 0].sum().backward()  # a loss that depends on the weights only
        grads[detach] = f.heads.w2.grad
    assert grads[True] is None  # rule scheduler + detached scores: weights are constants
    assert grads[False] is not None and grads[False].abs().sum() > 0


def test_mc_dropout_in_eval_mode_is_a_fixed_ensemble():
    # eval keeps dropout on (uncertainty > 0) with the same T masks every call and for every
    # sample, so repeated calls and any batching agree; training draws new masks
    f = DMSFusion(["a", "b"], dim=D, num_classes=K, head_dropout=0.5).eval()
    z = _z("ab")
    u1 = f(z).scores["uncertainty"]
    u2 = f(z).scores["uncertainty"]
    assert (u1 > 0).all()
    assert torch.equal(u1, u2)
    f.train()
    assert not torch.equal(f(z).scores["uncertainty"], f(z).scores["uncertainty"])


def test_rule_scheduler_prefers_the_confident_modality():
    f = DMSFusion(["a", "b"], dim=D, num_classes=K, head_dropout=0.0, scorers=["confidence"],
                  scheduler={"name": "softmax"})
    with torch.no_grad():
        f.heads.w1.zero_(); f.heads.w2.zero_(); f.heads.b2.zero_()
        f.heads.b2[0, 0] = 6.0  # head a is sure, head b is uniform
    w = f(_z("ab")).weights
    assert (w[:, 0] > 0.9).all()


def test_ablation_switches():
    f = DMSFusion(["a", "b"], dim=D, num_classes=K,
                  scheduler={"name": "softmax", "alpha": 0, "beta": 0, "gamma": 0, "delta": 0})
    w = f(_z("ab")).weights
    assert torch.allclose(w, torch.full_like(w, 0.5))


def test_bad_fusion_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="at least one modality"):
        DMSFusion([], dim=D, num_classes=K)
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        DMSFusion(["a"], dim=D, num_classes=1)
    with pytest.raises(ConfigError, match=r"fusion.scheduler.name: 'sofmax' is not a scheduler; did you mean 'softmax'"):
        DMSFusion(["a"], dim=D, num_classes=K, scheduler="sofmax")
