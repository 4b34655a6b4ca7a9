"""A tiny random Llama and a tokenizer built in memory, for tests that need an LM but no weights.

The tokenizer is byte-level BPE with no merges: its 256 byte tokens cover any text (every
language, punctuation, emoji), decoding gives the text back exactly, and it is built in
milliseconds with nothing read from disk or the network. Reusing the bundled SmolLM2 tokenizer
would tie every test to the one-time GGUF conversion and give the tiny model a 49k-row embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fusionkit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-3 are ``<pad> <s> </s> <unk>``, 4-259 the 256 bytes.

    Pads on the left (decoder-only generation); adds no bos/eos of its own.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **SPECIAL_TOKENS)


def tiny_llama(vocab_size: int | None = None, hidden: int = 32, layers: int = 2, heads: int = 4,
               seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random-init ``LlamaForCausalLM`` (eval mode) and the :func:`byte_tokenizer`.

    Args:
        vocab_size: embedding rows; default the tokenizer's 260. Larger leaves unused rows.
        hidden: model width; ``heads`` must divide it.
        layers: decoder layers.
        heads: attention heads (as many key/value heads).
        seed: the weights depend on it alone; the global RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if vocab_size < len(tokenizer):
        raise ConfigError(f"tiny_llama: vocab_size {vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens; pass at least {len(tokenizer)} or None")
    if hidden % heads:
        raise ConfigError(f"tiny_llama: hidden {hidden} is not divisible by heads {heads}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
