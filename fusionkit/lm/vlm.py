"""The two halves of a pretrained BLIP-2 or LLaVA checkpoint, loaded apart so DMS can sit between.

A checkpoint (hub id or local folder as ``save_pretrained`` writes it) is cut where DMS goes::

    image path -> tokens already in the LM width H       (encoders hf_blip2_vision / hf_llava_vision)
        BLIP-2: vision_model -> qformer(query_tokens) -> language_projection        (B, N_q, H)
        LLaVA:  vision_tower hidden states (vision_feature_layer, CLS dropped by the
                'default' vision_feature_select_strategy) -> multi_modal_projector   (B, N_patches, H)
    language model: a plain causal LM reading inputs_embeds (OPTForCausalLM, LlamaForCausalLM, ...)
                                                         (decoders hf_blip2 / hf_llava)

Each half is the checkpoint's own transformers class with the other half deleted in ``__init__``.
``from_pretrained`` builds models on the meta device, so the deleted half never takes memory and
its tensors are skipped (``_keys_to_ignore_on_load_unexpected``); transformers' own checkpoint key
conversions (e.g. the ``language_model.model.*`` layout llava-hf checkpoints are saved in) apply as
for the full model, and a half whose weights are not all in the checkpoint is an error, never a
silent random init. The image path runs the checkpoint's own ``get_image_features``.

The LM half is registered with ``AutoModelForCausalLM`` for ``Blip2Config`` and ``LlavaConfig``
(transformers has no causal LM for either), so :func:`fusionkit.lm.loading.load_causal_lm` loads a
BLIP-2 / LLaVA checkpoint like any LM: tokenizer with a pad token, frozen / LoRA / full, dtype and
its one-line errors all come from there. transformers is imported with this module; the encoders
and decoders import it when they are built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from fusionkit.errors import ConfigError
from fusionkit.lm.convert import first_line
from fusionkit.lm.loading import _load_errors, _offline

# decoder / encoder family -> the model_type its checkpoint's config.json must have
MODEL_TYPES = {"blip2": "blip-2", "llava": "llava"}
FAMILY_OF = {v: k for k, v in MODEL_TYPES.items()}


class _Half:
    """Mixin for an official checkpoint class whose ``__init__`` deletes the other half.

    It keeps transformers treating the class as its own (key conversions), keeps the official weight
    init away from the deleted modules, and makes ``from_pretrained`` refuse a checkpoint that lacks
    any weight of this half (transformers would initialise it randomly and only log a report).
    """

    half = ""  # "image path" or "language model", for messages

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: this is the official class minus a half, so transformers applies the official key
        conversions of its model type (it skips them for classes defined outside transformers)."""
        return False

    def _init_weights(self, module):
        if module is not self:  # the outer class's own init reaches for the deleted half
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.pop("output_loading_info", None)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"] | {key for key, *_ in info["mismatched_keys"]})
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights of its {cls.half} (first: {missing[0]}); "
                             f"it is not a {model.config.model_type} checkpoint as transformers saves them")
        return model.eval()


class Blip2ImagePath(_Half, Blip2ForConditionalGeneration):
    """BLIP-2 without its LM: ViT, Q-Former with its learned queries, projection into the LM width."""

    half = "image path"
    _keys_to_ignore_on_load_unexpected = [r"^language_model\."]

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        del self.language_model
        self.post_init()  # transformers' bookkeeping (tied weights, ...) without the deleted half

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> ``language_projection(qformer(query_tokens, vision(pixels)))`` ``(B, N_q, H)``."""
        return self.get_image_features(pixel_values, return_dict=True).pooler_output


class Blip2LanguagePart(_Half, Blip2ForConditionalGeneration):
    """BLIP-2 without its image path; ``from_pretrained`` returns the causal LM inside (OPT, ...)."""

    half = "language model"
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^qformer\.", r"^query_tokens",
                                          r"^language_projection\."]

    def __init__(self, config: Blip2Config):
        if not config.use_decoder_only_language_model:  # checked before any weight is read
            raise ValueError("its language model is an encoder-decoder (Flan-T5); only BLIP-2 checkpoints with "
                             "a decoder-only LM (OPT) read a prefix of embeddings")
        super().__init__(config)
        del self.vision_model, self.qformer, self.query_tokens, self.language_projection
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return super().from_pretrained(*args, **kwargs).language_model  # a plain OPTForCausalLM


class LlavaImagePath(_Half, LlavaForConditionalGeneration):
    """LLaVA without its LM: vision tower and multi-modal projector."""

    half = "image path"
    _keys_to_ignore_on_load_unexpected = [r"language_model\.", r"^lm_head\."]
    _tied_weights_keys = None  # the LM head it would tie is gone

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        del self.model.language_model, self.lm_head
        self.post_init()

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> ``multi_modal_projector(selected vision features)`` ``(B, N, H)``."""
        features = self.get_image_features(pixel_values, return_dict=True).pooler_output  # B x (N, H)
        return torch.stack(list(features))  # (B, N, H): no image_sizes, so every image has N tokens


