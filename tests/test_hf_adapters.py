"""Pretrained BLIP-2 / LLaVA checkpoints behind DMS (``hf_blip2``, ``hf_llava`` and their image encoders).

Everything runs on tiny random checkpoints written by ``save_pretrained`` (:mod:`fusionkit.lm.tiny_vlm`):
the adapters must load such a folder, feed the LM exactly the image tokens the checkpoint's own
modules compute, train and generate with DMS in between, mask a missing image, and keep the frozen
checkpoint weights out of fusionkit checkpoints. Real 2.7B / 7B checkpoints are never loaded here.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_CLIP
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError
from fusionkit.lm.tiny_vlm import IMAGE_SIZE, WIDTH, save_tiny_vlm
from fusionkit.registry import build, registry

FAMILIES = ["blip2", "llava"]
N_TOKENS = {"blip2": 4, "llava": 16}  # query tokens; (32 px / 8 px patches)^2 without CLS
D, K = 16, 3
MODS = ["image", "text"]  # sorted: the image's tokens come first in the prefix
IMAGE = ModalitySpec("image", channels=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlm")
    return {f: str(save_tiny_vlm(f, root / f)) for f in FAMILIES}


def official(folder: str, family: str):
    """The full checkpoint as transformers loads it: the reference the adapters must match."""
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    cls = Blip2ForConditionalGeneration if family == "blip2" else LlavaForConditionalGeneration
    return cls.from_pretrained(folder).eval()


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 images of odd sizes (the processor resizes them)."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (20 + 3 * i, 18, 3), dtype=np.uint8) for i in range(n)]


def image_encoder(folder: str, family: str, **cfg):
    torch.manual_seed(0)
    return build("encoders", {"name": f"hf_{family}_vision", "model": folder, **cfg}, spec=IMAGE)


def decoder(folder: str, family: str, **cfg):
    torch.manual_seed(0)
    dec = build("decoders", {"name": f"hf_{family}", "model": folder, "max_new_tokens": 3, **cfg},
                dim=D, num_classes=K)
    dec.attach({"image": WIDTH, "text": 8})
    return dec


def model(folder: str, family: str, **dec_cfg):
    """image: the checkpoint's image path; text: a tiny open_clip text tower; DMS; the adapter decoder."""
    from fusionkit.model import MultimodalModel

    torch.manual_seed(0)
    text = build("encoders", {"name": "open_clip_text", "model_cfg": TINY_CLIP, "trainable": True},
                 spec=ModalitySpec("text"))
    encoders = {"image": image_encoder(folder, family), "text": text}
    fusion = build("fusions", "dms", modalities=MODS, dim=D, num_classes=K)
    dec = build("decoders", {"name": f"hf_{family}", "model": folder, "max_new_tokens": 3, **dec_cfg},
                dim=D, num_classes=K)
    dec.attach({m: e.token_dim for m, e in encoders.items()})
    return MultimodalModel(encoders, fusion, dec, D)


def batch_of(m, pictures, has_image, questions=("what colour?", "which shape is it", "is it red?")):
    """A collated batch as the data loader builds it (samples without an image have none)."""
    from fusionkit.data.loader import Collate

    items = [{"inputs": {"image": m.encoders["image"].preprocess(p) if has else None,
                         "text": m.encoders["text"].preprocess(q)}, "target": i % K, "index": i}
             for i, (p, has, q) in enumerate(zip(pictures, has_image, questions))]
    batch = Collate(dict(m.encoders))(items)
    batch["answer_text"] = ["red", "circle", "no"][: len(items)]
    return batch


def capture_lm(monkeypatch, dec) -> list[dict]:
    """Record the inputs of every call of the LM's transformer, with the per-key bias in effect."""
    from fusionkit.decoders import llava

    calls: list[dict] = []
    inner = dec.lm.get_decoder()
    original = inner.forward

    @functools.wraps(original)  # transformers inspects the signature
    def forward(*args, **kwargs):
        calls.append({**kwargs, "bias": llava._KEY_BIAS.get()})
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, "forward", forward)
    return calls


