"""The fast DMS layer computes what the layer computed before the speed work (issue 12).

``tests/dms_reference.py`` is a frozen copy of the old arithmetic. Each case builds a
``DMSFusion``, deep-copies it, runs the live forward, losses and backward on one copy and the
reference on the other from the same RNG state, and compares every output: fused vector,
weights, each scorer's signal, unimodal logits, loss terms, gradients with respect to the inputs
and to every parameter, the scheduler's running statistics, and the RNG state afterwards (the
MC-dropout masks come from the same call, so both consume the generator identically and draw
the same masks).

Tolerance: ``|new - ref| <= 1e-6 + 1e-6 |ref|`` (the relative part only matters for values
above 1: losses, squared norms). The layouts differ (the MC passes' matmul runs transposed and
their softmax along another axis; alignment reads a Gram matrix), so values agree to float32
rounding, not bit for bit. One signal needs care: the old MC uncertainty ``E[p^2] - E[p]^2``
carries ~3e-8 of float32 rounding (measured against float64; the new two-pass form ~5e-9), and
standardising it divides by its spread (~1e-2, down to the 1e-4 floor), which can lift that
rounding above 1e-6 downstream. So the uncertainty is compared on its own, and the reference then
continues from the live value (its gradient still flows through the reference's own MC passes);
:func:`test_end_to_end_without_shared_uncertainty` checks the whole chain without that step, at
1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dms_reference as ref
from fusionkit import build
from fusionkit.fusions.base import UnimodalHeads
from fusionkit.fusions.dms import mix
from fusionkit.scorers.mc_dropout import mc_variance

NAMES = ["audio", "image", "text"]
B, D, K = 24, 12, 5
TOL = 1e-6  # atol and rtol

PAPER = {"scorers": ["confidence", "mc_dropout", "alignment"],  # configs/presets/dms-paper.yaml
         "scheduler": {"name": "softmax", "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "temperature": 0.25,
                       "standardize": False},
         "mwcl_weight": 0.1, "aux_weight": 1.0, "route_weight": 0.0}
CONFIGS = {
    "default": {},
    "paper": PAPER,
    "mlp": {"scheduler": {"name": "mlp", "hidden": 16, "layers": 2}},
    "mlp_standardized": {"scheduler": {"name": "mlp", "standardize": True}},
    "all_signals_mc_rate": {"scorers": ["confidence", {"name": "mc_dropout", "passes": 7, "dropout": 0.5},
                                        "alignment", "agreement"]},
    "not_detached": {**PAPER, "detach_scores": False},
    "not_detached_mlp": {"scheduler": {"name": "mlp"}, "detach_scores": False,
                         "scorers": ["confidence", "mc_dropout", "alignment", "agreement"]},
    "no_dropout": {"head_dropout": 0.0, "scorers": ["confidence", "mc_dropout", "alignment"]},
    "shared_masks": {"scorers": ["confidence", {"name": "mc_dropout", "per_sample_masks": False}, "agreement"]},
    "shared_masks_not_detached": {**PAPER, "detach_scores": False,
                                  "scorers": ["confidence", {"name": "mc_dropout", "per_sample_masks": False},
                                              "alignment"]},
}
# every presence pattern over three modalities, including rows with one modality
PATTERNS = [[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
MASK = torch.tensor([PATTERNS[i % len(PATTERNS)] for i in range(B)], dtype=torch.bool)


def _fusion(params: dict, seed: int = 0):
    torch.manual_seed(seed)
    f = build("fusions", {"name": "dms", **params}, modalities=NAMES, dim=D, num_classes=K)
    with torch.no_grad():  # trained-looking heads: peaked predictions, signals with some spread
        f.heads.w2.mul_(6.0)
        f.heads.temperature.copy_(torch.tensor([1.0, 1.7, 0.6]))
    return f


def _inputs(seed: int, nan_missing: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = {m: torch.randn(B, D, generator=g) for m in NAMES}  # each (B, d)
    if nan_missing:  # missing rows hold garbage that must not leak
        for i, m in enumerate(NAMES):
            z[m][~MASK[:, i]] = float("nan")
    return {m: v.requires_grad_() for m, v in z.items()}


def _close(new, old, what: str, tol: float = TOL, old_nan_ok: bool = False) -> None:
    """``new`` matches ``old``; with ``old_nan_ok``, where the old value was NaN (the gradient
    alignment had at a lone or missing modality with ``detach_scores: false``) the new one must
    be finite and is not compared."""
    assert new.shape == old.shape and new.dtype == old.dtype, what
    if old_nan_ok:
        assert new.isfinite().all(), what
        new, old = new[~old.isnan()], old[~old.isnan()]
    torch.testing.assert_close(new, old, atol=tol, rtol=tol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def _run_both(params: dict, train: bool, mask, target, steps: int = 2, transform=None,
              share_uncertainty: bool = True, tol: float = TOL):
    """Live and reference forward + loss + backward, ``steps`` times (running statistics move)."""
    new = _fusion(params).train(train)
    old = copy.deepcopy(new)
    for step in range(steps):
        z_new, z_old = _inputs(step + 1, mask is not None), _inputs(step + 1, mask is not None)
        torch.manual_seed(100 + step)
        with new.heads.mapped(transform):
            out = new(z_new, mask)
        terms = new.loss_terms(out, target)
        (out.fused.square().mean() + sum(terms.values())).backward()
        rng_new = torch.get_rng_state()

        torch.manual_seed(100 + step)
        shared = {k: v for k, v in out.scores.items() if k == "uncertainty" and share_uncertainty}
        with old.heads.mapped(transform):
            ref_out = ref.dms_forward(old, z_old, mask, use_values=shared)
        ref_terms = ref.dms_loss_terms(old, ref_out, target)
        (ref_out["fused"].square().mean() + sum(ref_terms.values())).backward()
        assert torch.equal(rng_new, torch.get_rng_state()), "the RNG was consumed differently"

        assert out.scores.keys() == ref_out["computed_scores"].keys()
        for name, s in ref_out["computed_scores"].items():
            _close(out.scores[name], s, f"score {name}")  # each signal on its own, always at 1e-6
        for field in ("fused", "weights", "unimodal_logits", "z"):
            _close(getattr(out, field), ref_out[field], field, tol)
        assert torch.equal(out.mask, ref_out["mask"])
        assert terms.keys() == ref_terms.keys()
        for name, t in ref_terms.items():
            _close(terms[name], t, f"loss {name}", tol)
        for m in NAMES:
            _close(z_new[m].grad, z_old[m].grad, f"grad z[{m}]", tol, old_nan_ok=True)
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if old_params[name].grad is None:
            assert p.grad is None, name
        else:
            _close(p.grad, old_params[name].grad, f"grad {name}", tol)
    old_buffers = dict(old.named_buffers())
    for name, b in new.named_buffers():
        _close(b, old_buffers[name], f"buffer {name}", tol)
    return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_outputs_losses_and_gradients_as_before(name, train):
    out = _run_both(CONFIGS[name], train, MASK, torch.arange(B) % K)
    assert (out.weights[~MASK] == 0).all() and not out.weights.isnan().any()


@pytest.mark.parametrize("name", ["default", "paper"])
def test_same_results_with_every_modality_present(name):
    out = _run_both(CONFIGS[name], True, None, torch.arange(B) % K)
    assert out.mask.all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_end_to_end_without_shared_uncertainty(train):
    # the default standardises the MC uncertainty: its float32 rounding (~3e-8) is amplified
    # by 1 / std, so the whole chain agrees to 1e-5 rather than 1e-6
    _run_both(CONFIGS["default"], train, MASK, torch.arange(B) % K, share_uncertainty=False, tol=1e-5)


def test_same_results_for_retrieval_probes_and_soft_targets():
    # inside heads.mapped the MC passes go through the transform (the general layout)
    cand = F.normalize(torch.randn(7, K, generator=torch.Generator().manual_seed(3)), dim=-1)  # (N, K)
    transform = lambda out: F.normalize(out, dim=-1) @ cand.T * 10.0  # noqa: E731
    target = torch.zeros(B, 7)
    target[torch.arange(B), torch.arange(B) % 7] = 1.0  # (B, N) soft targets
    out = _run_both(CONFIGS["all_signals_mc_rate"], True, MASK, target, transform=transform)
    assert out.unimodal_logits.shape == (B, len(NAMES), 7)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_masks", "per_sample_masks"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [None, 0.5, 0.001])
def test_heads_sample_matches_the_reference_with_the_same_masks(dropout, train, per_sample):
    torch.manual_seed(0)
    heads = UnimodalHeads(3, D, 16, K, 0.2).train(train)
    with torch.no_grad():
        heads.w2.mul_(6.0)
        heads.temperature.copy_(torch.tensor([1.0, 2.0, 0.5]))
    z = torch.randn(B, 3, D)
    torch.manual_seed(7)
    probs = heads.sample(z, passes=9, dropout=dropout, per_sample=per_sample)
    torch.manual_seed(7)
    expected = ref.heads_sample(heads, z, 9, dropout, per_sample=per_sample)
    assert probs.shape == (9, B, 3, K)
    _close(probs, expected, "probabilities (T, B, M, K)")
    _close(mc_variance(probs), ref.mc_variance(expected), "uncertainty")


def test_training_masks_are_per_sample_unless_shared():
    # two copies of one sample in a batch: per-sample masks (the default) give each copy its own
    # passes; shared masks give them the same T passes (and so the same uncertainty)
    heads = UnimodalHeads(3, D, 16, K, 0.2).train()
    z = torch.randn(1, 3, D).expand(4, 3, D)
    per_sample = heads.sample(z, passes=8)  # (T, B, M, K)
    shared = heads.sample(z, passes=8, per_sample=False)
    assert not torch.allclose(per_sample[:, 0], per_sample[:, 3])
    assert torch.equal(shared[:, 0], shared[:, 3])
    assert not torch.allclose(shared[0], shared[1])  # the passes still differ from each other
    torch.manual_seed(3)
    a = heads.sample(z, passes=8, per_sample=False)
    torch.manual_seed(3)
    assert torch.equal(a, heads.sample(z, passes=8, per_sample=False))  # drawn from the global RNG


def test_lone_or_missing_modality_gradients_are_finite_without_detach():
    # alignment's old floor after the square roots gave NaN gradients at a zero norm
    f = _fusion({**PAPER, "detach_scores": False}).train()
    z = _inputs(1, nan_missing=True)
    out = f(z, MASK)
    (out.fused.square().mean() + f.loss(out, torch.arange(B) % K)).backward()
    assert all(z[m].grad.isfinite().all() for m in NAMES)
    assert all(p.grad.isfinite().all() for p in f.parameters() if p.grad is not None)
    assert (z["audio"].grad[~MASK[:, 0]] == 0).all()  # nothing reaches a missing row


# -- torch.compile: one graph, the same numbers ----------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["default", "paper", "mlp_standardized"])
def test_forward_traces_as_one_graph(name, train):
    # no tensor-to-Python reads (bool(mask.all()), .item()) left in the DMS forward
    f = _fusion(CONFIGS[name]).train(train)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(_inputs(1, nan_missing=True), MASK)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_layer_gives_the_eager_numbers(train):
    # aot_eager: the same graph capture as inductor without a C++ build, so the test stays fast
    eager = _fusion(CONFIGS["default"]).train(train)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    target = torch.arange(B) % K
    results = []
    for f, module in ((eager, eager), (compiled, compiled_module)):
        z = _inputs(1, nan_missing=True)
        torch.manual_seed(5)
        out = f(z, MASK)
        (out.fused.square().mean() + module.loss(out, target)).backward()
        results.append((out, {m: z[m].grad for m in NAMES}, module))
    (out_e, grad_e, mod_e), (out_c, grad_c, mod_c) = results
    for field in ("fused", "weights", "unimodal_logits"):
        _close(getattr(out_c, field), getattr(out_e, field), field)
    for name in out_e.scores:
        _close(out_c.scores[name], out_e.scores[name], f"score {name}")
    for m in NAMES:
        _close(grad_c[m], grad_e[m], f"grad z[{m}]")
    for (name, b_c), (_, b_e) in zip(mod_c.named_buffers(), mod_e.named_buffers()):
        _close(b_c, b_e, f"buffer {name}")  # the running statistics moved the same way
    assert (out_c.weights[~MASK] == 0).all() and not out_c.weights.isnan().any()


def test_compiled_layer_with_a_symbolic_batch_size_gives_the_eager_numbers():
    # dynamic=True (or torch.compile's automatic recompile once the batch size changes) makes B
    # symbolic; the MC-dropout masks' random draw failed to trace then (found on a GPU run)
    eager = _fusion(CONFIGS["default"]).train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (B, B - 5):
        outs = []
        for f, module in ((eager, eager), (compiled, compiled_module)):
            z = {m: v[:rows].detach().requires_grad_() for m, v in _inputs(1, nan_missing=True).items()}
            torch.manual_seed(7)
            out = f(z, MASK[:rows])
            (out.fused.square().mean() + module.loss(out, torch.arange(rows) % K)).backward()
            outs.append((out, z))
        (out_e, z_e), (out_c, z_c) = outs
        assert out_c.fused.shape == (rows, D)
        _close(out_c.fused, out_e.fused, f"fused at B={rows}")
        _close(out_c.scores["uncertainty"], out_e.scores["uncertainty"], f"uncertainty at B={rows}")
        for m in NAMES:
            _close(z_c[m].grad, z_e[m].grad, f"grad z[{m}] at B={rows}")


def test_compiled_layer_still_rejects_a_sample_without_modalities():
    f = torch.compile(_fusion(CONFIGS["default"]).eval(), fullgraph=True, backend="aot_eager")
    mask = MASK.clone()
    mask[3] = False
    with pytest.raises(RuntimeError, match="no modality present"):
        f(_inputs(1, nan_missing=False), mask)


def test_mix_backward_is_the_exact_derivative():
    # the hand-written backward of (h, spread) against finite differences, in float64
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.rand(5, 3, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(mix, (z, w))
    h, spread = mix(z, w)
    assert torch.allclose(h, (w.unsqueeze(-1) * z).sum(1))
    direct = (w.unsqueeze(-1) * (z - h.unsqueeze(1)).square()).sum((1, 2))  # sum_m w_m |h - z_m|^2
    assert torch.allclose(spread, direct)


def test_eval_weights_of_a_sample_do_not_depend_on_its_batch():
    """Eval-mode MC dropout uses T masks shared by every sample from a fixed seed: a sample gets
    the same signals and weights alone, in any batch, at any position, and the global RNG is untouched."""
    f = _fusion(CONFIGS["default"]).eval()
    z = _inputs(1, False)
    with torch.no_grad():
        together = f(z, None)
        rng = torch.get_rng_state()
        alone = [f({m: v[i:i + 1] for m, v in z.items()}, None) for i in range(3)]
        flipped = f({m: v.flip(0) for m, v in z.items()}, None)
    assert torch.equal(rng, torch.get_rng_state())
    for i in range(3):
        torch.testing.assert_close(alone[i].weights[0], together.weights[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped.weights.flip(0), together.weights, atol=1e-6, rtol=0)
    f.train()
    torch.manual_seed(0)
    a = f(z, None).scores["uncertainty"]
    torch.manual_seed(1)
    b = f(z, None).scores["uncertainty"]
    assert not torch.allclose(a, b)  # training still draws new masks per sample from the global RNG
