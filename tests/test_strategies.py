"""Training strategies (kind ``strategies``): the hook order in the real trainer, ModalImmune's
collapse target, gradient mask and Neumann hyper-gradient, AIM's per-depth strength and gates,
--resume, and tiny CLI runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY
from fusionkit.config import ModelConfig, load_raw, resolve
from fusionkit.errors import ConfigError
from fusionkit.registry import build, register, registry
from fusionkit.strategies.aim import modulation_strength, unit_gates
from fusionkit.strategies.base import Strategy, StrategyConfig, TrainContext, decode_tensor, encode_tensor
from fusionkit.strategies.hypergrad import hypergradient, neumann_inverse_hvp
from fusionkit.strategies.modalimmune import collapse_target
from fusionkit.training.checkpoint import find_checkpoint, read_meta
from fusionkit.training.trainer import prepare_run_dir, train
from test_checkpoints import cli


# -- a tiny model and batch (also used by the registry-wide test) -----------------------------------
def tiny_model(modalities=("a", "b", "c"), dim: int = 8, classes: int = 3, seed: int = 0):
    """DMS over ``modalities``, each a 5-long vector through a 2-layer MLP; a classification task."""
    from fusionkit.datasets.base import DatasetBundle, MultimodalSplit
    from fusionkit.encoders.base import ModalitySpec
    from fusionkit.model import build_model

    task = build("tasks", "classification")
    labels = list(range(classes))
    task.setup(DatasetBundle({"train": MultimodalSplit({"x": [None] * classes}, labels)},
                             classes=[str(k) for k in labels], modalities={}))
    torch.manual_seed(seed)
    mlp = {"name": "mlp", "hidden": 6, "layers": 2, "dropout": 0.0}
    cfg = ModelConfig(dim=dim, encoders={m: dict(mlp) for m in modalities},
                      fusion={"name": "dms"}, decoder={"name": "classifier"})
    specs = {m: ModalitySpec("vector", dim=5) for m in modalities}
    return build_model(cfg, specs, list(modalities), task)


def tiny_batch(modalities=("a", "b", "c"), B: int = 8, classes: int = 3, seed: int = 1, mask=None):
    """A collated batch; by default (M >= 2) sample 1 lacks ``b``, sample 2 has only ``a`` and
    (M = 3) sample 3 lacks ``c``."""
    g = torch.Generator().manual_seed(seed)
    M = len(modalities)
    if mask is None:
        mask = torch.ones(B, M, dtype=torch.bool)
        if M >= 2:
            mask[1, 1] = False
            mask[2, 1:] = False
        if M >= 3:
            mask[3, 2] = False
    inputs, rows = {}, {}
    for j, m in enumerate(sorted(modalities)):
        rows[m] = mask[:, j].nonzero().flatten()
        inputs[m] = torch.randn(len(rows[m]), 5, generator=g) if len(rows[m]) else None
    return {"inputs": inputs, "rows": rows, "mask": mask, "target": torch.randint(0, classes, (B,), generator=g),
            "index": torch.arange(B), "skipped": []}


def one_step(strategy: Strategy, model, batch, optimizer=None, step: int = 0):
    """What the trainer does for one batch; returns the terms."""
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = strategy.transform_batch(batch, step)
    out = model(batch)
    terms = model.loss_terms(out, batch)
    extra = strategy.loss_terms(out, batch, model)
    optimizer.zero_grad(set_to_none=True)
    sum([*terms.values(), *extra.values()]).backward()
    strategy.after_backward(model, step)
    optimizer.step()
    strategy.after_step(model, step)
    return extra


# -- 1. the hook order, through the real trainer -----------------------------------------------------
CALLS: list[tuple] = []


class RecorderConfig(StrategyConfig):
    pass


@register("strategies", "test_recorder")
class Recorder(Strategy):
    """Records every hook call (test_strategies)."""

    Config = RecorderConfig

    def on_train_start(self, model, optimizer, context):
        CALLS.append(("on_train_start", isinstance(context, TrainContext)))
        self.model = model

    def transform_batch(self, batch, step):
        CALLS.append(("transform_batch", step))
        return {**batch, "recorded": True}

    def loss_terms(self, out, batch, model):
        CALLS.append(("loss_terms", batch.get("recorded", False)))
        return {"recorded": out.logits.sum() * 0.0 + 0.5}

    def after_backward(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        CALLS.append(("after_backward", step, all(g is not None for g in grads)))
        self.weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def after_step(self, model, step):
        now = [p for p in model.parameters() if p.requires_grad]
        moved = any(not torch.equal(w, p) for w, p in zip(self.weights, now))
        CALLS.append(("after_step", step, moved))

    def on_epoch_end(self, epoch, record):
        CALLS.append(("on_epoch_end", epoch, "val" in record))
        return {"epoch_seen": epoch}

    def on_train_end(self, model):
        CALLS.append(("on_train_end",))


def test_hooks_are_called_in_the_documented_order(tmp_path):
    CALLS.clear()
    cfg = resolve(load_raw(None, ["modalities=[fou, kar]", *TINY, "train.epochs=2",
                                  "train.strategies=[test_recorder]"]))
    run = tmp_path / "run"
    train(cfg, prepare_run_dir(run, False), show_progress=False)
    steps = 10  # 1200 training samples, batches of 128
    expected = [("on_train_start", True)]
    for epoch in (1, 2):
        for step in range((epoch - 1) * steps, epoch * steps):
            expected += [("transform_batch", step), ("loss_terms", True), ("after_backward", step, True),
                         ("after_step", step, True)]
        expected.append(("on_epoch_end", epoch, True))
    expected.append(("on_train_end",))
    assert CALLS == expected
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_recorded"] for r in rows] == [0.5, 0.5]  # logged like the model's own terms
    assert [r["strategies"] for r in rows] == [{"test_recorder": {"epoch_seen": e}} for e in (1, 2)]
    resume = read_meta(find_checkpoint(run / "checkpoints", "last").weights)["resume"]
    assert resume["strategies"] == {"step": 20, "strategies": [["test_recorder", {}]]}


# -- 2. ModalImmune -------------------------------------------------------------------------------------
def test_collapse_target_on_a_hand_computed_example():
    # centred rows span e2 with s = 2*sqrt(2) and e1 with s = sqrt(2): p = (2/3, 1/3), r = exp(H(p)) = 1.89,
    # so the top direction (e2) is kept and shrunk by 1 - lambda, and e1 (beyond the effective rank) goes.
    offset = torch.tensor([1.0, 3.0])
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [9.0, 9.0]])
    z[:4] += offset
    rows = torch.tensor([True, True, True, True, False])  # the last sample lacks the modality
    lam = torch.tensor(0.5, requires_grad=True)
    col = collapse_target(z, rows, lam)
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + offset
    assert torch.allclose(col.target[:4], expected, atol=1e-6)
    assert torch.equal(col.target[4], torch.tensor([9.0, 9.0]))  # a missing row is never touched
    assert col.rank == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))), rel=1e-5)
    # penalty = (lambda^2 * 8 + 2) / (8 + 2), d/dlambda = 2 * lambda * 8 / 10
    assert col.penalty.item() == pytest.approx(0.4, abs=1e-6)
    (dlam,) = torch.autograd.grad(col.penalty, lam)
    assert float(dlam) == pytest.approx(0.8, abs=1e-6)
    full = collapse_target(z, rows, torch.tensor(1.0))  # lambda = 1: every present row is the mean
    assert torch.allclose(full.target[:4], offset.expand(4, 2), atol=1e-6)
    one = collapse_target(z, torch.tensor([True, False, False, False, False]), lam)  # no spread: unchanged, 0
    assert torch.equal(one.target, z) and float(one.penalty) == 0.0


def test_gradient_mask_changes_exactly_the_entries_it_selects():
    def grads(mask_on: bool):
        model = tiny_model()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        mi = build("strategies", {"name": "modalimmune", "grad_mask": mask_on, "hypergrad": False})
        mi.on_train_start(model, opt, TrainContext(None))
        torch.manual_seed(3)
        one_step(mi, model, tiny_batch(seed=1), opt)  # gives AdamW its exp_avg_sq (the curvature)
        seen = {}
        real = mi.after_backward

        def spy(model, step):
            seen["before"] = [None if p.grad is None else p.grad.clone() for p in mi.params]
            seen["collapse"] = mi._step["grads"] if mi._step else None
            seen["curvature"] = [opt.state[p]["exp_avg_sq"].clone() for p in mi.params]  # what the mask reads
            real(model, step)
            seen["after"] = [None if p.grad is None else p.grad.clone() for p in mi.params]

        mi.after_backward = spy
        one_step(mi, model, tiny_batch(seed=2), opt, step=1)
        return seen

    on, off = grads(True), grads(False)
    masked = total = 0
    for b_on, b_off, a_on, a_off, g_c, curv in zip(on["before"], off["before"], on["after"], off["after"],
                                                   on["collapse"], on["curvature"]):
        if b_on is None:
            continue
        assert torch.equal(b_on, b_off) and torch.equal(a_off, b_off)  # same step; without the mask nothing changes
        if g_c is None:  # a parameter the collapse terms do not reach (the unimodal heads: scores are detached)
            assert torch.equal(a_on, b_on)
            continue
        clean = b_on - g_c
        sel = (g_c * clean < 0) & (curv > curv.mean())  # the documented rule, kappa = 1
        assert torch.equal(a_on[sel], clean[sel])  # masked entries keep only their clean gradient
        assert torch.equal(a_on[~sel], b_on[~sel])  # and nothing else moves
        masked, total = masked + int(sel.sum()), total + sel.numel()
    assert 0 < masked < total


def test_neumann_hypergradient_matches_the_exact_inverse_hessian_product():
    # inner: 1/2 w'Aw - lambda b'w (w* = lambda A^-1 b); outer: 1/2 |w - c|^2
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = (0.7 * torch.linalg.solve(A, b)).requires_grad_(True)
    exact = float((w.detach() - c) @ torch.linalg.solve(A, b))  # dL_out/dlambda at w*
    v = (w.detach() - c,)
    exact_ihvp = torch.linalg.solve(A, v[0])
    alpha = 0.25  # < 1 / lambda_max(A) = 0.27
    errors, ihvp_errors = [], []
    for K in (1, 5, 20, 80, 300):
        grad, norms = hypergradient(lambda: 0.5 * w @ A @ w - lam * (b @ w), lambda: 0.5 * ((w - c) ** 2).sum(),
                                    [w], lam, K, alpha)
        errors.append(abs(float(grad) - exact))
        approx, _ = neumann_inverse_hvp(lambda u: [A @ u[0]], list(v), K, alpha)
        ihvp_errors.append(float((approx[0] - exact_ihvp).norm()))
        assert norms == sorted(norms, reverse=True)  # the series contracts
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-9 * max(1.0, abs(exact)) and ihvp_errors[-1] < 1e-9
    # alpha = None: 0.5 / lambda_max(A) from power iterations, and the series still converges
    grad, norms = hypergradient(lambda: 0.5 * w @ A @ w - lam * (b @ w), lambda: 0.5 * ((w - c) ** 2).sum(),
                                [w], lam, 400, None, power_steps=20)
    assert abs(float(grad) - exact) < 1e-8 and norms[-1] < norms[0]


# -- 3. AIM ----------------------------------------------------------------------------------------------
def test_modulation_strength_per_depth_follows_the_imbalance():
    dominant = torch.tensor([0.5, 0.4, 0.25])  # probe losses at 3 depths of the dominant modality
    weak = torch.tensor([1.0, 0.4])  # 2 depths: dominant depths 0, 1, 2 meet weak depths 0, 1, 1
    s = modulation_strength(dominant, [weak], gamma=2.0)
    # rho = (1.0/0.5, 0.4/0.4, 0.4/0.25) = (2, 1, 1.6); s = tanh(2 * max(0, rho - 1))
    assert s.tolist() == pytest.approx([math.tanh(2.0), 0.0, math.tanh(1.2)])
    two = modulation_strength(dominant[:2], [torch.tensor([1.0, 0.8]), torch.tensor([0.5, 0.4])], gamma=1.0)
    assert two.tolist() == pytest.approx([math.tanh(0.5), math.tanh(0.5)])  # the weak modalities' mean
    assert modulation_strength(torch.tensor([float("nan"), 0.5]), [torch.tensor([1.0, 1.0])], 1.0)[0] == 0
    assert unit_gates(torch.tensor([0.1, 0.5, 0.3, 0.2]), 0.5, 0.75).tolist() == [0.25, 1.0, 1.0, 0.25]


def test_aim_runs_the_dominant_encoder_again_with_the_gates_of_its_depths():
    model = tiny_model(("a", "b"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    aim = build("strategies", {"name": "aim", "dominant": "a", "gamma": 1.0, "under_fraction": 0.5})
    aim.on_train_start(model, opt, TrainContext(None))
    assert [type(d).__name__ for d in aim.depths["a"]] == ["Linear", "Linear", "Linear"]  # 2 MLP layers + projector
    aim.probe_ema = {"a": torch.tensor([0.5, 0.5, 0.5]), "b": torch.tensor([1.0, 0.5, 0.75])}
    aim.ratio["a"][0] = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.0, 0.9])  # units 5, 1, 2 are under-optimised
    first = aim.depths["a"][0]
    outputs = []
    first.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))  # after AIM's own
    batch = tiny_batch(("a", "b"), mask=torch.ones(8, 2, dtype=torch.bool))
    model.train()
    s = math.tanh(1.0)  # rho = (2, 1, 1.5) -> s = (tanh 1, 0, tanh 0.5)
    assert aim.strengths("a").tolist() == pytest.approx([s, 0.0, math.tanh(0.5)])
    out = model(batch)
    terms = aim.loss_terms(out, batch, model)  # gates from the losses measured so far
    clean, degraded = outputs  # the ordinary pass, then the auxiliary one
    gate = torch.tensor([1 - s, 1, 1, 1 - s, 1 - s, 1])
    assert torch.allclose(degraded, clean * gate, atol=1e-6)
    assert set(terms) == {"aim"} and torch.isfinite(terms["aim"]) and terms["aim"].requires_grad


# -- 4. any number of modalities, missing ones ----------------------------------------------------------
@pytest.mark.parametrize("name", ["modalimmune", "aim"])
@pytest.mark.parametrize("modalities", [("a",), ("a", "b"), ("a", "b", "c")], ids=["M1", "M2", "M3"])
def test_strategies_work_for_any_number_of_modalities_with_missing_ones(name, modalities):
    model = tiny_model(modalities)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    strategy = build("strategies", {"name": name, "hypergrad_every": 1} if name == "modalimmune" else name)
    strategy.on_train_start(model, opt, TrainContext(None))
    model.train()
    for step in range(3):
        terms = one_step(strategy, model, tiny_batch(modalities, seed=step), opt, step)
        assert terms and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    if len(modalities) == 1:  # nothing to collapse, nobody to modulate: the terms are exactly 0
        assert all(t.item() == 0.0 for t in terms.values())
    state = json.loads(json.dumps(strategy.state_dict()))
    strategy.load_state_dict(state)
    assert json.loads(json.dumps(strategy.state_dict())) == state  # restored exactly


def test_modalimmune_collapses_only_rows_that_keep_another_modality():
    model = tiny_model(("a", "b"))
    mi = build("strategies", {"name": "modalimmune", "controller": False, "grad_mask": False, "hypergrad": False})
    mi.on_train_start(model, torch.optim.AdamW(model.parameters()), TrainContext(None))
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    batch = tiny_batch(("a", "b"), B=5, mask=mask)
    model.train()
    out = model(batch)
    z = mi.inputs.z
    _, rows = mi._rows(batch)
    for j, m in enumerate(("a", "b")):
        col, _ = mi._collapsed(model, z, out.tokens, batch, j, rows, torch.tensor(0.5), target_only=True)
        changed = {**z, m: torch.where(rows[:, j].unsqueeze(1), col.target, z[m])}[m]
        alone = (mask[:, j] & ~rows[:, j]) | ~mask[:, j]  # only-m samples and samples without m
        assert torch.equal(changed[alone], z[m][alone])
        assert not torch.allclose(changed[rows[:, j]], z[m][rows[:, j]])
        assert (changed[~mask[:, j]] == 0).all()  # a missing modality stays exactly zero


# -- 5. --resume, the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategies", ["[modalimmune]", "[aim]"])
def test_a_resumed_run_with_a_strategy_equals_the_run_never_interrupted(strategies, tmp_path, monkeypatch):
    from test_resume import _cfg, _rows, _stopped

    extra = (f"train.strategies={strategies}", "train.epochs=3")
    full = train(_cfg(*extra), prepare_run_dir(tmp_path / "full", False), show_progress=False)
    cut = _stopped(_cfg(*extra), tmp_path / "cut", 1, monkeypatch)
    state = read_meta(find_checkpoint(cut / "checkpoints", "last").weights)["resume"]["strategies"]
    assert state["step"] == 10 and state["strategies"][0][1]
    resumed = train(_cfg(*extra), cut, show_progress=False, resume=True)
    rows = _rows(tmp_path / "full")
    assert _rows(cut) == rows and all("strategies" in r for r in rows)
    assert resumed.test == full.test


@pytest.mark.parametrize("name,terms", [("modalimmune", ("immune", "collapse")), ("aim", ("aim",))])
def test_cli_trains_one_tiny_epoch_with_each_strategy(name, terms, tmp_path, capsys, monkeypatch):
    out = tmp_path / name
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                    *TINY, f"train.strategies=[{name}]")
    assert code == 0, err
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for t in terms:
        assert math.isfinite(row[f"train_{t}"]), row
    assert math.isfinite(row["train_loss"]) and 0 <= row["val"]["accuracy"] <= 1 and math.isfinite(row["val"]["nll"])
    assert name in row["strategies"]
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(v) for v in results["test"]["unimodal_accuracy"].values())


def test_strategies_are_listed_and_bad_blocks_fail_early(capsys):
    from fusionkit.cli.main import main

    entries = {e.name: e for e in registry("strategies").entries()}
    assert entries["modalimmune"].source == "core" and entries["aim"].source == "core"
    try:
        main(["list", "strategies"])
    except SystemExit as exc:
        assert not exc.code
    listing = capsys.readouterr().out
    assert "modalimmune" in listing and "aim" in listing
    base = ["modalities=[fou, kar]", *TINY]
    cases = [("train.strategies=[modalimune]", r"train.strategies.0.name: 'modalimune' is not a training strategy; "
                                                r"did you mean 'modalimmune'\?"),
             ("train.strategies=[{name: aim, dominant: img}]", r"train.strategies.0.dominant: 'img' is not among"),
             ("train.strategies=[{name: modalimmune, strength: 1.5}]",
              r"train.strategies.0.strength: Input should be less"),
             ("train.strategies=[aim, aim]", r"'aim' is listed 2 times")]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve(load_raw(None, [*base, override]))
    cfg = resolve(load_raw(None, [*base, "train.strategies=[aim]"]))
    assert cfg.train.strategies[0]["name"] == "aim" and cfg.train.strategies[0]["gamma"] == 1.0  # defaults filled


def test_tensor_state_round_trips_bit_for_bit():
    for t in (torch.randn(3, 4), torch.tensor(float("nan")), torch.zeros(0), torch.tensor([True, False]),
              torch.randn(2, dtype=torch.float64)):
        back = decode_tensor(json.loads(json.dumps(encode_tensor(t))))
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back.view(-1).view(torch.uint8) if back.numel() else back,
                           t.view(-1).view(torch.uint8) if t.numel() else t)


def test_aim_auxiliary_pass_leaves_batch_norm_statistics_alone():
    model = tiny_model(("a", "b"))
    model.encoders["a"].net.insert(1, torch.nn.BatchNorm1d(6))  # a dominant encoder with batch norm
    bn = model.encoders["a"].net[1]
    aim = build("strategies", {"name": "aim", "dominant": "a"})
    aim.on_train_start(model, torch.optim.AdamW(model.parameters()), TrainContext(None))
    aim.probe_ema = {"a": torch.tensor([0.5, 0.5, 0.5, 0.5]), "b": torch.tensor([1.0, 1.0, 1.0])}
    batch = tiny_batch(("a", "b"), mask=torch.ones(8, 2, dtype=torch.bool))
    model.train()
    out = model(batch)
    stats = {k: v.clone() for k, v in bn.named_buffers()}  # after the ordinary pass
    terms = aim.loss_terms(out, batch, model)
    assert all(torch.equal(v, stats[k]) for k, v in bn.named_buffers())
    (model.loss_terms(out, batch)["task"] + terms["aim"]).backward()  # the ordinary graph is intact
    assert model.encoders["a"].net[0].weight.grad is not None and terms["aim"].item() > 0
