"""LLaVA-style language-model decoder: DMS-weighted modality tokens as a prefix of a causal LM.

Each modality's token sequence ``(B, L_m, token_dim)`` goes through its own projector (LLaVA-1.5's
two-layer GELU MLP) into the LM's hidden size, and the sequence the LM reads is, per sample::

    [fused token] [modality 1 tokens] ... [modality M tokens] [prompt tokens] [answer tokens, eos]

passed as ``inputs_embeds``. The fused token is the fusion's ``h`` (so the fused representation
feeds the decoder); modalities come in sorted-name order. Every sample of a batch has the same
prefix layout: padding inside a modality and every token of a missing modality are switched off
in ``attention_mask`` (never attended, so their values cannot change the output), and position
ids count only attended tokens (``cumsum(mask) - 1``, as ``generate`` computes them). Training
labels are -100 everywhere except the answer tokens and the closing eos.

How the DMS weights ``w`` (rows sum to 1 over the M_b present modalities) reach the LM
(``weighting``):

- ``bias`` (default): an additive ``log(M_b * w_m)`` on the attention logits of every query
  towards every key of modality m, in every layer and head. Relative to uniform weights,
  attention mass on m is multiplied by ``M_b * w_m`` before renormalisation; uniform weights (or
  static ``mean`` fusion) give bias 0, i.e. plain LLaVA. It is implemented as an attention
  function registered with transformers' ``AttentionInterface`` that adds the per-key bias to
  SDPA (``position_bias``), also during ``generate``.
- ``scale``: modality m's token embeddings multiplied by ``M_b * w_m`` (LLaMA's pre-norm
  partly undoes this in the first layer; the residual stream keeps it).
- ``both``, or ``none`` (weights only choose which modalities are present).

The LM side (answer labels, the teacher-forced loss, ``generate``, the context check, checkpoint
keys) is shared with the ``blip2`` decoder in :mod:`fusionkit.decoders.lm_prefix`.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.decoders.lm_prefix import LMPrefixDecoder, pool_tokens
from fusionkit.lm.loading import LMConfig, input_embeddings
from fusionkit.registry import register

ATTENTION = "fusionkit_sdpa"  # name of the biased attention function registered with transformers


class LlavaConfig(LMConfig):
    projector: Literal["mlp2x_gelu", "linear"] = Field("mlp2x_gelu", description=(
        "per-modality projector into the LM width: LLaVA-1.5's Linear-GELU-Linear, or one Linear (LLaVA-1)"))
    max_tokens: int | None = Field(16, ge=1, description=(
        "at most this many tokens per modality (longer sequences are average-pooled in contiguous "
        "groups): the LM's cost grows with the prefix length; None keeps every token"))
    fused_token: bool = Field(True, description="put the fused vector h (projected) in front of the modality tokens")
    weighting: Literal["bias", "scale", "both", "none"] = Field("bias", description=(
        "how DMS weights reach the LM: additive log(M*w) attention bias on each modality's tokens, "
        "scaling of their embeddings by M*w, both, or none"))
    prompt: str = Field("Answer:", description="text after the modality tokens, before the answer")
    max_new_tokens: int = Field(5, ge=1, description="generation length limit (answers are short)")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; >1 = beam search")
    max_answer_tokens: int = Field(8, ge=1, description="training targets are cut to this many tokens (+ eos)")


# The per-key bias of the LM call in progress, (B, L0); set only inside `key_bias(...)`. A context
# variable rather than a model argument because `generate` rejects arguments the LM does not declare.
_KEY_BIAS: ContextVar[Tensor | None] = ContextVar("fusionkit_key_bias", default=None)


@contextmanager
def key_bias(bias: Tensor | None):
    """Within the block, every attention call of an LM using ``ATTENTION`` adds ``bias`` per key."""
    token = _KEY_BIAS.set(bias)
    try:
        yield
    finally:
        _KEY_BIAS.reset(token)


def _biased_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the additive per-key bias of :func:`key_bias` ``(B, L0)`` on the first L0 keys (0
    beyond: tokens generated later carry no bias). Beam search repeats each sample's rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key_bias = _KEY_BIAS.get()
    if key_bias is not None:
        if key_bias.shape[0] != query.shape[0]:  # beams: (B, L0) -> (B * beams, L0)
            key_bias = key_bias.repeat_interleave(query.shape[0] // key_bias.shape[0], dim=0)
        kv = key.shape[2]
        bias = key_bias[:, :kv] if key_bias.shape[1] >= kv else F.pad(key_bias, (0, kv - key_bias.shape[1]))  # (B, kv)
        bias = bias[:, None, None, :].to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], kv)
        if kwargs.get("position_bias") is not None:
            bias = bias + kwargs["position_bias"]
        kwargs["position_bias"] = bias  # (B, heads, q, kv)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_biased_attention() -> None:
    """Make ``ATTENTION`` a valid ``attn_implementation`` (attention and its mask builder)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _biased_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _projector(kind: str, width: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, hidden)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


