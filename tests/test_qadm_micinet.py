"""QADM-Net and MICINet fusions: hand-computed cores, missing modalities, any M, and a tiny CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_cli
from fusionkit.errors import ConfigError
from fusionkit.fusions.base import Fusion
from fusionkit.fusions.micinet import compensate, pair_probabilities, relative_power, remove_confusion
from fusionkit.fusions.qadm import exit_distribution, informativeness, prototype_confidence, prototype_logits
from fusionkit.registry import build

NAMES = ["a", "b", "c"]
B, D, K = 5, 8, 4
# every pattern of presence over three modalities, including single-modality rows
MASK = torch.tensor([[True, True, True], [True, False, False], [False, True, False],
                     [False, False, True], [False, True, True]])
# what each fusion must train beyond the unimodal heads
LEARNED = {"qadm": ("prototypes", "layer_w", "layer_b", "hyper.weight"),
           "micinet": ("directions", "degree", "comp_w", "comp_b")}
GELU_1 = F.gelu(torch.tensor(1.0)).item()


def _fusion(name: str, names: list[str] = NAMES, dim: int = D, classes: int = K, **params) -> Fusion:
    torch.manual_seed(0)
    return build("fusions", {"name": name, **params}, modalities=names, dim=dim, num_classes=classes)


def _inputs(names: list[str] = NAMES, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, D, generator=g, requires_grad=True) for m in names}


def _fixed_heads(fusion: Fusion, logits: list[list[float]]) -> None:
    """Make head m output ``logits[m]`` whatever z is (W = 0, bias = logits)."""
    with torch.no_grad():
        for p in fusion.heads.parameters():
            p.zero_()
        fusion.heads.b2.copy_(torch.tensor(logits))


# -- shared invariants --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qadm", "micinet"])
@pytest.mark.parametrize("train", [True, False])
def test_missing_modalities_are_exact_zeros_and_gradients_reach_the_learned_parts(name, train):
    fusion = _fusion(name).train(train)
    z = _inputs()
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
    fusion = _fusion(name, names).train()
    z = _inputs(names)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1:] = False  # sample 0: only the first modality
    mask[1, :-1] = False  # sample 1: only the last
    out = fusion(z, mask)
    assert torch.isfinite(out.fused).all()
    assert out.weights[0].tolist() == [1.0] + [0.0] * (M - 1)
    assert out.weights[1].tolist() == [0.0] * (M - 1) + [1.0]
    assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B, abs=1e-6)


def test_micinet_single_modality_without_removal_is_the_identity():
    fusion = _fusion("micinet", ["only"], removal=False).eval()
    z = _inputs(["only"])
    out = fusion(z)
    assert out.weights.tolist() == [[1.0]] * B
    assert torch.equal(out.fused, z["only"])  # rho = 1: nothing to compensate with


@pytest.mark.parametrize("name", ["qadm", "micinet"])
def test_soft_targets_are_refused(name):
    fusion = _fusion(name, ["a", "b"], classes=3)
    out = fusion({"a": torch.randn(2, D), "b": torch.randn(2, D)})
    with pytest.raises(ConfigError, match=f"fusion {name} needs single-label targets"):
        fusion.loss(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    assert torch.isfinite(fusion.loss(out, torch.tensor([0, 2])))
    # retrieval maps the heads onto the batch's N candidates: MICINet's class pairs no longer exist
    if name == "micinet":
        with fusion.heads.mapped(lambda logits: logits[..., :2]), pytest.raises(ConfigError, match="single-label"):
            fusion({"a": torch.randn(2, D), "b": torch.randn(2, D)})


# -- QADM-Net -----------------------------------------------------------------------------
def _qadm_2d(names: list[str], scale: float, layer_bias: float, **params) -> Fusion:
    """K = 2, d = 2, prototypes e1, e2; refinement layers add ``gelu(layer_bias)`` each."""
    fusion = _fusion("qadm", names, dim=2, classes=2, proto_scale=scale, depth=3, **params)
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
    fusion = _fusion("micinet", ["a"], dim=2, classes=2).eval()
    _fixed_heads(fusion, [[0.0, 0.0]])
    with torch.no_grad():
        fusion.directions.copy_(torch.tensor([[[1.0, 0.0]]]))
    out = fusion({"a": torch.tensor([[2.0, 3.0]])})
    assert out.fused[0].tolist() == pytest.approx([1.5, 3.0])
    assert out.scores["confusion"][0, 0].item() == pytest.approx(0.25)
    _fixed_heads(fusion, [[math.log(9), 0.0]])  # q = (0.9, 0.1): pi = 0.18, strength 0.09
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
    fusion = _fusion("micinet", NAMES, dim=2, classes=2, removal=False).eval()
    _fixed_heads(fusion, [[math.log(1.6), math.log(0.4)], [math.log(1.2), math.log(0.8)], [0.0, 0.0]])
    zs = {"a": z[:, 0], "b": z[:, 1], "c": z[:, 2]}
    out = fusion(zs)
    assert out.weights[0].tolist() == pytest.approx([0.75, 0.25, 0.0], abs=1e-6)
    assert out.scores["margin"][0].tolist() == pytest.approx([0.6, 0.2, 0.0], abs=1e-6)
    assert out.fused[0].tolist() == pytest.approx((0.9375 * z[0, 0] + 0.4375 * z[0, 1]).tolist(), abs=1e-6)
    no_comp = _fusion("micinet", NAMES, dim=2, classes=2, removal=False, compensation=False).eval()
    _fixed_heads(no_comp, [[math.log(1.6), math.log(0.4)], [math.log(1.2), math.log(0.8)], [0.0, 0.0]])
    assert no_comp(zs).fused[0].tolist() == pytest.approx((0.75 * z[0, 0] + 0.25 * z[0, 1]).tolist(), abs=1e-6)


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
