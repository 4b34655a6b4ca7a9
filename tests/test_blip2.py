"""The BLIP-2-style Q-Former decoder on a tiny random Llama (``fusionkit/decoders/blip2.py``).

Layout under test::

    [fused token] [N_q query outputs] [prompt] [answer tokens, eos]

The Q-Former's numbers are recomputed from its parts: the cross-attention bias ``(B, K)``, the
attention probabilities of layer 0 (checked against what SDPA produced) and the LM call captured
during teacher forcing.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from conftest import run_cli, tiny_vqa_overrides
from fusionkit.decoders.blip2 import Blip2Decoder
from fusionkit.errors import ConfigError
from fusionkit.fusions.base import FusionOutput
from fusionkit.model import Tokens
from fusionkit.registry import registry

D, K, NQ, W = 16, 5, 4, 32
MODS = ["image", "text"]  # sorted: image keys first in the memory
WIDTHS = {"image": 8, "text": 6}
# a batch of 3: different valid lengths per sample, and sample 1 has no text
IMAGE_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
TEXT_MASK = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]
WEIGHTS = [[0.7, 0.3], [1.0, 0.0], [0.4, 0.6]]  # rows sum to 1 over present modalities
L_IMAGE, L_TEXT = 3, 4


def make_decoder(lm, **cfg) -> Blip2Decoder:
    torch.manual_seed(0)
    base = {"num_queries": NQ, "qformer_layers": 2, "qformer_width": W, "qformer_heads": 4, "max_new_tokens": 3}
    dec = Blip2Decoder(Blip2Decoder.Config(lm=str(lm), **{**base, **cfg}), dim=D, num_classes=K)
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
    """Record every call of the LM's transformer: its keyword inputs and the logits everywhere."""
    calls: list[dict] = []
    inner, head = dec.lm.get_decoder(), dec.lm.get_output_embeddings()
    original = inner.forward

    @functools.wraps(original)  # transformers inspects the forward signature
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append({**kwargs, "logits": head(out.last_hidden_state).detach()})
        return out

    monkeypatch.setattr(inner, "forward", forward)
    return calls


def capture_cross_attention(dec, layer: int = 0) -> list[tuple]:
    """``(x, memory, attn_mask, output)`` of every call of one layer's cross-attention."""
    seen: list[tuple] = []
    dec.layers[layer].cross_attn.register_forward_hook(lambda mod, args, out: seen.append((*args, out)))
    return seen


# -- 1. shapes -------------------------------------------------------------------------------------
def test_qformer_output_and_prefix_shapes(tiny_lm):
    dec = make_decoder(tiny_lm)
    tokens, fused = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK}), fusion_output(WEIGHTS)
    memory, bias = dec.memory(fused, tokens)
    assert memory.shape == (3, L_IMAGE + L_TEXT, W) and bias.shape == (3, L_IMAGE + L_TEXT)
    out = dec.qformer(fused, tokens)
    assert out.shape == (3, NQ, dec.hidden) and dec.hidden == 32
    assert torch.isfinite(out).all()
    embeds, mask, key_bias = dec.prefix(fused, tokens)
    P = 1 + NQ + len(dec.prompt_ids)  # fused token + queries + "Answer:" (7 bytes)
    assert embeds.shape == (3, P, dec.hidden) and len(dec.prompt_ids) == 7
    assert mask.dtype == torch.long and mask.eq(1).all() and key_bias is None
    assert torch.equal(embeds[:, 1 : 1 + NQ], out)
    assert torch.equal(embeds[:, 0], dec.fused_proj(fused.fused))
    assert torch.equal(embeds[:, 1 + NQ :], dec.lm.get_input_embeddings()(dec.prompt_ids).expand(3, -1, -1))
    no_fused = make_decoder(tiny_lm, fused_token=False, num_queries=6)
    assert no_fused.fused_proj is None
    assert no_fused.prefix(fused, tokens)[0].shape == (3, 6 + 7, 32)


def test_max_tokens_pools_each_modality_before_the_qformer(tiny_lm):
    dec = make_decoder(tiny_lm, max_tokens=2)
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    memory, bias = dec.memory(fusion_output(WEIGHTS), tokens)
    assert memory.shape == (3, 2 + 2, W)  # image 3 -> groups of 2 -> 2; text 4 -> 2
    # sample 2: image [1, 0 | 0] -> [real, pad]; text [1, 1 | 0, 0] -> [real, pad]
    assert torch.isfinite(bias[2]).tolist() == [True, False, True, False]


