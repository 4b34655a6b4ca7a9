"""examples/typicality_scorer.py: out-of-distribution inputs score low and lose weight; the
running statistics survive a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionkit import build
from fusionkit.fusions.base import UnimodalHeads
from fusionkit.registry import load_plugin, registry
from fusionkit.scorers.base import ScoreContext

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "typicality_scorer.py"
NAMES = ["audio", "image", "text"]
B, D, K = 64, 16, 4


@pytest.fixture(scope="module")
def fusion_factory():
    load_plugin(str(EXAMPLE))

    def make():
        torch.manual_seed(0)
        return build("fusions", {"name": "dms", "scorers": ["confidence", "mc_dropout", "agreement", "typicality"],
                                 "scheduler": {"coefficients": {"typicality": 1.0}}},
                     modalities=NAMES, dim=D, num_classes=K)
    yield make
    registry("scorers")._entries.pop("typicality")  # an example, not a built-in: leave the registry as found


def test_it_passes_the_registry_wide_scorer_checks(fusion_factory):
    # what tests/test_registry.py asks of every built-in scorer (it collects before this loads)
    scorer = build("scorers", {"name": "typicality"})
    heads = UnimodalHeads(len(NAMES), D, 8, K, 0.2)
    z = torch.randn(4, len(NAMES), D)
    signal = scorer(ScoreContext(z=z, mask=torch.ones(4, len(NAMES), dtype=torch.bool), logits=heads(z), heads=heads))
    assert scorer.signal == "typicality" and signal.shape == (4, len(NAMES)) and torch.isfinite(signal).all()


def _batch(seed: int, scale_audio: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = {m: torch.randn(B, D, generator=g) + 2.0 for m in NAMES}  # the "training distribution"
    z["audio"] = z["audio"] * scale_audio
    return z


def _trained(make):
    f = make().train()
    mask = torch.ones(B, len(NAMES), dtype=torch.bool)
    for step in range(60):  # running statistics (and the scheduler's standardisation) settle
        f(_batch(step), mask)
    return f.eval(), mask


def test_out_of_distribution_audio_scores_low_and_loses_weight(fusion_factory):
    f, mask = _trained(fusion_factory)
    with torch.no_grad():
        clean = f(_batch(100), mask)
        noisy = f(_batch(100, scale_audio=25.0), mask)  # audio far outside what training saw
    typ_clean, typ_noisy = clean.scores["typicality"], noisy.scores["typicality"]
    assert typ_clean.shape == (B, len(NAMES))
    assert typ_noisy[:, 0].mean() < typ_clean[:, 0].mean() - 2.0  # about -log(1 + 625) against -log(2)
    torch.testing.assert_close(typ_noisy[:, 1:], typ_clean[:, 1:])  # the other modalities are untouched
    assert noisy.weights[:, 0].mean() < clean.weights[:, 0].mean() / 2


def test_running_statistics_load_from_a_checkpoint(fusion_factory):
    f, mask = _trained(fusion_factory)
    state = f.state_dict()
    saved = [v for k, v in state.items() if k.endswith(".mu")]
    assert len(saved) == 1 and saved[0].shape == (len(NAMES), D)  # the statistics are in the checkpoint
    fresh = fusion_factory()
    fresh.load_state_dict(state)
    fresh.eval()
    z = _batch(7, scale_audio=3.0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(z, mask).scores["typicality"], f(z, mask).scores["typicality"])


def test_statistics_move_only_in_training(fusion_factory):
    f, mask = _trained(fusion_factory)
    before = {k: v.clone() for k, v in f.state_dict().items() if k.endswith(("mu", "var"))}
    with torch.no_grad():
        f(_batch(5, scale_audio=10.0), mask)  # eval mode: no update
    after = {k: v for k, v in f.state_dict().items() if k.endswith(("mu", "var"))}
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    mu = next(v for k, v in after.items() if k.endswith(".mu"))
    var = next(v for k, v in after.items() if k.endswith(".var"))
    # training moved them to the training data's statistics (inputs: N(2, 1) per dimension)
    assert mu.mean().item() == pytest.approx(2.0, abs=0.1) and var.mean().item() == pytest.approx(1.0, abs=0.15)
