"""Video encoder: a Hugging Face video model (VideoMAE style) with its video processor.

Such models take a fixed number of frames (``config.num_frames``), so ``preprocess`` samples
exactly that many uniformly over the clip (repeating frames of a shorter clip) and runs the
model's video processor (resize, crop, rescale, normalise) on the CPU; every clip then has the
same shape and ``collate`` just stacks them. ``forward`` mean-pools the patch tokens.

Tokens (``encode``): the last hidden states ``(B, N, hidden)``, N = (num_frames / tubelet) x
patches per frame for VideoMAE; every clip has the same N, so the mask is all True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput
from fusionkit.encoders.hf_audio import from_config_dict, transformer_blocks
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register


def video_array(raw: Any) -> np.ndarray:
    """Frames ``(F, H, W, C)`` / ``(F, H, W)`` uint8 (or float in [0, 1]) -> uint8 ``(F, H, W, 3)``."""
    arr = np.asarray(raw)
    if arr.ndim == 3:
        arr = arr[..., None]  # (F, H, W) grayscale -> (F, H, W, 1)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"video has shape {arr.shape}; expected (F, H, W, C) with C in 1, 3")
    if arr.shape[0] == 0:
        raise DataError("video has zero frames")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


class HFVideoConfig(EncoderConfig):
    trainable: bool | int = Field(False, description=(
        "frozen by default: a pretrained video model is already a good feature extractor; "
        "N fine-tunes the last N transformer layers"))
    model: str | None = Field(None, description=(
        "a Hugging Face hub id ('MCG-NJU/videomae-base') or a local folder with the model and "
        "its video (or image) processor"))
    config: dict[str, Any] | None = Field(None, description=(
        "instead of model: a transformers config ({model_type: videomae, ...}) for a random-init "
        "model, paired with its video processor sized to config.image_size (offline tests)"))
    processor: dict[str, Any] = Field(default_factory=dict, description=(
        "overrides for the video processor (e.g. image_mean, image_std, size)"))
    num_frames: int | None = Field(None, ge=1, description=(
        "frames sampled per clip; None = the model's config.num_frames (VideoMAE needs exactly that)"))
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "mean over tokens, or the first token (for models with a [CLS] token, e.g. TimeSformer)"))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("set exactly one of model (hub id or folder) or config (random init)")
        return self


def _processor_for(hf_config: Any, overrides: dict[str, Any]):
    """The video processor class of ``hf_config``'s model type, sized to its image_size."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    if type(hf_config) not in VIDEO_PROCESSOR_MAPPING:
        raise ConfigError(f"encoder hf_video: model_type '{hf_config.model_type}' has no video processor")
    processor_cls = VIDEO_PROCESSOR_MAPPING[type(hf_config)]
    if isinstance(processor_cls, dict):  # one class per backend; torchvision is the fast one
        processor_cls = processor_cls.get("torchvision") or next(iter(processor_cls.values()))
    size = getattr(hf_config, "image_size", None)
    sized = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}} if size else {}
    return processor_cls(**{**sized, **overrides})


@register("encoders", "hf_video")
class HFVideoEncoder(Encoder):
    """Video -> uniform frame sampling + HF video processor -> AutoModel (VideoMAE...) -> mean/CLS (B, H)."""

    Config = HFVideoConfig
    kinds = ("video",)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        from transformers import AutoModel, AutoVideoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cfg = self.config
        if cfg.config is not None:
            hf_config = from_config_dict(cfg.config, "hf_video")
            self.model = AutoModel.from_config(hf_config)
            self.processor = _processor_for(hf_config, cfg.processor)
        else:
            try:
                # AutoVideoProcessor also reads an older repo's image-processor config
                self.processor = AutoVideoProcessor.from_pretrained(cfg.model, **cfg.processor)
                self.model = AutoModel.from_pretrained(cfg.model)
            except OSError as err:
                where = "folder" if Path(cfg.model).exists() else "hub id (no network, or not on the hub?)"
                raise ConfigError(f"encoder hf_video: cannot load '{cfg.model}' as a {where}: "
                                  f"{str(err).splitlines()[0]}") from None
        self.num_frames = cfg.num_frames or getattr(self.model.config, "num_frames", None) or 16
        self.out_dim = self.model.config.hidden_size
        self.apply_trainable()

    def preprocess(self, raw: Any) -> Tensor:
        """Frames ``(F, H, W, C)`` -> ``num_frames`` uniformly sampled, processed ``(T, 3, S, S)``."""
        frames = video_array(raw)  # (F, H, W, 3) uint8
        idx = np.rint(np.linspace(0, frames.shape[0] - 1, self.num_frames)).astype(int)  # repeats if F < T
        out = self.processor([frames[idx]], return_tensors="pt")
        pixels = out["pixel_values"] if "pixel_values" in out else next(iter(out.values()))
        return torch.as_tensor(pixels[0]).float()  # (T, 3, S, S)

    def trainable_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.model)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).pooled  # (B, H)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Pooled ``(B, H)`` and the last hidden states ``(B, N, H)`` (no padding: all real)."""
        tokens = self.model(pixel_values=x).last_hidden_state  # (B, T, 3, S, S) -> (B, N, H)
        pooled = tokens[:, 0] if self.config.pooling == "cls" else tokens.mean(1)  # (B, H)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, N)
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)
