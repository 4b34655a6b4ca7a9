"""Video encoder: any registered image encoder on uniformly sampled frames, then temporal pooling.

``preprocess`` picks up to ``num_frames`` frames spread uniformly over the clip (all of them
for a shorter clip) and runs the inner image encoder's own ``preprocess`` on each. ``collate``
hands every frame of the batch to the inner encoder's ``collate`` at once and keeps the frame
count per clip; ``forward`` encodes the real frames only (no compute on padding), scatters them
into ``(B, F_max, d)`` and pools over time with a frame mask: a clip pools the same frames in
any batch. ``attention`` pooling learns a softmax over frames from a small scoring MLP.

Tokens (``encode``): one per frame, the inner encoder's per-frame features before temporal
pooling, ``(B, F_max, d)`` with the frame mask (padded frames are zero).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput, ModalitySpec
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import build, component_field, register, registry


class FramesConfig(EncoderConfig):
    trainable: bool | int = Field(True, description=(
        "true: the image encoder keeps its own 'trainable' and the pooling trains; false: all "
        "frozen; N: the last N blocks of [image encoder blocks..., attention pooling]"))
    image: Any = component_field("encoders", {"name": "timm", "model_name": "resnet18", "image_size": 112}, (
        "the image encoder run on every frame (any registered image encoder block)"))
    num_frames: int = Field(8, ge=1, description="frames sampled uniformly per clip (cost grows linearly)")
    pooling: Literal["mean", "attention"] = Field("mean", description=(
        "mean over real frames, or a learned softmax over frames (lets the model pick key frames)"))
    attention_hidden: int = Field(64, ge=1, description="width of the attention pooling's scoring MLP")


class AttentionPool(nn.Module):
    """Softmax over frames of a learned score; padded frames get weight 0."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def weights(self, x: Tensor, mask: Tensor) -> Tensor:
        s = self.score(x).squeeze(-1)  # (B, F, d) -> (B, F)
        return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=1)  # (B, F), every clip has a frame

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.einsum("bf,bfd->bd", self.weights(x, mask), x)  # (B, d)


@register("encoders", "frames")
class FramesEncoder(Encoder):
    """Video -> any image encoder per sampled frame -> masked mean or attention over time (B, d)."""

    Config = FramesConfig
    kinds = ("video",)

    @classmethod
    def weight_files(cls, config: FramesConfig):
        """The inner image encoder's files with mean pooling; None with attention pooling (random init)."""
        if config.pooling != "mean":
            return None
        inner, inner_config = registry("encoders").validate(config.image, "encoder frames.image")
        return inner.weight_files(inner_config)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        cfg = self.config
        kinds = registry("encoders").get(cfg.image["name"]).kinds
        if kinds and "image" not in kinds:
            raise ConfigError(f"encoder frames.image: '{cfg.image['name']}' takes {list(kinds)}, not image")
        channels = spec.channels or 3  # video frames are RGB unless the dataset says otherwise
        self.image = build("encoders", cfg.image, "encoder frames.image",
                           spec=ModalitySpec("image", channels=channels))
        self.out_dim = self.image.out_dim
        self.pool = AttentionPool(self.out_dim, cfg.attention_hidden) if cfg.pooling == "attention" else None
        self.apply_trainable()

    def preprocess(self, raw: Any) -> list[Any]:
        """Frames ``(F, H, W, C)`` -> the inner encoder's preprocessed frames (at most num_frames)."""
        frames = np.asarray(raw)
        if frames.ndim not in (3, 4) or frames.shape[0] == 0:
            raise DataError(f"video has shape {frames.shape}; expected (F, H, W, C) or (F, H, W) with F >= 1")
        n = frames.shape[0]
        idx = np.arange(n) if n <= self.config.num_frames else \
            np.rint(np.linspace(0, n - 1, self.config.num_frames)).astype(int)
        return [self.image.preprocess(frames[i]) for i in idx]

    def collate(self, items: list[list[Any]]) -> dict[str, Any]:
        """Clips -> ``frames`` (the inner batch of all their frames) and ``counts (B,)``."""
        counts = torch.tensor([len(clip) for clip in items], dtype=torch.long)
        return {"frames": self.image.collate([f for clip in items for f in clip]), "counts": counts}

    def trainable_blocks(self) -> list[nn.Module]:
        return [*self.image.trainable_blocks(), *([self.pool] if self.pool is not None else [])]

    def frame_features(self, x: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(B, F_max, d)`` per-frame features (zeros on padding) and the ``(B, F_max)`` frame mask."""
        counts = x["counts"]
        flat = self.image(x["frames"])  # (sum of counts, d)
        B, F_max = counts.numel(), int(counts.max())
        mask = torch.arange(F_max, device=flat.device) < counts.to(flat.device)[:, None]  # (B, F_max)
        feats = flat.new_zeros(B, F_max, flat.shape[-1])
        feats[mask] = flat  # row-major order of mask matches the clip-by-clip order of frames
        return feats, mask

    def forward(self, x: dict[str, Any]) -> Tensor:
        return self.encode(x).pooled  # (B, d)

    def encode(self, x: dict[str, Any]) -> EncoderOutput:
        """Pooled ``(B, d)`` and one token per sampled frame ``(B, F_max, d)`` with the frame mask."""
        feats, mask = self.frame_features(x)  # (B, F, d), (B, F)
        if self.pool is not None:
            pooled = self.pool(feats, mask)  # (B, d)
        else:
            m = mask.unsqueeze(-1).to(feats.dtype)  # (B, F, 1)
            pooled = (feats * m).sum(1) / m.sum(1)  # (B, d): every clip has at least one frame
        return EncoderOutput(pooled=pooled, tokens=feats, token_mask=mask)
