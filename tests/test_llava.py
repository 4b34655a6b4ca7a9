"""The LLaVA-style decoder on a tiny random Llama: what it feeds the LM, and what it gets back.

Layout under test (``fusionkit/decoders/llava.py``)::

    [fused token] [image tokens] [text tokens] [prompt] [answer tokens, eos]

Most tests capture the LM call (``inputs_embeds``, ``attention_mask``, ``position_ids``, the
per-key bias and the logits) and recompute the decoder's numbers from it by hand.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fusionkit.decoders import llava
from fusionkit.decoders.llava import LlavaDecoder, pool_tokens
from fusionkit.errors import ConfigError
from fusionkit.fusions.base import FusionOutput
from fusionkit.fusions.dms import DMSFusion
from fusionkit.model import Tokens

D, K = 16, 5
MODS = ["image", "text"]  # sorted: image first in the prefix
WIDTHS = {"image": 8, "text": 6}  # token widths of the two "encoders"
# token masks of a batch of 3: different valid lengths per sample, and sample 1 has no text
IMAGE_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
TEXT_MASK = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
WEIGHTS = [[0.7, 0.3], [1.0, 0.0], [0.4, 0.6]]  # rows sum to 1 over present modalities


def make_decoder(lm, **cfg) -> LlavaDecoder:
    torch.manual_seed(0)
    dec = LlavaDecoder(LlavaDecoder.Config(lm=str(lm), **{"max_tokens": None, **cfg}), dim=D, num_classes=K)
    dec.attach(WIDTHS)
    return dec.eval()


def make_tokens(masks: dict[str, list[list[int]]], seed: int = 0) -> dict[str, Tokens]:
    """Tokens as the model hands them over: random where real, zero elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODS:
        mask = torch.tensor(masks[m], dtype=torch.bool)  # (B, L)
        values = torch.randn(*mask.shape, WIDTHS[m], generator=g)  # (B, L, width)
        out[m] = Tokens(values * mask.unsqueeze(-1), mask)
    return out


def fusion_output(weights, seed: int = 0) -> FusionOutput:
    """A fusion output with hand-made weights (mask = weight > 0)."""
    w = torch.tensor(weights)
    B, M = w.shape
    g = torch.Generator().manual_seed(seed)
    return FusionOutput(fused=torch.randn(B, D, generator=g), weights=w, unimodal_logits=torch.zeros(B, M, K),
                        mask=w > 0, z=torch.zeros(B, M, D), modalities=MODS)


def capture_lm(monkeypatch, dec) -> list[dict]:
    """Record every call of the LM's transformer (teacher forcing and each generate step): its
    keyword inputs, the per-key bias in effect and the logits at every position."""
    calls: list[dict] = []
    inner, head = dec.lm.get_decoder(), dec.lm.get_output_embeddings()
    original = inner.forward

    @functools.wraps(original)  # transformers inspects the forward signature
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append({**kwargs, "bias": llava._KEY_BIAS.get(), "logits": head(out.last_hidden_state).detach()})
        return out

    monkeypatch.setattr(inner, "forward", forward)
    return calls


def answer_ids(dec, answer: str) -> list[int]:
    """The answer's tokens (cut to max_answer_tokens) + eos."""
    tok = dec.tokenizer
    return tok(" " + answer, add_special_tokens=False)["input_ids"][: dec.config.max_answer_tokens] + [tok.eos_token_id]


def spans(dec, tokens) -> dict[str, slice]:
    """Prefix positions of each part (no pooling: max_tokens=None)."""
    L_i, L_t = tokens["image"].mask.shape[1], tokens["text"].mask.shape[1]
    P = 1 + L_i + L_t + len(dec.prompt_ids)
    return {"fused": slice(0, 1), "image": slice(1, 1 + L_i), "text": slice(1 + L_i, 1 + L_i + L_t),
            "prompt": slice(1 + L_i + L_t, P), "P": P}


