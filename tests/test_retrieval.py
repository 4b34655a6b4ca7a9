"""The retrieval task: metrics on a hand-made similarity matrix, multi-positive InfoNCE, the probe
transform over in-batch candidates, and one tiny two-modality run end to end through the CLI
(train, eval --json, retrieve, bad input)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from conftest import REPO, run_cli
from fusionkit.datasets.base import DatasetBundle, MultimodalSplit
from fusionkit.errors import ConfigError, DataError
from fusionkit.evaluation import _cat
from fusionkit.fusions.base import UnimodalHeads, masked_unimodal_loss
from fusionkit.metrics.retrieval import retrieval_metrics
from fusionkit.registry import build
from fusionkit.tasks.retrieval import info_nce
from test_vqa_task import fusionkit, one_line_error

RESULT_KEYS = {f"{d}_{k}" for d in ("q2t", "t2q") for k in ("r1", "r5", "r10", "median_rank")}


# -- metrics -------------------------------------------------------------------------------------
def test_retrieval_metrics_on_a_hand_made_matrix_with_a_repeated_text():
    texts = ["a", "b", "a", "c"]  # samples 0 and 2 share their target text
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.2],   # q0: best "a" is t2 (0.5), beaten by t1 (b) -> rank 2
                        [0.3, 0.8, 0.1, 0.0],   # q1: t1 first -> rank 1
                        [0.7, 0.2, 0.1, 0.3],   # q2: t0 has the same text "a" -> rank 1
                        [0.6, 0.5, 0.4, 0.3]])  # q3: three other texts score higher -> rank 4
    m = retrieval_metrics(sim, texts)
    assert set(m) == RESULT_KEYS | {"accuracy"}
    assert (m["q2t_r1"], m["q2t_r5"], m["q2t_median_rank"]) == (0.5, 1.0, 1.5)  # ranks 2, 1, 1, 4
    # columns: t0 -> q2 (0.7) rank 1; t1 -> q1 (0.8) after q0 (0.9): rank 2; t2 -> q0 (0.5) rank 1;
    # t3 -> q3 (0.3) ties with q2 (0.3, text "a"): ties go to the hit, rank 1
    assert (m["t2q_r1"], m["t2q_r5"], m["t2q_r10"], m["t2q_median_rank"]) == (0.75, 1.0, 1.0, 1.0)
    assert m["accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    assert retrieval_metrics(sim, ["a", "b", "e", "c"])["q2t_r1"] == 0.25  # q2's hit needs the repeated text
    assert retrieval_metrics(torch.zeros(0, 0), [])["accuracy"] == 0.0


def test_info_nce_with_repeated_texts_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)  # texts a, a, b

    def lse(*x):
        return math.log(sum(math.exp(v) for v in x))

    rows = [lse(2, 1, 0) - lse(2, 1), lse(0, 1, 0) - lse(0, 1), lse(1, 0, 3) - 3]
    cols = [lse(2, 0, 1) - lse(2, 0), lse(1, 1, 0) - lse(1, 1), lse(0, 0, 3) - 3]
    assert info_nce(logits, pos).item() == pytest.approx((sum(rows) / 3 + sum(cols) / 3) / 2, rel=1e-6)
    # distinct texts: CLIP's symmetric cross-entropy
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert info_nce(logits, torch.eye(3, dtype=torch.bool)).item() == pytest.approx(clip.item(), rel=1e-6)


# -- the task, the probe transform -----------------------------------------------------------------
def test_retrieval_targets_and_bad_input():
    task = build("tasks", {"name": "retrieval", "embed_dim": 16})
    split = MultimodalSplit({"x": [None] * 3}, [{"text": "a red circle"}, {"captions": ["a blue circle", "x"]},
                                                {"text": "a red circle"}])
    task.setup(DatasetBundle({"train": split}, classes=[], modalities={}))
    assert task.num_probe_classes == 16 and task.probe_classes == []
    out = task.collate_targets(split.targets)
    assert out["target_text"] == ["a red circle", "a blue circle", "a red circle"]
    assert out["target"].tolist() == [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    assert "target_text" not in task.collate_targets([None])
    with pytest.raises(DataError, match="has no reference caption"):
        task.collate_targets([{"captions": []}])
    with pytest.raises(DataError, match="empty target text"):
        task.collate_targets([{"text": " "}])
    with pytest.raises(ConfigError, match=r"task retrieval needs targets \{text: ...\}"):
        task.collate_targets([3])
    with pytest.raises(ConfigError, match="1 distinct target text"):
        task.setup(DatasetBundle({"train": MultimodalSplit({"x": [None] * 2}, [{"text": "a"}, {"text": "a"}])},
                                 classes=[], modalities={}))


def test_probe_transform_maps_heads_to_candidates():
    torch.manual_seed(0)
    heads = UnimodalHeads(2, 8, 16, 4, 0.2)  # M = 2, K = embed_dim = 4
    z = torch.randn(3, 2, 8)
    cand = F.normalize(torch.randn(5, 4), dim=-1)  # N = 5 candidates
    plain = heads.eval()(z)  # (B, M, K)
    transform = lambda out: F.normalize(out, dim=-1) @ cand.T * 10.0  # noqa: E731
    with heads.mapped(transform):
        mapped = heads(z)  # (B, M, N)
        sampled = heads.sample(z, passes=6)  # (T, B, M, N)
    assert plain.shape == (3, 2, 4) and mapped.shape == (3, 2, 5) and sampled.shape == (6, 3, 2, 5)
    assert torch.allclose(mapped, transform(plain), atol=1e-6)
    assert torch.allclose(sampled.sum(-1), torch.ones(6, 3, 2), atol=1e-5)
    assert heads.transform is None and torch.equal(heads(z), plain)  # off outside the block
    # a DMS fusion reads the mapped outputs: signals and weights over the candidates
    fusion = build("fusions", "dms", modalities=["a", "b"], dim=8, num_classes=4)
    dec = build("decoders", {"name": "retrieval"}, dim=8, num_classes=4)
    with fusion.heads.mapped(dec.probe_transform(cand)):
        out = fusion({"a": torch.randn(5, 8), "b": torch.randn(5, 8)})
    assert out.unimodal_logits.shape == (5, 2, 5) and torch.allclose(out.weights.sum(1), torch.ones(5))
    loss = masked_unimodal_loss(out.unimodal_logits, torch.eye(5), out.mask)  # probe label of sample i: i
    assert torch.isfinite(loss) and loss.item() > 0
    dec.logit_scale.data.fill_(10.0)
    assert dec.scale().item() == 100.0  # CLIP's clamp


def test_batches_with_different_candidate_counts_are_padded():
    a, b = torch.randn(4, 2, 4), torch.randn(2, 2, 2)
    logits = _cat([a, b], "unimodal_logits")
    assert logits.shape == (6, 2, 4) and (logits[4:, :, 2:] == -1e4).all() and torch.equal(logits[:4], a)
    probs = _cat([a.softmax(-1), b.softmax(-1)], "unimodal_probs")
    assert (probs[4:, :, 2:] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(6, 2))
    same_width = [torch.ones(2, 3), torch.zeros(1, 3)]  # nothing to pad
    assert torch.equal(_cat(same_width, "target"), torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3]))


def test_the_retrieval_config_resolves():
    code, stdout, err = fusionkit("config", "show", str(REPO / "configs" / "easy-retrieval.yaml"))
    assert code == 0, err
    assert "name: retrieval" in stdout and "embed_dim: 256" in stdout and "logit_scale: 2.659" in stdout


# -- end to end through the CLI: digits with image + morphological features -> caption -------------
def tiny_retrieval_overrides() -> list[str]:
    return ["data={name: digits, task: captioning}", "modalities=[image, mor]", "task={name: retrieval, embed_dim: 32}",
            "model.encoders.image={name: timm, model_name: test_resnet, image_size: 32, in_chans: 1}",
            "model.dim=32", "model.decoder={name: retrieval}", "train.epochs=1", "train.batch_size=96",
            "runtime.accelerator=cpu"]


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval") / "dms"
    proc = run_cli("train", "--out", str(out), "--no-progress", *tiny_retrieval_overrides())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused (mean R@1)" in proc.stdout and "q2t_r1=" in proc.stdout
    return out


@pytest.fixture(scope="module")
def query(tmp_path_factory) -> tuple[Path, Path]:
    """A digit as a PNG and its morphological features as a .npy file."""
    from fusionkit.registry import build as build_

    sample = build_("datasets", {"name": "digits", "task": "captioning"}).load().splits["test"][0]["inputs"]
    folder = tmp_path_factory.mktemp("query")
    Image.fromarray((np.asarray(sample["image"]) * 255).astype(np.uint8)).save(folder / "digit.png")
    np.save(folder / "mor.npy", np.asarray(sample["mor"], dtype=np.float32))
    return folder / "digit.png", folder / "mor.npy"


def test_retrieval_run_reports_recall_and_eval_repeats_it(retrieval_run):
    test = json.loads((retrieval_run / "results.json").read_text())["test"]
    assert RESULT_KEYS | {"accuracy", "unimodal_accuracy", "mean_weights", "n"} <= set(test)
    assert test["n"] == 400 and test["accuracy"] == pytest.approx((test["q2t_r1"] + test["t2q_r1"]) / 2)
    assert all(0 <= test[k] <= 1 for k in RESULT_KEYS if "median" not in k)
    assert test["q2t_r1"] <= test["q2t_r5"] <= test["q2t_r10"] and 1 <= test["q2t_median_rank"] <= 400
    assert set(test["mean_weights"]) == {"image", "mor"} and sum(test["mean_weights"].values()) == pytest.approx(1.0)
    assert all(0 <= v <= 1 for v in test["unimodal_accuracy"].values())
    with safe_open(str(retrieval_run / "checkpoints" / "best" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "decoder.logit_scale" in keys and "decoder.target_proj.weight" in keys
    assert not [k for k in keys if k.startswith("decoder.target_encoder.")]  # frozen MiniLM: rebuilt, not stored
    code, stdout, err = fusionkit("eval", str(retrieval_run), "--json")
    assert code == 0, err
    got = json.loads(stdout)
    assert {k: got[k] for k in RESULT_KEYS} == {k: test[k] for k in RESULT_KEYS}


def test_retrieve_prints_the_top_matches(retrieval_run, query, tmp_path):
    image, mor = query
    code, stdout, err = fusionkit("retrieve", str(retrieval_run), "--query-image", str(image),
                                  "--input", f"mor={mor}", "--top", "3")
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 3
    parsed = [re.fullmatch(r"(\d)\. (-?[0-9.]+)  (a handwritten .+)", line) for line in lines]
    assert all(parsed) and [int(p[1]) for p in parsed] == [1, 2, 3]
    scores = [float(p[2]) for p in parsed]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    weights = re.search(r"DMS weights: image ([0-9.]+), mor ([0-9.]+)", err)
    assert weights and float(weights[1]) + float(weights[2]) == pytest.approx(1.0, abs=2e-3)

    gallery = tmp_path / "gallery.jsonl"
    gallery.write_text(json.dumps({"text": "a handwritten zero"}) + "\n\n" + json.dumps({"text": "a cat"}) + "\n")
    code, stdout, err = fusionkit("retrieve", str(retrieval_run), "--query-image", str(image), "--top", "5",
                                  "--gallery", str(gallery))
    assert code == 0, err
    assert sorted(line.split("  ", 1)[1] for line in stdout.splitlines()) == ["a cat", "a handwritten zero"]
    assert "mor 0.000" in err  # the missing modality gets no weight


@pytest.mark.parametrize("args,message", [
    (["--gallery", "EMPTY"], "has no items"),
    (["--gallery", "BAD"], "line 1: expected an object with a non-empty 'text'"),
    (["--top", "0"], "--top must be at least 1"),
    (["--query-text", "seven"], "it has no ['text']"),
])
def test_retrieve_bad_input_is_one_line(retrieval_run, query, tmp_path, args, message):
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "BAD").write_text(json.dumps({"caption": "x"}) + "\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "BAD") else a for a in args]
    line = one_line_error(*fusionkit("retrieve", str(retrieval_run), "--query-image", str(query[0]), *args)[::2])
    assert message in line


def test_retrieval_needs_its_decoder_and_soft_target_fusions(tmp_path):
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "a"), "--no-progress",
                                     *tiny_retrieval_overrides(), "model.decoder=classifier")[::2])
    assert "task retrieval needs the retrieval decoder" in line
    line = one_line_error(*fusionkit("train", "--out", str(tmp_path / "b"), "--no-progress",
                                     *tiny_retrieval_overrides(), "model.fusion=qmf")[::2])
    assert "fusion qmf needs single-label targets" in line
