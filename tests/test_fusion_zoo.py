"""The baseline fusion policies: shared invariants, then each policy's own numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusion_helpers import B, D, K, MASK, NAMES
from fusion_helpers import fix_heads as _fixed_heads
from fusion_helpers import make_fusion as _fusion
from fusion_helpers import make_inputs as _inputs
from fusionkit.errors import ConfigError, DataError
from fusionkit.fusions.mean import MeanFusion
from fusionkit.fusions.modality_dropout import ModalityDropoutFusion, drop_modalities
from fusionkit.fusions.qmf import QMFFusion, ranking_loss
from fusionkit.fusions.tmc import TMCFusion, combine_opinions, dirichlet_opinion, ds_combine, evidential_loss
from fusionkit.registry import build

ZOO = ["late", "attention", "gated", "modality_dropout", "tmc", "qmf"]


# -- shared invariants --------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("train", [True, False])
def test_shapes_weights_and_finite_gradients(name, train):
    fusion = _fusion(name).train(train)
    z = _inputs()
    with torch.no_grad():  # NaN in missing rows must not leak anywhere
        for i, m in enumerate(NAMES):
            z[m][~MASK[:, i]] = float("nan")
    out = fusion(z, MASK)
    M = len(NAMES)
    assert out.fused.shape == (B, D)
    assert out.weights.shape == (B, M)
    assert out.unimodal_logits.shape == (B, M, K)
    assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B, abs=1e-5)
    assert (out.weights[~out.mask] == 0).all()
    assert not (out.mask & ~MASK).any()  # nothing missing is ever made present
    assert torch.isfinite(out.fused).all() and torch.isfinite(out.weights).all()
    if out.logits is not None:
        assert out.logits.shape == (B, K) and torch.isfinite(out.logits).all()
    logits = out.logits if out.logits is not None else out.fused[:, :K]
    y = torch.arange(B) % K
    terms = fusion.loss_terms(out, y)
    loss = F.cross_entropy(logits, y) + sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in fusion.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for i, m in enumerate(NAMES):  # a missing row gets exactly zero gradient
        assert torch.isfinite(z[m].grad).all()
        assert (z[m].grad[~MASK[:, i]] == 0).all()


@pytest.mark.parametrize("name", ZOO)
def test_single_modality_gets_all_the_weight(name):
    fusion = _fusion(name, ["only"]).eval()
    out = fusion(_inputs(["only"]))
    assert out.weights.tolist() == [[1.0]] * B
    if name != "gated":  # gated passes z through its expert first
        assert torch.allclose(out.fused, _inputs(["only"])["only"], atol=1e-6)


@pytest.mark.parametrize("name", ZOO)
def test_empty_sample_is_an_error(name):
    fusion = _fusion(name).train()
    mask = MASK.clone()
    mask[2] = False
    with pytest.raises(DataError, match=r"sample\(s\) \[2\]"):
        fusion(_inputs(), mask)


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="fusions.base.bogus: unknown key"):
        build("fusions", {"name": "modality_dropout", "base": {"name": "mean", "bogus": 1}},
              modalities=NAMES, dim=D, num_classes=K)
    with pytest.raises(ConfigError, match="fusions.p"):
        build("fusions", {"name": "modality_dropout", "p": 1.0}, modalities=NAMES, dim=D, num_classes=K)


# -- late ---------------------------------------------------------------------------------
def test_late_logits_are_mean_of_present_unimodal_logits():
    out = _fusion("late").eval()(_inputs(), MASK)
    u = out.unimodal_logits.detach()
    expected = torch.stack([u[b, MASK[b]].mean(0) for b in range(B)])  # (B, K)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    # row 1 has only modality "a": its logits are exactly head a's
    assert torch.equal(out.logits[1], out.unimodal_logits[1, 0])
    assert out.weights[4].tolist() == [0.0, 0.5, 0.5]


# -- attention / gated --------------------------------------------------------------------
def test_attention_weights_follow_the_learned_score():
    fusion = _fusion("attention").eval()
    with torch.no_grad():  # score = z[0] exactly: a bigger first coordinate wins weight
        for p in fusion.score.parameters():
            p.zero_()
        fusion.score[0].weight[0, 0] = 1.0
        fusion.score[2].weight[0, 0] = 1.0
    z = {m: torch.zeros(1, D) for m in NAMES}
    z["b"][0, 0] = 2.0
    out = fusion(z)
    t = math.tanh(2.0)
    assert out.weights[0].tolist() == pytest.approx(
        [1 / (2 + math.exp(t)), math.exp(t) / (2 + math.exp(t)), 1 / (2 + math.exp(t))], abs=1e-6)


def test_gated_weights_depend_on_other_modalities():
    fusion = _fusion("gated").eval()
    z = _inputs()
    w1 = fusion(z).weights
    z2 = dict(z, c=z["c"] + 3.0)  # change only modality c
    w2 = fusion(z2).weights
    assert (w1[:, 0] - w2[:, 0]).abs().max() > 1e-4  # a's weight moved: the gate reads everything
    # each modality has its own expert: h = sum_m w_m (W_m z_m + b_m)
    out = fusion(z, MASK)
    experts = torch.einsum("bmd,mde->bme", out.z, fusion.expert_w) + fusion.expert_b
    expected = (out.weights.unsqueeze(-1) * experts * MASK.unsqueeze(-1)).sum(1)
    assert torch.allclose(out.fused, expected, atol=1e-5)


# -- modality dropout ---------------------------------------------------------------------
def test_modality_dropout_eval_is_exactly_the_base_fusion():
    wrapper = _fusion("modality_dropout", p=0.5, base={"name": "dms"}).eval()
    base = build("fusions", "dms", modalities=NAMES, dim=D, num_classes=K).eval()
    base.load_state_dict(wrapper.inner.state_dict())
    z = _inputs()
    torch.manual_seed(3)  # DMS's MC-dropout scorer samples; same seed, same draws
    a = wrapper(z, MASK)
    torch.manual_seed(3)
    b = base(z, MASK)
    assert torch.equal(a.fused, b.fused) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.mask, MASK)
    y = torch.arange(B) % K
    assert wrapper.loss_terms(a, y).keys() == {"aux", "mwcl"}
    assert torch.equal(wrapper.loss(a, y), base.loss(b, y))


def test_modality_dropout_has_no_heads_of_its_own():
    wrapper = _fusion("modality_dropout")
    inner = sum(p.numel() for p in wrapper.inner.parameters())
    assert sum(p.numel() for p in wrapper.parameters()) == inner
    assert all(k.startswith("inner.") for k in wrapper.state_dict())
    assert wrapper.heads is wrapper.inner.heads


def test_drop_modalities_never_empties_a_sample():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4000, 4, generator=g) < 0.6
    mask[~mask.any(1), 0] = True
    dropped = drop_modalities(mask, 0.5, generator=g)
    assert not (dropped & ~mask).any()  # only ever removes
    assert dropped.any(1).all()  # never a whole sample
    removed = (mask & ~dropped).sum().item() / mask.sum().item()
    assert 0.3 < removed < 0.5  # about p = 0.5, less the rescued ones
    single = mask.sum(1) == 1  # a lone modality is always kept
    assert torch.equal(dropped[single], mask[single])
    # the rescued modality is uniform among the present ones: full rows, p close to 1
    full = torch.ones(6000, 3, dtype=torch.bool)
    kept = drop_modalities(full, 0.999, generator=g)
    assert (kept.sum(1) >= 1).all()
    assert kept.float().mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.03)
    assert torch.equal(drop_modalities(mask, 0.0, generator=g), mask)


def test_modality_dropout_train_mode_drops_some():
    wrapper = _fusion("modality_dropout", p=0.5).train()
    torch.manual_seed(0)
    mask = torch.ones(400, 3, dtype=torch.bool)
    z = {m: torch.randn(400, D) for m in NAMES}
    out = wrapper(z, mask)
    assert 0 < (~out.mask).sum().item() < 400 * 3
    assert out.mask.any(1).all()
    assert (out.weights[~out.mask] == 0).all()
    # dropped rows are zeroed before the inner fusion sees them
    assert (out.z[~out.mask] == 0).all()


# -- TMC ----------------------------------------------------------------------------------
def test_ds_combine_by_hand():
    # C = 0.5*0.6 + 0.2*0.1 = 0.32, 1 - C = 0.68
    # b = ((0.05 + 0.15 + 0.03), (0.12 + 0.06 + 0.18)) / 0.68 = (0.338235, 0.529412)
    # u = 0.09 / 0.68 = 0.132353
    b, u = ds_combine(torch.tensor([0.5, 0.2]), torch.tensor(0.3),
                      torch.tensor([0.1, 0.6]), torch.tensor(0.3))
    assert b.tolist() == pytest.approx([0.338235, 0.529412], abs=1e-6)
    assert u.item() == pytest.approx(0.132353, abs=1e-6)
    assert b.sum().item() + u.item() == pytest.approx(1.0, abs=1e-6)
    # (0, 1) is the identity: a missing view changes nothing
    b2, u2 = ds_combine(torch.tensor([0.5, 0.2]), torch.tensor(0.3), torch.zeros(2), torch.tensor(1.0))
    assert b2.tolist() == pytest.approx([0.5, 0.2]) and u2.item() == pytest.approx(0.3)


def test_ds_combine_is_order_invariant_for_three_views():
    g = torch.Generator().manual_seed(0)
    _, b, u = dirichlet_opinion(3 * torch.randn(6, 3, 5, generator=g))  # (B, 3 views, K)
    mask = torch.ones(6, 3, dtype=torch.bool)
    ref_b, ref_u = combine_opinions(b, u, mask)
    for perm in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        pb, pu = combine_opinions(b[:, perm], u[:, perm], mask)
        assert torch.allclose(pb, ref_b, atol=1e-6) and torch.allclose(pu, ref_u, atol=1e-7)
    # masking view 1 equals combining views 0 and 2 only
    mb, mu = combine_opinions(b, u, torch.tensor([[True, False, True]]).expand(6, 3))
    tb, tu = ds_combine(b[:, 0], u[:, 0], b[:, 2], u[:, 2])
    assert torch.allclose(mb, tb) and torch.allclose(mu, tu)


def test_tmc_uncertainty_falls_as_evidence_grows():
    _, _, u_low = dirichlet_opinion(torch.tensor([[0.0, 0.0, 0.0]]))
    _, _, u_high = dirichlet_opinion(torch.tensor([[5.0, 0.0, 0.0]]))
    # softplus(0) = ln 2: S = 3 + 3 ln 2, u = 3 / S = 0.590616
    assert u_low.item() == pytest.approx(3 / (3 + 3 * math.log(2)), abs=1e-6)
    assert u_high.item() < u_low.item()
    fusion = TMCFusion(NAMES, dim=D, num_classes=3, head_dropout=0.0).eval()
    _fixed_heads(fusion, [[2.0, 0.0, 0.0], [6.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    out = fusion({m: torch.zeros(1, D) for m in NAMES})
    u_views = out.scores["uncertainty"][0]
    assert u_views[1] < u_views[0] < u_views[2]  # more evidence, less uncertainty
    assert out.weights[0].argmax().item() == 1  # the most certain view weighs most
    assert out.weights[0].tolist() == pytest.approx(((1 - u_views) / (1 - u_views).sum()).tolist())
    # combining agreeing views is more certain than any of them
    _, u_comb = combine_opinions(*dirichlet_opinion(out.unimodal_logits)[1:], out.mask)
    assert u_comb.item() < u_views.min().item()
    assert out.logits.exp().sum().item() == pytest.approx(1.0, abs=1e-6)  # log of a distribution
    assert out.logits[0].argmax().item() == 0


def test_tmc_single_view_logits_are_its_dirichlet_mean():
    fusion = TMCFusion(["a"], dim=D, num_classes=3, head_dropout=0.0).eval()
    _fixed_heads(fusion, [[1.0, -1.0, 0.5]])
    out = fusion({"a": torch.zeros(1, D)})
    alpha = F.softplus(torch.tensor([1.0, -1.0, 0.5])) + 1
    assert out.logits[0].tolist() == pytest.approx((alpha / alpha.sum()).log().tolist(), abs=1e-5)


def test_evidential_loss_by_hand_and_kl_matches_torch():
    alpha = torch.tensor([[3.0, 1.0], [1.0, 4.0]])
    y = torch.tensor([0, 0])
    # row 0: digamma(4) - digamma(3) = 1/3; alpha~ = (1, 1) -> KL = 0
    # row 1: digamma(5) - digamma(1) = 1 + 1/2 + 1/3 + 1/4 = 2.083333; alpha~ = (1, 4)
    expected_ce = torch.tensor([1 / 3, 25 / 12])
    Dir = torch.distributions.Dirichlet
    kl = torch.distributions.kl_divergence(Dir(torch.tensor([[1.0, 1.0], [1.0, 4.0]])), Dir(torch.ones(2, 2)))
    # KL(Dir(1, 4) || Dir(1, 1)) = lgamma(5) - lgamma(2) - lgamma(4) + 3 (digamma(4) - digamma(5))
    #                           = ln 24 - ln 6 - 3/4 = ln 4 - 0.75 = 0.636294
    assert kl.tolist() == pytest.approx([0.0, 0.636294], abs=1e-5)
    loss = evidential_loss(alpha, y, kl_weight=0.5)
    assert loss.tolist() == pytest.approx((expected_ce + 0.5 * kl).tolist(), abs=1e-5)
    assert evidential_loss(alpha, y, kl_weight=0.0).tolist() == pytest.approx(expected_ce.tolist(), abs=1e-6)


def test_tmc_loss_terms_add_the_evidential_term():
    fusion = _fusion("tmc", kl_weight=0.0, aux_weight=0.0).eval()
    out = fusion(_inputs(), MASK)
    y = torch.arange(B) % K
    terms = fusion.loss_terms(out, y)
    assert set(terms) == {"aux", "tmc"} and terms["aux"].item() == 0.0
    assert out.extra_losses == {}
    # by hand: per-view expected CE averaged over samples having the view, summed; plus combined
    alpha_m = F.softplus(out.unimodal_logits) + 1
    alpha_y = alpha_m.gather(-1, y.view(B, 1, 1).expand(B, 3, 1)).squeeze(-1)  # (B, M)
    ace = torch.digamma(alpha_m.sum(-1)) - torch.digamma(alpha_y)
    views = sum(ace[MASK[:, m], m].mean() for m in range(3))
    p = out.logits.exp()  # alpha / S of the combination
    S = K / combine_opinions(*dirichlet_opinion(out.unimodal_logits)[1:], MASK)[1]
    alpha = p * S.unsqueeze(-1)
    combined = (torch.digamma(alpha.sum(-1)) - torch.digamma(alpha[torch.arange(B), y])).mean()
    assert terms["tmc"].item() == pytest.approx((views + combined).item(), rel=1e-4)


# -- QMF ----------------------------------------------------------------------------------
def test_qmf_weights_favour_the_peaked_modality():
    fusion = QMFFusion(NAMES, dim=D, num_classes=K, head_dropout=0.0).eval()
    _fixed_heads(fusion, [[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = fusion({m: torch.zeros(1, D) for m in NAMES})
    c = torch.tensor([math.log(math.exp(4) + 3), math.log(4), math.log(math.e + 3)])  # logsumexp
    w = torch.softmax(c, 0)
    assert out.weights[0].tolist() == pytest.approx(w.tolist(), abs=1e-6)
    assert out.weights[0, 0] > out.weights[0, 2] > out.weights[0, 1]
    expected = w[0] * torch.tensor([4.0, 0, 0, 0]) + w[2] * torch.tensor([1.0, 0, 0, 0])
    assert out.logits[0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # the peaked modality missing: weight moves to the others, still rows of 1
    out = fusion({m: torch.zeros(1, D) for m in NAMES}, torch.tensor([[False, True, True]]))
    assert out.weights[0, 0].item() == 0.0 and out.weights[0].sum().item() == pytest.approx(1.0)


def test_qmf_ranking_loss_by_hand():
    conf = torch.tensor([[1.0], [3.0], [2.0]], requires_grad=True)  # (B=3, M=1)
    sample_loss = torch.tensor([[0.1], [0.5], [0.5]])
    # ordered pairs with unequal loss: (0,1), (1,0), (0,2), (2,0); sample 0 has the lowest loss
    # and should be most confident: violations max(0, 3 - 1) = 2 and max(0, 2 - 1) = 1, each
    # counted in both orders -> (2 + 2 + 1 + 1) / 4 = 1.5; the tie (1, 2) is ignored
    loss = ranking_loss(conf, sample_loss, torch.ones(3, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert conf.grad.flatten().tolist() == pytest.approx([-1.0, 0.5, 0.5])
    # sample 1 missing: only the (0, 2) pair remains
    no_1 = torch.tensor([[True], [False], [True]])
    assert ranking_loss(conf, sample_loss, no_1).item() == pytest.approx(1.0)
    # no valid pair: 0, not NaN
    assert ranking_loss(conf, torch.zeros(3, 1), torch.ones(3, 1, dtype=torch.bool)).item() == 0.0


def test_qmf_rank_term_is_weighted():
    fusion = _fusion("qmf", rank_weight=0.0)
    out = fusion(_inputs(), MASK)
    y = torch.arange(B) % K
    assert "rank" not in fusion.loss_terms(out, y)
    fusion.config = fusion.config.model_copy(update={"rank_weight": 2.0})
    terms = fusion.loss_terms(out, y)
    logits = out.unimodal_logits
    ce = F.cross_entropy(logits.reshape(-1, K), y.repeat_interleave(3), reduction="none").view(B, 3)
    assert terms["rank"].item() == pytest.approx(2.0 * ranking_loss(logits.logsumexp(-1), ce, MASK).item())


def test_mean_is_modality_dropout_default_base():
    wrapper = _fusion("modality_dropout")
    assert isinstance(wrapper.inner, MeanFusion)
    assert isinstance(wrapper, ModalityDropoutFusion) and wrapper.config.p == 0.3