# -- 1. the checkpoint's own image path and LM ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_encoder_is_the_checkpoints_image_path_with_its_preprocessing(folders, family):
    from transformers import AutoImageProcessor

    enc = image_encoder(folders[family], family)
    ref = official(folders[family], family)
    pictures = images(3)
    pixels = enc.collate([enc.preprocess(p) for p in pictures])  # (3, 3, S, S)
    assert pixels.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    own = AutoImageProcessor.from_pretrained(folders[family])(images=pictures, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, own, atol=1e-6)  # the checkpoint's own resize, crop and mean/std
    gray = enc.preprocess(np.full((9, 7), 0.5, dtype=np.float32))  # float in [0, 1], one channel
    assert gray.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and torch.allclose(gray[:, 0, 0], own.new_tensor(
        [(0.5 - mu) / sd for mu, sd in zip(enc.processor.image_mean, enc.processor.image_std)]), atol=1e-5)

    with torch.no_grad():
        out = enc.encode(pixels)
        if family == "blip2":  # language_projection(qformer(query_tokens, vision(pixels)))
            vision = ref.vision_model(pixels).last_hidden_state  # (B, 1 + 16, 32)
            queries = ref.qformer(query_embeds=ref.query_tokens.expand(3, -1, -1),
                                  encoder_hidden_states=vision).last_hidden_state  # (B, 4, 32)
            expected = ref.language_projection(queries)  # (B, 4, H)
        else:  # the checkpoint's get_image_features (layer -2, CLS dropped, projector)
            expected = torch.stack(list(ref.get_image_features(pixels).pooler_output))  # (B, 16, H)
    assert out.tokens.shape == (3, N_TOKENS[family], WIDTH) == expected.shape
    assert torch.allclose(out.tokens, expected, atol=1e-6)
    assert torch.allclose(out.pooled, expected.mean(1), atol=1e-6)  # the vector DMS scores
    assert enc.out_dim == enc.token_dim == WIDTH and out.token_mask.all()
    assert enc.frozen and not enc.train().vlm.training  # frozen by default, so it stays in eval mode
    assert sum(p.numel() for p in enc.parameters()) < sum(p.numel() for p in ref.parameters()) / 2  # no LM inside


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_lm_is_the_checkpoints_lm_and_reads_the_image_tokens_unchanged(folders, family, monkeypatch):
    from fusionkit.fusions.base import FusionOutput
    from fusionkit.model import Tokens

    dec = decoder(folders[family], family).eval()
    ref = official(folders[family], family)
    ids = torch.tensor([[5, 70, 80, 90, 100]])
    with torch.no_grad():
        lm_logits = dec.lm(input_ids=ids).logits
        ref_logits = (ref.language_model if family == "blip2" else ref)(input_ids=ids).logits
    assert torch.allclose(lm_logits, ref_logits, atol=1e-5)
    assert isinstance(dec.projectors["image"], nn.Identity) and not isinstance(dec.projectors["text"], nn.Identity)

    enc = image_encoder(folders[family], family)
    with torch.no_grad():
        image_tokens = enc.encode(enc.collate([enc.preprocess(p) for p in images(2)])).tokens  # (2, N, H)
    N = N_TOKENS[family]
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0]])  # sample 1 has no text
    fused = FusionOutput(fused=torch.randn(2, D), weights=w, unimodal_logits=torch.zeros(2, 2, K), mask=w > 0,
                         z=torch.zeros(2, 2, D), modalities=MODS)
    tokens = {"image": Tokens(image_tokens, torch.ones(2, N, dtype=torch.bool)),
              "text": Tokens(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))}
    calls = capture_lm(monkeypatch, dec)
    dec(fused, tokens, {"answer_text": ["red", "no"]})
    (call,) = calls
    embeds = call["inputs_embeds"]  # [fused][image N][text 5][prompt][answer]
    assert torch.equal(embeds[:, 1 : 1 + N], image_tokens)  # the checkpoint's tokens, unpooled and unprojected
    # DMS as in llava: log(M_b w_m) on the image keys, the missing text masked
    assert torch.allclose(call["bias"][:, 1 : 1 + N], torch.tensor([[math.log(1.4)], [0.0]]).expand(2, N))
    assert call["attention_mask"][1, 1 + N : 1 + N + 5].eq(0).all()


