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
    cfgs = variant_configs(_raw('train.augment=[{corrupt: "fou:gaussian_noise", p: 0.2}]',
                                "model.fusion.scheduler={name: mlp, standardize: true}"))
    # the default dms has no alignment scorer and here a learned scheduler: those two do not apply
    assert list(cfgs) == [v for v in VARIANTS if v not in ("no_alignment", "learned_scheduler")]
    full = cfgs["full"].model.fusion
    scorers = {n: [s["name"] for s in c.model.fusion["scorers"]] for n, c in cfgs.items() if c.model.fusion["name"] == "dms"}
    assert scorers["full"] == ["confidence", "mc_dropout", "agreement"]
    assert scorers["no_confidence"] == ["mc_dropout", "agreement"]
    assert scorers["no_uncertainty"] == ["confidence", "agreement"]
    assert scorers["no_agreement"] == ["confidence", "mc_dropout"]
    assert full["scheduler"]["name"] == "mlp" and full["scheduler"]["standardize"] and full["route_weight"] == 1.0
    rule = cfgs["rule_scheduler"].model.fusion
    assert rule["scheduler"]["name"] == "softmax" and rule["scheduler"]["standardize"] and rule["route_weight"] == 0
    assert cfgs["no_standardize"].model.fusion["scheduler"] == {**full["scheduler"], "standardize": False}
    assert cfgs["no_route"].model.fusion == {**full, "route_weight": 0.0}
    assert cfgs["no_mwcl"].model.fusion == {**full, "mwcl_weight": 0.0}
    assert cfgs["no_augment"].train.augment == [] and len(cfgs["full"].train.augment) == 1
    assert cfgs["no_calibration"].train.calibrate is False and cfgs["full"].train.calibrate is True
    assert cfgs["static_mean"].model.fusion["name"] == "mean" and len(cfgs["static_mean"].train.augment) == 1
    assert all(c.seed == cfgs["full"].seed and c.modalities == ["fou", "kar"] for c in cfgs.values())
    default = variant_configs(_raw())  # the default: softmax rule on standardised signals, no augment
    assert "learned_scheduler" in default and "no_route" not in default and "no_augment" not in default
    assert default["learned_scheduler"].model.fusion["scheduler"]["name"] == "mlp"
    paper = variant_configs(_raw("model.fusion.scorers=[confidence, mc_dropout, alignment]",
                                 "model.fusion.scheduler={name: softmax}"))
    assert "no_alignment" in paper and "no_standardize" not in paper


def test_ablation_errors():
    with pytest.raises(ConfigError, match="needs a config whose model.fusion is dms"):
        variant_configs(_raw("model.fusion={name: mean}"))
    with pytest.raises(ConfigError, match="'no_mwlc' is not an ablation variant; did you mean 'no_mwcl'"):
        variant_configs(_raw(), ["no_mwlc"])
    with pytest.raises(ConfigError, match="variant 'no_alignment' has nothing to switch off: the config has no 'alignment' scorer"):
        variant_configs(_raw(), ["no_alignment"])
    with pytest.raises(ConfigError, match="variant 'no_augment' has nothing to switch off: the config has no train.augment"):
        variant_configs(_raw(), ["no_augment"])


def test_ablate_cli_writes_one_table(tmp_path):
    out = tmp_path / "abl"
    proc = run_cli("ablate", "--corrupt", "fou:missing", "--severity", "1.0", "--variants", "full,static_mean",
                   "--seeds", "0,1", "--out", str(out), "modalities=[fou, kar]", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "static_mean"} and result["seeds"] == [0, 1]
    for name, row in rows.items():
        clean = [json.loads(run_cli("eval", str(out / name / f"seed{k}"), "--json").stdout)["accuracy"] for k in (0, 1)]
        assert [r["clean_accuracy"] for r in row["per_seed"]] == pytest.approx(clean)
        assert row["clean_accuracy"] == pytest.approx(sum(clean) / 2)
        assert row["clean_accuracy_std"] == pytest.approx(abs(clean[0] - clean[1]) / 2 ** 0.5)
        # fou dropped for every sample: all weight on kar, accuracy = the kar-only prediction
        assert row["mean_weights_corrupted"] == {"fou": 0.0, "kar": 1.0}
        assert row["drop_points"] == pytest.approx(100 * (row["clean_accuracy"] - row["corrupted_accuracy"]))
    assert "| full |" in (out / "ablation.md").read_text() and "+/-" in (out / "ablation.md").read_text()
    again = run_cli("ablate", "--corrupt", "fou:missing", "--variants", "full", "--out", str(out),
                    "modalities=[fou, kar]", *TINY)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
