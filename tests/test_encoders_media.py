"""open_clip, mel_cnn, hf_audio, frames and hf_video encoders on tiny random-init models (offline).

Covers: output shape/dtype, padding of variable-length audio and video in ``collate`` (a clip
gives the same features alone and next to a longer one), resampling and cropping of audio,
freezing (``trainable`` false / 1 / true, checked by a backward pass), attention pooling over
padded frames, local weights and folders, and the errors a user can hit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fusionkit import build
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, DataError

# -- tiny configs (random init, no download) -------------------------------------------------
CLIP = {"model_cfg": {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
# feat_extract_norm "layer": the frame-local conv encoder that wav2vec2-large/HuBERT use, and
# the one that is exactly padding-invariant with an attention mask
W2V = {"model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
       "intermediate_size": 37, "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2],
       "num_feat_extract_layers": 2, "feat_extract_norm": "layer",
       "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
AST = {"model_type": "audio-spectrogram-transformer", "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 37, "max_length": 64, "num_mel_bins": 32}
VMAE = {"model_type": "videomae", "image_size": 32, "patch_size": 16, "num_frames": 4, "tubelet_size": 2,
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
TINY_FRAME = {"name": "timm", "model_name": "test_resnet", "image_size": 32}

RGB, TEXT = ModalitySpec("image", channels=3), ModalitySpec("text")
AUDIO, VIDEO = ModalitySpec("audio", extra={"sample_rate": 16000}), ModalitySpec("video", channels=3)
rng = np.random.default_rng(0)


def clip(seconds: float, rate: int = 16000, channels: int | None = None) -> np.ndarray:
    shape = (int(seconds * rate),) if channels is None else (channels, int(seconds * rate))
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def video(frames: int, h: int = 20, w: int = 24) -> np.ndarray:
    return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


# block, spec, one raw sample per index (lengths vary with the index)
CASES = {
    "open_clip_image": ({"name": "open_clip_image", **CLIP}, RGB, lambda i: rng.random((20 + i, 18))),
    "open_clip_text": ({"name": "open_clip_text", **CLIP}, TEXT, lambda i: "a handwritten seven" + " !" * i),
    "mel_cnn": ({"name": "mel_cnn", "model_name": "test_resnet", "n_mels": 32}, AUDIO,
                lambda i: clip(0.2 + 0.1 * i, channels=2)),
    "hf_audio_wav2vec2": ({"name": "hf_audio", "config": W2V}, AUDIO, lambda i: clip(0.2 + 0.1 * i)),
    "hf_audio_ast": ({"name": "hf_audio", "config": AST}, AUDIO, lambda i: clip(0.2 + 0.1 * i)),
    "frames": ({"name": "frames", "image": TINY_FRAME, "pooling": "attention"}, VIDEO, lambda i: video(3 + 4 * i)),
    "hf_video": ({"name": "hf_video", "config": VMAE}, VIDEO, lambda i: video(3 + 4 * i)),
}


def encode(enc, raws):
    return enc(enc.collate([enc.preprocess(r) for r in raws]))


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_encoder_gives_finite_float32_features_of_out_dim(case):
    block, spec, sample = CASES[case]
    torch.manual_seed(0)
    enc = build("encoders", block, spec=spec)
    out = encode(enc, [sample(i) for i in range(3)])
    assert out.shape == (3, enc.out_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std(0).max() > 0  # different inputs, different features


@pytest.mark.parametrize("case", ["open_clip_image", "open_clip_text", "mel_cnn", "hf_audio_wav2vec2",
                                  "frames", "hf_video"])
@pytest.mark.parametrize("trainable", [False, 1, True])
def test_gradients_reach_exactly_the_trainable_blocks(case, trainable):
    block, spec, sample = CASES[case]
    torch.manual_seed(0)
    enc = build("encoders", {**block, "trainable": trainable}, spec=spec).eval()  # eval: no layerdrop
    params = dict(enc.named_parameters())
    out = encode(enc, [sample(i) for i in range(2)])
    if trainable is False:
        assert not any(p.requires_grad for p in params.values())
        assert not out.requires_grad
        return
    out.square().sum().backward()
    # (a grad may be all zeros: timm zero-initialises the last BN of each residual block)
    got_grad = {n for n, p in params.items() if p.grad is not None}
    if trainable is True:
        assert all(p.requires_grad for p in params.values())
        # masked_spec_embed only replaces frames under SpecAugment masking (training mode)
        assert got_grad == {n for n in params if not n.endswith("masked_spec_embed")}
    else:
        last = [b for b in enc.trainable_blocks() if list(b.parameters())][-1]
        last_ids = {id(p) for p in last.parameters()}
        expected = {n for n, p in params.items() if id(p) in last_ids}
        assert {n for n, p in params.items() if p.requires_grad} == expected
        assert got_grad == expected


# -- open_clip --------------------------------------------------------------------------------
def test_open_clip_uses_its_transform_and_tokenizer():
    import open_clip

    img = build("encoders", {"name": "open_clip_image", **CLIP}, spec=RGB)
    arr = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    x = img.preprocess(arr)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, img.transform(Image.fromarray(arr)))  # numpy goes through PIL
    assert torch.allclose(img.preprocess(arr / 255.0), x, atol=1e-6)  # float [0, 1] == uint8
    assert img.preprocess(arr[:, :, 0]).shape == (3, 32, 32)  # grayscale -> RGB
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    white = img.preprocess(np.full((8, 8, 3), 255, np.uint8))
    assert torch.allclose(white, (1 - mean) / std * torch.ones(3, 32, 32), atol=1e-5)

    txt = build("encoders", {"name": "open_clip_text", **CLIP}, spec=TEXT)
    ids = txt.preprocess("a red bird")
    assert ids.shape == (16,) and ids.dtype == torch.long
    assert ids[0] == 49406 and 49407 in ids.tolist()  # <start_of_text> ... <end_of_text>
    assert img.out_dim == txt.out_dim == 32  # one shared embedding space
    with pytest.raises(DataError, match="text must be a string"):
        txt.preprocess(3)


def test_open_clip_local_checkpoint_is_loaded(tmp_path):
    import open_clip

    ref = open_clip.create_model("ViT-B-32", pretrained=None, **CLIP["model_cfg"])
    path = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), path)
    img = build("encoders", {"name": "open_clip_image", **CLIP, "pretrained": str(path)}, spec=RGB)
    for k, v in ref.visual.state_dict().items():
        assert torch.equal(img.visual.state_dict()[k], v), k
    txt = build("encoders", {"name": "open_clip_text", **CLIP, "pretrained": str(path)}, spec=TEXT)
    assert torch.equal(txt.model.token_embedding.weight, ref.token_embedding.weight)


def test_open_clip_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="'ViT-B-3' is not an open_clip model; did you mean"):
        build("encoders", {"name": "open_clip_image", "model_name": "ViT-B-3"}, spec=RGB)
    with pytest.raises(ConfigError, match="'laion2b' is not a pretrained tag of ViT-B-32.*laion2b_s34b_b79k"):
        build("encoders", {"name": "open_clip_image", "pretrained": "laion2b"}, spec=RGB)
    with pytest.raises(ConfigError, match="checkpoint file .* does not exist"):
        build("encoders", {"name": "open_clip_text", "pretrained": str(tmp_path / "w.pt")}, spec=TEXT)
    with pytest.raises(ConfigError, match="pretrained: true does not say which weights"):
        build("encoders", {"name": "open_clip_image", "pretrained": True}, spec=RGB)


# -- audio ------------------------------------------------------------------------------------
def test_audio_is_resampled_to_the_encoder_rate_downmixed_and_cropped():
    spec_8k = ModalitySpec("audio", extra={"sample_rate": 8000})
    mel = build("encoders", {"name": "mel_cnn", "model_name": "test_resnet", "n_mels": 32}, spec=spec_8k)
    assert mel.preprocess(clip(0.5, rate=8000)).shape == (32, 8000 // 160 + 1)  # 4000 -> 8000 samples
    hf = build("encoders", {"name": "hf_audio", "config": W2V}, spec=spec_8k)
    assert hf.preprocess(clip(0.5, rate=8000)).shape == (8000,)
    assert hf.preprocess(clip(0.5, rate=8000, channels=2)).shape == (8000,)  # stereo -> mono
    hf16 = build("encoders", {"name": "hf_audio", "config": W2V, "max_seconds": 1.0}, spec=AUDIO)
    assert hf16.preprocess(clip(3.0)).shape == (16000,)
    stereo = clip(0.3, channels=2)
    assert torch.equal(hf16.preprocess(stereo), hf16.preprocess(stereo.mean(0)))
    with pytest.raises(DataError, match="zero samples"):
        hf16.preprocess(np.zeros((1, 0), np.float32))
    with pytest.raises(DataError, match="expected \\(C, T\\)"):
        hf16.preprocess(np.zeros((1, 2, 3), np.float32))


def test_mel_cnn_spectrogram_matches_torchaudio_and_pads_in_collate():
    import torchaudio

    enc = build("encoders", {"name": "mel_cnn", "model_name": "test_resnet", "n_mels": 32}, spec=AUDIO)
    wave = clip(0.3)
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=32)(
        torch.from_numpy(wave))
    ref = torch.log(ref + 1e-6)
    assert torch.allclose(enc.preprocess(wave), (ref - ref.mean()) / (ref.std() + 1e-5), atol=1e-4)
    short, long = enc.preprocess(clip(0.2)), enc.preprocess(clip(0.5))
    batch = enc.collate([short, long])
    assert batch["spec"].shape == (2, 1, 32, long.shape[1])
    assert batch["frames"].tolist() == [short.shape[1], long.shape[1]]
    assert (batch["spec"][0, 0, :, short.shape[1]:] == 0).all()
    # window and filterbank are plain CPU tensors, not state: they never follow the model to a GPU
    assert not any("window" in k or "filterbank" in k for k in enc.state_dict())
    fixed = build("encoders", {"name": "mel_cnn", "model_name": "test_resnet", "n_mels": 32,
                               "max_seconds": 0.5, "pad_to_max": True}, spec=AUDIO)
    assert fixed.preprocess(clip(0.2)).shape == fixed.preprocess(clip(2.0)).shape == (32, 51)


def test_hf_audio_clip_pools_the_same_alone_and_padded_in_a_batch():
    torch.manual_seed(0)
    enc = build("encoders", {"name": "hf_audio", "config": W2V}, spec=AUDIO).eval()
    short, long = clip(0.15), clip(0.4)
    batch = enc.collate([enc.preprocess(short), enc.preprocess(long)])
    assert batch["input_values"].shape == (2, 6400) and batch["lengths"].tolist() == [2400, 6400]
    assert "attention_mask" in batch  # a layer-norm feature encoder is meant to get the mask
    with torch.no_grad():
        together = enc(batch)
        alone = torch.cat([encode(enc, [short]), encode(enc, [long])])
    assert torch.allclose(together, alone, atol=1e-5)


def test_hf_audio_group_norm_model_gets_zero_padding_without_a_mask():
    torch.manual_seed(0)
    enc = build("encoders", {"name": "hf_audio", "config": {**W2V, "feat_extract_norm": "group"}}, spec=AUDIO).eval()
    batch = enc.collate([enc.preprocess(clip(0.15)), enc.preprocess(clip(0.4))])
    assert "attention_mask" not in batch  # as HF ships wav2vec2-base: zero padding, no mask
    assert (batch["input_values"][0, 2400:] == 0).all()
    with torch.no_grad():
        tokens = enc.model(input_values=batch["input_values"]).last_hidden_state  # (2, L, 32)
        n = int(enc.model._get_feat_extract_output_lengths(torch.tensor(2400)))
        assert torch.allclose(enc(batch)[0], tokens[0, :n].mean(0), atol=1e-6)  # pooled over real frames


def test_hf_audio_ast_and_cls_pooling():
    torch.manual_seed(0)
    enc = build("encoders", {"name": "hf_audio", "config": AST, "pooling": "cls"}, spec=AUDIO).eval()
    assert enc.feature_extractor.num_mel_bins == 32 and enc.feature_extractor.max_length == 64  # from config
    batch = enc.collate([enc.preprocess(clip(0.2)), enc.preprocess(clip(0.9))])
    assert batch["input_values"].shape == (2, 64, 32)  # fixed-length fbank (frames, mel bins)
    with torch.no_grad():
        tokens = enc.model(input_values=batch["input_values"]).last_hidden_state
        assert torch.equal(enc(batch), tokens[:, 0])


def test_hf_audio_loads_a_local_folder(tmp_path):
    torch.manual_seed(0)
    ref = build("encoders", {"name": "hf_audio", "config": W2V}, spec=AUDIO).eval()
    ref.model.save_pretrained(tmp_path)
    ref.feature_extractor.save_pretrained(tmp_path)
    enc = build("encoders", {"name": "hf_audio", "model": str(tmp_path)}, spec=AUDIO).eval()
    raws = [clip(0.2), clip(0.3)]
    with torch.no_grad():
        assert torch.allclose(encode(enc, raws), encode(ref, raws), atol=1e-6)


def test_hf_audio_config_errors():
    with pytest.raises(ConfigError, match="set exactly one of model"):
        build("encoders", {"name": "hf_audio"}, spec=AUDIO)
    with pytest.raises(ConfigError, match="set exactly one of model"):
        build("encoders", {"name": "hf_audio", "model": "x", "config": W2V}, spec=AUDIO)
    with pytest.raises(ConfigError, match="config needs a 'model_type'"):
        build("encoders", {"name": "hf_audio", "config": {"hidden_size": 32}}, spec=AUDIO)
    with pytest.raises(ConfigError, match="cannot load .* as a folder"):
        build("encoders", {"name": "hf_audio", "model": "."}, spec=AUDIO)


# -- video ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_frames_clip_pools_the_same_alone_and_padded_in_a_batch(pooling):
    torch.manual_seed(0)
    enc = build("encoders", {"name": "frames", "image": TINY_FRAME, "pooling": pooling}, spec=VIDEO).eval()
    short, long = video(3), video(20)
    assert len(enc.preprocess(short)) == 3 and len(enc.preprocess(long)) == 8  # all / num_frames
    batch = enc.collate([enc.preprocess(short), enc.preprocess(long)])
    assert batch["frames"].shape == (11, 3, 32, 32) and batch["counts"].tolist() == [3, 8]
    with torch.no_grad():
        together = enc(batch)
        alone = torch.cat([encode(enc, [short]), encode(enc, [long])])
    assert torch.allclose(together, alone, atol=1e-5)


def test_frames_samples_uniformly_over_the_clip():
    enc = build("encoders", {"name": "frames", "image": TINY_FRAME, "num_frames": 4}, spec=VIDEO)
    frames = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(10)])  # frame i has value 10 i
    picked = [round(float(f.mean() * enc.image.norm_std.mean() + enc.image.norm_mean.mean()) * 25.5)
              for f in enc.preprocess(frames)]
    assert picked == [0, 3, 6, 9]  # linspace(0, 9, 4) rounded


def test_frames_attention_gives_padded_frames_zero_weight():
    torch.manual_seed(0)
    enc = build("encoders", {"name": "frames", "image": TINY_FRAME, "pooling": "attention"}, spec=VIDEO).eval()
    batch = enc.collate([enc.preprocess(video(2)), enc.preprocess(video(5))])
    with torch.no_grad():
        feats, mask = enc.frame_features(batch)  # (2, 5, d), (2, 5)
        w = enc.pool.weights(feats, mask)
        assert mask.tolist() == [[True, True, False, False, False], [True] * 5]
        assert (w[0, 2:] == 0).all() and torch.allclose(w.sum(1), torch.ones(2))
        junk = feats.clone()
        junk[0, 2:] = 1e3  # whatever sits in the padding cannot change the pooled vector
        assert torch.allclose(enc.pool(junk, mask), enc.pool(feats, mask))


def test_frames_takes_any_image_encoder_and_rejects_others():
    torch.manual_seed(0)
    enc = build("encoders", {"name": "frames", "image": {"name": "open_clip_image", **CLIP}, "num_frames": 2},
                spec=VIDEO)
    assert encode(enc, [video(4), video(1)]).shape == (2, 32)
    with pytest.raises(ConfigError, match="'mlp' takes \\['vector'\\], not image"):
        build("encoders", {"name": "frames", "image": {"name": "mlp", "in_dim": 4}}, spec=VIDEO)
    with pytest.raises(ConfigError, match="encoders.image.model_nam: unknown key"):
        build("encoders", {"name": "frames", "image": {"name": "timm", "model_nam": "x"}}, spec=VIDEO)


def test_hf_video_samples_the_model_frame_count_and_loads_a_local_folder(tmp_path):
    torch.manual_seed(0)
    enc = build("encoders", {"name": "hf_video", "config": VMAE}, spec=VIDEO).eval()
    assert enc.preprocess(video(2)).shape == enc.preprocess(video(30, 40, 50)).shape == (4, 3, 32, 32)
    assert enc.preprocess(video(3)[..., :1]).shape == (4, 3, 32, 32)  # grayscale frames
    enc.model.save_pretrained(tmp_path)
    enc.processor.save_pretrained(tmp_path)
    loaded = build("encoders", {"name": "hf_video", "model": str(tmp_path)}, spec=VIDEO).eval()
    raws = [video(5), video(9)]
    with torch.no_grad():
        assert torch.allclose(encode(loaded, raws), encode(enc, raws), atol=1e-6)
    with pytest.raises(DataError, match="video has shape"):
        enc.preprocess(np.zeros((4, 5), np.uint8))


def test_hf_video_reads_an_older_image_processor_config(tmp_path):
    from transformers import VideoMAEImageProcessor

    build("encoders", {"name": "hf_video", "config": VMAE}, spec=VIDEO).model.save_pretrained(tmp_path)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = build("encoders", {"name": "hf_video", "model": str(tmp_path)}, spec=VIDEO)
    assert enc.preprocess(video(6)).shape == (4, 3, 32, 32)
