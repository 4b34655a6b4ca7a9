"""Image encoders that are a pretrained BLIP-2 or LLaVA checkpoint's own image path.

``hf_blip2_vision`` runs the checkpoint's ViT, Q-Former (its learned queries) and language
projection; ``hf_llava_vision`` its vision tower (hidden states of ``vision_feature_layer``, CLS
dropped by the ``default`` select strategy) and multi-modal projector. Both return the tokens the
checkpoint would splice into its LM, already in the LM width H::

    image -> checkpoint image processor -> (3, S, S) -> image path -> tokens (B, N, H), pooled = mean (B, H)

so the matching decoder (``hf_blip2`` / ``hf_llava``, same ``model``) feeds them to the LM
unchanged, with DMS in between; the pooled mean is the vector DMS scores and fuses. Preprocessing is
the checkpoint's own image processor (``preprocessor_config.json``: resize, crop, mean/std).
One file for both: they differ only in which half of :mod:`fusionkit.lm.vlm` they load.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput
from fusionkit.errors import DataError
from fusionkit.registry import register

class VLMVisionConfig(EncoderConfig):
    trainable: bool | int = Field(False, description=(
        "frozen by default: the checkpoint's image path already speaks its LM's language; true: "
        "fine-tune all of it; N: the last N blocks (1 = only the projection into the LM)"))
    model: str = Field(..., description=(
        "the checkpoint (hub id or local save_pretrained folder); name the same one as the decoder's "
        "model: these tokens mean something only to that checkpoint's LM"))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "weight dtype: float32 is exact and fast on CPU; bfloat16 halves memory on accelerators"))


class VLMVisionEncoder(Encoder):
    """Base: a checkpoint's image path (family ``blip2`` or ``llava``) as an image encoder."""

    Config = VLMVisionConfig
    kinds = ("image",)
    family = ""

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        from fusionkit.lm.loading import lm_hidden_size
        from fusionkit.lm.vlm import load_image_path, load_image_processor

        cfg = self.config
        who = f"encoder {self.registry_name}"
        self.vlm = load_image_path(cfg.model, self.family, cfg.dtype, who)  # Blip2ImagePath / LlavaImagePath
        self.processor = load_image_processor(cfg.model, who)
        self.out_dim = lm_hidden_size(self.vlm)  # H: tokens and pooled vector are in the LM width
        self.apply_trainable()

    def preprocess(self, raw: Any) -> Tensor:
        """PIL image, array ``(H, W)`` / ``(H, W, C)`` or tensor ``(C, H, W)`` -> pixel values ``(3, S, S)``.

        uint8 input goes to the checkpoint's processor as it is (exactly its own preprocessing);
        float input is taken to be in [0, 1] already and is not divided by 255 again.
        """
        if isinstance(raw, Tensor):
            x = raw if raw.dim() == 3 else raw.unsqueeze(0)  # (C, H, W)
        else:
            arr = np.asarray(raw)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            if arr.ndim != 3:
                raise DataError(f"image has shape {arr.shape}; expected (H, W) or (H, W, C)")
            x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)  # (C, H, W)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)  # gray -> RGB
        elif x.shape[0] == 4:
            x = x[:3]  # RGBA -> RGB
        elif x.shape[0] != 3:
            raise DataError(f"image has {x.shape[0]} channels; encoder {self.registry_name} reads RGB or gray")
        if x.dtype != torch.uint8:
            x = x.float()
        out = self.processor(images=x, do_rescale=x.dtype == torch.uint8, return_tensors="pt")
        return out["pixel_values"][0]  # (3, S, S): resized, cropped, normalised as the checkpoint expects

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).pooled

    def encode(self, x: Tensor) -> EncoderOutput:
        """Tokens ``(B, N, H)`` exactly as the checkpoint computes them, and their mean ``(B, H)``."""
        dtype = next(self.vlm.parameters()).dtype
        tokens = self.vlm.image_tokens(x.to(dtype))  # (B, N, H)
        mask = tokens.new_ones(tokens.shape[:2], dtype=bool)  # (B, N): a fixed number, no padding
        return EncoderOutput(pooled=tokens.mean(1), tokens=tokens, token_mask=mask)

    def external_state(self) -> set[str]:
        """Frozen checkpoint weights: rebuilt from ``model`` on load, not worth storing in checkpoints."""
        return {f"vlm.{k}" for k, p in self.vlm.named_parameters() if not p.requires_grad}


class Blip2VisionConfig(VLMVisionConfig):
    model: str = Field("Salesforce/blip2-opt-2.7b", description=VLMVisionConfig.model_fields["model"].description)


@register("encoders", "hf_blip2_vision")
class Blip2VisionEncoder(VLMVisionEncoder):
    """Images -> a BLIP-2 checkpoint's ViT + Q-Former + projection -> its query tokens (B, N_q, H)."""

    Config = Blip2VisionConfig
    family = "blip2"

    def trainable_blocks(self) -> list[nn.Module]:
        """ViT, Q-Former (its queries follow it), projection into the LM: ``trainable: 1`` trains the projection."""
        return [self.vlm.vision_model, self.vlm.qformer, self.vlm.language_projection]

    def apply_trainable(self) -> None:
        super().apply_trainable()
        self.vlm.query_tokens.requires_grad_(any(p.requires_grad for p in self.vlm.qformer.parameters()))


class LlavaVisionConfig(VLMVisionConfig):
    model: str = Field("llava-hf/llava-1.5-7b-hf", description=VLMVisionConfig.model_fields["model"].description)


@register("encoders", "hf_llava_vision")
class LlavaVisionEncoder(VLMVisionEncoder):
    """Images -> a LLaVA checkpoint's vision tower + multi-modal projector -> patch tokens (B, N, H)."""

    Config = LlavaVisionConfig
    family = "llava"

    def trainable_blocks(self) -> list[nn.Module]:
        """Vision tower, then projector: ``trainable: 1`` trains the projector only (LLaVA's stage 1)."""
        return [self.vlm.model.vision_tower, self.vlm.model.multi_modal_projector]