@register("decoders", "llava")
class LlavaDecoder(LMPrefixDecoder):
    """LLaVA-style: DMS-weighted modality tokens (and the fused vector) as a causal LM's prefix."""

    Config = LlavaConfig
    length_fix = "lower decoder.max_tokens or shorten decoder.prompt"

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)  # loads the LM (lm_prefix.py)
        cfg = self.config
        register_biased_attention()
        base = getattr(self.lm, "base_model", self.lm)
        for model in {id(self.lm): self.lm, id(base): base}.values():
            if hasattr(model, "set_attn_implementation"):
                try:
                    model.set_attn_implementation(ATTENTION)
                except (ValueError, TypeError, AttributeError):
                    pass
        lm_config = getattr(self.lm, "config", None)
        if lm_config is not None:
            lm_config._attn_implementation = ATTENTION
        self.fused_proj = _projector(cfg.projector, dim, self.hidden) if cfg.fused_token else None
        self.projectors = nn.ModuleDict()  # filled by attach() once the encoders' token widths are known

    def attach(self, token_dims: dict[str, int]) -> None:
        """Build one projector per modality from its encoder's token width (sorted names)."""
        for m in sorted(token_dims):
            self.projectors[m] = _projector(self.config.projector, token_dims[m], self.hidden)

    # -- building the LM input -----------------------------------------------------------------
    def prefix(self, fused, tokens: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``(embeds (B, P, H), attention mask (B, P) long, key bias (B, P))`` of the shared prefix."""
        cfg = self.config
        weights = fused.weights  # (B, M), 0 where missing
        present = fused.mask  # (B, M)
        B, M = weights.shape
        embed = input_embeddings(self.lm)
        dtype = embed.weight.dtype
        n_present = present.sum(1, keepdim=True).to(weights.dtype)  # (B, 1)
        rel = (weights * n_present).clamp_min(1e-4)  # (B, M): M_b * w_m, 1 for uniform weights
        parts, masks, biases = [], [], []
        if self.fused_proj is not None:
            parts.append(self.fused_proj(fused.fused.to(dtype)).unsqueeze(1))  # (B, 1, H)
            masks.append(torch.ones(B, 1, dtype=torch.bool, device=weights.device))
            biases.append(torch.zeros(B, 1, dtype=weights.dtype, device=weights.device))
        for j, m in enumerate(fused.modalities):
            t = tokens[m]
            tok, tmask = pool_tokens(t.tokens, t.mask, cfg.max_tokens)  # (B, L, d), (B, L)
            e = self.projectors[m](tok.to(dtype))  # (B, L, H)
            tmask = tmask & present[:, j : j + 1]  # a missing modality: every position masked
            if cfg.weighting in ("scale", "both"):
                e = e * rel[:, j, None, None].to(e.dtype)
            e = e * tmask.unsqueeze(-1).to(e.dtype)  # masked positions hold zeros
            bias = rel[:, j : j + 1].log().expand(B, e.shape[1]) if cfg.weighting in ("bias", "both") \
                else torch.zeros(B, e.shape[1], dtype=weights.dtype, device=weights.device)
            parts.append(e)
            masks.append(tmask)
            biases.append(torch.where(tmask, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))
        prompt = self.prompt_embeds(B)  # (B, P_text, H)
        parts.append(prompt)
        masks.append(torch.ones(B, prompt.shape[1], dtype=torch.bool, device=weights.device))
        biases.append(torch.zeros(B, prompt.shape[1], dtype=weights.dtype, device=weights.device))
        embeds = torch.cat(parts, 1)  # (B, P, H)
        mask = torch.cat(masks, 1)  # (B, P)
        bias = torch.cat(biases, 1).float()  # (B, P)
        return embeds, mask.long(), bias

    def lm_bias(self, bias: Tensor | None):
        """The LM's attention adds ``bias (B, L0)`` per key (``ATTENTION``), also during ``generate``."""
        return key_bias(bias)
