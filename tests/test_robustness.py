"""Robustness evaluation and weight diagnostics: report numbers, determinism, outputs, errors."""

from __future__ import annotations

import copy
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from fusionkit.cli.main import main
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, RunDirError
from fusionkit.evaluation import collect, summarize
from fusionkit.robustness import CorruptedSplit, curve_auc, parse_levels, resolve_specs, robustness_report
from fusionkit.training.trainer import load_run, make_loader

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVELS = [0.0, 0.25, 0.5, 1.0]  # uneven on purpose: the trapezoid must weight the last gap double


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fusionkit(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up): ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory) -> Path:
    """A second run on the same data (mean fusion), used as the other curve."""
    out = tmp_path_factory.mktemp("runs") / "mean"
    proc = run_cli("train", "--modalities", "fou,kar", "--fusion", "mean", "--out", str(out), "--no-progress", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def before(tiny_run, mean_run) -> dict[Path, dict[str, bytes]]:
    """Every file of both run folders, read before any robustness command touches them."""
    return {run: snapshot(run) for run in (tiny_run, mean_run)}


@pytest.fixture(scope="module")
def report(tiny_run, mean_run, before, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("robustness") / "noise"
    proc = run_cli("robustness", str(tiny_run), str(mean_run), "--corrupt", "fou:gaussian_noise",
                   "--levels", ",".join(map(str, LEVELS)), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == data
    return data, out


@pytest.fixture(scope="module")
def weights(tiny_run, before, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("weights") / "noise"
    code, stdout, err = fusionkit("weights", str(tiny_run), "--corrupt", "fou:gaussian_noise", "--samples", "4",
                                  "--levels", "0,0.5,1", "--out", str(out))
    assert code == 0, err
    assert "mean weights - tiny: fou:gaussian_noise" in stdout  # the rich table
    return json.loads((out / "weights.json").read_text()), out


@pytest.fixture(scope="module")
def tiny_loaded(tiny_run):
    return load_run(tiny_run)


def level(run: dict, severity: float) -> dict:
    return next(x for x in run["levels"] if x["severity"] == severity)


# -- CorruptedSplit on a synthetic split (no model) ----------------------------------------------
VECTOR = ModalitySpec("vector", dim=5)


def toy_split(n: int = 200) -> MultimodalSplit:
    rng = np.random.default_rng(0)
    cols = {m: [rng.normal(size=5).astype(np.float32) for _ in range(n)] for m in ("a", "b")}
    cols["b"][0] = None  # sample 0 has only "a"
    return MultimodalSplit(cols, [i % 3 for i in range(n)])


def test_corrupted_split_is_a_reproducible_view_that_never_mutates_the_split():
    split = toy_split()
    original = copy.deepcopy(split.columns)
    specs = resolve_specs(["a:gaussian_noise"], {"a": VECTOR, "b": VECTOR})
    one, two = (CorruptedSplit(split, specs, 0.5, seed=3) for _ in range(2))
    for i in (1, 7, 150):
        x = one[i]["inputs"]
        np.testing.assert_array_equal(x["a"], two[i]["inputs"]["a"])  # same seed -> same corrupted value
        np.testing.assert_array_equal(x["b"], split.columns["b"][i])  # other modality untouched
        assert not np.array_equal(x["a"], split.columns["a"][i])
        # the noise is the same draw scaled by severity: level 1.0 is twice as far from clean as 0.5
        at_one = CorruptedSplit(split, specs, 1.0, seed=3)[i]["inputs"]["a"]
        np.testing.assert_allclose(at_one - split.columns["a"][i], 2 * (x["a"] - split.columns["a"][i]), atol=1e-5)
    other_seed = CorruptedSplit(split, specs, 0.5, seed=4)[1]["inputs"]["a"]
    assert not np.array_equal(other_seed, one[1]["inputs"]["a"])
    for m in ("a", "b"):  # the underlying split is never modified
        assert all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(split.columns[m], original[m]))


def test_missing_never_drops_the_last_present_modality():
    split = toy_split()
    specs = resolve_specs(["missing:a", "missing:b"], {"a": VECTOR, "b": VECTOR})
    data = CorruptedSplit(split, specs, 1.0)
    present = [[m for m, v in data[i]["inputs"].items() if v is not None] for i in range(len(data))]
    assert present[0] == ["a"]  # only "a" to begin with: dropping it would leave nothing
    assert all(p == ["b"] for p in present[1:])  # "a" dropped first, then "b" is the last one left


def test_random_subset_picks_modalities_with_probability_p_the_same_at_every_severity():
    split = toy_split(2000)
    specs = resolve_specs(["a:gaussian_noise", "b:gaussian_noise"], {"a": VECTOR, "b": VECTOR})
    never = CorruptedSplit(split, specs, 1.0, protocol="random_subset", p=0.0)
    always = CorruptedSplit(split, specs, 1.0, protocol="random_subset", p=1.0)
    every = CorruptedSplit(split, specs, 1.0, protocol="all")
    for i in (3, 99):
        np.testing.assert_array_equal(never[i]["inputs"]["a"], split.columns["a"][i])
        np.testing.assert_array_equal(always[i]["inputs"]["b"], every[i]["inputs"]["b"])
    half = CorruptedSplit(split, specs, 1.0, protocol="random_subset", p=0.5)
    chosen = [half.chosen(i) for i in range(len(split))]
    for m in ("a", "b"):
        assert 0.45 < np.mean([m in c for c in chosen]) < 0.55
    both = np.mean([len(c) == 2 for c in chosen])
    assert 0.2 < both < 0.3  # independent per modality: 0.5 * 0.5
    assert chosen == [CorruptedSplit(split, specs, 0.3, protocol="random_subset", p=0.5).chosen(i)
                      for i in range(len(split))]


def test_curve_auc_and_levels():
    assert curve_auc([0, 0.5, 1], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert curve_auc([0.2, 0.4], [0.8, 0.6]) == pytest.approx(0.7)  # normalised by the 0.2 span
    assert curve_auc([0.5], [0.9]) == 0.9
    assert parse_levels("1, 0,0.5,0") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match=r"severity must be a number in \[0, 1\] \(got 1.5\)"):
        parse_levels("0,1.5")


# -- the report ---------------------------------------------------------------------------------
def test_clean_level_matches_fusionkit_eval(report, tiny_run):
    data, _ = report
    proc = run_cli("eval", str(tiny_run), "--json")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout)
    tiny = data["runs"][0]
    assert tiny["run"] == str(tiny_run) and tiny["baseline"] and tiny["fusion"] == "dms"
    assert level(tiny, 0.0)["accuracy"] == evaluated["accuracy"]
    assert level(tiny, 0.0)["unimodal_accuracy"] == evaluated["unimodal_accuracy"]
    assert tiny["clean"]["accuracy"] == evaluated["accuracy"]


def test_report_numbers_recompute_from_corrupted_split(report, tiny_loaded):
    data, _ = report
    cfg, bundle, model = tiny_loaded
    specs = resolve_specs(["fou:gaussian_noise"], bundle.modalities)
    loader = make_loader(model, CorruptedSplit(bundle.splits["test"], specs, 0.5, seed=0), cfg, shuffle=False)
    torch.manual_seed(0)  # what the report does before each evaluation
    expected = summarize(collect(model, loader), model.modalities)
    got = level(data["runs"][0], 0.5)
    assert got["accuracy"] == expected["accuracy"] and got["n"] == expected["n"] == 400
    assert got["unimodal_accuracy"] == expected["unimodal_accuracy"]
    assert got["ece"] == pytest.approx(expected["ece"], abs=1e-6)
    assert got["nll"] == pytest.approx(expected["nll"], abs=1e-6)
    assert got["mean_weights"] == pytest.approx(expected["mean_weights"], abs=1e-6)
    clean = data["runs"][0]["clean"]["accuracy"]
    assert got["drop_points"] == pytest.approx(100 * (clean - expected["accuracy"]))
    assert got["drop_percent"] == pytest.approx(100 * (clean - expected["accuracy"]) / clean)


def test_auc_ratio_and_effective_robustness(report):
    data, _ = report
    assert data["levels"] == LEVELS and len(data["runs"]) == 2
    aucs = []
    for run in data["runs"]:
        acc = [level(run, s)["accuracy"] for s in LEVELS]
        trapezoid = sum((b - a) * (ya + yb) / 2 for a, b, ya, yb in zip(LEVELS, LEVELS[1:], acc, acc[1:]))
        assert run["auc"] == pytest.approx(trapezoid / (LEVELS[-1] - LEVELS[0]))
        assert run["auc_ratio"] == pytest.approx(run["auc"] / run["clean"]["accuracy"])
        # gaussian noise at full severity costs accuracy
        assert level(run, 1.0)["accuracy"] < run["clean"]["accuracy"]
        aucs.append(run["auc"])
    assert data["runs"][0]["effective_robustness"] == 0.0  # the baseline (first run)
    assert data["runs"][1]["effective_robustness"] == pytest.approx(aucs[1] - aucs[0])


def test_outputs_are_pngs_markdown_and_deterministic(report, tiny_run, mean_run):
    data, out = report
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.json", "report.md"]
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    md = (out / "report.md").read_text()
    assert "| run | severity | accuracy | drop (pts) | drop (%) | ECE | mean weights |" in md
    assert f"| tiny | 1 | {level(data['runs'][0], 1.0)['accuracy']:.4f} |" in md
    # the same evaluation again, in this process (other RNG state, other import order): same report
    again = robustness_report([tiny_run, mean_run], ["fou:gaussian_noise"], LEVELS)
    assert json.dumps(again, indent=2) + "\n" == (out / "report.json").read_text()


def test_missing_modality_gets_zero_weight(tiny_run):
    data = robustness_report([tiny_run], ["missing:fou"], [0.0, 1.0])
    full = level(data["runs"][0], 1.0)
    assert full["mean_weights"] == {"fou": 0.0, "kar": 1.0}
    assert full["unimodal_accuracy"]["fou"] is None  # no sample has fou any more
    assert level(data["runs"][0], 0.0)["mean_weights"]["fou"] > 0.3


def test_random_subset_with_p_zero_equals_clean(tiny_run):
    data = robustness_report([tiny_run], ["fou:gaussian_noise"], [0.0, 1.0], protocol="random_subset", p=0.0)
    assert data["protocol"] == "random_subset" and data["p"] == 0.0
    clean, noisy = (level(data["runs"][0], s) for s in (0.0, 1.0))
    assert {k: v for k, v in noisy.items() if k != "severity"} == {k: v for k, v in clean.items() if k != "severity"}
    assert data["runs"][0]["auc"] == pytest.approx(clean["accuracy"])


# -- errors -------------------------------------------------------------------------------------
def test_existing_output_folder_is_refused(report, tiny_run):
    _, out = report
    before_report = (out / "report.json").read_bytes()
    code, _, err = fusionkit("robustness", str(tiny_run), "--corrupt", "fou:gaussian_noise", "--out", str(out))
    assert code == 2
    assert f"robustness folder '{out}' already exists; pass --overwrite to replace it" in err
    assert (out / "report.json").read_bytes() == before_report
    code, _, err = fusionkit("robustness", str(tiny_run), "--corrupt", "fou:gaussian_noise",
                          "--out", str(tiny_run / "plots"), "--overwrite")
    assert code == 2 and "evaluation never writes into run folders" in err


@pytest.mark.parametrize("args,message", [
    (["--corrupt", "fou:gausian_noise"], "'gausian_noise' is not a corruption; did you mean 'gaussian_noise'?"),
    (["--corrupt", "fou:gaussian_noise", "--levels", "0,1.5"], "severity must be a number in [0, 1] (got 1.5)"),
    (["--corrupt", "fuo:gaussian_noise"], "'fuo' is not a modality of this run; did you mean 'fou'?"),
    (["--corrupt", "fou:gaussian_blur"], "corruption 'gaussian_blur' applies to image data, not 'vector'"),
    (["--corrupt", "fou:gaussian_noise", "--p", "0.3"], "--p only applies to --protocol random_subset"),
])
def test_bad_input_exits_2_with_one_line(args, message, tiny_run, tmp_path):
    code, _, err = fusionkit("robustness", str(tiny_run), *args, "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_runs_on_different_data_or_without_checkpoint_are_refused(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    cfg = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(cfg.replace("split_seed: 0", "split_seed: 1"))
    with pytest.raises(ConfigError, match="runs use different datasets"):
        robustness_report([tiny_run, other], ["fou:gaussian_noise"], [0.0])
    shutil.rmtree(other / "checkpoints" / "best")
    with pytest.raises(RunDirError, match="has no checkpoint 'best'"):
        robustness_report([tiny_run], ["fou:gaussian_noise"], [0.0], baseline=other)


# -- weights ------------------------------------------------------------------------------------
def test_weights_move_away_from_the_corrupted_modality(weights):
    data, out = weights
    assert data["levels"] == [0.0, 0.5, 1.0] and data["modalities"] == ["fou", "kar"]
    means = {x["severity"]: x["mean_weights"] for x in data["mean_weights"]}
    for w in means.values():
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-5)
    assert means[1.0]["fou"] < means[0.0]["fou"]  # DMS trusts the noisy modality less
    assert len(data["samples"]) == 4 and data["samples_severity"] == 1.0
    for sample in data["samples"]:
        for key in ("clean", "corrupted"):
            assert sum(sample[key].values()) == pytest.approx(1.0, abs=1e-5)
    for name in ("sample_weights.png", "weights_vs_severity.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_run_folders_are_byte_identical_after_evaluation(before, report, weights):
    for run, files in before.items():
        assert snapshot(run) == files
