"""Decoder ``hf_llava``: a pretrained LLaVA checkpoint's LM behind DMS.

The checkpoint's vision tower + multi-modal projector are the image encoder ``hf_llava_vision``;
its LM (Vicuna/Llama, Mistral, ...) is this decoder's LM, reading ``[fused token][the checkpoint's
projected patch tokens][other modalities' projected tokens][prompt][answer]`` with DMS weights as in
``llava`` (:mod:`fusionkit.decoders.hf_vlm`).
"""

from __future__ import annotations

from pydantic import Field

from fusionkit.decoders.hf_vlm import VLMDecoder, VLMDecoderConfig
from fusionkit.registry import register


class HFLlavaConfig(VLMDecoderConfig):
    model: str = Field("llava-hf/llava-1.5-7b-hf", description=VLMDecoderConfig.model_fields["model"].description)


@register("decoders", "hf_llava")
class HFLlavaDecoder(VLMDecoder):
    """A pretrained LLaVA checkpoint: its patch tokens and other modalities, DMS-weighted, into its LM."""

    Config = HFLlavaConfig
    family = "llava"
