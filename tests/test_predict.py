"""``fusionkit predict``: a trained run on a JSONL file without labels, for every kind of task.

Three tiny runs, each trained once for the module in this process: a classification run and a
retrieval run on manifests of our own (a PNG image column and an inline vector column), and a
VQA run (easy_vqa with the tiny random LM). Predict reads rows from another folder than the
manifest's, so relative paths must resolve against the JSONL file's folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_vqa_overrides
from test_vqa_task import QUESTION, fusionkit, one_line_error

CLASSES = ["cat", "dog", "eel"]
SPLITS = ["train", "train", "train", "val", "test"]  # by (row // 3) % 5: every split holds every class
TINY_IMAGE = "model.encoders.image={name: timm, model_name: test_resnet, image_size: 32, pretrained: false}"
TRAIN = ["--no-progress", TINY_IMAGE, "model.dim=16", "train.epochs=2", "train.batch_size=16",
         "runtime.accelerator=cpu"]


def write_manifest(root: Path, n: int = 60) -> Path:
    """``root/m.jsonl``: n rows of a 12x12 PNG (a bright band whose place is the class) and a
    4-d vector (one-hot class plus noise); every 7th row lacks its image. Each row has a label,
    a caption (for retrieval) and a split."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = i % 3
        pixels = (rng.random((12, 12)) * 80).astype(np.uint8)
        pixels[:, 4 * k:4 * k + 4] += 150
        Image.fromarray(pixels, "L").save(root / "img" / f"{i}.png")
        vec = (np.eye(3)[k] * 2 + rng.normal(0, 0.7, 3)).round(3).tolist() + [0.0]
        rows.append({"image": None if i % 7 == 0 else f"img/{i}.png", "vec": vec, "label": CLASSES[k],
                     "caption": f"a picture of a {CLASSES[k]}", "split": SPLITS[i // 3 % 5]})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def unlabelled(manifest: Path, folder: Path, split: str = "test") -> tuple[Path, list[dict]]:
    """The manifest's rows of ``split`` as a JSONL file in ``folder`` (another folder): no label,
    caption or split; image paths relative to ``folder``; row 2 named by an ``id``; row 3 lacks
    its image key entirely (its manifest value is null). Returns the file and the source rows."""
    source = [json.loads(line) for line in manifest.read_text().splitlines()]
    source = [r for r in source if r["split"] == split]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(source):
        image = os.path.relpath(manifest.parent / r["image"], folder) if r["image"] else None
        row = {"image": image, "vec": r["vec"]}
        if i == 1:
            row["id"] = "sample-b"
        if image is None and not any("image" not in x for x in rows):
            del row["image"]
        rows.append(row)
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, source


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cls_run(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cls"
    code, _, err = fusionkit("train", "--data", str(manifest), "--out", str(out), *TRAIN,
                             "data.modalities={image: image, vec: vector}")
    assert code == 0, err
    return out


def predictions(*args: str) -> list[dict]:
    code, stdout, err = fusionkit("predict", *args)
    assert code == 0, err
    return [json.loads(line) for line in stdout.splitlines()]


# -- classification ----------------------------------------------------------------------------
def test_predictions_match_what_eval_computes_and_missing_modalities_weigh_zero(cls_run, manifest, tmp_path):
    from fusionkit.evaluation import collect
    from fusionkit.training.trainer import load_run, make_loader

    rows, source = unlabelled(manifest, tmp_path / "elsewhere")
    out = tmp_path / "predictions.jsonl"
    code, stdout, err = fusionkit("predict", str(cls_run), "--data", str(rows), "--out", str(out))
    assert code == 0, err
    assert stdout == "" and f"wrote {len(source)} predictions to {out}" in err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(source) == 12
    assert [r["line"] for r in got] == list(range(1, 13))
    assert [r["id"] for r in got] == [1, "sample-b", *range(3, 13)]  # the id field, else the line number

    missing = [k for k, r in enumerate(source) if r["image"] is None]
    assert missing  # the manifest puts image-less rows in the test split
    for k, r in enumerate(got):
        assert set(r) == {"id", "line", "label", "probs", "weights", "present", "heads"}
        assert list(r["probs"]) == CLASSES and sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probs"], key=r["probs"].get)
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        if k in missing:
            assert r["weights"]["image"] == 0.0 and r["present"] == ["vec"] and r["heads"]["image"] is None
        else:
            assert r["present"] == ["image", "vec"] and r["heads"]["image"]["label"] in CLASSES
        assert r["heads"]["vec"]["label"] in CLASSES and 1 / 3 <= r["heads"]["vec"]["p"] <= 1

    # the model `fusionkit eval` runs, on the same samples: same labels, probabilities and weights
    cfg, bundle, model = load_run(cls_run)
    c = collect(model, make_loader(model, bundle.splits["test"], cfg, shuffle=False))
    assert [r["label"] for r in got] == [CLASSES[int(k)] for k in c["probs"].argmax(1)]
    assert np.allclose([list(r["probs"].values()) for r in got], c["probs"].numpy(), atol=2e-6)
    assert np.allclose([list(r["weights"].values()) for r in got], c["weights"].numpy(), atol=2e-6)
    code, stdout, err = fusionkit("eval", str(cls_run), "--json")
    assert code == 0, err
    right = np.mean([r["label"] == s["label"] for r, s in zip(got, source)])
    assert json.loads(stdout)["accuracy"] == pytest.approx(right)


def test_predict_prints_to_stdout_and_never_replaces_a_file_without_overwrite(cls_run, manifest, tmp_path):
    rows, source = unlabelled(manifest, tmp_path)
    printed = predictions(str(cls_run), "--data", str(rows))
    assert len(printed) == len(source)

    out = tmp_path / "p.jsonl"
    out.write_text("keep me\n")
    line = one_line_error(*fusionkit("predict", str(cls_run), "--data", str(rows), "--out", str(out))[::2])
    assert "already exists" in line and "--overwrite" in line
    assert out.read_text() == "keep me\n"
    code, _, err = fusionkit("predict", str(cls_run), "--data", str(rows), "--out", str(out), "--overwrite",
                             "--checkpoint", "last", "--no-progress")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == len(source)


GOOD_ROW = {"vec": [1, 0, 0, 0]}
BAD = {  # rows of the --data file, the arguments after the run folder (ROWS: that file, DIR: tmp_path), message
    "no known modality": ([GOOD_ROW, {"caption": "a cat", "id": 7}], None,
                          "line 2: none of the run's modalities ['image', 'vec'] is present "
                          "(the row has: caption, id)"),
    "not JSON": (["{oops"], None, "line 1: not JSON"),
    "not an object": ([[1, 2]], None, "line 1: expected a JSON object"),
    "wrong vector length": ([{"vec": [1, 2]}], None,
                            "line 1, modality 'vec': vector has length 2; this run's vectors have length 4"),
    "vector of text": ([{"vec": ["a", 1, 2, 3]}], None, "line 1, modality 'vec': a vector must be a non-empty list"),
    "missing image file": ([{"image": "nope.png"}], None,
                           "line 1, modality 'image': image file 'nope.png' does not exist"),
    "number as image": ([{"image": 5, "vec": [1, 0, 0, 0]}], None,
                        "line 1, modality 'image': an image value must be a file path, got 5"),
    "corrupt image": ([{"image": "bad.png"}], None, "line 1, modality 'image': image file"),
    "empty file": ([], None, "is empty"),
    "no such file": ([GOOD_ROW], ["--data", "DIR/none.jsonl"], "--data 'DIR/none.jsonl' is not a file"),
    "no --data": ([GOOD_ROW], [], "Missing option '--data'"),
    "gallery for classification": ([GOOD_ROW], ["--data", "ROWS", "--gallery", "ROWS"],
                                   "--gallery is for retrieval runs"),
    "top 0": ([GOOD_ROW], ["--data", "ROWS", "--top", "0"], "--top must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, cls_run, tmp_path):
    rows, args, message = BAD[case]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "rows.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    args = ["--data", "ROWS"] if args is None else args
    args = [a.replace("ROWS", str(tmp_path / "rows.jsonl")).replace("DIR", str(tmp_path)) for a in args]
    out = tmp_path / "never.jsonl"
    line = one_line_error(*fusionkit("predict", str(cls_run), *args, "--out", str(out))[::2])
    assert message.replace("DIR", str(tmp_path)) in line
    assert not out.exists()


def test_an_out_folder_is_one_line(cls_run, tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    line = one_line_error(*fusionkit("predict", str(cls_run), "--data", str(tmp_path / "rows.jsonl"),
                                     "--out", str(tmp_path))[::2])
    assert "is a folder; give a file name" in line


def test_not_a_run_folder_is_one_line(tmp_path):
    line = one_line_error(*fusionkit("predict", str(tmp_path), "--data", str(tmp_path / "x.jsonl"))[::2])
    assert f"'{tmp_path}' is not a run folder" in line


# -- retrieval ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_run(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "retrieval"
    code, _, err = fusionkit("train", "--out", str(out), *TRAIN, "train.epochs=1",
                             f"data={{name: manifest, path: '{manifest}', task: captioning, "
                             "modalities: {image: image, vec: vector}}",
                             "task={name: retrieval, embed_dim: 16}", "model.decoder={name: retrieval}")
    assert code == 0, err
    return out


def test_retrieval_rows_get_their_best_gallery_matches(retrieval_run, manifest, tmp_path):
    rows, source = unlabelled(manifest, tmp_path)
    gallery = tmp_path / "gallery.jsonl"
    texts = ["a picture of a cat", "a picture of a dog", "a picture of an eel"]
    gallery.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    got = predictions(str(retrieval_run), "--data", str(rows), "--gallery", str(gallery), "--top", "2")
    assert len(got) == len(source)
    for r, s in zip(got, source):
        assert set(r) == {"id", "line", "matches", "weights", "present"}
        assert len(r["matches"]) == 2 and {m["text"] for m in r["matches"]} <= set(texts)
        scores = [m["score"] for m in r["matches"]]
        assert scores == sorted(scores, reverse=True) and all(-1 <= x <= 1 for x in scores)
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        if s["image"] is None:
            assert r["weights"]["image"] == 0.0 and r["present"] == ["vec"]
    # without --gallery: the run's test-split captions
    (first,) = predictions(str(retrieval_run), "--data", str(rows), "--top", "1", "--no-progress")[:1]
    assert first["matches"][0]["text"] in {f"a picture of a {c}" for c in CLASSES}

    # `fusionkit retrieve` reads its one query the same way (a .npy vector, an image path)
    np.save(tmp_path / "v.npy", np.asarray(source[0]["vec"], dtype=np.float32))
    image = manifest.parent / source[0]["image"]
    code, stdout, err = fusionkit("retrieve", str(retrieval_run), "--query-image", str(image),
                                  "--input", f"vec={tmp_path / 'v.npy'}", "--gallery", str(gallery), "--top", "3")
    assert code == 0, err
    assert sorted(line.split("  ", 1)[1] for line in stdout.splitlines()) == texts
    assert re.search(r"DMS weights: image [0-9.]+, vec [0-9.]+  \(3 gallery texts\)", err)


# -- generation (VQA) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vqa_run(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "vqa"
    code, _, err = fusionkit("train", "--out", str(out), "--no-progress", *tiny_vqa_overrides(tiny_lm))
    assert code == 0, err
    return out


def test_vqa_rows_get_generated_text_and_probe_answers(vqa_run, tmp_path):
    import easy_vqa

    source = sorted(easy_vqa.get_test_image_paths().items())[0][1]
    with Image.open(source) as im:
        im.convert("RGB").save(tmp_path / "shape.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "shape.png", "text": QUESTION, "id": "q1"},
        {"text": "is there a circle?"},  # no image
        {"image": "shape.png", "text": None},  # no question
    ]))
    got = predictions(str(vqa_run), "--data", str(rows))
    assert [r["id"] for r in got] == ["q1", 2, 3]
    from fusionkit.training.trainer import load_run

    vocab = load_run(vqa_run)[2].task.probe_classes  # the answers the probes choose from
    for r in got:
        assert set(r) == {"id", "line", "text", "weights", "present", "heads"}
        assert isinstance(r["text"], str)
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        for m, head in r["heads"].items():
            assert (head is None) == (m not in r["present"])
            if head is not None:
                assert head["label"] in vocab and 0 < head["p"] <= 1
    assert got[1]["weights"] == {"image": 0.0, "text": 1.0} and got[2]["weights"] == {"image": 1.0, "text": 0.0}
    code, stdout, err = fusionkit("generate", str(vqa_run), "--image", str(tmp_path / "shape.png"), "--text", QUESTION)
    assert code == 0, err
    assert stdout.count("\n") == 1 and "DMS weights: image " in err  # one sample from the command line
    # the same text `fusionkit generate` writes for the same rows
    code, _, err = fusionkit("generate", str(vqa_run), "--data", str(rows), "--out", str(tmp_path / "a.jsonl"))
    assert code == 0, err
    generated = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [g["text"] for g in generated] == [r["text"] for r in got]
