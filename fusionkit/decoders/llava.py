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
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fusionkit.decoders.base import Decoder
from fusionkit.errors import ConfigError
from fusionkit.lm.loading import LMConfig, input_embeddings, lm_context_length, lm_hidden_size, load_causal_lm
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


def pool_tokens(tokens: Tensor, mask: Tensor, limit: int | None) -> tuple[Tensor, Tensor]:
    """Average contiguous groups so that at most ``limit`` tokens remain (masked mean per group).

    ``tokens (B, L, d)``, ``mask (B, L)`` -> ``(B, L', d)``, ``(B, L')`` with ``L' = ceil(L / g)``,
    ``g = ceil(L / limit)``; a group is real when any of its tokens is.
    """
    B, L, d = tokens.shape
    if limit is None or L <= limit:
        return tokens, mask
    g = math.ceil(L / limit)
    groups = math.ceil(L / g)
    pad = groups * g - L
    t = F.pad(tokens, (0, 0, 0, pad)).view(B, groups, g, d)  # (B, L', g, d)
    m = F.pad(mask, (0, pad)).view(B, groups, g).to(tokens.dtype)  # (B, L', g)
    pooled = (t * m.unsqueeze(-1)).sum(2) / m.sum(2, keepdim=True).clamp_min(1)  # (B, L', d)
    return pooled, m.sum(2) > 0


def _projector(kind: str, width: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, hidden)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


@register("decoders", "llava")
class LlavaDecoder(Decoder):
    """LLaVA-style: DMS-weighted modality tokens (and the fused vector) as a causal LM's prefix."""

    Config = LlavaConfig
    generative = True
    needs_tokens = True

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)
        cfg = self.config
        self.lm, self.tokenizer = load_causal_lm(cfg)
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
        self.hidden = lm_hidden_size(self.lm)
        self.context = lm_context_length(self.lm)
        self.fused_proj = _projector(cfg.projector, dim, self.hidden) if cfg.fused_token else None
        self.projectors = nn.ModuleDict()  # filled by attach() once the encoders' token widths are known
        tok = self.tokenizer
        self.register_buffer("prompt_ids", torch.tensor(tok(cfg.prompt, add_special_tokens=False)["input_ids"],
                                                        dtype=torch.long), persistent=False)
        if tok.eos_token_id is None:
            raise ConfigError(f"decoder llava: the tokenizer of LM '{cfg.lm}' has no eos token; choose another LM")

    def attach(self, token_dims: dict[str, int]) -> None:
        """Build one projector per modality from its encoder's token width (sorted names)."""
        for m in sorted(token_dims):
            self.projectors[m] = _projector(self.config.projector, token_dims[m], self.hidden)

    def external_state(self) -> set[str]:
        """Frozen pretrained LM weights are rebuilt from ``lm`` on load, not stored in checkpoints
        (LoRA: only the adapters are stored; full fine-tuning: everything)."""
        if self.config.trainable == "full":
            return set()
        return {f"lm.{k}" for k, p in self.lm.named_parameters() if not p.requires_grad}

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
        prompt = embed(self.prompt_ids.to(embed.weight.device)).unsqueeze(0).expand(B, -1, -1)  # (B, P_text, H)
        parts.append(prompt)
        masks.append(torch.ones(B, prompt.shape[1], dtype=torch.bool, device=weights.device))
        biases.append(torch.zeros(B, prompt.shape[1], dtype=weights.dtype, device=weights.device))
        embeds = torch.cat(parts, 1)  # (B, P, H)
        mask = torch.cat(masks, 1)  # (B, P)
        bias = torch.cat(biases, 1).float()  # (B, P)
        return embeds, mask.long(), bias

    def _check_length(self, length: int) -> None:
        if length > self.context:
            raise ConfigError(f"decoder llava: the LM input has {length} tokens but LM '{self.config.lm}' reads at "
                              f"most {self.context}; lower decoder.max_tokens or shorten decoder.prompt")

    def _answer_ids(self, answers: list[str], device) -> tuple[Tensor, Tensor]:
        """Right-padded answer token ids + eos ``(B, A)`` and their mask."""
        tok = self.tokenizer
        limit = self.config.max_answer_tokens
        seqs = [tok(" " + a.strip(), add_special_tokens=False)["input_ids"][:limit] + [tok.eos_token_id]
                for a in answers]
        A = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), A), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), A, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return ids.to(device), mask.to(device)

    @staticmethod
    def positions(mask: Tensor) -> Tensor:
        """Position ids counting attended tokens only, exactly as ``generate`` derives them."""
        pos = mask.long().cumsum(-1) - 1
        return pos.masked_fill(mask == 0, 0)

    # -- training ------------------------------------------------------------------------------
    def forward(self, fused, tokens: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        """Teacher-forced cross-entropy on ``batch["answer_text"]`` (answer tokens + eos only)."""
        embeds, mask, bias = self.prefix(fused, tokens)
        B, P, _ = embeds.shape
        ids, amask = self._answer_ids(batch["answer_text"], embeds.device)  # (B, A)
        self._check_length(P + ids.shape[1])
        embed = input_embeddings(self.lm)
        inputs = torch.cat([embeds, embed(ids)], 1)  # (B, P + A, H)
        attention = torch.cat([mask, amask.long()], 1)  # (B, P + A)
        labels = torch.cat([torch.full((B, P), -100, dtype=torch.long, device=ids.device),
                            ids.masked_fill(~amask, -100)], 1)  # (B, P + A): answer tokens only
        with key_bias(F.pad(bias, (0, ids.shape[1]))):  # (B, P + A): answer tokens carry no bias
            hidden = self.lm.get_decoder()(inputs_embeds=inputs, attention_mask=attention,
                                           position_ids=self.positions(attention), use_cache=False).last_hidden_state
        # the vocabulary projection only where a label exists (position t predicts token t + 1): the
        # prefix is most of the sequence, and the LM head is a fifth of SmolLM2's FLOPs per token
        targets = labels[:, 1:]  # (B, P + A - 1)
        keep = targets != -100
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (n_labels, V)
        return F.cross_entropy(logits, targets[keep])

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, fused, tokens: dict[str, Any], batch: dict[str, Any] | None = None) -> list[str]:
        """Greedy (or beam) decoding with the LM's own ``generate``; returns stripped strings."""
        cfg = self.config
        embeds, mask, bias = self.prefix(fused, tokens)
        self._check_length(embeds.shape[1] + cfg.max_new_tokens)
        tok = self.tokenizer
        with key_bias(bias):
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                   num_beams=cfg.num_beams, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        # with inputs_embeds only, generate returns just the new tokens
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
