"""Text encoder: the text tower of an open_clip model, with open_clip's own tokenizer.

Shares building and block splitting with :mod:`fusionkit.encoders.open_clip_image`; an image
and a text modality configured with the same ``model_name``/``pretrained`` land in one
embedding space (useful for alignment scores).

Tokens: open_clip's ``encode_text`` returns only the pooled (EOT) embedding, but its per-token
states pass through the tower's ``ln_final`` on the way. ``encode`` records that module's output
with a forward hook for the duration of one ``encode_text`` call, so the tokens
``(B, context_length, width)`` come from the very pass that gives the pooled vector; the mask
marks every id that is not the tokenizer's padding. Towers without a per-token ``ln_final``
(Hugging Face text towers, CoCa's class-token tower) fall back to the pooled vector as one token.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderOutput
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
        # open_clip's SimpleTokenizer pads with 0; HF-backed tokenizers use their own pad id
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        self.apply_trainable()

    def _token_norm(self) -> nn.LayerNorm | None:
        """The tower's ``ln_final`` when it sees every position's state, else None."""
        tower = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps a separate tower
        norm = getattr(tower, "ln_final", None)
        # CoCa's tower (cls_emb) applies ln_final to the pooled vector only: no token states there
        return norm if isinstance(norm, nn.LayerNorm) and getattr(tower, "cls_emb", None) is None else None

    @property
    def token_dim(self) -> int:
        """The text transformer's width when per-token states are reachable; else ``out_dim``."""
        norm = self._token_norm()
        return int(norm.normalized_shape[0]) if norm is not None else self.out_dim

    def preprocess(self, raw: Any) -> Tensor:
        """Text -> token ids ``(context_length,)``, padded/truncated by the tokenizer."""
        if not isinstance(raw, str):
            raise DataError(f"text must be a string, got {type(raw).__name__}")
        return self.tokenizer([raw])[0]  # (1, L) -> (L,)

    def trainable_blocks(self) -> list[nn.Module]:
        return tower_blocks(getattr(self.model, "text", self.model))

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_text(x)  # (B, L) token ids -> (B, embed_dim)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Pooled ``(B, embed_dim)`` and the ``ln_final`` states ``(B, L, width)`` of non-padding ids."""
        norm = self._token_norm()
        if norm is None:
            return super().encode(x)  # no per-token states: the pooled vector as one token
        seen: list[Tensor] = []
        hook = norm.register_forward_hook(lambda _module, _args, out: seen.append(out))
        try:
            pooled = self.model.encode_text(x)  # (B, L) ids -> (B, embed_dim); the hook sees (B, L, width)
        finally:
            hook.remove()
        mask = x != self.pad_id  # (B, L): SOT, text and EOT are real, padding is not
        tokens = seen[-1] * mask.unsqueeze(-1).to(seen[-1].dtype)  # (B, L, width), zeros on padding
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)
