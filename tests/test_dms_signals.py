"""What makes DMS weights move: standardised signals, prediction agreement, calibrated heads,
the routing loss, and old checkpoints without the new buffers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusionkit import DMSFusion, build
from fusionkit.evaluation import expected_calibration_error
from fusionkit.fusions.dms import route_loss
from fusionkit.schedulers.base import SignalNorm
from fusionkit.scorers.agreement import agreement
from fusionkit.training.calibration import calibrate_heads, fit_temperature
from fusionkit.training.checkpoint import load_weights, save_checkpoint


def test_standardisation_updates_in_training_and_freezes_in_eval():
    norm = SignalNorm(signals=2, momentum=0.5)
    g = torch.Generator().manual_seed(0)
    feats = torch.stack([0.9 + 0.05 * torch.randn(64, 3, generator=g),
                         5e-4 + 1e-3 * torch.randn(64, 3, generator=g)], dim=-1)  # (B, M, S)
    mask = torch.ones(64, 3, dtype=torch.bool)
    mask[:8, 0] = False
    norm.train()
    out = norm(feats, mask)
    # first batch: cumulative rate 1, so the running stats equal this batch's (present entries only)
    present = feats[mask]  # (n, S)
    assert torch.allclose(norm.running_mean, present.mean(0), atol=1e-6)
    assert torch.allclose(norm.running_var, present.var(0, unbiased=False), rtol=1e-4)
    assert out[mask].mean(0).abs().max() < 1e-5 and torch.allclose(out[mask].std(0), torch.ones(2), atol=0.02)
    assert int(norm.batches) == 1
    norm(feats + 1.0, mask)  # a second training batch moves the running mean by momentum 0.5
    assert torch.allclose(norm.running_mean, present.mean(0) + 0.5, atol=1e-5)
    frozen = norm.running_mean.clone(), norm.running_var.clone()
    norm.eval()
    y = norm(feats * 3, mask)
    assert torch.equal(norm.running_mean, frozen[0]) and torch.equal(norm.running_var, frozen[1])
    assert torch.allclose(y, (feats * 3 - frozen[0]) / (frozen[1] + SignalNorm.EPS).sqrt())
    assert int(norm.batches) == 2


def test_standardised_scheduler_state_lives_in_the_state_dict():
    f = DMSFusion(["a", "b"], dim=8, num_classes=5, scheduler={"name": "softmax", "standardize": True})
    keys = set(f.state_dict())
    assert {"scheduler.norm.running_mean", "scheduler.norm.running_var", "heads.temperature"} <= keys
    assert f.scheduler.signal_scale().keys() == set(f.scheduler.signals)


def test_agreement_differs_between_two_disagreeing_modalities():
    # head 0 is sure of class 0; head 1 leans to class 1 but gives class 0 some mass
    probs = torch.tensor([[[0.90, 0.05, 0.05], [0.30, 0.60, 0.10]]])  # (B=1, M=2, K=3)
    mask = torch.ones(1, 2, dtype=torch.bool)
    a = agreement(probs, mask)
    # a_0 = p_0[argmax p_1] = p_0[1]; a_1 = p_1[argmax p_0] = p_1[0]
    assert a[0].tolist() == pytest.approx([0.05, 0.30])
    # the paper's alignment would be one number for both at M = 2; agreement is not symmetric
    assert a[0, 0] != a[0, 1]
    alone = agreement(probs, torch.tensor([[True, False]]))
    assert alone.tolist() == [[0.0, 0.0]]


def test_agreement_uses_the_confidence_weighted_vote_of_the_others():
    sure_1 = [0.02, 0.96, 0.02]
    unsure_2 = [0.30, 0.30, 0.40]
    probs = torch.tensor([[[0.2, 0.5, 0.3], sure_1, unsure_2]])  # three heads
    a = agreement(probs, torch.ones(1, 3, dtype=torch.bool))
    # for head 0 the others vote class 1 (head 1 is confident, head 2 almost uniform)
    assert a[0, 0].item() == pytest.approx(0.5)


def test_temperature_scaling_lowers_a_heads_ece():
    g = torch.Generator().manual_seed(0)
    n, k = 2000, 4
    target = torch.randint(0, k, (n,), generator=g)
    true_logits = torch.randn(n, k, generator=g)
    true_logits[torch.arange(n), target] += 1.0  # a moderately accurate head
    # sample labels from the true probabilities so the true model is calibrated ...
    y = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)
    over = true_logits * 4.0  # ... and a head 4x over-confident
    before = expected_calibration_error(over.softmax(-1), y)
    t = fit_temperature(over, y)
    after = expected_calibration_error((over / t).softmax(-1), y)
    assert t == pytest.approx(4.0, rel=0.15)
    assert after < before / 3
    temps, report = calibrate_heads(torch.stack([over, true_logits], 1), torch.ones(n, 2, dtype=torch.bool), y, ["a", "b"])
    assert temps[0].item() == pytest.approx(t, rel=1e-3) and temps[1].item() == pytest.approx(1.0, abs=0.15)
    assert report["a"]["ece_after"] < report["a"]["ece_before"]


def test_calibrated_heads_change_confidence_not_predictions():
    f = DMSFusion(["a", "b"], dim=8, num_classes=5).eval()
    z = {m: torch.randn(4, 8) for m in "ab"}
    torch.manual_seed(0)
    before = f(z)
    f.heads.temperature.copy_(torch.tensor([4.0, 1.0]))
    torch.manual_seed(0)
    after = f(z)
    assert torch.equal(before.unimodal_logits, after.unimodal_logits)  # raw logits: aux loss, accuracy
    assert (after.scores["confidence"][:, 0] < before.scores["confidence"][:, 0]).all()
    assert torch.allclose(after.scores["confidence"][:, 1], before.scores["confidence"][:, 1])


def test_route_loss_targets_the_heads_that_were_right():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]],    # head a right, b wrong (target 0)
                           [[5.0, 0.0], [5.0, 0.0]],    # both right: no routing information
                           [[0.0, 5.0], [0.0, 5.0]]])   # both wrong: none either
    target = torch.tensor([0, 0, 0])
    w = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert route_loss(w, logits, target, mask).item() == pytest.approx(-math.log(0.8))
    mask[0, 1] = False  # b missing: a alone and right -> no information left
    assert route_loss(w, logits, target, mask).item() == 0.0


def test_route_weight_trains_only_a_learned_scheduler():
    rule = DMSFusion(["a", "b"], dim=8, num_classes=5, route_weight=1.0, scheduler={"name": "softmax"})
    assert "route" not in rule.loss_terms(rule({m: torch.randn(4, 8) for m in "ab"}), torch.zeros(4, dtype=torch.long))
    f = DMSFusion(["a", "b"], dim=8, num_classes=5, route_weight=1.0, scheduler={"name": "mlp"})
    z = {m: torch.randn(16, 8, requires_grad=True) for m in "ab"}
    out = f(z)
    terms = f.loss_terms(out, torch.randint(0, 5, (16,)))
    assert "route" in terms
    f.zero_grad()
    terms["route"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in f.heads.parameters())  # heads untouched
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in f.scheduler.parameters())


def test_old_checkpoint_without_temperature_still_loads(tmp_path):
    f = DMSFusion(["a", "b"], dim=8, num_classes=5)
    state = {k: v for k, v in f.state_dict().items() if k != "heads.temperature"}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text("{}")
    g = DMSFusion(["a", "b"], dim=8, num_classes=5)
    g.heads.temperature.fill_(3.0)
    load_weights(g, tmp_path / "old.safetensors")
    assert g.heads.temperature.tolist() == [3.0, 3.0]  # absent key: the module keeps its value
    save_checkpoint(tmp_path, "new", g, {})
    state.pop("heads.w1")  # a real parameter missing is still an error
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(Exception, match="does not fit this model"):
        load_weights(DMSFusion(["a", "b"], dim=8, num_classes=5), tmp_path / "bad.safetensors")