# -- 1. labels -------------------------------------------------------------------------------------
def test_loss_is_cross_entropy_over_exactly_the_answer_tokens_and_eos(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm)
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    calls = capture_lm(monkeypatch, dec)
    answers = ["red", "a", "triangle"]  # " red", " a", " triangle" (9 bytes, cut to max_answer_tokens 8)
    loss = dec(fusion_output(WEIGHTS), tokens, {"answer_text": answers})
    (call,) = calls
    P = spans(dec, tokens)["P"]
    ids = [answer_ids(dec, a) for a in answers]
    assert [len(s) for s in ids] == [5, 3, 9]  # + eos; padded to 9
    A = max(len(s) for s in ids)
    embeds, attention, logits = call["inputs_embeds"], call["attention_mask"], call["logits"]
    assert embeds.shape == (3, P + A, dec.hidden) and attention.shape == (3, P + A)

    embed = dec.lm.get_input_embeddings()
    expected_nll = []
    for i, seq in enumerate(ids):
        n = len(seq)
        # the answer, right-padded: attended up to eos, masked after
        assert attention[i, P:].tolist() == [1] * n + [0] * (A - n)
        assert torch.equal(embeds[i, P : P + n], embed(torch.tensor(seq)))
        # position t predicts token t + 1: the answer's j-th token comes from position P - 1 + j
        logp = logits[i, P - 1 : P - 1 + n].float().log_softmax(-1)  # (n, V)
        expected_nll.append(-logp[torch.arange(n), torch.tensor(seq)])
    expected = torch.cat(expected_nll).mean()  # 17 tokens: every prefix, prompt and pad position ignored
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # positions count attended tokens only (what generate derives from the mask)
    pos = call["position_ids"]
    for i in range(3):
        real = attention[i].bool()
        assert pos[i, real].tolist() == list(range(int(real.sum())))


def test_prefix_padding_and_prompt_are_in_the_attention_mask_as_documented(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm)
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    calls = capture_lm(monkeypatch, dec)
    dec(fusion_output(WEIGHTS), tokens, {"answer_text": ["no", "no", "no"]})
    s = spans(dec, tokens)
    attention = calls[0]["attention_mask"]
    assert attention[:, s["fused"]].tolist() == [[1]] * 3
    assert attention[:, s["image"]].tolist() == IMAGE_MASK
    assert attention[:, s["text"]].tolist() == TEXT_MASK  # sample 1 has no text: all 0
    assert attention[:, s["prompt"]].eq(1).all()


