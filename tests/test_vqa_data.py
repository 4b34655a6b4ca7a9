"""VQA data: the easy_vqa dataset, VQA answer normalisation and scores, VQA manifests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionkit.datasets.easy_vqa import question_type, stratified_sample
from fusionkit.errors import DataError
from fusionkit.metrics.vqa import normalize_answer, vqa_report, vqa_score
from fusionkit.registry import build, registry

easy_vqa = pytest.importorskip("easy_vqa")
SMALL = {"name": "easy_vqa", "max_train_questions": 300, "max_test_questions": 60}


@pytest.fixture(scope="module")
def small():
    return build("datasets", SMALL).load()


# -- easy_vqa --------------------------------------------------------------------------------
def test_easy_vqa_sizes_follow_the_config(small):
    assert {k: len(s) for k, s in small.splits.items()} == {"train": 270, "val": 30, "test": 60}
    assert small.info["sizes"] == {"train": 270, "val": 30, "test": 60}
    assert small.classes == [] and small.info["task"] == "vqa" and small.info["question_modality"] == "text"
    assert small.info["answers"] == easy_vqa.get_answers() and len(small.info["answers"]) == 13
    assert {m: (s.kind, s.channels) for m, s in small.modalities.items()} == {"image": ("image", 3),
                                                                            "text": ("text", None)}


def test_easy_vqa_val_images_are_not_train_images(small):
    ids = small.info["image_ids"]
    assert not set(ids["train"]) & set(ids["val"])
    assert all(i.startswith("train:") for s in ("train", "val") for i in small.splits[s].ids)
    assert all(i.startswith("test:") for i in small.splits["test"].ids)
    # on the full train split: 10% of the 4,000 images, fixed by split_seed
    ds = build("datasets", {"name": "easy_vqa"})
    image_ids = easy_vqa.get_train_questions()[2]
    val = ds._val_images(image_ids)
    assert len(val) == 400 and val == ds._val_images(image_ids) and val <= set(image_ids)
    assert val != build("datasets", {"name": "easy_vqa", "split_seed": 1})._val_images(image_ids)


def test_easy_vqa_targets_types_and_images(small):
    answers = set(easy_vqa.get_answers())
    for name, split in small.splits.items():
        for k in range(len(split)):
            item = split[k]
            target, question, image = item["target"], item["inputs"]["text"], item["inputs"]["image"]
            assert len(target["answers"]) == 1 and target["answers"][0] in answers
            assert target["type"] == question_type(target["answers"][0])
            # the templates: yes/no questions start with is/does, the others with what
            assert question.split()[0] in (("is", "does") if target["type"] == "yes/no" else ("what",)), question
            assert image.mode == "RGB" and image.size == (64, 64)
    texts, ans, _ = easy_vqa.get_train_questions()
    assert (texts[0], ans[0], question_type(ans[0])) == ("what is the blue shape?", "rectangle", "shape")
    assert (texts[1], ans[1], question_type(ans[1])) == ("what color is the shape?", "blue", "color")
    assert (texts[2], ans[2], question_type(ans[2])) == ("does the image contain a rectangle?", "yes", "yes/no")
    assert question_type("maybe") is None


def test_easy_vqa_sample_is_seeded_and_stratified(small):
    again = build("datasets", SMALL).load()
    assert again.splits["test"].ids == small.splits["test"].ids
    other = build("datasets", {**SMALL, "split_seed": 1}).load()
    assert other.splits["test"].ids != small.splits["test"].ids
    # the test pool has 3,611 yes among 9,673 questions: 60 * 3611 / 9673 = 22.4
    counts = Counter(t["answers"][0] for t in small.splits["test"].targets)
    assert counts["yes"] in (22, 23) and len(counts) == 13
    idx = stratified_sample(["a"] * 50 + ["b"] * 30 + ["c"] * 20, 10, np.random.default_rng(0))
    assert len(idx) == 10 and (idx[:-1] < idx[1:]).all()
    assert [int((idx < 50).sum()), int(((idx >= 50) & (idx < 80)).sum()), int((idx >= 80).sum())] == [5, 3, 2]
    assert stratified_sample(["a", "b"], 5, np.random.default_rng(0)).tolist() == [0, 1]


def test_easy_vqa_is_registered_with_frozen_pretrained_encoders():
    assert "easy_vqa" in registry("datasets").names()
    ds = build("datasets", {"name": "easy_vqa"})
    assert ds.task == "vqa" and ds.default_modalities == ("image", "text")
    assert ds.default_encoders() == {
        "image": {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled",
                  "trainable": False, "image_size": 64},
        "text": {"name": "hf_text", "model": "minilm", "trainable": False}}
    for m, block in ds.default_encoders().items():  # the blocks validate against the encoders
        registry("encoders").validate(block, f"model.encoders.{m}")


# -- normalisation and scores ----------------------------------------------------------------
@pytest.mark.parametrize("raw,normal", [
    ("Two.", "2"), ("the Red", "red"), ("a circle!", "circle"), ("  An  Apple\tpie ", "apple pie"),
    ("dont", "don't"), ("don't", "don't"), ("None", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("1,000", "1000"),          # digit-comma-digit: every listed punctuation mark is deleted
    ("red,blue", "red blue"),   # a comma touching no space becomes a space
    ("red, blue", "red blue"),  # a comma next to a space is deleted
    ("3.5", "3.5"), ("yes.", "yes"), ("3. cats", "3 cats"),
    ("left-hand", "left hand"), ("(yes)", "yes"), ("50%", "50%"), ("it's", "it's"),
])
def test_normalize_answer_follows_the_official_vqa_rules(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_score_single_and_soft():
    assert vqa_score("Two.", ["2"]) == 1.0 and vqa_score("the Red", ["red"]) == 1.0
    assert vqa_score("blue", ["red"]) == 0.0
    ten = ["red"] * 2 + ["blue"] * 8
    assert vqa_score("red", ten) == pytest.approx(2 / 3)
    assert vqa_score("Red.", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_score("red", ["red"] + ["blue"] * 9) == pytest.approx(1 / 3)
    assert vqa_score("blue", ten) == 1.0 and vqa_score("green", ten) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_score("red", [])


def test_vqa_report_per_type_by_hand():
    predictions = ["yes", "Red", "circle", "no"]
    answers = [["yes"], ["red", "red", "blue"], ["square"], ["no"]]
    types = ["yes/no", "color", "shape", None]
    report = vqa_report(predictions, answers, types)
    # scores 1, 2/3 (2 of 3 references), 0, 1 -> accuracy 8/12; exact match 3/4
    assert report["accuracy"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert report["exact_match"] == pytest.approx(0.75) and report["n"] == 4
    assert report["per_type"] == {"color": {"accuracy": pytest.approx(2 / 3), "n": 1},
                                  "shape": {"accuracy": 0.0, "n": 1}, "yes/no": {"accuracy": 1.0, "n": 1}}
    assert "per_type" not in vqa_report(predictions, answers)
    with pytest.raises(ValueError, match="one entry per question"):
        vqa_report(["a"], [["a"], ["b"]])


# -- VQA manifests ---------------------------------------------------------------------------
def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8), "RGB").save(path)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def manifest(path: Path, **kw):
    return build("datasets", {"name": "manifest", "path": str(path), "task": "vqa", **kw})


@pytest.fixture
def files(tmp_path) -> Path:
    for k in range(10):
        png(tmp_path / "img" / f"{k}.png", 20 * k)
    return tmp_path


VQA_ROWS = [
    {"image": "img/0.png", "question": "what color is it?", "answers": ["red", "dark red"], "qtype": "color",
     "split": "train"},
    {"image": "img/1.png", "question": "is it round?", "answers": "yes", "qtype": "yes/no", "split": "train"},
    {"image": "img/1.png", "question": "how many?", "answers": [2, "two"], "split": "val"},
    {"image": "img/2.png", "question": "what shape?", "answers": ["circle"], "qtype": "shape", "split": "test"},
]


def test_vqa_manifest_from_jsonl(files):
    ds = manifest(jsonl(files / "m.jsonl", VQA_ROWS), question_type="qtype")
    assert ds.task == "vqa"
    bundle = ds.load()
    assert bundle.classes == [] and {m: s.kind for m, s in bundle.modalities.items()} == {
        "image": "image", "question": "text"}
    assert bundle.info["task"] == "vqa" and bundle.info["question_modality"] == "question"
    assert bundle.info["answers"] == ["dark red", "red", "yes"]  # from the train split
    train = bundle.splits["train"]
    assert train.ids == [1, 2] and train.targets == [
        {"answers": ["red", "dark red"], "type": "color"}, {"answers": ["yes"], "type": "yes/no"}]
    item = train[0]["inputs"]
    assert item["question"] == "what color is it?" and item["image"].mode == "RGB"
    assert bundle.splits["val"].targets == [{"answers": ["2", "two"], "type": None}]
    assert bundle.splits["test"].targets == [{"answers": ["circle"], "type": "shape"}]
    assert build("datasets", {"name": "manifest", "path": str(files / "m.jsonl")}).task == "classification"


def test_vqa_manifest_from_csv_splits_answers_on_bars(files):
    (files / "m.csv").write_text(
        "image,q,ans,split\n"
        "img/0.png,what color is it?,red|dark red,train\n"
        "img/1.png,what shape is it?,circle,val\n"
        "img/2.png,is it 5.png?,no | nope ,test\n")
    bundle = manifest(files / "m.csv", question="q", answers="ans").load()
    assert {m: s.kind for m, s in bundle.modalities.items()} == {"image": "image", "q": "text"}
    assert bundle.info["question_modality"] == "q"
    assert [s.targets[0]["answers"] for s in bundle.splits.values()] == [
        ["red", "dark red"], ["circle"], ["no", "nope"]]
    assert bundle.splits["test"][0]["inputs"]["q"] == "is it 5.png?"  # a question, not an image path
    assert bundle.splits["train"].ids == [2]


def test_vqa_manifest_without_the_question_column(files):
    rows = [{"image": "img/0.png", "text": "what?", "answers": ["red"], "split": "train"}]
    path = jsonl(files / "m.jsonl", rows)
    with pytest.raises(DataError) as err:
        manifest(path).load()
    assert str(err.value) == (f"manifest '{path}': no column 'question' (data.question); "
                              f"columns are answers, image, split, text")
    with pytest.raises(DataError, match=r"no column 'answer' \(data.answers\)"):
        manifest(path, question="text", answers="answer").modality_specs()


@pytest.mark.parametrize("bad,message", [
    ({"image": "img/3.png", "question": "what?", "split": "train"}, "has no answer (column 'answers')"),
    ({"image": "img/3.png", "question": "what?", "answers": [], "split": "train"}, "has no answer"),
    ({"image": "img/3.png", "question": "what?", "answers": ["", " "], "split": "train"}, "has no answer"),
    ({"image": "img/3.png", "question": " ", "answers": ["red"], "split": "train"}, "has no question"),
    ({"image": "img/3.png", "answers": ["red"], "split": "train"}, "has no question (column 'question')"),
    ({"image": "img/3.png", "question": "what?", "answers": [["red"]], "split": "train"},
     "answers (column 'answers') must be strings"),
])
def test_vqa_manifest_bad_rows_error_or_skip(files, bad, message):
    rows = VQA_ROWS[:2] + [bad] + VQA_ROWS[2:]  # the bad row is line 3
    path = jsonl(files / "m.jsonl", rows)
    with pytest.raises(DataError) as err:
        manifest(path).load()
    assert f"manifest '{path}' line 3 {message}" in str(err.value), str(err.value)
    bundle = manifest(path, on_bad_sample="skip").load()
    assert [(r["id"], r["stage"]) for r in bundle.info["skipped"]] == [(3, "load")]
    assert message in bundle.info["skipped"][0]["reason"]
    assert bundle.splits["train"].ids == [1, 2] and bundle.splits["val"].ids == [4]


def test_vqa_manifest_drawn_split_keeps_an_image_in_one_split(files):
    rows = [{"image": f"img/{k}.png", "question": f"question {j}?", "answers": ["yes" if j % 2 else "no"]}
            for k in range(10) for j in range(3)]
    path = jsonl(files / "m.jsonl", rows)
    bundle = manifest(path, val_fraction=0.2, test_fraction=0.2).load()
    assert {k: len(s) for k, s in bundle.splits.items()} == {"train": 18, "val": 6, "test": 6}  # 6/2/2 images
    images = {k: set(s.columns["image"]) for k, s in bundle.splits.items()}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    assert manifest(path).load().splits["val"].ids == manifest(path).load().splits["val"].ids
