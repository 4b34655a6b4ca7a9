"""Retrieval decoder: the fused vector as a query embedding, target texts as key embeddings (CLIP style).

- target texts -> a text encoder (``target_encoder``: any registered text encoder, by default the
  bundled all-MiniLM-L6-v2 through ``hf_text``, frozen) -> a trainable linear projection -> L2
  normalisation: ``t (N, E)``;
- fused ``h (B, d)`` -> a trainable linear projection -> L2 normalisation: ``q (B, E)``;
- similarity logits ``s * q t^T`` with a learnable scale ``s = exp(logit_scale)``, initialised at
  1 / 0.07 and clamped at 100 as in CLIP.

``E`` is the decoder's ``num_classes``: the retrieval task passes its ``embed_dim``, which is also
the width of the unimodal heads, so :meth:`RetrievalDecoder.probe_transform` can compare the
heads' outputs with the same target embeddings. A frozen target encoder is rebuilt from the
config on load, so checkpoints do not store its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.decoders.base import Decoder, DecoderConfig
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError
from fusionkit.registry import build, component_field, register, registry


class RetrievalDecoderConfig(DecoderConfig):
    target_encoder: Any = component_field(
        "encoders", {"name": "hf_text"},
        "encoder of the target texts (default: bundled all-MiniLM-L6-v2, frozen, so each distinct "
        "text is encoded once and remembered); only the projection after it is trained")
    logit_scale: float = Field(math.log(1 / 0.07), description=(
        "initial log of the similarity scale (CLIP: log(1 / 0.07), a softmax temperature of 0.07)"))
    max_scale: float = Field(100.0, gt=0, description=(
        "exp(logit_scale) is clamped here (CLIP), so training cannot make the softmax arbitrarily sharp"))
    chunk: int = Field(256, ge=1, description="texts encoded per call when embedding many (a gallery)")


@register("decoders", "retrieval")
class RetrievalDecoder(Decoder):
    """Query embedding of the fused vector vs embeddings of target texts, with a learnable CLIP temperature."""

    Config = RetrievalDecoderConfig
    retrieval = True  # the model embeds the batch's target texts and maps the probes onto them

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)
        cfg = self.config
        block = cfg.target_encoder
        kinds = registry("encoders").get(block["name"]).kinds
        if "text" not in kinds:
            raise ConfigError(f"model.decoder.target_encoder: encoder '{block['name']}' takes {list(kinds)}, "
                              f"not text")
        self.target_encoder = build("encoders", block, "model.decoder.target_encoder", spec=ModalitySpec("text"))
        self.query_proj = nn.Linear(dim, num_classes)
        self.target_proj = nn.Linear(self.target_encoder.out_dim, num_classes)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale)))

    def external_state(self) -> set[str]:
        """Frozen target-encoder weights are rebuilt from the config on load, not stored."""
        return {f"target_encoder.{k}" for k, p in self.target_encoder.named_parameters() if not p.requires_grad}

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_scale)

    def forward(self, h: Tensor) -> Tensor:
        """Unit query embeddings: ``(B, d) -> (B, E)``."""
        return F.normalize(self.query_proj(h), dim=-1)

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Unit target embeddings ``(N, E)`` of ``texts`` (encoded ``chunk`` at a time)."""
        enc = self.target_encoder
        ref = self.target_proj.weight
        parts = []
        for start in range(0, len(texts), self.config.chunk):
            x = enc.collate([enc.preprocess(t) for t in texts[start:start + self.config.chunk]])
            x = {k: v.to(ref.device) for k, v in x.items()} if isinstance(x, dict) else x.to(ref.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not enc.frozen):
                feats = enc(x)  # (n, H)
            parts.append(self.target_proj(feats.to(ref.dtype)))  # (n, E)
        out = torch.cat(parts) if parts else torch.zeros(0, ref.shape[0], dtype=ref.dtype, device=ref.device)
        return F.normalize(out, dim=-1)

    def similarity(self, query: Tensor, targets: Tensor) -> Tensor:
        """Logits ``s * q t^T``: ``(B, E), (N, E) -> (B, N)``."""
        return self.scale() * query @ targets.T

    def probe_transform(self, candidates: Tensor) -> Callable[[Tensor], Tensor]:
        """Map unimodal head outputs ``(..., B, M, E)`` to logits over ``candidates`` ``(N, E)``:
        ``(..., B, M, N)`` = normalised head output . candidate * scale. Candidates and scale are
        detached: the probes learn to point at targets, they do not move the target space."""
        cand = candidates.detach()  # (N, E)
        scale = self.scale().detach()

        def transform(out: Tensor) -> Tensor:
            return F.normalize(out, dim=-1) @ cand.T.to(out.dtype) * scale.to(out.dtype)  # (..., B, M, N)

        return transform
