"""BLIP-2-style decoder: a Q-Former's learned queries read every modality's tokens and become the
prefix of a causal LM.

The LM reads, per sample, exactly as BLIP-2's OPT path (``inputs_embeds``; the prefix and the
prompt labelled -100, so the loss covers the answer tokens and the eos only)::

    [fused token] [query 1] ... [query N_q] [prompt tokens] [answer tokens, eos]

The Q-Former (B samples, M modalities in sorted-name order, K = sum_m L_m keys, W = qformer_width,
H = the LM's width)::

    E   = LN_E(concat_m [T_m A_m + a_m + e_m])     (B, K, W)  per-modality input projection + type embedding
    X^0 = learned queries                          (B, N_q, W)
    for each layer (pre-LayerNorm, residuals):
        X = X + SelfAttn(LN(X))                    the queries talk to each other
        X = X + CrossAttn(LN(X), E; beta)          softmax(q k^T / sqrt(W / heads) + beta_k) v, per head
        X = X + FFN(LN(X))                         Linear(W, 4W) - GELU - Linear(4W, W)
    prefix = LN(X^L) P + p                         (B, N_q, H)

How the DMS weights ``w`` (rows sum to 1 over the M_b present modalities) enter: ``beta (B, K)`` is
added to the cross-attention logits of every query and head towards key k of modality m:

- ``-inf`` when the key is padding or m is missing for the sample: never attended, so its values
  cannot change the output (they are also zeroed before the input projection);
- ``log(M_b * w_m)`` with ``weighting: bias`` (default): relative to uniform weights the
  cross-attention mass on m is multiplied by ``M_b * w_m`` before renormalisation; uniform weights
  (static ``mean`` fusion) give 0, i.e. a plain Q-Former; ``0`` with ``weighting: none``.

A sample with no attendable key at all (all of its tokens padding) gets a zero cross-attention
output instead of softmax over nothing (NaN). The LM side (loss, ``generate``, context check,
checkpoint keys) is :mod:`fusionkit.decoders.lm_prefix`, shared with the ``llava`` decoder.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from fusionkit.decoders.lm_prefix import LMPrefixDecoder, pool_tokens
from fusionkit.lm.loading import LMConfig, input_embeddings
from fusionkit.registry import register


class Blip2Config(LMConfig):
    num_queries: int = Field(32, ge=1, description=(
        "N_q learned queries = the LM prefix length from the Q-Former (BLIP-2 uses 32): the LM's cost "
        "no longer grows with the number of modality tokens"))
    qformer_layers: int = Field(2, ge=1, description=(
        "Q-Former blocks (self-attention, cross-attention, feed-forward); BLIP-2's 12 are pre-trained, "
        "a shallow one trains end to end on the task"))
    qformer_width: int = Field(256, ge=1, description=(
        "W, the Q-Former's width, independent of the LM's (BLIP-2: 768, BERT-base)"))
    qformer_heads: int = Field(4, ge=1, description="attention heads of every Q-Former attention; must divide W")
    max_tokens: int | None = Field(None, ge=1, description=(
        "at most this many tokens per modality before the Q-Former (average-pooled in contiguous groups, "
        "as in llava); None keeps every token: the cross-attention is linear in them and the LM prefix "
        "length does not depend on them"))
    weighting: Literal["bias", "none"] = Field("bias", description=(
        "how DMS weights reach the Q-Former: additive log(M*w) on the cross-attention logits towards "
        "each modality's tokens, or none (weights only choose which modalities are present)"))
    fused_token: bool = Field(True, description="put the fused vector h (projected) in front of the queries")
    prompt: str = Field("Answer:", description="text after the queries, before the answer")
    max_new_tokens: int = Field(5, ge=1, description="generation length limit (answers are short)")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; >1 = beam search")
    max_answer_tokens: int = Field(8, ge=1, description="training targets are cut to this many tokens (+ eos)")

    @field_validator("qformer_heads")
    @classmethod
    def _heads_divide_width(cls, heads: int, info: ValidationInfo) -> int:
        width = info.data.get("qformer_width")
        if width is not None and width % heads:
            options = [h for h in (1, 2, 4, 8, 16) if width % h == 0]
            raise ValueError(f"qformer_heads must divide qformer_width {width}; use one of {options}")
        return heads


class Attention(nn.Module):
    """Multi-head attention of ``x (B, Q, W)`` over ``context (B, K, W)`` with SDPA and a float mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def _split(self, t: Tensor) -> Tensor:
        B, L, W = t.shape
        return t.view(B, L, self.heads, W // self.heads).transpose(1, 2)  # (B, L, W) -> (B, heads, L, W/heads)

    def project(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, K, W)
        return self._split(self.q(x)), self._split(k), self._split(v)

    def forward(self, x: Tensor, context: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.project(x, context)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, Q, W/heads)
        B, _, Q, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(B, Q, -1))  # (B, Q, W)

    def probabilities(self, x: Tensor, context: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``softmax(q k^T / sqrt(d_h) + attn_mask)`` ``(B, heads, Q, K)``: what SDPA weighs ``v`` with."""
        q, k, _ = self.project(x, context)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, Q, K)
        return (scores if attn_mask is None else scores + attn_mask).softmax(-1)


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the modality tokens, feed-forward."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_self, self.self_attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm_cross, self.cross_attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))  # BERT's 4x

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor, gate: Tensor) -> Tensor:
        """``x (B, N_q, W)``, ``memory (B, K, W)``, ``attn_mask (B, heads, N_q, K)``, ``gate (B, 1, 1)``:
        1, or 0 for a sample without an attendable key."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross(x), memory, attn_mask) * gate
        return x + self.ff(self.norm_ff(x))  # (B, N_q, W)


@register("decoders", "blip2")
class Blip2Decoder(LMPrefixDecoder):
    """BLIP-2-style: a Q-Former's learned queries cross-attend over the DMS-weighted modality tokens."""

    Config = Blip2Config
    length_fix = "lower decoder.num_queries or shorten decoder.prompt"

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)  # loads the LM (lm_prefix.py)
        cfg = self.config
        W = cfg.qformer_width
        self.queries = nn.Parameter(0.02 * torch.randn(cfg.num_queries, W))  # (N_q, W); BLIP-2's init std
        self.inputs = nn.ModuleDict()  # per modality Linear(d_m, W): filled by attach()
        self.modality_embed = nn.ParameterDict()  # per modality (W,): filled by attach()
        self.memory_norm = nn.LayerNorm(W)  # one scale for every modality's keys (BLIP-2's ln_vision)
        self.layers = nn.ModuleList(QFormerLayer(W, cfg.qformer_heads) for _ in range(cfg.qformer_layers))
        self.out_norm = nn.LayerNorm(W)  # pre-LN blocks leave the residual stream unnormalised
        self.to_lm = nn.Linear(W, self.hidden)  # BLIP-2's language_projection
        self.fused_proj = nn.Linear(dim, self.hidden) if cfg.fused_token else None

    def attach(self, token_dims: dict[str, int]) -> None:
        """Build each modality's input projection and type embedding from its token width."""
        W = self.config.qformer_width
        for m in sorted(token_dims):
            self.inputs[m] = nn.Linear(token_dims[m], W)
            self.modality_embed[m] = nn.Parameter(0.02 * torch.randn(W))

    # -- the Q-Former --------------------------------------------------------------------------
    def memory(self, fused, tokens: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The cross-attention's keys/values ``(B, K, W)`` and its additive per-key bias ``(B, K)``:
        ``log(M_b * w_m)`` (or 0) on modality m's real tokens, ``-inf`` on padding and missing ones."""
        cfg = self.config
        weights, present = fused.weights, fused.mask  # (B, M), 0 / False where missing
        n_present = present.sum(1, keepdim=True).to(weights.dtype)  # (B, 1)
        rel = (weights * n_present).clamp_min(1e-4)  # (B, M): M_b * w_m, 1 for uniform weights
        dtype = self.queries.dtype
        parts, biases = [], []
        for j, m in enumerate(fused.modalities):
            t = tokens[m]
            tok, tmask = pool_tokens(t.tokens, t.mask, cfg.max_tokens)  # (B, L, d_m), (B, L)
            tmask = tmask & present[:, j : j + 1]  # a missing modality: every position masked
            tok = torch.where(tmask.unsqueeze(-1), tok.to(dtype), torch.zeros((), dtype=dtype, device=tok.device))
            parts.append(self.inputs[m](tok) + self.modality_embed[m])  # (B, L, W)
            logw = rel[:, j : j + 1].log() if cfg.weighting == "bias" else torch.zeros_like(rel[:, :1])  # (B, 1)
            biases.append(torch.where(tmask, logw.expand_as(tmask), float("-inf")))  # (B, L)
        return self.memory_norm(torch.cat(parts, 1)), torch.cat(biases, 1).to(dtype)  # (B, K, W), (B, K)

    def attention_inputs(self, fused, tokens: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``(memory (B, K, W), attn_mask (B, heads, N_q, K), gate (B, 1, 1))`` for every layer."""
        memory, bias = self.memory(fused, tokens)
        B, K, _ = memory.shape
        has_key = torch.isfinite(bias).any(1)  # (B,)
        bias = bias.masked_fill(~has_key[:, None], 0.0)  # keeps SDPA finite; the gate zeroes that output
        attn_mask = bias[:, None, None, :].expand(B, self.config.qformer_heads, self.config.num_queries, K)
        return memory, attn_mask, has_key[:, None, None].to(memory.dtype)

    def qformer(self, fused, tokens: dict[str, Any]) -> Tensor:
        """The queries' outputs projected to the LM width: ``(B, num_queries, H)``."""
        memory, attn_mask, gate = self.attention_inputs(fused, tokens)
        x = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, N_q, W)
        for layer in self.layers:
            x = layer(x, memory, attn_mask, gate)
        return self.to_lm(self.out_norm(x))  # (B, N_q, H)

    # -- the LM input --------------------------------------------------------------------------
    def prefix(self, fused, tokens: dict[str, Any]) -> tuple[Tensor, Tensor, None]:
        """``(embeds (B, P, H), attention mask (B, P) long, None)``: every position is attended (a
        missing modality is already masked inside the Q-Former), and the LM runs unchanged."""
        dtype = input_embeddings(self.lm).weight.dtype
        B = fused.weights.shape[0]
        parts = []
        if self.fused_proj is not None:
            h = fused.fused.to(self.fused_proj.weight.dtype)
            parts.append(self.fused_proj(h).to(dtype).unsqueeze(1))  # (B, 1, H)
        parts.append(self.qformer(fused, tokens).to(dtype))  # (B, N_q, H)
        parts.append(self.prompt_embeds(B))  # (B, P_text, H)
        embeds = torch.cat(parts, 1)  # (B, P, H)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device), None
