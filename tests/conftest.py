"""Shared fixtures: tiny configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# feature caches the tests fill stay out of the user's ~/.cache: one folder per test session,
# deleted when the session ends (pytest_sessionfinish)
_OWN_FEATURE_CACHE = None
if "FUSIONKIT_FEATURE_CACHE" not in os.environ:
    import tempfile

    _OWN_FEATURE_CACHE = os.environ["FUSIONKIT_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="fusionkit-test-features-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_FEATURE_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_FEATURE_CACHE, ignore_errors=True)

from fusionkit.encoders.base import ModalitySpec  # noqa: E402  (after the offline switches)

REPO = Path(__file__).resolve().parents[1]
FUSIONKIT = Path(sys.executable).with_name("fusionkit")

# vectors only: trains in about a second per epoch
TINY = ["train.epochs=1", "train.batch_size=128", "model.dim=32", "runtime.accelerator=cpu"]


# -- tiny encoders: shared by the registry-wide tests (test_registry, test_encoder_tokens) -----
TINY_CLIP = {  # open_clip ViT with one block per tower, random init
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Encoder name -> overrides that keep it tiny and offline; everything else runs with its defaults.
TINY_ENCODERS = {
    "timm": {"model_name": "test_resnet", "image_size": 32},
    "open_clip_image": {"model_cfg": TINY_CLIP},
    "open_clip_text": {"model_cfg": TINY_CLIP},
    "mel_cnn": {"model_name": "test_resnet", "n_mels": 32},
    "hf_audio": {"config": {
        "model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 37, "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2],
        "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}},
    "frames": {"image": {"name": "timm", "model_name": "test_resnet", "image_size": 32}, "num_frames": 4},
    "hf_video": {"config": {
        "model_type": "videomae", "image_size": 32, "patch_size": 16, "num_frames": 4, "tubelet_size": 2,
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}},
}
# One raw sample per modality kind; sample i > 0 differs in length (text, audio: longer; video:
# fewer frames, down to one), so a batch of them needs padding.
ENCODER_SAMPLES = {
    "image": lambda i=0: torch.rand(20, 18).numpy(),
    "text": lambda i=0: "a handwritten seven" + " written again" * i,
    "vector": lambda i=0: torch.randn(12).numpy(),
    "audio": lambda i=0: (0.1 * torch.randn(1, 4000 + 2000 * i)).numpy(),  # (C, T): 0.25 s at 16 kHz, longer
    "video": lambda i=0: torch.randint(0, 256, (max(1, 5 - 2 * i), 20, 24, 3), dtype=torch.uint8).numpy(),
}
ENCODER_SPECS = {"image": ModalitySpec("image", channels=1), "text": ModalitySpec("text"),
                 "vector": ModalitySpec("vector", dim=12),
                 "audio": ModalitySpec("audio", extra={"sample_rate": 16000}),
                 "video": ModalitySpec("video", channels=3)}


_TINY_VLMS: dict[str, str] = {}


def tiny_vlm(family: str) -> str:
    """Folder of a tiny random BLIP-2 (``blip2``) or LLaVA (``llava``) checkpoint, written once per session."""
    if family not in _TINY_VLMS:
        import tempfile

        from fusionkit.lm.tiny_vlm import save_tiny_vlm

        _TINY_VLMS[family] = str(save_tiny_vlm(family, tempfile.mkdtemp(prefix=f"tiny-{family}-")))
    return _TINY_VLMS[family]


def tiny_overrides(kind: str, name: str) -> dict:
    """Registry-wide tiny settings for a component; checkpoint adapters get a tiny local checkpoint."""
    if kind == "encoders" and name in ("hf_blip2_vision", "hf_llava_vision"):
        return {"model": tiny_vlm(name.split("_")[1])}
    return dict(TINY_ENCODERS.get(name, {})) if kind == "encoders" else {}


def tiny_encoder(name: str, **overrides):
    """Registered encoder ``name`` on its tiny config (plus ``overrides``), seeded, for the spec of
    its first modality kind; returns ``(encoder, sample)`` with ``sample(i)`` one raw input."""
    from fusionkit.registry import build, registry

    kind = registry("encoders").get(name).kinds[0]
    torch.manual_seed(0)
    enc = build("encoders", {"name": name, **tiny_overrides("encoders", name), **overrides}, spec=ENCODER_SPECS[kind])
    return enc, ENCODER_SAMPLES[kind]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``fusionkit`` console script; returns the completed process."""
    return subprocess.run([str(FUSIONKIT), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One 2-epoch DMS run on two vector views, shared by the eval/config tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                   *TINY, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# -- a tiny random language model saved as a folder (any HF causal LM folder is a decoder LM) ---
def save_tiny_lm(path: Path) -> Path:
    from fusionkit.lm.testing import tiny_llama

    model, tokenizer = tiny_llama(hidden=32, layers=2, heads=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """Folder of a random-init 2-layer Llama (width 32) with a byte-level tokenizer."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def tiny_vqa_overrides(lm: Path, fusion: str = "dms") -> list[str]:
    """easy_vqa with a few hundred questions, a tiny random image encoder, the bundled MiniLM for
    the question and the tiny LM."""
    return ["data={name: easy_vqa, max_train_questions: 200, max_test_questions: 40}",
            "model.encoders.image={name: timm, model_name: test_resnet, image_size: 32, pretrained: false, "
            "trainable: true}",
            "model.dim=32",
            f"model.decoder={{name: llava, lm: '{lm}', max_tokens: 4, max_new_tokens: 3}}",
            f"model.fusion={{name: {fusion}}}", "train.epochs=1", "train.batch_size=32",
            "runtime.accelerator=cpu"]
