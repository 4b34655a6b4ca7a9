"""Every registered component is built from its defaults and run on a tiny input."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, RegistryError
from fusionkit.fusions.base import UnimodalHeads
from fusionkit.registry import REGISTRIES, Registry, build, registry
from fusionkit.scorers.base import ScoreContext

B, M, D, K = 4, 3, 16, 5

TINY_CLIP = {  # open_clip ViT with one block per tower, random init
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Overrides that keep a component tiny; everything else runs with its defaults.
TINY = {
    ("encoders", "timm"): {"model_name": "test_resnet", "image_size": 32},
    ("encoders", "open_clip_image"): {"model_cfg": TINY_CLIP},
    ("encoders", "open_clip_text"): {"model_cfg": TINY_CLIP},
    ("encoders", "mel_cnn"): {"model_name": "test_resnet", "n_mels": 32},
    ("encoders", "hf_audio"): {"config": {
        "model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 37, "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2],
        "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}},
    ("encoders", "frames"): {"image": {"name": "timm", "model_name": "test_resnet", "image_size": 32},
                             "num_frames": 4},
    ("encoders", "hf_video"): {"config": {
        "model_type": "videomae", "image_size": 32, "patch_size": 16, "num_frames": 4, "tubelet_size": 2,
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}},
}
SAMPLES = {  # one raw sample per modality kind
    "image": lambda: torch.rand(20, 18).numpy(),
    "text": lambda: "a handwritten seven",
    "vector": lambda: torch.randn(12).numpy(),
    "audio": lambda: (0.1 * torch.randn(1, 4000)).numpy(),  # (C, T): 0.25 s at 16 kHz
    "video": lambda: torch.randint(0, 256, (5, 20, 24, 3), dtype=torch.uint8).numpy(),  # (F, H, W, C)
}
SPECS = {"image": ModalitySpec("image", channels=1), "text": ModalitySpec("text"),
         "vector": ModalitySpec("vector", dim=12),
         "audio": ModalitySpec("audio", extra={"sample_rate": 16000}),
         "video": ModalitySpec("video", channels=3)}
SKIP_KINDS = {"corruptions", "datasets"}  # own parametrised tests (test_corruptions, below)


def _components():
    for kind in sorted(REGISTRIES):
        if kind in SKIP_KINDS:
            continue
        for name in registry(kind).names():
            yield pytest.param(kind, name, id=f"{kind}:{name}")


@pytest.mark.parametrize("kind,name", list(_components()))
def test_every_component_builds_and_runs(kind, name):
    block = {"name": name, **TINY.get((kind, name), {})}
    torch.manual_seed(0)
    if kind == "encoders":
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
    elif kind == "decoders":
        dec = build(kind, block, dim=D, num_classes=K)
        assert dec(torch.randn(B, D)).shape == (B, K)
    else:
        pytest.fail(f"kind '{kind}' has no registry-wide test: add a branch here")


@pytest.mark.parametrize("name", registry("datasets").names())
def test_every_dataset_loads_with_disjoint_splits(name, tmp_path):
    block = {"name": name}
    if name == "manifest":  # reads files: use the offline demo dataset (tones, no espeak-ng)
        from fusionkit.data.demo import write_demo

        block["path"] = str(write_demo(tmp_path, n_per_class=3, use_espeak=False).out_dir / "manifest.jsonl")
    bundle = build("datasets", block).load()
    ids = [set(split.ids) for split in bundle.splits.values()]
    assert set(bundle.splits) >= {"train", "val", "test"}
    assert all(len(s) > 0 for s in ids)
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    item = bundle.splits["train"][0]
    assert set(item["inputs"]) == set(bundle.modalities)
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
