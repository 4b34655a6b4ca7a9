"""The captioning task: soft (multi-label) probe targets in the core, caption metrics, caption data,
and one tiny run end to end through the CLI (train, eval --json, generate, bad input)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_cli
from fusionkit.datasets.base import DatasetBundle, MultimodalSplit
from fusionkit.datasets.easy_vqa import captions_for, image_facts
from fusionkit.errors import ConfigError, DataError
from fusionkit.fusions.base import masked_unimodal_loss
from fusionkit.fusions.dms import route_loss
from fusionkit.metrics import captions as caption_metrics
from fusionkit.metrics.captions import caption_scores
from fusionkit.registry import build
from fusionkit.tasks.base import probe_summary
from fusionkit.training.calibration import fit_temperature
from test_vqa_task import fusionkit, one_line_error

easy_vqa = pytest.importorskip("easy_vqa")
METRICS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}


def task_on(captions: list[list[str]], **cfg):
    task = build("tasks", {"name": "captioning", **cfg})
    split = MultimodalSplit({"x": [None] * len(captions)}, [{"captions": c} for c in captions])
    task.setup(DatasetBundle({"train": split}, classes=[], modalities={}))
    return task


# -- probe space: concept vocabulary, soft targets ---------------------------------------------
def test_concept_vocabulary_and_soft_targets():
    task = task_on([["A red circle.", "there is a red circle in the image"], ["a blue circle"],
                    ["the RED square"], ["a red triangle"]], top_concepts=3, max_concept_share=1.0)
    # samples using each word: red 3, circle 2, then blue/square/triangle 1 (ties by name)
    assert task.probe_classes == ["red", "circle", "blue"]
    out = task.collate_targets([{"captions": ["a circle that is red"]}, {"captions": ["a green square"]},
                                {"captions": ["a blue one", "A BLUE CIRCLE"]}])
    assert out["target"].dtype == torch.float32 and out["target"].shape == (3, 3)
    assert out["target"].tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    assert out["answer_text"] == ["a circle that is red", "a green square", "a blue one"]  # the first reference
    assert out["captions"][2] == ["a blue one", "A BLUE CIRCLE"]
    unlabelled = task.collate_targets([None, {"captions": ["red"]}])  # `fusionkit generate`: no references
    assert "answer_text" not in unlabelled and unlabelled["target"][0].sum() == 0


def test_words_most_captions_use_are_not_concepts():
    caps = [["a handwritten one"], ["a handwritten two, tall"], ["a handwritten three, tall"], ["a handwritten four"]]
    # "handwritten" is in 4/4 samples, "tall" in 2/4: the default share 0.5 keeps "tall" only
    assert task_on(caps).probe_classes == ["tall", "four", "one", "three", "two"]
    assert task_on(caps, max_concept_share=0.4).probe_classes == ["four", "one", "three", "two"]
    assert task_on(caps, max_concept_share=1.0).probe_classes[0] == "handwritten"


def test_bad_captioning_targets():
    with pytest.raises(DataError, match="training sample 1 has no reference caption"):
        task_on([["a red circle"], []])
    with pytest.raises(DataError, match="has an empty reference caption"):
        task_on([["a red circle", " "]])
    with pytest.raises(ConfigError, match=r"task captioning needs targets \{captions: \[...\]\}.*data.task=captioning"):
        build("tasks", "captioning").setup(
            DatasetBundle({"train": MultimodalSplit({"x": [None]}, [3])}, classes=["a"], modalities={}))
    with pytest.raises(ConfigError, match="concept vocabulary of 1 word"):
        task_on([["the red"], ["a red"]], max_concept_share=1.0)
    with pytest.raises(ConfigError, match=r"vocabulary of 0 word.*share = 0.5 of the samples: \['red'\]"):
        task_on([["the red"], ["a red"]])


# -- the core with soft targets -----------------------------------------------------------------
def test_soft_target_aux_loss_by_hand():
    # head logits log(1), log(2), log(3): p = (1/6, 2/6, 3/6) everywhere
    logits = torch.tensor([1.0, 2.0, 3.0]).log().expand(3, 2, 3).clone()  # (B=3, M=2, K=3)
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # sample 1: no label
    mask = torch.tensor([[True, True], [True, True], [True, False]])  # sample 2 lacks modality 1
    ce0 = 0.5 * math.log(6) + 0.5 * math.log(3)  # -(0.5 log 1/6 + 0.5 log 2/6)
    ce2 = math.log(2)  # -log 3/6
    # modality 0: samples 0 and 2 (mean); modality 1: sample 0 only
    expected = (ce0 + ce2) / 2 + ce0
    assert masked_unimodal_loss(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)
    # a one-hot soft target is the hard label
    hard = torch.tensor([2, -100, 1])
    assert masked_unimodal_loss(logits, torch.nn.functional.one_hot(hard.clamp(min=0), 3).float()
                                * (hard != -100)[:, None], mask).item() == pytest.approx(
        masked_unimodal_loss(logits, hard, mask).item(), rel=1e-6)


def test_route_loss_and_probe_metrics_read_soft_targets():
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]],  # sample 0: head 0 right (1), head 1 wrong (2)
                           [[0.0, 0.0, 5.0], [0.0, 0.0, 4.0]]])  # sample 1: both right
    mask = torch.ones(2, 2, dtype=torch.bool)
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    # only sample 0 is informative: goal (1, 0) -> -log 0.25
    assert route_loss(weights, logits, target, mask).item() == pytest.approx(-math.log(0.25))
    c = {"target": target, "mask": mask, "unimodal": logits.argmax(-1), "unimodal_probs": logits.softmax(-1),
         "weights": weights}
    summary = probe_summary(c, ["a", "b"])
    assert summary["unimodal_accuracy"] == {"a": 1.0, "b": 0.5}
    assert summary["mean_weights"] == {"a": pytest.approx(0.375), "b": pytest.approx(0.625)}
    # temperature fitting: a one-hot soft target gives the hard label's temperature
    x = torch.randn(50, 4) * 3
    y = torch.randint(0, 4, (50,))
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    assert fit_temperature(x, one_hot) == pytest.approx(fit_temperature(x, y), rel=1e-4)


@pytest.mark.parametrize("fusion", ["tmc", "qmf"])
def test_single_label_fusions_refuse_soft_targets(fusion):
    f = build("fusions", fusion, modalities=["a", "b"], dim=8, num_classes=3)
    out = f({"a": torch.randn(2, 8), "b": torch.randn(2, 8)})
    with pytest.raises(ConfigError, match=f"fusion {fusion} needs single-label targets"):
        f.loss(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
    assert torch.isfinite(f.loss(out, torch.tensor([0, 2])))  # hard labels as before


# -- caption metrics ------------------------------------------------------------------------------
def test_bleu_1_with_brevity_penalty_by_hand():
    ref = "there is a red circle in the image"  # 8 words
    s = caption_scores(["a red circle"], [[ref]])
    bp = math.exp(1 - 8 / 3)  # candidate shorter than its (closest) reference
    assert s["bleu_1"] == pytest.approx(bp * 3 / 3, rel=1e-6)  # every unigram is in the reference
    assert s["bleu_2"] == pytest.approx(bp * math.sqrt(1 * 2 / 2), rel=1e-6)  # "a red", "red circle"
    same = caption_scores([ref, "A blue square."], [[ref, "a circle"], ["a blue square"]])
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6) and same["rouge_l"] == pytest.approx(1.0)
    assert same["meteor"] > 0.9 and set(same) == METRICS


def test_wrapper_equals_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = ["A red circle.", "a blue shape", "there's a green triangle!", ""]
    refs = [["a red circle", "there is a red circle in the image"], ["a blue rectangle"],
            ["a green triangle", "the image shows a green triangle"], ["a teal circle"]]
    ours = caption_scores(preds, refs)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)


def test_without_java_meteor_is_unavailable_and_the_rest_is_computed(monkeypatch, caplog):
    preds, refs = ["a red circle", "a blue square"], [["a red circle"], ["a blue rectangle", "a blue square"]]
    with_java = caption_scores(preds, refs)
    caption_metrics._warn_no_java.cache_clear()
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="fusionkit.metrics.captions"):
        first = caption_scores(preds, refs)
        again = caption_scores(preds, refs)
    assert first["meteor"] is None and again == first
    assert {k: first[k] for k in METRICS - {"meteor"}} == pytest.approx(
        {k: with_java[k] for k in METRICS - {"meteor"}})  # lower-case, no punctuation: same tokens
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "METEOR is unavailable" in warnings[0]
    assert caption_metrics.simple_tokenize("There's a RED circle, here!") == "there s a red circle here"
    caption_metrics._warn_no_java.cache_clear()


def test_caption_metrics_reject_missing_references():
    with pytest.raises(DataError, match="sample 1 has no reference caption"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(DataError, match="sample 0 has an empty reference caption"):
        caption_scores(["a"], [[""]])


# -- caption data ---------------------------------------------------------------------------------
def test_easy_vqa_caption_facts_and_phrasings():
    qa = [("what is the blue shape?", "rectangle"), ("is there a red shape?", "no")]
    assert image_facts(qa) == ("rectangle", "blue")
    assert image_facts([("does the image not contain a circle?", "no")]) == ("circle", None)
    assert image_facts([("is no teal shape present?", "no")]) == (None, "teal")
    ruled = [("is there a circle?", "no"), ("is there not a triangle?", "yes")]
    assert image_facts(ruled) == ("rectangle", None)  # the only shape left
    assert image_facts([("is there a red shape?", "no")]) == (None, None)
    caps = captions_for("circle", "red", 3, np.random.default_rng(0))
    assert caps[0] == "a red circle" and len(set(caps)) == 3 and all("red circle" in c or "red" in c for c in caps)
    assert captions_for("circle", "red", 3, np.random.default_rng(0)) == caps
    assert captions_for(None, "teal", 6, np.random.default_rng(1))[0] == "a teal shape"
    assert all("{" not in c and "None" not in c for c in captions_for("triangle", None, 4, np.random.default_rng(2)))


def test_easy_vqa_captioning_is_one_sample_per_image():
    ds = build("datasets", {"name": "easy_vqa", "task": "captioning", "max_train_images": 40, "max_test_images": 10})
    assert ds.task == "captioning" and ds.default_modalities == ("image",)
    bundle = ds.load()
    assert {k: len(s) for k, s in bundle.splits.items()} == {"train": 36, "val": 4, "test": 10}
    assert bundle.classes == [] and set(bundle.modalities) == {"image"} and bundle.info["task"] == "captioning"
    ids = [i for s in bundle.splits.values() for i in s.ids]
    assert len(set(ids)) == len(ids) and all(":image" in i for i in ids)
    for t in bundle.splits["train"].targets:
        caps = t["captions"]
        assert len(caps) == 3 and len(set(caps)) == 3 and caps[0].startswith("a ") and caps[0].split()[1] in caps[1]
    assert build("datasets", {"name": "easy_vqa"}).task == "vqa"  # the default stays vqa
    with pytest.raises(ConfigError, match="max_train_images"):
        from fusionkit.config import resolve

        resolve({"data": {"name": "easy_vqa", "task": "captioning", "max_train_questions": 10}})


def test_digits_captioning_targets():
    ds = build("datasets", {"name": "digits", "task": "captioning", "captions_per_sample": 2})
    assert ds.task == "captioning" and ds.default_modalities == ("image",)
    bundle = ds.load()
    assert bundle.classes == [] and len(bundle.splits["train"]) == 1200
    first = bundle.splits["train"].targets[0]["captions"]
    assert len(first) == 2 and first[0].startswith("a handwritten zero, with ")
    assert build("datasets", "digits").load().splits["train"].targets[0] == 0  # classification unchanged


def _png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path.name


def test_manifest_captioning_jsonl_csv_and_bad_rows(tmp_path):
    for k in range(4):
        _png(tmp_path / f"{k}.png")
    rows = [{"image": "0.png", "caption": ["a red square", "a small red square"], "split": "train"},
            {"image": "1.png", "caption": "a red block", "split": "val"},
            {"image": "2.png", "caption": "a red tile", "split": "test"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build("datasets", {"name": "manifest", "path": str(path), "task": "captioning"})
    bundle = ds.load()
    assert ds.task == "captioning" and bundle.classes == [] and set(bundle.modalities) == {"image"}
    assert [s.targets for s in bundle.splits.values()] == [
        [{"captions": ["a red square", "a small red square"]}], [{"captions": ["a red block"]}],
        [{"captions": ["a red tile"]}]]
    (tmp_path / "m.csv").write_text("image,caption,split\n0.png,a red square| a small red square ,train\n"
                                    "1.png,a red block,val\n2.png,a red tile,test\n")
    csv = build("datasets", {"name": "manifest", "path": str(tmp_path / "m.csv"), "task": "captioning"}).load()
    assert csv.splits["train"].targets == [{"captions": ["a red square", "a small red square"]}]
    for bad, message in [({"image": "3.png", "caption": "", "split": "train"}, "has no caption (column 'caption')"),
                         ({"image": "3.png", "caption": ["a", " "], "split": "train"}, "has an empty caption"),
                         ({"image": "3.png", "split": "train"}, "has no caption"),
                         ({"image": "3.png", "caption": [], "split": "train"}, "has no caption")]:
        path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], bad, *rows[1:]]))
        with pytest.raises(DataError, match=re.escape(f"line 2 {message}")):
            build("datasets", {"name": "manifest", "path": str(path), "task": "captioning"}).load()
        skipped = build("datasets", {"name": "manifest", "path": str(path), "task": "captioning",
                                     "on_bad_sample": "skip"}).load()
        assert [r["id"] for r in skipped.info["skipped"]] == [2]


def test_the_captioning_config_resolves():
    code, stdout, err = fusionkit("config", "show", str(REPO / "configs" / "easy-captioning.yaml"))
    assert code == 0, err
    assert "task: captioning" in stdout and "top_concepts: 200" in stdout and "max_answer_tokens: 16" in stdout


# -- end to end through the CLI -------------------------------------------------------------------
def tiny_caption_overrides(lm: Path) -> list[str]:
    return ["data={name: easy_vqa, task: captioning, max_train_images: 80, max_test_images: 16}",
            "modalities=[image]", "task=captioning",
            "model.encoders.image={name: timm, model_name: test_resnet, image_size: 32, pretrained: false, "
            "trainable: true}",
            "model.dim=32", f"model.decoder={{name: llava, lm: '{lm}', max_tokens: 4, max_new_tokens: 4, "
            "max_answer_tokens: 12, prompt: 'Caption:'}", "train.epochs=1", "train.batch_size=32",
            "runtime.accelerator=cpu"]


@pytest.fixture(scope="module")
def caption_run(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captioning") / "dms"
    proc = run_cli("train", "--out", str(out), "--no-progress", *tiny_caption_overrides(tiny_lm))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated captions: CIDEr" in proc.stdout and "cider=" in proc.stdout
    assert "PTBTokenizer" not in proc.stderr  # the JVM's log stays out of the terminal
    return out


def test_caption_run_reports_the_metrics_and_eval_repeats_them(caption_run):
    test = json.loads((caption_run / "results.json").read_text())["test"]
    assert METRICS | {"accuracy", "unimodal_accuracy", "mean_weights", "n", "unimodal_ece"} <= set(test)
    assert test["n"] == 16 and test["accuracy"] == test["cider"] and isinstance(test["meteor"], float)
    assert all(0 <= test[k] <= 1 for k in METRICS - {"cider"}) and test["cider"] >= 0
    assert test["mean_weights"] == {"image": pytest.approx(1.0)}
    vocab = json.loads((caption_run / "checkpoints" / "best" / "meta.json").read_text())["task"]["probe_classes"]
    assert {"red", "circle", "triangle"} <= set(vocab) and not {"a", "the", "image"} & set(vocab)
    code, stdout, err = fusionkit("eval", str(caption_run), "--json")
    assert code == 0, err
    got = json.loads(stdout)
    assert got["split"] == "test" and {k: got[k] for k in METRICS} == {k: test[k] for k in METRICS}


def test_generate_prints_a_caption(caption_run, tmp_path):
    source = sorted(easy_vqa.get_test_image_paths().items())[0][1]
    with Image.open(source) as im:
        im.convert("RGB").save(tmp_path / "shape.png")
    code, stdout, err = fusionkit("generate", str(caption_run), "--image", str(tmp_path / "shape.png"))
    assert code == 0, err
    assert stdout.count("\n") == 1 and "DMS weights: image 1.000" in err


def test_captioning_bad_input_is_one_line(tiny_lm, tmp_path):
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "a"), "--no-progress", "data=digits",
                                     "task=captioning", "train.epochs=1", "runtime.accelerator=cpu",
                                     f"model.decoder={{name: llava, lm: '{tiny_lm}'}}")[::2])
    assert "task captioning needs targets {captions: [...]}" in line and "data.task=captioning" in line
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "b"), "--no-progress",
                                     *tiny_caption_overrides(tiny_lm), "model.fusion=tmc")[::2])
    assert "fusion tmc needs single-label targets" in line
    rows = [{"image": _png(tmp_path / "0.png"), "caption": ["a red square", ""]}, {"image": "0.png", "caption": []}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line_error(*fusionkit("train", "--data", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "c"),
                                     "data.task=captioning", "task=captioning", "runtime.accelerator=cpu",
                                     f"model.decoder={{name: llava, lm: '{tiny_lm}'}}")[::2])
    assert "line 1 has an empty caption (column 'caption', caption 2 of 2)" in line
    assert not (tmp_path / "c").exists()  # bad data: no run folder