# -- 2. training and generation through the whole model ------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_dms_training_step_and_generation(folders, family):
    m = model(folders[family], family)
    batch = batch_of(m, images(3), has_image=[True, False, True])
    m.train()
    out = m(batch)
    w = out.fusion.weights  # (B, M)
    assert w[1].tolist() == [0.0, 1.0] and torch.allclose(w.sum(1), torch.ones(3))
    loss = out.lm_loss + sum(m.fusion.loss_terms(out.fusion, batch["target"]).values())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    text_proj = list(m.decoder.projectors["text"].parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in text_proj)
    assert any(p.grad.abs().sum() > 0 for p in text_proj)
    assert all(p.grad is None for p in m.decoder.lm.parameters())  # frozen LM
    assert all(p.grad is None for p in m.encoders["image"].parameters())  # frozen image path
    assert m.decoder.fused_proj[0].weight.grad.abs().sum() > 0

    m.eval()
    texts = m.generate(batch)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_missing_image_is_masked_so_its_pixels_change_nothing(folders, family, monkeypatch):
    """The image path runs on every sample's pixels, but sample 1's image is marked missing."""
    from fusionkit.model import Tokens

    m = model(folders[family], family).eval()
    enc, dec = m.encoders["image"], m.decoder
    calls = capture_lm(monkeypatch, dec)
    present = torch.tensor([[True, True], [False, True], [True, True]])
    batch = {"answer_text": ["red", "circle", "no"]}
    text = Tokens(torch.randn(3, 4, m.encoders["text"].token_dim), torch.ones(3, 4, dtype=torch.bool))
    with torch.no_grad():  # once: the MC-dropout scorer draws new masks on every call
        fused = m.fusion({mod: torch.randn(3, D) for mod in MODS}, present)

    def run(pictures):
        with torch.no_grad():
            image = enc.encode(enc.collate([enc.preprocess(p) for p in pictures]))
            tokens = {"image": Tokens(image.tokens, image.token_mask), "text": text}
            return dec(fused, tokens, batch), dec.generate(fused, tokens), image.tokens

    pictures = images(3)
    loss0, text0, tokens0 = run(pictures)
    N = N_TOKENS[family]
    assert calls[0]["attention_mask"][1, 1 : 1 + N].eq(0).all()  # every image position masked for sample 1
    assert calls[0]["bias"][1, 1 : 1 + N].eq(0).all()

    other = list(pictures)
    other[1] = 255 - pictures[1]  # new pixels for the missing image
    loss1, text1, tokens1 = run(other)
    assert not torch.equal(tokens1[1], tokens0[1])  # the image path did see different pixels
    assert torch.equal(loss1, loss0) and text1 == text0

    other[0] = 255 - pictures[0]  # a present image: now it matters
    loss2, _, _ = run(other)
    assert loss2.item() != loss0.item()


# -- 3. checkpoints stay small -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_external_state_lists_the_frozen_checkpoint_weights(folders, family, tmp_path):
    from safetensors import safe_open

    from fusionkit.training.checkpoint import save_checkpoint

    m = model(folders[family], family)
    dec = m.decoder
    lm_keys = {f"lm.{k}" for k in dec.lm.state_dict()}  # OPT's head is tied to its embeddings: both names
    assert len(lm_keys) > 10 and dec.external_state() == lm_keys
    with safe_open(str(save_checkpoint(tmp_path, "best", m, {"epoch": 1})), "pt") as f:
        saved = set(f.keys())
    assert not [k for k in saved if k.startswith("decoder.lm.")]
    assert {"decoder.projectors.text.0.weight", "decoder.fused_proj.0.weight"} <= saved
    assert not [k for k in saved if k.startswith("decoder.projectors.image")]  # identity: nothing to store

    enc = m.encoders["image"]
    assert enc.external_state() == {f"vlm.{k}" for k, _ in enc.vlm.named_parameters()}
    head = image_encoder(folders[family], family, trainable=1)  # the last block: the projection into the LM
    trained = {k for k, p in head.vlm.named_parameters() if p.requires_grad}
    last = "language_projection." if family == "blip2" else "model.multi_modal_projector."
    assert trained and all(k.startswith(last) for k in trained)
    assert head.external_state() == {f"vlm.{k}" for k, _ in head.vlm.named_parameters()} - {f"vlm.{k}" for k in trained}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_adapters_only_and_keeps_the_base_lm_external(folders, family):
    dec = decoder(folders[family], family, trainable="lora")
    lora = {k for k, p in dec.lm.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    assert dec.external_state() == {f"lm.{k}" for k in dec.lm.state_dict()} - {f"lm.{k}" for k in lora}
    from fusionkit.fusions.base import FusionOutput
    from fusionkit.model import Tokens

    w = torch.tensor([[0.5, 0.5]])
    fused = FusionOutput(fused=torch.randn(1, D), weights=w, unimodal_logits=torch.zeros(1, 2, K), mask=w > 0,
                         z=torch.zeros(1, 2, D), modalities=MODS)
    N = N_TOKENS[family]
    tokens = {"image": Tokens(torch.randn(1, N, WIDTH), torch.ones(1, N, dtype=torch.bool)),
              "text": Tokens(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))}
    dec(fused, tokens, {"answer_text": ["red"]}).backward()
    assert all(p.grad is not None for k, p in dec.lm.named_parameters() if k in lora)


# -- 4. errors a user can fix ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,name", [("decoders", "hf_blip2"), ("decoders", "hf_llava"),
                                       ("encoders", "hf_blip2_vision"), ("encoders", "hf_llava_vision")])
