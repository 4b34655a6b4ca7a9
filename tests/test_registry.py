"""Every registered component is built from its defaults and run on a tiny input."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import IterableDataset

from conftest import ENCODER_SAMPLES, ENCODER_SPECS, TINY_ENCODERS, tiny_overrides, tiny_vlm
from fusionkit.errors import ConfigError, RegistryError
from fusionkit.fusions.base import UnimodalHeads
from fusionkit.registry import REGISTRIES, Registry, build, registry
from fusionkit.scorers.base import ScoreContext

B, M, D, K = 4, 3, 16, 5

# Overrides that keep a component tiny; everything else runs with its defaults.
TINY = {("encoders", name): overrides for name, overrides in TINY_ENCODERS.items()}
TINY[("datasets", "easy_vqa")] = {"max_train_questions": 60, "max_test_questions": 20}
SAMPLES, SPECS = ENCODER_SAMPLES, ENCODER_SPECS  # one raw sample and spec per modality kind
SKIP_KINDS = {"corruptions", "datasets"}  # own parametrised tests (test_corruptions, below)


def _components():
    for kind in sorted(REGISTRIES):
        if kind in SKIP_KINDS:
            continue
        for name in registry(kind).names():
            yield pytest.param(kind, name, id=f"{kind}:{name}")


@pytest.mark.parametrize("kind,name", list(_components()))
def test_every_component_builds_and_runs(kind, name, request):
    block = {"name": name, **TINY.get((kind, name), {})}
    torch.manual_seed(0)
    if kind == "encoders":
        block = {**block, **tiny_overrides(kind, name)}
        cls = registry(kind).get(name)
        mod_kind = cls.kinds[0]
        enc = build(kind, block, spec=SPECS[mod_kind])
        batch = enc.collate([enc.preprocess(SAMPLES[mod_kind]()) for _ in range(B)])
        out = enc(batch)
        assert out.shape == (B, enc.out_dim)
        assert torch.isfinite(out).all()
    elif kind == "fusions":
        f = build(kind, block, modalities=["a", "b", "c"], dim=D, num_classes=K)
        z = {m: torch.randn(B, D) for m in "abc"}
        mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
        out = f(z, mask)
        assert out.fused.shape == (B, D)
        assert out.weights.shape == (B, M)
        assert (out.weights[~mask] == 0).all()
        assert out.weights.sum(1).tolist() == pytest.approx([1.0] * B, abs=1e-5)
        loss = f.loss(out, torch.randint(0, K, (B,)))
        assert loss.dim() == 0 and torch.isfinite(loss)
        if out.logits is not None:
            assert out.logits.shape == (B, K)
    elif kind == "scorers":
        s = build(kind, block)
        heads = UnimodalHeads(M, D, 8, K, 0.2)
        z = torch.randn(B, M, D)
        signal = s(ScoreContext(z=z, mask=torch.ones(B, M, dtype=torch.bool), logits=heads(z), heads=heads))
        assert s.signal and signal.shape == (B, M) and torch.isfinite(signal).all()
    elif kind == "schedulers":
        signals = ["confidence", "uncertainty", "alignment"]
        sch = build(kind, block, signals=signals)
        mask = torch.tensor([[1, 1, 0]] * B, dtype=torch.bool)
        w = sch({s: torch.rand(B, M) for s in signals}, mask)
        assert w.shape == (B, M) and (w[:, 2] == 0).all()
        assert w.sum(1).tolist() == pytest.approx([1.0] * B)
    elif kind == "decoders" and getattr(registry(kind).get(name), "generative", False):
        _check_generative_decoder(block, request)
    elif kind == "decoders":
        dec = build(kind, block, dim=D, num_classes=K)
        assert dec(torch.randn(B, D)).shape == (B, K)
        if getattr(dec, "retrieval", False):  # unit embeddings of texts, similarities, probe transform
            t = dec.embed_texts(["a red circle", "a blue square", "a red circle"])
            assert t.shape == (3, K) and torch.allclose(t.norm(dim=-1), torch.ones(3)) and torch.equal(t[0], t[2])
            assert dec.similarity(dec(torch.randn(B, D)), t).shape == (B, 3)
            assert dec.probe_transform(t)(torch.randn(2, B, M, K)).shape == (2, B, M, 3)
    elif kind == "tasks":
        _check_task(name, build(kind, block))
    elif kind == "strategies":
        _check_strategy(block)
    elif kind == "loggers":  # one epoch and a result into a fresh run folder, something written there
        run = request.getfixturevalue("tmp_path") / "run"
        run.mkdir()
        logger = build(kind, block)
        logger.start(run, {"seed": 0, "train": {"lr": 0.001}})
        logger.log_epoch(1, {"epoch": 1, "val": {"accuracy": 0.5, "nll": None}})
        logger.log_result({"best_epoch": 1, "test": {"accuracy": 0.25}})
        logger.close()
        assert any(f.is_file() and f.stat().st_size > 0 for f in run.rglob("*"))
    else:
        pytest.fail(f"kind '{kind}' has no registry-wide test: add a branch here")


def _check_generative_decoder(block, request):
    """A text decoder on a tiny random Llama: finite teacher-forced loss, one string per sample."""
    from fusionkit.model import Tokens

    fields = registry("decoders").get(block["name"]).Config.model_fields
    widths = {"a": 8, "b": 6, "c": 4}
    if "image_modality" in fields:  # a checkpoint adapter: its image modality's tokens are in the LM width
        block.update(model=tiny_vlm(block["name"].removeprefix("hf_")), image_modality="a")
        widths["a"] = 32
    elif "lm" in fields:
        block["lm"] = str(request.getfixturevalue("tiny_lm"))
    dec = build("decoders", {**block, "max_new_tokens": 2}, dim=D, num_classes=K)
    if getattr(dec, "needs_tokens", False):
        dec.attach(widths)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    fused = build("fusions", "mean", modalities=["a", "b", "c"], dim=D, num_classes=K)(
        {m: torch.randn(B, D) for m in "abc"}, mask)
    tokens = {}
    for j, (m, width) in enumerate(widths.items()):
        lengths = torch.tensor([3, 1, 2, 3]) * mask[:, j]  # (B,): different valid lengths, 0 when missing
        tmask = torch.arange(3) < lengths[:, None]  # (B, 3)
        tokens[m] = Tokens(torch.randn(B, 3, width) * tmask.unsqueeze(-1), tmask)
    loss = dec(fused, tokens, {"answer_text": ["red", "a triangle", "no", "yes"]})
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    trained = [p for p in dec.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    texts = dec.generate(fused, tokens)
    assert isinstance(texts, list) and len(texts) == B and all(isinstance(t, str) for t in texts)


def _check_strategy(block):
    """Three training steps of a strategy on a tiny 3-modality model with missing modalities:
    scalar finite terms, finite gradients and weights, a JSON state that restores exactly."""
    import json

    from fusionkit.strategies.base import TrainContext
    from test_strategies import one_step, tiny_batch, tiny_model

    model = tiny_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    strategy = build("strategies", block)
    strategy.on_train_start(model, opt, TrainContext(None))
    model.train()
    for step in range(3):
        terms = one_step(strategy, model, tiny_batch(seed=step), opt, step)
        assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values()), terms
        assert all(torch.isfinite(p).all() for p in model.parameters())
    state = json.loads(json.dumps(strategy.state_dict()))
    strategy.load_state_dict(state)
    assert json.loads(json.dumps(strategy.state_dict())) == state
    strategy.on_train_end(model)


def _check_task(name, task):
    """Set the task up on a tiny hand-made bundle, then collate one batch of its targets."""
    from fusionkit.datasets.base import DatasetBundle, MultimodalSplit
    from fusionkit.tasks.base import IGNORE

    if name == "classification":
        train, classes = [0, 2, 1, 2], ["a", "b", "c"]
        batch, probe, expected = [2, 0, 1, 1], ["a", "b", "c"], [2, 0, 1, 1]
    elif name == "vqa":
        train, classes = [{"answers": ["Red."], "type": "color"}, {"answers": ["red", "red", "blue"], "type": "color"},
                          {"answers": ["yes"], "type": "yes/no"}, {"answers": ["no"], "type": "yes/no"},
                          {"answers": ["yes"], "type": "yes/no"}, {"answers": [], "type": None}], []
        batch = [{"answers": ["no"], "type": "yes/no"}, {"answers": ["purple"], "type": "color"},
                 {"answers": ["the Red", "blue"], "type": "color"}, {"answers": ["yes"], "type": "yes/no"}]
        probe, expected = ["red", "yes", "no"], [2, IGNORE, 0, 1]  # by frequency, ties by name
    elif name == "captioning":  # soft targets over a concept vocabulary
        train, classes = [{"captions": ["A red circle.", "a circle that is red"]}, {"captions": ["a blue circle"]},
                          {"captions": ["the red square"]}, {"captions": ["a green triangle"]}], []
        batch = [{"captions": ["a red one"]}, {"captions": ["a green square"]}, {"captions": ["a blue circle"]},
                 {"captions": ["a pink one", "CIRCLE, red"]}]
        # by samples using the word (none in more than half of them), ties by name
        probe = ["circle", "red", "blue", "green", "square", "triangle"]
        expected = [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0.5, 0.5, 0], [0.5, 0, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0]]
    elif name == "retrieval":  # soft targets over the in-batch candidates (same text = positive)
        train, classes = [{"text": "a red circle"}, {"captions": ["a blue circle", "a circle"]}], []
        batch = [{"text": "a"}, {"captions": ["b", "c"]}, {"text": "a"}, {"text": "c"}]
        probe, expected = [], [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]]
    else:
        pytest.fail(f"task '{name}' has no registry-wide test: add a tiny bundle here")
    split = MultimodalSplit({"x": [None] * len(train)}, train)
    task.setup(DatasetBundle({"train": split}, classes=classes, modalities={}))
    assert task.probe_classes == probe
    assert task.num_probe_classes == (task.config.embed_dim if name == "retrieval" else len(probe))
    out = task.collate_targets(batch)
    target = out["target"]
    if target.is_floating_point():  # soft: a distribution (or an all-zero row: no label) per sample
        assert target.shape[0] == B and ((target.sum(1) - 1).abs().lt(1e-6) | (target.sum(1) == 0)).all()
        assert torch.allclose(target, torch.tensor(expected, dtype=target.dtype))
    else:
        assert target.dtype == torch.long and target.shape == (B,)
        assert ((target >= 0) & (target < len(probe)) | (target == IGNORE)).all()
        assert target.tolist() == expected
    if name == "vqa":
        assert out["answers"] == [t["answers"] for t in batch]
        assert out["answer_text"] == ["no", "purple", "red", "yes"]  # what the LM is taught: normalised
        assert out["types"] == ["yes/no", "color", "color", "yes/no"]
        assert "answer_text" not in task.collate_targets([None, {"answers": ["no"]}, None, None])
    if name == "captioning":
        assert out["answer_text"] == ["a red one", "a green square", "a blue circle", "a pink one"]  # first reference
    if name == "retrieval":
        assert out["target_text"] == ["a", "b", "a", "c"]


@pytest.mark.parametrize("name", registry("datasets").names())
def test_every_dataset_loads_with_disjoint_splits(name, tmp_path):
    block = {"name": name, **TINY.get(("datasets", name), {})}
    if name == "manifest":  # reads files: use the offline demo dataset (tones, no espeak-ng)
        from fusionkit.data.demo import write_demo

        block["path"] = str(write_demo(tmp_path, n_per_class=3, use_espeak=False).out_dir / "manifest.jsonl")
    if name == "hf_datasets":  # a tiny dataset written with save_to_disk
        from test_hf_datasets import tiny_saved_dataset

        block["path"] = str(tiny_saved_dataset(tmp_path / "hf"))
    if name == "webdataset":  # tiny tar shards
        from test_webdataset import write_shards

        block.update(write_shards(tmp_path))
    bundle = build("datasets", block).load()
    # a streamed split (webdataset) has no random access: its sample ids come from reading it
    ids = [{it["id"] for it in split} if isinstance(split, IterableDataset) else set(split.ids)
           for split in bundle.splits.values()]
    assert set(bundle.splits) >= {"train", "val", "test"}
    assert all(len(s) > 0 for s in ids)
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    train = bundle.splits["train"]
    item = next(iter(train)) if isinstance(train, IterableDataset) else train[0]
    assert set(item["inputs"]) == set(bundle.modalities)
    if bundle.info.get("task", "classification") == "vqa":  # VQA targets: reference answers
        assert item["target"]["answers"] and all(isinstance(a, str) and a for a in item["target"]["answers"])
        assert bundle.info["question_modality"] in bundle.modalities
    else:
        assert 0 <= item["target"] < len(bundle.classes)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(RegistryError, match=r"'dsm' is not a fusion; did you mean 'dms'\? \(choices: .*concat.*\)"):
        registry("fusions").get("dsm")
    with pytest.raises(RegistryError, match="is not a component kind"):
        registry("fusion")


def test_extra_and_badly_typed_keys_are_rejected_with_their_path():
    with pytest.raises(ConfigError, match=r"^model.fusion.mwcl_wieght: unknown key$"):
        registry("fusions").validate({"name": "dms", "mwcl_wieght": 0.1}, "model.fusion")
    with pytest.raises(ConfigError, match=r"model.fusion.scheduler.alpha: Input should be a valid number.*\(got 'high'\)"):
        registry("fusions").validate({"name": "dms", "scheduler": {"name": "softmax", "alpha": "high"}},
                                     "model.fusion")


def test_resolve_fills_nested_defaults():
    r = registry("fusions").resolve("dms")
    assert r["scheduler"]["name"] == "softmax" and r["scheduler"]["temperature"] > 0
    assert [s["name"] for s in r["scorers"]] == ["confidence", "mc_dropout", "agreement"]
    assert r["scheduler"]["standardize"] is True and r["route_weight"] == 1.0
    assert r["scorers"][1]["passes"] == 10


def test_registration_rules():
    reg = Registry("things")

    class NoConfig:
        pass

    with pytest.raises(RegistryError, match="needs a nested pydantic 'Config'"):
        reg.register("x")(NoConfig)

    class Loose:
        class Config(BaseModel):
            pass

    with pytest.raises(RegistryError, match="extra='forbid'"):
        reg.register("x")(Loose)

    class Good:
        """A good thing."""

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")

    class Other(Good):
        pass

    reg.register("good")(Good)
    assert reg._entries["good"].description == "A good thing."
    with pytest.raises(RegistryError, match="already registered by core"):
        reg.register("good")(Other)


def test_plugin_cannot_shadow_a_core_name(tmp_path):
    from fusionkit.registry import load_plugin

    f = tmp_path / "shadow.py"
    f.write_text(
        "from fusionkit.registry import register\n"
        "from fusionkit.fusions.mean import MeanFusion\n"
        "@register('fusions', 'dms')\n"
        "class Fake(MeanFusion):\n"
        "    pass\n")
    with pytest.raises(RegistryError, match="'dms' is already registered by core"):
        load_plugin(str(f))
