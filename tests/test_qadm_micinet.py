"""QADM-Net and MICINet fusions together: missing modalities, any M, soft targets, a tiny CLI run.
Each method's own core is tested in tests/test_qadm.py and tests/test_micinet.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_cli
from fusion_helpers import B, D, K, MASK, NAMES, make_fusion, make_inputs
from fusionkit.errors import ConfigError
from test_micinet import LEARNED as MICINET_LEARNED
from test_qadm import LEARNED as QADM_LEARNED

# what each fusion must train beyond the unimodal heads
LEARNED = {"qadm": QADM_LEARNED, "micinet": MICINET_LEARNED}


# -- shared invariants --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qadm", "micinet"])
@pytest.mark.parametrize("train", [True, False])
def test_missing_modalities_are_exact_zeros_and_gradients_reach_the_learned_parts(name, train):
    fusion = make_fusion(name).train(train)
    z = make_inputs()
    with torch.no_grad():  # NaN in missing rows must not leak anywhere
        for i, m in enumerate(NAMES):
            z[m][~MASK[:, i]] = float("nan")
    out = fusion(z, MASK)
    assert out.fused.shape == (B, D) and out.weights.shape == (B, 3) and out.unimodal_logits.shape == (B, 3, K)
    assert (out.weights[~MASK] == 0).all()
    assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B, abs=1e-6)
    assert out.weights[1:4].max(1).values.tolist() == [1.0, 1.0, 1.0]  # one present modality: all the weight
    assert torch.isfinite(out.fused).all() and torch.isfinite(out.weights).all()
    for signal in out.scores.values():
        assert signal.shape == (B, 3) and torch.isfinite(signal).all() and (signal[~MASK] == 0).all()
    y = torch.arange(B) % K
    loss = F.cross_entropy(out.fused[:, :K], y) + fusion.loss(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = dict(fusion.named_parameters())
    for pname in LEARNED[name]:
        g = grads[pname].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, pname
    for i, m in enumerate(NAMES):  # a missing row gets exactly zero gradient
        assert torch.isfinite(z[m].grad).all() and (z[m].grad[~MASK[:, i]] == 0).all()


@pytest.mark.parametrize("name", ["qadm", "micinet"])
@pytest.mark.parametrize("M", [1, 2, 6])
def test_any_number_of_modalities_and_all_but_one_missing(name, M):
    names = [f"m{i}" for i in range(M)]
    fusion = make_fusion(name, names).train()
    z = make_inputs(names)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1:] = False  # sample 0: only the first modality
    mask[1, :-1] = False  # sample 1: only the last
    out = fusion(z, mask)
    assert torch.isfinite(out.fused).all()
    assert out.weights[0].tolist() == [1.0] + [0.0] * (M - 1)
    assert out.weights[1].tolist() == [0.0] * (M - 1) + [1.0]
    assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B, abs=1e-6)


@pytest.mark.parametrize("name", ["qadm", "micinet"])
def test_soft_targets_are_refused(name):
    fusion = make_fusion(name, ["a", "b"], classes=3)
    out = fusion({"a": torch.randn(2, D), "b": torch.randn(2, D)})
    with pytest.raises(ConfigError, match=f"fusion {name} needs single-label targets"):
        fusion.loss(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    assert torch.isfinite(fusion.loss(out, torch.tensor([0, 2])))
    # retrieval maps the heads onto the batch's N candidates: MICINet's class pairs no longer exist
    if name == "micinet":
        with fusion.heads.mapped(lambda logits: logits[..., :2]), pytest.raises(ConfigError, match="single-label"):
            fusion({"a": torch.randn(2, D), "b": torch.randn(2, D)})


# -- end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qadm", "micinet"])
def test_one_epoch_through_the_cli_gives_finite_metrics(name, tmp_path):
    out = tmp_path / name
    proc = run_cli("train", "--modalities", "fou,kar", "--fusion", name, "--out", str(out), "--no-progress", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    epoch = json.loads(line)
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val"]["nll"])
    if name == "qadm":
        assert math.isfinite(epoch["train_proto"])
    test = json.loads((out / "results.json").read_text())["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and math.isfinite(test["nll"])
    assert sum(test["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
