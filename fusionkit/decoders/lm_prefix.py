"""What every decoder that feeds a causal LM a prefix of embeddings shares (``llava``, ``blip2``).

A subclass only builds the prefix, per sample::

    prefix(fused, tokens) -> (embeds (B, P, H), attention mask (B, P), key bias (B, P) or None)

and this base does the LM side, the same for every bridge: load the LM (frozen, full or LoRA),
tokenise the answers, the teacher-forced loss with labels only on the answer tokens and the eos
(the prefix and the prompt are labelled -100, as BLIP-2's OPT path does), generation with the LM's
own ``generate(inputs_embeds=...)``, the context-length check, and the frozen LM weights that
checkpoints leave out. ``lm_bias(bias)`` is the hook through which a subclass makes the LM's own
attention add a per-key bias (LLaVA's ``weighting: bias``); by default the LM runs unchanged.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionkit.decoders.base import Decoder
from fusionkit.errors import ConfigError
from fusionkit.lm.loading import input_embeddings, lm_context_length, lm_hidden_size, load_causal_lm


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


class LMPrefixDecoder(Decoder):
    """Base of the decoders that put the fused inputs in front of a causal LM (``inputs_embeds``).

    The subclass's ``Config`` derives from :class:`fusionkit.lm.loading.LMConfig` and has
    ``prompt``, ``max_new_tokens``, ``num_beams`` and ``max_answer_tokens``.
    """

    generative = True
    needs_tokens = True
    length_fix = "shorten decoder.prompt"  # how to fit the LM's context (named in the error)

    def __init__(self, config=None, *, dim, num_classes):
        super().__init__(config, dim=dim, num_classes=num_classes)
        cfg = self.config
        self.lm, self.tokenizer = load_causal_lm(cfg)
        self.hidden = lm_hidden_size(self.lm)
        self.context = lm_context_length(self.lm)
        tok = self.tokenizer
        self.register_buffer("prompt_ids", torch.tensor(tok(cfg.prompt, add_special_tokens=False)["input_ids"],
                                                        dtype=torch.long), persistent=False)
        if tok.eos_token_id is None:
            raise ConfigError(f"decoder {self.name}: the tokenizer of LM '{cfg.lm}' has no eos token; "
                              f"choose another LM")

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def external_state(self) -> set[str]:
        """Frozen pretrained LM weights are rebuilt from ``lm`` on load, not stored in checkpoints
        (LoRA: only the adapters are stored; full fine-tuning: everything). Tied weights count
        under every name (SmolLM2's ``lm_head.weight`` is its embedding matrix)."""
        if self.config.trainable == "full":
            return set()
        return {f"lm.{k}" for k, p in self.lm.named_parameters(remove_duplicate=False) if not p.requires_grad}

    # -- what a subclass provides --------------------------------------------------------------
    def prefix(self, fused, tokens: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(embeds (B, P, H), attention mask (B, P) long, key bias (B, P) or None)``."""
        raise NotImplementedError

    def lm_bias(self, bias: Tensor | None) -> AbstractContextManager:
        """Context in which the LM's attention adds ``bias (B, L0)`` per key; none by default."""
        return nullcontext()

    def prompt_embeds(self, B: int) -> Tensor:
        """The prompt's token embeddings, the same for every sample: ``(B, P_text, H)``."""
        embed = input_embeddings(self.lm)
        return embed(self.prompt_ids.to(embed.weight.device)).unsqueeze(0).expand(B, -1, -1)

    # -- the LM side ---------------------------------------------------------------------------
    def _check_length(self, length: int) -> None:
        if length > self.context:
            raise ConfigError(f"decoder {self.name}: the LM input has {length} tokens but LM '{self.config.lm}' "
                              f"reads at most {self.context}; {self.length_fix}")

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
        with self.lm_bias(None if bias is None else F.pad(bias, (0, ids.shape[1]))):  # answer keys: no bias
            hidden = self.lm.get_decoder()(inputs_embeds=inputs, attention_mask=attention,
                                           position_ids=self.positions(attention), use_cache=False).last_hidden_state
        # the vocabulary projection only where a label exists (position t predicts token t + 1): the
        # prefix is most of the sequence, and the LM head is a fifth of SmolLM2's FLOPs per token
        targets = labels[:, 1:]  # (B, P + A - 1)
        keep = targets != -100
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (n_labels, V)
        return F.cross_entropy(logits, targets[keep])

    @torch.no_grad()
    def generate(self, fused, tokens: dict[str, Any], batch: dict[str, Any] | None = None) -> list[str]:
        """Greedy (or beam) decoding with the LM's own ``generate``; returns stripped strings."""
        cfg = self.config
        embeds, mask, bias = self.prefix(fused, tokens)
        self._check_length(embeds.shape[1] + cfg.max_new_tokens)
        tok = self.tokenizer
        with self.lm_bias(bias):
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                   num_beams=cfg.num_beams, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        # with inputs_embeds only, generate returns just the new tokens
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