# -- 2. generation ---------------------------------------------------------------------------------
def test_generate_returns_one_string_per_sample_with_mixed_masks_and_beams(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm, max_new_tokens=3)
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    torch.manual_seed(0)
    fusion = DMSFusion(MODS, dim=D, num_classes=K).eval()
    present = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    fused = fusion({m: torch.randn(3, D) for m in MODS}, present)
    assert fused.weights[1].tolist() == [1.0, 0.0]

    calls = capture_lm(monkeypatch, dec)
    dec(fused, tokens, {"answer_text": ["x", "x", "x"]})
    P = spans(dec, tokens)["P"]
    teacher = calls[0]["logits"][:, P - 1]  # (B, V): the next-token logits after the prefix

    generated = []
    original = dec.lm.generate

    @functools.wraps(original)
    def spy(*args, **kwargs):
        generated.append(original(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(dec.lm, "generate", spy)
    texts = dec.generate(fused, tokens)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    ids = generated[-1]
    assert ids.shape[0] == 3 and 1 <= ids.shape[1] <= 3
    # generate's first step sees the same prefix, positions and bias as the teacher-forced pass
    step = calls[1]
    assert step["inputs_embeds"].shape[1] == P
    assert torch.equal(step["bias"], calls[0]["bias"][:, :P])
    assert torch.allclose(step["logits"][:, -1], teacher, atol=1e-5)
    assert torch.equal(ids[:, 0], teacher.argmax(-1))
    assert texts == [t.strip() for t in dec.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    dec.config = dec.config.model_copy(update={"num_beams": 2})
    n_calls = len(calls)
    beams = dec.generate(fused, tokens)
    assert isinstance(beams, list) and len(beams) == 3 and all(isinstance(t, str) for t in beams)
    assert generated[-1].shape[0] == 3  # one sequence per sample, not per beam
    # beam rows (B * beams) start from their own sample's prefix, bias included
    step = calls[n_calls]
    assert step["inputs_embeds"].shape[:2] == (6, P)
    assert torch.allclose(step["logits"][:, -1], teacher.repeat_interleave(2, dim=0), atol=1e-5)


# -- 3. a missing modality cannot matter -----------------------------------------------------------
def test_a_missing_modality_is_masked_and_its_values_cannot_change_the_output(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm, max_new_tokens=3)
    # sample 1 lacks text, yet its text tokens claim to be real: the fusion mask must win
    text_mask = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    fused = fusion_output(WEIGHTS)
    batch = {"answer_text": ["red", "blue", "yes"]}
    calls = capture_lm(monkeypatch, dec)

    def run(tokens):
        loss = dec(fused, tokens, batch)
        return loss, calls[-1]["logits"], dec.generate(fused, tokens)

    base = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    loss0, logits0, text0 = run(base)
    s = spans(dec, base)
    assert calls[0]["attention_mask"][1, s["text"]].eq(0).all()
    assert calls[0]["bias"][1, s["text"]].eq(0).all()

    other = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    other["text"].tokens[1] = 100 * torch.randn(4, WIDTHS["text"])  # new values for the missing modality
    loss1, logits1, text1 = run(other)
    assert torch.equal(logits1, logits0)
    assert torch.equal(loss1, loss0)
    assert text1 == text0

    present = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    present["image"].tokens[1, :2] = 100 * torch.randn(2, WIDTHS["image"])  # sample 1's real image tokens
    loss2, logits2, _ = run(present)
    assert not torch.equal(logits2[1], logits0[1])
    assert torch.equal(logits2[0], logits0[0])  # other samples are untouched
    assert loss2.item() != loss0.item()


# -- 4. how the DMS weights reach the LM -----------------------------------------------------------
def test_scale_multiplies_each_modalitys_embeddings_by_m_times_w(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm, weighting="scale")
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    calls = capture_lm(monkeypatch, dec)
    dec(fusion_output(WEIGHTS), tokens, {"answer_text": ["no"] * 3})
    embeds, s = calls[0]["inputs_embeds"], spans(dec, tokens)
    rel = torch.tensor(WEIGHTS) * torch.tensor([[2.0], [1.0], [2.0]])  # M_b * w_m
    for j, m in enumerate(MODS):
        t = tokens[m]
        expected = dec.projectors[m](t.tokens) * rel[:, j, None, None] * t.mask.unsqueeze(-1)  # (B, L, H)
        assert torch.allclose(embeds[:, s[m]], expected, atol=1e-6)
    assert (embeds[0, s["image"]] != 0).all()
    assert calls[0]["bias"] is None or calls[0]["bias"].eq(0).all()  # scale alone adds no bias


def test_bias_is_log_m_times_w_on_each_modalitys_keys_and_zero_elsewhere(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm, weighting="bias")
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    calls = capture_lm(monkeypatch, dec)
    dec(fusion_output(WEIGHTS), tokens, {"answer_text": ["no"] * 3})
    bias, s = calls[0]["bias"], spans(dec, tokens)
    assert bias.shape == calls[0]["attention_mask"].shape  # (B, P + A): the answer carries none
    expected = torch.zeros_like(bias)
    for i, (w, n) in enumerate(zip(WEIGHTS, [2, 1, 2])):
        for j, m in enumerate(MODS):
            real = tokens[m].mask[i]
            expected[i, s[m]] = torch.where(real, math.log(n * w[j]) if w[j] > 0 else 0.0, 0.0)
    assert torch.allclose(bias, expected, atol=1e-6)
    assert bias[0, s["image"]][0].item() == pytest.approx(math.log(1.4))
    assert bias[2, s["text"]][0].item() == pytest.approx(math.log(1.2))
    # embeddings are not scaled under "bias"
    t = tokens["image"]
    assert torch.allclose(calls[0]["inputs_embeds"][:, s["image"]],
                          dec.projectors["image"](t.tokens) * t.mask.unsqueeze(-1), atol=1e-6)


def test_uniform_weights_give_zero_bias(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm, weighting="both")
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    calls = capture_lm(monkeypatch, dec)
    dec(fusion_output([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]), tokens, {"answer_text": ["no"] * 3})
    assert torch.equal(calls[0]["bias"], torch.zeros_like(calls[0]["bias"]))


def test_lowering_a_weight_lowers_the_attention_mass_on_that_modality(tiny_lm):
    """Layer 0, last prefix query: attention mass on the image keys as w_image goes 0.8 -> 0.5 -> 0.2.

    The attention function is wrapped to recompute softmax(QK^T * scale + mask + bias), checked
    against the output SDPA really produced."""
    from transformers import AttentionInterface

    dec = make_decoder(tiny_lm, weighting="bias")
    ws = [0.8, 0.5, 0.2]
    one = {"image": [[1, 1, 1]], "text": [[1, 1, 1, 1]]}
    single = make_tokens(one)
    tokens = {m: Tokens(t.tokens.expand(3, -1, -1), t.mask.expand(3, -1)) for m, t in single.items()}
    probs = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        out, weights = llava._biased_sdpa(module, query, key, value, attention_mask, **kwargs)
        if module.layer_idx == 0:
            q, kv = query.shape[2], key.shape[2]
            scores = query @ key.transpose(-1, -2) * kwargs["scaling"]  # (B, heads, q, kv)
            if attention_mask is None:
                attention_mask = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
            scores = scores + llava._KEY_BIAS.get()[:, None, None, :kv]
            p = scores.softmax(-1)  # (B, heads, q, kv)
            assert torch.allclose((p @ value).transpose(1, 2), out, atol=1e-5)
            probs.append(p)
        return out, weights

    AttentionInterface.register(llava.ATTENTION, spy)
    try:
        dec(fusion_output([[w, 1 - w] for w in ws]), tokens, {"answer_text": ["no"] * 3})
    finally:
        llava.register_biased_attention()
    s = spans(dec, tokens)
    (p,) = probs
    mass = p[:, :, s["P"] - 1, s["image"]].sum(-1).mean(1)  # (B,): mean over heads
    assert mass[0] > mass[1] > mass[2] > 0
    other = p[:, :, s["P"] - 1, s["text"]].sum(-1).mean(1)
    assert other[0] < other[1] < other[2]


# -- 5. context length -----------------------------------------------------------------------------
def test_a_prefix_longer_than_the_lm_context_is_a_config_error(tiny_lm):
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    fused = fusion_output(WEIGHTS)
    # byte-level tokenizer: one token per character; context 256 = 1 + 3 + 4 + prompt + answer
    answer = {"answer_text": ["red"] * 3}  # " red" + eos: 5 tokens
    fits = make_decoder(tiny_lm, prompt="x" * (256 - 8 - 5))
    assert fits.context == 256
    assert torch.isfinite(fits(fused, tokens, answer))
    long = make_decoder(tiny_lm, prompt="x" * (256 - 8 - 5 + 1))
    with pytest.raises(ConfigError, match=r"257 tokens.*at most 256.*decoder\.max_tokens.*decoder\.prompt"):
        long(fused, tokens, answer)
    with pytest.raises(ConfigError, match=r"at most 256.*decoder\.max_tokens.*decoder\.prompt"):
        long.generate(fused, tokens)


# -- 6. pooling ------------------------------------------------------------------------------------
def test_pool_tokens_averages_real_tokens_in_contiguous_groups():
    tokens = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]]).unsqueeze(-1)  # (2, 5, 1)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    pooled, pmask = pool_tokens(tokens, mask, 2)  # groups of 3: [0, 1, 2], [3, 4, pad]
    assert pooled.squeeze(-1).tolist() == [[1.5, 4.0], [0.0, 45.0]]
    assert pmask.tolist() == [[True, True], [False, True]]
    pooled, pmask = pool_tokens(tokens, mask, 3)  # groups of 2: [0, 1], [2, 3], [4, pad]
    assert pooled.squeeze(-1).tolist() == [[1.5, 4.0, 0.0], [0.0, 40.0, 50.0]]
    assert pmask.tolist() == [[True, True, False], [False, True, True]]
    same, same_mask = pool_tokens(tokens, mask, 5)
    assert same is tokens and same_mask is mask
    assert pool_tokens(tokens, mask, None)[0] is tokens