# -- 2. a missing modality cannot matter -----------------------------------------------------------
def test_a_missing_modalitys_tokens_cannot_change_the_output_and_a_present_ones_do(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm)
    text_mask = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]  # sample 1 lacks text, yet its tokens claim to be real
    fused = fusion_output(WEIGHTS)
    batch = {"answer_text": ["red", "blue", "yes"]}
    calls = capture_lm(monkeypatch, dec)
    seen = capture_cross_attention(dec)

    base = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    out0, loss0, text0 = dec.qformer(fused, base), dec(fused, base, batch), dec.generate(fused, base)
    logits0 = calls[0]["logits"]
    x, memory, attn_mask, _ = seen[0]
    p = dec.layers[0].cross_attn.probabilities(x, memory, attn_mask)  # (B, heads, N_q, K)
    assert p[1, :, :, L_IMAGE:].eq(0).all()  # never attended: exactly zero mass
    assert p[1, :, :, :2].sum(-1).sub(1).abs().max() < 1e-5  # all of it on the 2 real image tokens

    other = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    other["text"].tokens[1] = 100 * torch.randn(4, WIDTHS["text"])  # new values for the missing modality
    n = len(calls)
    out1, loss1, text1 = dec.qformer(fused, other), dec(fused, other, batch), dec.generate(fused, other)
    assert torch.equal(out1, out0)
    assert torch.equal(loss1, loss0)
    assert torch.equal(calls[n]["logits"], logits0)  # the teacher-forced LM call
    assert text1 == text0

    present = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    present["image"].tokens[1, :2] = 100 * torch.randn(2, WIDTHS["image"])  # sample 1's real image tokens
    out2, loss2 = dec.qformer(fused, present), dec(fused, present, batch)
    assert not torch.equal(out2[1], out0[1])
    assert torch.equal(out2[0], out0[0]) and torch.equal(out2[2], out0[2])  # other samples untouched
    assert loss2.item() != loss0.item()
    # padding of a present modality cannot matter either (sample 2's last two text tokens)
    padded = make_tokens({"image": IMAGE_MASK, "text": text_mask})
    padded["text"].tokens[2, 2:] = 50.0
    assert torch.equal(dec.qformer(fused, padded), out0)


def test_a_sample_without_any_attendable_token_gives_finite_outputs_and_gradients(tiny_lm):
    """Sample 1 has only image, and every image position of it is padding: no key to attend."""
    dec = make_decoder(tiny_lm).train()
    masks = {"image": [[1, 1, 0], [0, 0, 0], [1, 0, 0]], "text": TEXT_MASK}
    tokens, fused = make_tokens(masks), fusion_output(WEIGHTS)
    memory, attn_mask, gate = dec.attention_inputs(fused, tokens)
    assert attn_mask.shape == (3, 4, NQ, L_IMAGE + L_TEXT)
    assert gate.flatten().tolist() == [1.0, 0.0, 1.0]
    assert torch.isfinite(attn_mask[1]).all() and attn_mask[1].eq(0).all()  # no -inf row handed to SDPA
    out = dec.qformer(fused, tokens)
    assert torch.isfinite(out).all()
    loss = dec(fused, tokens, {"answer_text": ["red", "no", "yes"]})
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in dec.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # its (padding) token values cannot reach its output
    other = make_tokens(masks)
    other["image"].tokens[1] = 100 * torch.randn(L_IMAGE, WIDTHS["image"])
    with torch.no_grad():
        assert torch.equal(dec.qformer(fused, other)[1], out[1].detach())


# -- 3. how the DMS weights reach the Q-Former -----------------------------------------------------
def test_cross_attention_bias_is_log_m_times_w_on_each_modalitys_keys(tiny_lm):
    dec = make_decoder(tiny_lm)
    tokens = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK})
    _, bias = dec.memory(fusion_output(WEIGHTS), tokens)  # (B, K)
    spans = {"image": slice(0, L_IMAGE), "text": slice(L_IMAGE, L_IMAGE + L_TEXT)}
    for i, (w, n) in enumerate(zip(WEIGHTS, [2, 1, 2])):
        for j, m in enumerate(MODS):
            real = tokens[m].mask[i].tolist()
            expected = [math.log(n * w[j]) if r and w[j] > 0 else float("-inf") for r in real]
            assert bias[i, spans[m]].tolist() == pytest.approx(expected, abs=1e-6)
    assert bias[0, 0].item() == pytest.approx(math.log(1.4))
    assert bias[2, L_IMAGE].item() == pytest.approx(math.log(1.2))
    assert bias[1, 0].item() == 0.0  # a lone modality: M_b * w_m = 1

    _, uniform = dec.memory(fusion_output([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]), tokens)
    real = torch.cat([tokens["image"].mask, tokens["text"].mask], 1)  # (B, K)
    real[1, L_IMAGE:] = False
    assert uniform[real].eq(0).all() and uniform[~real].eq(float("-inf")).all()
    _, none = make_decoder(tiny_lm, weighting="none").memory(fusion_output(WEIGHTS), tokens)
    assert none[real].eq(0).all() and none[~real].eq(float("-inf")).all()