def test_an_uncached_hub_id_offline_is_a_one_line_config_error(kind, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too: nothing is ever downloaded
    context = {"dim": D, "num_classes": K} if kind == "decoders" else {"spec": IMAGE}
    default = registry(kind).get(name).Config().model  # Salesforce/blip2-opt-2.7b, llava-hf/llava-1.5-7b-hf
    with pytest.raises(ConfigError) as err:
        build(kind, {"name": name}, **context)
    message = str(err.value)
    assert "\n" not in message and f"model '{default}' cannot be loaded offline" in message
    assert "local folder" in message


def test_config_mistakes_are_config_errors_that_name_the_fix(folders):
    with pytest.raises(ConfigError, match=r"'llava' checkpoint, not 'blip-2'; use the hf_llava components"):
        build("decoders", {"name": "hf_blip2", "model": folders["llava"]}, dim=D, num_classes=K)
    with pytest.raises(ConfigError, match=r"'blip-2' checkpoint, not 'llava'"):
        build("encoders", {"name": "hf_llava_vision", "model": folders["blip2"]}, spec=IMAGE)
    with pytest.raises(ConfigError, match=r"set `model`, not `lm`"):
        registry("decoders").validate({"name": "hf_llava", "lm": "bundled:smollm2-135m-instruct"}, "model.decoder")
    with pytest.raises(ConfigError, match=r"is not a folder"):
        build("encoders", {"name": "hf_llava_vision", "model": "/no/such/folder"}, spec=IMAGE)
    # the resolved block (what a run folder stores) validates again, without the internal `lm`
    resolved = registry("decoders").resolve({"name": "hf_llava", "model": folders["llava"]}, "model.decoder")
    assert "lm" not in resolved and resolved["model"] == folders["llava"] and resolved["max_tokens"] is None
    assert registry("decoders").validate(resolved, "model.decoder")[1].lm == folders["llava"]

    dec = build("decoders", {"name": "hf_llava", "model": folders["llava"]}, dim=D, num_classes=K)
    with pytest.raises(ConfigError, match=r"image_modality 'image' is not among the modalities \['photo', 'text'\]"):
        dec.attach({"photo": WIDTH, "text": 8})
    with pytest.raises(ConfigError, match=r"gives 96-wide tokens but the LM .* is 32 wide; use encoder hf_llava_vision"):
        dec.attach({"image": 96, "text": 8})


def test_each_half_loads_alone_and_a_missing_weight_is_an_error_not_a_random_init(folders, tmp_path):
    """A LLaVA folder whose LM weights were removed: the image path still loads, the LM does not."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = folders["llava"], tmp_path / "no_lm"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("language_model.")}  # llava-hf layout
    assert 0 < len(kept) < len(weights)
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})

    enc = image_encoder(str(dst), "llava")
    assert torch.equal(enc.encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).tokens,
                       image_encoder(src, "llava").encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).tokens)
    with pytest.raises(ConfigError, match=r"lacks \d+ weights of its language model \(first: "):
        build("decoders", {"name": "hf_llava", "model": str(dst)}, dim=D, num_classes=K)


def test_the_llava_hf_hub_key_layout_loads_into_both_halves(folders, tmp_path):
    """llava-hf checkpoints keep CLIP's inner ``vision_model.`` in their keys (``vision_tower.vision_model.*``),
    which transformers 5 renames on load; both halves must get the same weights as the full model does."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = folders["llava"], tmp_path / "hub_layout"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in hub)
    save_file(hub, str(dst / "model.safetensors"), metadata={"format": "pt"})

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = image_encoder(src, "llava").encode(pixels).tokens
        assert torch.equal(image_encoder(str(dst), "llava").encode(pixels).tokens, expected)
        ids = torch.tensor([[5, 70, 80]])
        assert torch.equal(decoder(str(dst), "llava").lm(input_ids=ids).logits,
                           decoder(src, "llava").lm(input_ids=ids).logits)


def test_a_blip2_checkpoint_with_an_encoder_decoder_lm_is_refused(tmp_path):
    """BLIP-2 Flan-T5: the T5 cannot read a prefix of embeddings as a causal LM; refused before loading it."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    from fusionkit.lm.testing import byte_tokenizer

    tok = byte_tokenizer()
    t5 = T5Config(vocab_size=len(tok), d_model=WIDTH, d_kv=8, d_ff=2 * WIDTH, num_layers=1, num_heads=4,
                  decoder_start_token_id=tok.pad_token_id)
    config = Blip2Config(vision_config={"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8},
                         qformer_config={"hidden_size": WIDTH, "num_hidden_layers": 1, "num_attention_heads": 4,
                                         "intermediate_size": 64, "encoder_hidden_size": WIDTH},
                         text_config=t5.to_dict(), num_query_tokens=2)
    assert not config.use_decoder_only_language_model
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"^decoder hf_blip2: .* has an encoder-decoder LM \(Flan-T5\); only BLIP-2 checkpoints"):
        build("decoders", {"name": "hf_blip2", "model": str(tmp_path)}, dim=D, num_classes=K)
