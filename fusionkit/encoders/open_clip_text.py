"""Text encoder: the text tower of an open_clip model, with open_clip's own tokenizer.

Shares building and block splitting with :mod:`fusionkit.encoders.open_clip_image`; an image
and a text modality configured with the same ``model_name``/``pretrained`` land in one
embedding space (useful for alignment scores).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fusionkit.encoders.base import Encoder
from fusionkit.encoders.open_clip_image import OpenClipConfig, create_open_clip, embed_dim, tower_blocks
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register


@register("encoders", "open_clip_text")
class OpenClipTextEncoder(Encoder):
    """Text -> open_clip tokenizer + text tower (random, tag or local weights) -> (B, embed_dim)."""

    Config = OpenClipConfig
    kinds = ("text",)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        import open_clip

        model, _ = create_open_clip(self.config, "open_clip_text")
        self.out_dim = embed_dim(model)
        # CLIP keeps its text tower as loose attributes, so keep the model and drop what the
        # text side never uses (the vision tower, the contrastive logit scale/bias)
        for unused in ("visual", "logit_scale", "logit_bias"):
            if hasattr(model, unused):
                delattr(model, unused)
        self.model = model
        # the tokenizer belongs to model_name; context_length is the built model's (model_cfg may change it)
        self.tokenizer = open_clip.get_tokenizer(self.config.model_name, context_length=model.context_length)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and vocab > model.vocab_size:
            raise ConfigError(f"encoder open_clip_text: the tokenizer has {vocab} tokens but the model's "
                              f"vocab_size is {model.vocab_size}; set model_cfg.text_cfg.vocab_size >= {vocab}")
        self.apply_trainable()

    def preprocess(self, raw: Any) -> Tensor:
        """Text -> token ids ``(context_length,)``, padded/truncated by the tokenizer."""
        if not isinstance(raw, str):
            raise DataError(f"text must be a string, got {type(raw).__name__}")
        return self.tokenizer([raw])[0]  # (1, L) -> (L,)

    def trainable_blocks(self) -> list[nn.Module]:
        return tower_blocks(getattr(self.model, "text", self.model))

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_text(x)  # (B, L) token ids -> (B, embed_dim)