def test_lowering_a_weight_lowers_the_cross_attention_mass_on_that_modality(tiny_lm):
    """Layer 0: the same sample with w_image = 0.8, 0.5, 0.2. The queries entering layer 0's
    cross-attention do not depend on the tokens, so the logits are the same in the three rows and
    the mass on the image keys must be r a / (r a + r' (1 - a)), a = the uniform (w = 0.5) mass,
    r = 2 w_image, r' = 2 w_text."""
    dec = make_decoder(tiny_lm)
    single = make_tokens({"image": [[1, 1, 1]], "text": [[1, 1, 1, 1]]})
    tokens = {m: Tokens(t.tokens.expand(3, -1, -1), t.mask.expand(3, -1)) for m, t in single.items()}
    ws = [0.8, 0.5, 0.2]
    seen = capture_cross_attention(dec)
    dec.qformer(fusion_output([[w, 1 - w] for w in ws]), tokens)
    (x, memory, attn_mask, out), = seen
    attn = dec.layers[0].cross_attn
    p = attn.probabilities(x, memory, attn_mask)  # (B, heads, N_q, K)
    _, _, v = attn.project(x, memory)
    mixed = (p @ v).transpose(1, 2).reshape(3, NQ, W)  # (B, N_q, W)
    assert torch.allclose(attn.out(mixed), out, atol=1e-5)  # the probabilities SDPA really used
    mass = p[..., :L_IMAGE].sum(-1)  # (B, heads, N_q)
    assert (mass[0] > mass[1]).all() and (mass[1] > mass[2]).all() and (mass[2] > 0).all()
    a = mass[1]
    for i, w in enumerate(ws):
        r, r_other = 2 * w, 2 * (1 - w)
        assert torch.allclose(mass[i], r * a / (r * a + r_other * (1 - a)), atol=1e-5)


# -- 4. the LM side: labels, generation, context, checkpoints --------------------------------------
def test_loss_is_cross_entropy_over_exactly_the_answer_tokens_and_eos(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm)
    tokens, fused = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK}), fusion_output(WEIGHTS)
    calls = capture_lm(monkeypatch, dec)
    answers = ["red", "a", "triangle"]
    loss = dec(fused, tokens, {"answer_text": answers})
    (call,) = calls
    tok = dec.tokenizer
    ids = [tok(" " + a, add_special_tokens=False)["input_ids"][:8] + [tok.eos_token_id] for a in answers]
    assert [len(s) for s in ids] == [5, 3, 9]  # byte tokens + eos; " triangle" cut to max_answer_tokens 8
    P, A = 1 + NQ + 7, 9
    embeds, attention, logits = call["inputs_embeds"], call["attention_mask"], call["logits"]
    assert embeds.shape == (3, P + A, 32) and attention.shape == (3, P + A)
    assert torch.equal(embeds[:, :P], dec.prefix(fused, tokens)[0])
    expected_nll = []
    for i, seq in enumerate(ids):
        n = len(seq)
        assert attention[i].tolist() == [1] * (P + n) + [0] * (A - n)
        logp = logits[i, P - 1 : P - 1 + n].float().log_softmax(-1)  # position t predicts token t + 1
        expected_nll.append(-logp[torch.arange(n), torch.tensor(seq)])
    expected = torch.cat(expected_nll).mean()  # 17 labels: no prefix, prompt or pad position counts
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert call["position_ids"][2].tolist() == list(range(P + A))  # the longest answer: nothing masked


def test_generate_returns_one_string_per_sample_greedy_and_with_beams(tiny_lm, monkeypatch):
    dec = make_decoder(tiny_lm)
    tokens, fused = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK}), fusion_output(WEIGHTS)
    calls = capture_lm(monkeypatch, dec)
    dec(fused, tokens, {"answer_text": ["x"] * 3})
    P = 1 + NQ + 7
    teacher = calls[0]["logits"][:, P - 1]  # (B, V): next-token logits after the prefix
    texts = dec.generate(fused, tokens)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    step = calls[1]  # generate's first step reads the same prefix
    assert step["inputs_embeds"].shape[:2] == (3, P)
    assert torch.allclose(step["logits"][:, -1], teacher, atol=1e-5)
    dec.config = dec.config.model_copy(update={"num_beams": 2})
    n = len(calls)
    beams = dec.generate(fused, tokens)
    assert isinstance(beams, list) and len(beams) == 3 and all(isinstance(t, str) for t in beams)
    assert calls[n]["inputs_embeds"].shape[:2] == (6, P)  # B * beams rows


