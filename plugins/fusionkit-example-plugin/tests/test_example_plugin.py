"""The example plugin, found through its installed entry point and used from the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fusionkit.fusions.base import UnimodalHeads
from fusionkit.registry import ENTRY_POINT_GROUP, build, registry
from fusionkit.scorers.base import ScoreContext

FUSIONKIT = str(Path(sys.executable).with_name("fusionkit"))


def _cli(*args, cwd=None):
    return subprocess.run([FUSIONKIT, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_entry_point_is_installed_and_registers_both_components():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("example") == "fusionkit_example_plugin"
    entries = {e.name: e for e in registry("scorers").entries()}
    assert entries["margin"].source == "plugin fusionkit_example_plugin"
    assert "top1" in registry("fusions").names()


def test_margin_is_the_top2_probability_gap():
    heads = UnimodalHeads(1, 2, 2, 3, 0.0)
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]]))  # (B=1, M=1, K=3)
    ctx = ScoreContext(z=torch.zeros(1, 1, 2), mask=torch.ones(1, 1, dtype=torch.bool), logits=logits, heads=heads)
    assert abs(build("scorers", "margin")(ctx).item() - 0.3) < 1e-6


def test_top1_puts_all_weight_on_the_most_confident_modality():
    f = build("fusions", "top1", modalities=["a", "b"], dim=4, num_classes=3)
    with torch.no_grad():
        for p in f.heads.parameters():
            p.zero_()
        f.heads.b2[1, 0] = 5.0  # head b is confident
    out = f({"a": torch.randn(2, 4), "b": torch.randn(2, 4)})
    assert out.weights.tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_plugin_shows_in_list_and_trains_from_the_cli(tmp_path):
    listing = _cli("list", "scorers").stdout
    assert "margin" in listing and "plugin fusionkit_example_plugin" in listing
    out = tmp_path / "run"
    proc = _cli("train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                "train.epochs=1", "model.dim=16",
                "model.fusion.scorers=[confidence, margin]", "model.fusion.scheduler.coefficients={margin: 2.0}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = _cli("config", "show", str(out)).stdout
    assert "name: margin" in cfg and "margin: 2.0" in cfg
    assert json.loads((out / "results.json").read_text())["test"]["n"] == 400


def test_local_plugin_file_is_loaded_with_the_plugins_flag(tmp_path):
    plugin = tmp_path / "my_scorer.py"
    plugin.write_text(
        '"""A local scorer."""\n'
        "from fusionkit.registry import register\n"
        "from fusionkit.scorers.base import Scorer, ScorerConfig\n"
        "@register('scorers', 'always_half')\n"
        "class Half(Scorer):\n"
        '    """Scores every modality 0.5 (local test plugin)."""\n'
        "    Config = ScorerConfig\n"
        "    signal = 'half'\n"
        "    def forward(self, ctx):\n"
        "        return ctx.mask.float() * 0.5\n")
    proc = _cli("--plugins", str(plugin), "list", "scorers")
    assert proc.returncode == 0, proc.stderr
    assert "always_half" in proc.stdout and "Scores every modality 0.5" in proc.stdout
    assert "always_half" not in _cli("list", "scorers").stdout  # only when asked for


def test_logit_penalty_strategy_is_registered_and_trains_from_the_cli(tmp_path):
    entries = {e.name: e for e in registry("strategies").entries()}
    assert entries["logit_penalty"].source == "plugin fusionkit_example_plugin"
    out = tmp_path / "run"
    proc = _cli("train", "--modalities", "fou,kar", "--out", str(out), "--no-progress", "train.epochs=1",
                "model.dim=16", "train.batch_size=128", "train.strategies=[{name: logit_penalty, weight: 0.05}]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_logit_penalty"] > 0 and row["strategies"] == {"logit_penalty": {"steps": 10}}
