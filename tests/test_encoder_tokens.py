"""Every registered encoder's token output (``encode``) on a tiny config: the contract, then layouts.

Contract: ``encode(x).pooled`` equals ``forward(x)``; tokens are ``(B, L, token_dim)`` with a
``(B, L)`` bool mask, every row has a real token, and padded positions hold zeros. The batch mixes
lengths (``ENCODER_SAMPLES``), so encoders of variable-length inputs really pad.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_encoder
from fusionkit.encoders.base import EncoderOutput
from fusionkit.registry import registry

B = 4
# encoders whose tiny batch of mixed lengths must produce padded token positions
PADS = {"hf_text", "open_clip_text", "mel_cnn", "hf_audio", "frames"}
# (L, token_dim) of the tiny configs: a number per encoder, so a layout change is seen
LAYOUT = {
    "timm": (1, 96),  # test_resnet at 32 px: a 1x1 final map (stride 32) of 96 channels
    "open_clip_image": (16, 32),  # (32 / 8)^2 patches of the tower width
    "open_clip_text": (16, 32),  # context_length of the text width
    "mlp": (1, 256),  # the fallback: the pooled vector as one token
    "hf_video": (8, 32),  # (4 frames / tubelet 2) x (32 / 16)^2 patches = 2 x 4
    "frames": (4, 96),  # one per frame, at most num_frames
    "hf_blip2_vision": (4, 32),  # the tiny checkpoint's query tokens, already in its LM width
    "hf_llava_vision": (16, 32),  # its image patches, projected into the LM width
}


def _batch(enc, sample, n: int = B):
    return enc.collate([enc.preprocess(sample(i)) for i in range(n)])


@pytest.mark.parametrize("name", registry("encoders").names())
def test_encode_follows_the_token_contract(name):
    enc, sample = tiny_encoder(name)
    enc.eval()
    batch = _batch(enc, sample)
    with torch.no_grad():
        out = enc.encode(batch)
        pooled = enc(batch)
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (B, enc.out_dim)
    assert torch.allclose(out.pooled, pooled, atol=1e-5)
    n, L, width = out.tokens.shape
    assert (n, width) == (B, enc.token_dim) and L >= 1
    assert out.token_mask.shape == (B, L) and out.token_mask.dtype == torch.bool
    assert out.token_mask.any(1).all()  # every row has a real token
    assert torch.isfinite(out.tokens).all()
    assert (out.tokens[~out.token_mask] == 0).all()  # padded positions are zero
    assert (out.tokens[out.token_mask].abs().sum(-1) > 0).all()  # real ones are not
    if name in PADS:
        assert not out.token_mask.all()  # mixed lengths: the padding check above was not vacuous
    if name in LAYOUT:
        assert (L, enc.token_dim) == LAYOUT[name]


def test_timm_tokens_are_the_positions_of_its_feature_map():
    enc, sample = tiny_encoder("timm", image_size=96)  # a 3x3 map: more than one position
    enc.eval()
    batch = _batch(enc, sample)
    with torch.no_grad():
        fmap = enc.backbone.forward_features(batch)  # (B, C, H, W)
        out = enc.encode(batch)
    _, C, H, W = fmap.shape
    assert (H, W) == (3, 3) and out.tokens.shape == (B, H * W, C)
    assert torch.allclose(out.tokens[:, 1 * W + 2], fmap[:, :, 1, 2])  # row-major positions
    assert torch.allclose(out.tokens.mean(1), out.pooled, atol=1e-5)  # resnet's head: the mean of the map


def test_timm_pooled_width_can_differ_from_the_token_width():
    # MobileNetV3's head has its own conv after pooling: 288-channel map, 1024-wide pooled vector
    enc, sample = tiny_encoder("timm", model_name="mobilenetv3_small_050")
    enc.eval()
    with torch.no_grad():
        out = enc.encode(_batch(enc, sample, 2))
    assert (enc.out_dim, enc.token_dim) == (1024, 288)
    assert out.pooled.shape == (2, 1024) and out.tokens.shape == (2, 1, 288)  # 32 px: a 1x1 map


def test_hf_text_mask_is_the_tokenizer_attention_mask():
    enc, _ = tiny_encoder("hf_text")
    texts = ["a seven", "a handwritten seven on a scanned form", "two"]
    batch = enc.collate(texts)
    with torch.no_grad():
        out = enc.encode(batch)
    assert torch.equal(out.token_mask, batch["attention_mask"].bool())
    lengths = out.token_mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and out.tokens.shape == (3, max(lengths), 384)
    with torch.no_grad():  # a text's tokens do not depend on the padding of its batch
        alone = enc.encode(enc.collate([texts[0]]))
    assert torch.allclose(out.tokens[0, : lengths[0]], alone.tokens[0], atol=1e-5)


def test_frames_gives_one_token_per_frame():
    enc, sample = tiny_encoder("frames")
    enc.eval()
    clips = [sample(0), sample(1), sample(2)]  # 5, 3 and 1 frames
    with torch.no_grad():
        out = enc.encode(enc.collate([enc.preprocess(c) for c in clips]))
        first = enc.image(enc.image.collate([enc.image.preprocess(f) for f in clips[1]]))  # (3, d)
    assert out.tokens.shape == (3, enc.config.num_frames, enc.out_dim)
    assert out.token_mask.sum(1).tolist() == [4, 3, 1]  # at most num_frames = 4 each
    assert torch.allclose(out.tokens[1, :3], first, atol=1e-5)


def test_mel_cnn_masks_the_padded_time_steps_of_a_short_clip():
    enc, sample = tiny_encoder("mel_cnn")
    enc.eval()
    clips = [enc.preprocess(sample(i)) for i in (0, 3)]  # 0.25 s and 0.625 s
    with torch.no_grad():
        both = enc.encode(enc.collate(clips))
        short = enc.encode(enc.collate(clips[:1]))
    steps = int(short.token_mask.sum())
    assert both.token_mask.sum(1).tolist() == [steps, both.tokens.shape[1]] and steps < both.tokens.shape[1]
    assert torch.allclose(both.pooled[0], both.tokens[0, :steps].mean(0), atol=1e-5)  # pooled: the real steps only