def test_a_prefix_longer_than_the_lm_context_and_bad_heads_are_config_errors(tiny_lm):
    tokens, fused = make_tokens({"image": IMAGE_MASK, "text": TEXT_MASK}), fusion_output(WEIGHTS)
    answer = {"answer_text": ["red"] * 3}  # " red" + eos: 5 tokens; context 256 = 1 + N_q + 7 + 5
    fits = make_decoder(tiny_lm, num_queries=256 - 13)
    assert fits.context == 256 and torch.isfinite(fits(fused, tokens, answer))
    long = make_decoder(tiny_lm, num_queries=256 - 12)
    with pytest.raises(ConfigError, match=r"decoder blip2: .*257 tokens.*at most 256.*decoder\.num_queries"):
        long(fused, tokens, answer)
    long.config = long.config.model_copy(update={"max_new_tokens": 5})  # 252 + 5 new tokens
    with pytest.raises(ConfigError, match=r"257 tokens.*at most 256.*decoder\.num_queries or shorten decoder\.prompt"):
        long.generate(fused, tokens)
    with pytest.raises(ConfigError, match=r"^model\.decoder\.qformer_heads: qformer_heads must divide "
                                          r"qformer_width 32; use one of \[1, 2, 4, 8, 16\] \(got 3\)$"):
        registry("decoders").validate({"name": "blip2", "qformer_width": 32, "qformer_heads": 3}, "model.decoder")


def test_external_state_lists_the_frozen_lm_and_checkpoints_keep_the_qformer(tiny_lm, tmp_path):
    from safetensors import safe_open

    from fusionkit.encoders.base import ModalitySpec
    from fusionkit.fusions.mean import MeanFusion
    from fusionkit.model import MultimodalModel
    from fusionkit.registry import build
    from fusionkit.training.checkpoint import save_checkpoint

    dec = make_decoder(tiny_lm)
    lm_keys = {f"lm.{k}" for k, _ in dec.lm.named_parameters()}
    assert len(lm_keys) > 10 and dec.external_state() == lm_keys
    assert not any(p.requires_grad for p in dec.lm.parameters())
    trained = {k for k, p in dec.named_parameters() if p.requires_grad}
    assert trained and not trained & lm_keys
    assert {"queries", "inputs.image.weight", "modality_embed.text", "layers.1.cross_attn.kv.weight",
            "to_lm.weight", "fused_proj.weight"} <= trained
    assert make_decoder(tiny_lm, trainable="full").external_state() == set()

    encoders = {m: build("encoders", {"name": "mlp", "hidden": WIDTHS[m]}, spec=ModalitySpec("vector", dim=4))
                for m in MODS}
    dec.attach({m: e.token_dim for m, e in encoders.items()})
    model = MultimodalModel(encoders, MeanFusion(MODS, D, K), dec, D)
    assert model.external_state() == {f"decoder.{k}" for k in lm_keys}
    path = save_checkpoint(tmp_path, "best", model, {"epoch": 1})
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    assert not [k for k in saved if k.startswith("decoder.lm.")]
    assert {"decoder.queries", "decoder.layers.0.self_attn.q.weight", "decoder.to_lm.bias"} <= saved


# -- 5. through the CLI ----------------------------------------------------------------------------
def test_tiny_vqa_training_through_the_cli_with_blip2(tiny_lm, tmp_path):
    overrides = [o for o in tiny_vqa_overrides(tiny_lm) if not o.startswith("model.decoder=")]
    overrides.append(f"model.decoder={{name: blip2, lm: '{tiny_lm}', num_queries: 4, qformer_layers: 1, "
                     f"qformer_width: 32, max_new_tokens: 3}}")
    out = tmp_path / "run"
    proc = run_cli("train", "--out", str(out), "--no-progress", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((out / "results.json").read_text())["test"]
    assert 0 <= test["vqa_accuracy"] <= 1 and test["n"] == 40
    config = (out / "config.yaml").read_text()
    assert "name: blip2" in config and "num_queries: 4" in config

    listing = run_cli("list", "decoders")
    assert listing.returncode == 0, listing.stderr
    assert "blip2" in listing.stdout and "llava" in listing.stdout
