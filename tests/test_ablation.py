"""The DMS ablation grid: variant configs, errors, and a tiny end-to-end table."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_cli
from fusionkit.ablation import VARIANTS, variant_configs
from fusionkit.config import load_raw
from fusionkit.errors import ConfigError


def _raw(*extra):
    return load_raw(None, ["modalities=[fou, kar]", *TINY, *extra])


def test_each_variant_changes_exactly_its_factor():
    cfgs = variant_configs(_raw())
    assert list(cfgs) == list(VARIANTS)
    sched = {n: c.model.fusion.get("scheduler", {}) for n, c in cfgs.items()}
    assert (sched["full"]["alpha"], sched["full"]["beta"], sched["full"]["gamma"]) == (1.0, 1.0, 1.0)
    assert sched["no_confidence"]["alpha"] == 0 and sched["no_confidence"]["beta"] == 1.0
    assert sched["no_uncertainty"]["beta"] == 0 and sched["no_uncertainty"]["gamma"] == 1.0
    assert sched["no_alignment"]["gamma"] == 0 and sched["no_alignment"]["alpha"] == 1.0
    assert sched["learned_scheduler"]["name"] == "mlp"
    assert cfgs["no_mwcl"].model.fusion["mwcl_weight"] == 0 and cfgs["full"].model.fusion["mwcl_weight"] > 0
    assert cfgs["static_mean"].model.fusion["name"] == "mean"
    assert all(c.seed == cfgs["full"].seed and c.modalities == ["fou", "kar"] for c in cfgs.values())


def test_ablation_errors():
    with pytest.raises(ConfigError, match="needs a config whose model.fusion is dms"):
        variant_configs(_raw("model.fusion={name: mean}"))
    with pytest.raises(ConfigError, match="'no_mwlc' is not an ablation variant; did you mean 'no_mwcl'"):
        variant_configs(_raw(), ["no_mwlc"])
    with pytest.raises(ConfigError, match="variant 'no_alignment' switches off a coefficient"):
        variant_configs(_raw("model.fusion.scheduler={name: mlp}"), ["no_alignment"])


def test_ablate_cli_writes_one_table(tmp_path):
    out = tmp_path / "abl"
    proc = run_cli("ablate", "--corrupt", "fou:missing", "--severity", "1.0", "--variants", "full,static_mean",
                   "--out", str(out), "modalities=[fou, kar]", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "static_mean"}
    for name, row in rows.items():
        clean = json.loads(run_cli("eval", str(out / name), "--json").stdout)["accuracy"]
        assert row["clean_accuracy"] == pytest.approx(clean)
        # fou dropped for every sample: all weight on kar, accuracy = the kar-only prediction
        assert row["mean_weights_corrupted"] == {"fou": 0.0, "kar": 1.0}
        assert row["drop_points"] == pytest.approx(100 * (row["clean_accuracy"] - row["corrupted_accuracy"]))
    assert "| full |" in (out / "ablation.md").read_text()
    again = run_cli("ablate", "--corrupt", "fou:missing", "--variants", "full", "--out", str(out),
                    "modalities=[fou, kar]", *TINY)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