# -- 7. checkpoints --------------------------------------------------------------------------------
def _model(lm, seed: int, **cfg):
    from fusionkit.encoders.base import ModalitySpec
    from fusionkit.fusions.mean import MeanFusion
    from fusionkit.model import MultimodalModel
    from fusionkit.registry import build

    torch.manual_seed(seed)
    encoders = {m: build("encoders", {"name": "mlp", "hidden": WIDTHS[m]}, spec=ModalitySpec("vector", dim=4))
                for m in MODS}
    dec = LlavaDecoder(LlavaDecoder.Config(lm=str(lm), **cfg), dim=D, num_classes=K)
    dec.attach({m: e.token_dim for m, e in encoders.items()})
    return MultimodalModel(encoders, MeanFusion(MODS, D, K), dec, D)


def test_frozen_lm_weights_stay_out_of_checkpoints_and_are_rebuilt_on_load(tiny_lm, tmp_path):
    from safetensors import safe_open

    from fusionkit.training.checkpoint import load_weights, save_checkpoint

    model = _model(tiny_lm, seed=0)
    dec = model.decoder
    lm_keys = {f"lm.{k}" for k, _ in dec.lm.named_parameters()}
    assert len(lm_keys) > 10 and dec.external_state() == lm_keys
    assert {k for k in dec.state_dict() if k.startswith("lm.")} <= lm_keys  # nothing else of the LM is saved
    assert model.external_state() == {f"decoder.{k}" for k in lm_keys}

    path = save_checkpoint(tmp_path, "best", model, {"epoch": 1})
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    assert not [k for k in saved if k.startswith("decoder.lm.")]
    assert {"decoder.fused_proj.0.weight", "decoder.projectors.image.0.weight",
            "decoder.projectors.text.2.bias"} <= saved

    fresh = _model(tiny_lm, seed=1)
    proj = "decoder.projectors.image.0.weight"
    assert not torch.equal(fresh.state_dict()[proj], model.state_dict()[proj])
    assert load_weights(fresh, path) == {"epoch": 1, "rebuilt_encoders": {}}  # no frozen file-backed encoder here
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # projectors from the file, the LM from its folder


def test_a_fully_trained_lm_is_part_of_the_checkpoint(tiny_lm):
    dec = make_decoder(tiny_lm, trainable="full")
    assert dec.external_state() == set()
    assert all(p.requires_grad for p in dec.lm.parameters())
