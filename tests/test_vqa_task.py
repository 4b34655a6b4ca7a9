"""The vqa task end to end through the CLI: train, eval, generate, robustness, and bad input.

One tiny easy_vqa run per fusion (``tiny_vqa_overrides``: a few hundred questions, a random
ResNet, MiniLM, the tiny random Llama) is trained once for the module. Training runs the real
console script; the other commands run in this process (``main``) to save interpreter start-ups.
"""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from conftest import run_cli, tiny_vqa_overrides
from fusionkit.cli.main import main

QUESTION = "what color is the shape?"
RESULT_KEYS = {"accuracy", "unimodal_accuracy", "mean_weights", "n", "vqa_accuracy", "exact_match", "per_type"}
EASY_VQA_ANSWERS = {"yes", "no", "circle", "rectangle", "triangle",
                    "red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


def fusionkit(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    run_dir = os.environ.pop("FUSIONKIT_RUN_DIR", None)  # `train` sets it (for DDP workers): keep it local
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            os.environ.pop("FUSIONKIT_RUN_DIR", None)
            if run_dir is not None:
                os.environ["FUSIONKIT_RUN_DIR"] = run_dir
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str) -> str:
    """Exit 2 with exactly one ``error:`` line and no traceback (train may first name its run folder)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("run folder ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def vqa_run(tiny_lm, tmp_path_factory) -> tuple[Path, str]:
    """A DMS run trained by the console script: ``(run folder, its stdout)``."""
    out = tmp_path_factory.mktemp("vqa") / "dms"
    proc = run_cli("train", "--out", str(out), "--no-progress", *tiny_vqa_overrides(tiny_lm))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def mean_vqa_run(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa") / "mean"
    code, _, err = fusionkit("train", "--out", str(out), "--no-progress", *tiny_vqa_overrides(tiny_lm, "mean"))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory) -> Path:
    """One easy_vqa test image, written as a PNG of our own."""
    import easy_vqa
    from PIL import Image

    path = tmp_path_factory.mktemp("inputs") / "shape.png"
    source = sorted(easy_vqa.get_test_image_paths().items())[0][1]
    with Image.open(source) as im:
        im.convert("RGB").save(path)
    return path


# -- 8. train --------------------------------------------------------------------------------------
def test_train_reports_vqa_metrics_and_stores_the_answer_vocabulary(vqa_run):
    run, stdout = vqa_run
    assert "generated answers" in stdout and "vqa_accuracy=" in stdout
    test = json.loads((run / "results.json").read_text())["test"]
    assert RESULT_KEYS <= set(test)
    assert set(test["unimodal_accuracy"]) == {"image", "text"}
    assert sum(test["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert test["n"] == 40
    assert 0 <= test["accuracy"] <= 1 and test["accuracy"] == test["vqa_accuracy"]
    assert 0 <= test["exact_match"] <= 1
    assert set(test["per_type"]) <= {"yes/no", "shape", "color"}
    assert sum(t["n"] for t in test["per_type"].values()) == 40
    vocab = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["task"]["probe_classes"]
    assert len(vocab) >= 2 and len(set(vocab)) == len(vocab)
    assert all(isinstance(a, str) for a in vocab) and set(vocab) <= EASY_VQA_ANSWERS


# -- 9. eval ---------------------------------------------------------------------------------------
def test_eval_json_repeats_the_training_result(vqa_run):
    run, _ = vqa_run
    code, stdout, err = fusionkit("eval", str(run), "--json")
    assert code == 0, err
    got = json.loads(stdout)
    test = json.loads((run / "results.json").read_text())["test"]
    assert set(got) == set(test) | {"split"} and got["split"] == "test"
    assert got["accuracy"] == test["accuracy"]
    assert got["unimodal_accuracy"] == test["unimodal_accuracy"]
    assert got["per_type"] == test["per_type"]
    assert got["mean_weights"] == pytest.approx(test["mean_weights"], abs=1e-6)


# -- 10. generate ----------------------------------------------------------------------------------
def test_generate_one_sample_prints_the_answer_and_its_weights(vqa_run, shape_png, tmp_path):
    run, _ = vqa_run
    code, stdout, err = fusionkit("generate", str(run), "--image", str(shape_png), "--text", QUESTION)
    assert code == 0, err
    assert stdout.count("\n") == 1  # one line: the answer
    weights = re.search(r"DMS weights: image ([0-9.]+), text ([0-9.]+)", err)
    assert weights and float(weights[1]) + float(weights[2]) == pytest.approx(1.0, abs=2e-3)

    # the same sample from a file gives the same answer
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": shape_png.name, "text": QUESTION}) + "\n")
    (tmp_path / shape_png.name).write_bytes(shape_png.read_bytes())  # relative to the file's folder
    code, _, err = fusionkit("generate", str(run), "--data", str(rows), "--out", str(tmp_path / "a.jsonl"))
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert stdout == row["text"] + "\n"


def test_generate_from_a_jsonl_file_and_its_errors(vqa_run, shape_png, tmp_path):
    run, _ = vqa_run
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(shape_png), "text": QUESTION},
        {"text": "is there a circle?"},  # no image
        {"image": str(shape_png)},  # no question
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    code, _, err = fusionkit("generate", str(run), "--data", str(rows), "--out", str(out))
    assert code == 0, err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 3
    assert all(set(a) == {"id", "text", "weights", "present"} and isinstance(a["text"], str) for a in answers)
    assert [a["id"] for a in answers] == [1, 2, 3]  # line numbers
    assert answers[0]["present"] == ["image", "text"]
    assert sum(answers[0]["weights"].values()) == pytest.approx(1.0, abs=2e-4)
    assert answers[1]["present"] == ["text"] and answers[1]["weights"] == {"image": 0.0, "text": 1.0}
    assert answers[2]["present"] == ["image"] and answers[2]["weights"] == {"image": 1.0, "text": 0.0}

    written = out.read_bytes()
    line = one_line_error(*fusionkit("generate", str(run), "--data", str(rows), "--out", str(out))[::2])
    assert "already exists" in line and "--overwrite" in line
    assert out.read_bytes() == written

    empty = tmp_path / "empty_row.jsonl"
    empty.write_text(json.dumps({"text": QUESTION}) + "\n" + json.dumps({"caption": "nothing we know"}) + "\n")
    code, _, err = fusionkit("generate", str(run), "--data", str(empty), "--out", str(tmp_path / "x.jsonl"))
    line = one_line_error(code, err)
    assert "line 2" in line and "none of the run's modalities" in line
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_on_a_classification_run_says_it_does_not_generate_text(tiny_run, shape_png):
    line = one_line_error(*fusionkit("generate", str(tiny_run), "--image", str(shape_png))[::2])
    assert "does not generate text" in line and "classification" in line


# -- 11. robustness --------------------------------------------------------------------------------
@pytest.mark.parametrize("corrupt", ["text:typos", "missing:image"])
def test_robustness_compares_vqa_runs(vqa_run, mean_vqa_run, corrupt, tmp_path):
    run, _ = vqa_run
    out = tmp_path / "R"
    code, _, err = fusionkit("robustness", str(run), str(mean_vqa_run), "--corrupt", corrupt,
                             "--levels", "0,1", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["levels"] == [0.0, 1.0] and report["corruptions"] == [corrupt]
    assert [r["fusion"] for r in report["runs"]] == ["dms", "mean"]
    for r in report["runs"]:
        assert [x["severity"] for x in r["levels"]] == [0.0, 1.0]
        assert all(0 <= x["accuracy"] <= 1 and x["n"] == 40 for x in r["levels"])
        assert r["levels"][0]["accuracy"] == r["clean"]["accuracy"]
        if corrupt == "missing:image":  # every image gone: all weight on the question
            assert r["levels"][1]["mean_weights"] == {"image": 0.0, "text": 1.0}
            assert r["levels"][1]["unimodal_accuracy"]["image"] is None
    test = json.loads((run / "results.json").read_text())["test"]
    assert report["runs"][0]["clean"]["accuracy"] == test["accuracy"]


# -- 12. bad input ---------------------------------------------------------------------------------
BAD = {
    "missing LM": (["model.decoder.lm=/nonexistent/folder"], r"LM '/nonexistent/folder': no such folder"),
    "top_answers 1": (["task={name: vqa, top_answers: 1}"], r"task\.top_answers: .*greater than or equal to 2"),
    "one answer": (["data.max_train_questions=2"], r"vocabulary of 1 answer.*at least 2 distinct answers"),
    "classifier decoder": (["model.decoder={name: classifier}"],
                           r"task 'vqa' generates text: choose a generative decoder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_vqa_config_is_one_line_and_exit_2(case, tiny_lm, tmp_path):
    extra, message = BAD[case]
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "run"), "--no-progress",
                                     *tiny_vqa_overrides(tiny_lm), *extra)[::2])
    assert re.search(message, line), line


def test_vqa_on_a_classification_dataset_is_one_line_and_exit_2(tmp_path):
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "run"), "--no-progress", "data={name: digits}",
                                     "task=vqa", "train.epochs=1", "runtime.accelerator=cpu")[::2])
    assert "task vqa needs targets {answers: [...]}" in line and "task=classification" in line
