"""Decoder ``hf_blip2``: a pretrained BLIP-2 checkpoint's LM behind DMS (decoder-only LMs: OPT).

The checkpoint's ViT + Q-Former + language projection are the image encoder ``hf_blip2_vision``;
its OPT is this decoder's LM, reading ``[fused token][the checkpoint's query tokens][other
modalities' projected tokens][prompt][answer]`` with DMS weights as in ``llava``
(:mod:`fusionkit.decoders.hf_vlm`). Flan-T5 checkpoints (encoder-decoder LMs) are refused.
"""

from __future__ import annotations

from pydantic import Field

from fusionkit.decoders.hf_vlm import VLMDecoder, VLMDecoderConfig
from fusionkit.registry import register


class HFBlip2Config(VLMDecoderConfig):
    model: str = Field("Salesforce/blip2-opt-2.7b", description=VLMDecoderConfig.model_fields["model"].description)


@register("decoders", "hf_blip2")
class HFBlip2Decoder(VLMDecoder):
    """A pretrained BLIP-2 (OPT) checkpoint: its Q-Former tokens and other modalities, DMS-weighted, into its LM."""

    Config = HFBlip2Config
    family = "blip2"