class LlavaLanguagePart(_Half, LlavaForConditionalGeneration):
    """LLaVA without its image path; ``from_pretrained`` returns the LM as its plain causal-LM class."""

    half = "language model"
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.", r"multi_modal_projector\."]

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        del self.model.vision_tower, self.model.multi_modal_projector
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        outer = super().from_pretrained(*args, **kwargs)
        with torch.device("meta"):  # an empty shell of the text model's own class (LlamaForCausalLM, ...)
            lm = AutoModelForCausalLM.from_config(outer.config.text_config)
        setattr(lm, lm.base_model_prefix, outer.model.language_model)  # the loaded decoder stack
        lm.set_output_embeddings(outer.lm_head)  # and head (still tied to the embeddings if the config ties them)
        lm.generation_config = outer.generation_config
        empty = [name for name, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
        if empty:
            raise ValueError(f"the LM class {type(lm).__name__} has parts LLaVA's language model lacks ({empty[0]})")
        return lm.eval()


IMAGE_PATHS = {"blip2": Blip2ImagePath, "llava": LlavaImagePath}


def register_checkpoint_lms() -> None:
    """``AutoModelForCausalLM`` on a BLIP-2 / LLaVA checkpoint loads its language model half.

    transformers maps neither config class to a causal LM (it raises), so nothing that worked
    before changes; ``exist_ok`` because transformers ignores registrations of its own config
    classes without it. Idempotent.
    """
    AutoModelForCausalLM.register(Blip2Config, Blip2LanguagePart, exist_ok=True)
    AutoModelForCausalLM.register(LlavaConfig, LlavaLanguagePart, exist_ok=True)


def checkpoint_source(spec: str, who: str) -> str:
    """A local folder (as a string) or a hub id; a path that does not exist is a ConfigError."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or path.exists():
        raise ConfigError(f"{who}: model '{spec}' is not a folder; pass a checkpoint folder as save_pretrained "
                          f"writes it, or a hub id like 'llava-hf/llava-1.5-7b-hf'")
    return spec


def checkpoint_config(spec: str, family: str, who: str):
    """The checkpoint's config, checked to be of ``family``; every failure a one-line ConfigError.

    Args:
        spec: hub id or local folder.
        family: ``"blip2"`` or ``"llava"``.
        who: the component asking, e.g. ``"decoder hf_llava"`` (starts the message).
    """
    source = checkpoint_source(spec, who)
    try:
        config = AutoConfig.from_pretrained(source)
    except _load_errors() as err:
        raise ConfigError(f"{who}: {load_failure(spec, source, err)}") from None
    found = getattr(config, "model_type", None)
    if found != MODEL_TYPES[family]:
        hint = f"; use the hf_{FAMILY_OF[found]} components for it" if found in FAMILY_OF else ""
        raise ConfigError(f"{who}: model '{spec}' is a '{found}' checkpoint, not '{MODEL_TYPES[family]}'{hint}")
    return config


def load_image_path(spec: str, family: str, dtype: str, who: str):
    """The checkpoint's image path (:class:`Blip2ImagePath` or :class:`LlavaImagePath`), eval mode."""
    checkpoint_config(spec, family, who)
    source = checkpoint_source(spec, who)
    try:
        return IMAGE_PATHS[family].from_pretrained(source, dtype=getattr(torch, dtype))
    except _load_errors() as err:
        raise ConfigError(f"{who}: {load_failure(spec, source, err)}") from None


def load_image_processor(spec: str, who: str) -> Any:
    """The checkpoint's own image processor (``preprocessor_config.json``)."""
    from transformers import AutoImageProcessor

    source = checkpoint_source(spec, who)
    try:
        return AutoImageProcessor.from_pretrained(source)
    except _load_errors() as err:
        raise ConfigError(f"{who}: model '{spec}' has no usable image processor ({first_line(err)}); the "
                          f"checkpoint needs preprocessor_config.json, as an image processor's save_pretrained "
                          f"writes it") from None


def load_failure(spec: str, source: str, err: BaseException) -> str:
    """One line: why the checkpoint did not load and what to do."""
    if Path(source).is_dir():
        return (f"model '{spec}' is not a loadable checkpoint folder ({first_line(err)}); it needs config.json "
                f"and the weights as save_pretrained writes them")
    if _offline() and isinstance(err, OSError):
        return (f"model '{spec}' cannot be loaded offline: not in the Hugging Face cache; download it once "
                f"with network access or pass a local folder")
    return f"model '{spec}' cannot be loaded from the Hugging Face hub ({first_line(err)}); check the id"
