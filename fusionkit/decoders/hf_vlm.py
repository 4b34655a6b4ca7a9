"""Shared by ``hf_blip2`` and ``hf_llava``: the ``llava`` decoder on a pretrained checkpoint's own LM.

A BLIP-2 or LLaVA checkpoint is cut in two (:mod:`fusionkit.lm.vlm`): its image path is the image
modality's encoder (``hf_blip2_vision`` / ``hf_llava_vision``, tokens already in the LM width H) and
its language model is this decoder's LM. DMS sits between them, exactly as in ``llava``
(:mod:`fusionkit.decoders.llava`, whose prefix, weighting and LM side this class reuses)::

    [fused token] [modality tokens, sorted names; the image's are the checkpoint's own] [prompt] [answer]

- the image modality (``image_modality``) enters through an identity projector: the LM reads the
  very tokens the checkpoint would have spliced in (Q-Former outputs or projected patches);
- every other modality (text, audio, ...) gets its own trainable LLaVA-1.5 projector into H;
- DMS weights: ``log(M_b w_m)`` attention bias on modality m's keys (default), a missing modality
  masked out of the attention, as ``llava`` documents.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from fusionkit.decoders.llava import LlavaConfig, LlavaDecoder
from fusionkit.errors import ConfigError


class VLMDecoderConfig(LlavaConfig):
    model: str = Field(..., description=(
        "the pretrained checkpoint (hub id or local save_pretrained folder) whose language model this "
        "decoder uses; the image encoder must name the same one"))
    lm: str = Field("", exclude=True, description=(
        "not a key to set: filled from `model`, since the LM is the checkpoint's own"))
    image_modality: str = Field("image", description=(
        "the modality whose encoder is the checkpoint's image path: its tokens are already in the LM "
        "width and enter unchanged; every other modality gets a trainable projector"))
    max_tokens: int | None = Field(None, ge=1, description=(
        "None keeps every token: the LM was trained on all of the checkpoint's image tokens; a number "
        "average-pools every modality, the image included, to at most that many"))

    @model_validator(mode="after")
    def _lm_is_the_checkpoint(self):
        if self.lm and self.lm != self.model:
            raise ValueError("set `model`, not `lm`: the language model is the checkpoint's own")
        self.lm = self.model
        return self


class VLMDecoder(LlavaDecoder):
    """Base: the ``llava`` decoder whose LM and image tokens come from one BLIP-2 / LLaVA checkpoint."""

    Config = VLMDecoderConfig
    family = ""  # "blip2" or "llava": the checkpoint type ``model`` must be

    def __init__(self, config=None, *, dim, num_classes):
        from fusionkit.lm.vlm import checkpoint_config, register_checkpoint_lms

        config = config or self.Config()
        who = f"decoder {self.name}"
        checkpoint = checkpoint_config(config.model, self.family, who)  # one-line errors, before any weight
        if not getattr(checkpoint, "use_decoder_only_language_model", True):
            raise ConfigError(f"{who}: model '{config.model}' has an encoder-decoder LM (Flan-T5); only BLIP-2 "
                              f"checkpoints with a decoder-only LM (OPT) read a prefix of embeddings")
        register_checkpoint_lms()  # load_causal_lm (llava's LM loading) now reads the checkpoint's LM half
        super().__init__(config, dim=dim, num_classes=num_classes)

    def attach(self, token_dims: dict[str, int]) -> None:
        """Identity for the image modality (its tokens are in the LM width); LLaVA projectors for the rest."""
        image, name = self.config.image_modality, self.name
        if image not in token_dims:
            raise ConfigError(f"decoder {name}: image_modality '{image}' is not among the modalities "
                              f"{sorted(token_dims)}; set decoder.image_modality")
        if token_dims[image] != self.hidden:
            raise ConfigError(f"decoder {name}: the '{image}' encoder gives {token_dims[image]}-wide tokens but the "
                              f"LM of '{self.config.model}' is {self.hidden} wide; use encoder {name}_vision "
                              f"with model '{self.config.model}' for '{image}'")
        super().attach({m: width for m, width in token_dims.items() if m != image})
        self.projectors[image] = nn.Identity()
