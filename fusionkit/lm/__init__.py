"""Causal language models for generative decoders: loaded offline, frozen, fully trained or LoRA.

- :mod:`fusionkit.lm.loading`: :class:`LMConfig` and :func:`load_causal_lm` (bundled alias, .gguf
  file, local folder or hub id), plus the size helpers a decoder needs;
- :mod:`fusionkit.lm.convert`: the bundled SmolLM2 GGUF file and its one-time conversion into a
  cached safetensors folder;
- :mod:`fusionkit.lm.testing`: a tiny random Llama with an in-memory tokenizer, for tests.

transformers and peft are imported when a model is loaded, not when this package is.
"""

from fusionkit.lm.convert import bundled_gguf, convert_gguf
from fusionkit.lm.loading import (
    LMConfig,
    input_embeddings,
    lm_context_length,
    lm_hidden_size,
    load_causal_lm,
)

__all__ = ["LMConfig", "bundled_gguf", "convert_gguf", "input_embeddings", "lm_context_length",
           "lm_hidden_size", "load_causal_lm"]
