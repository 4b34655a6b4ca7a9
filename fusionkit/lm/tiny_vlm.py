"""Tiny random BLIP-2 and LLaVA checkpoints, saved as ``save_pretrained`` folders, for offline tests.

Each folder is what a hub checkpoint holds, scaled down: ``config.json`` + weights, the byte-level
tokenizer of :mod:`fusionkit.lm.testing`, and the family's image processor
(``preprocessor_config.json``) at 32 px. Sizes: ViT width 32 with 8-px patches (16 patches),
LM width 32 with 2 layers; BLIP-2: a one-layer Q-Former with 4 queries and an OPT LM; LLaVA: a
two-layer CLIP tower read at layer -2 without its CLS token and a Llama LM. Built in well under a
second; the weights depend on ``seed`` alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusionkit.lm.testing import byte_tokenizer

IMAGE_SIZE = 32
WIDTH = 32  # vision tower and LM width
_VISION = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
               image_size=IMAGE_SIZE, patch_size=8)


def tiny_blip2(seed: int = 0):
    """A random-init ``Blip2ForConditionalGeneration`` (OPT LM, eval mode) and the byte tokenizer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    tok = byte_tokenizer()
    opt = OPTConfig(vocab_size=len(tok), hidden_size=WIDTH, ffn_dim=2 * WIDTH, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=WIDTH,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Blip2Config(
        vision_config={**_VISION, "num_hidden_layers": 1, "initializer_range": 0.02},  # default 1e-10: blind
        qformer_config=dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=2 * WIDTH, encoder_hidden_size=WIDTH, vocab_size=len(tok)),
        text_config=opt.to_dict(), num_query_tokens=4, image_token_index=tok.unk_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # zeros at init would make every query identical
            model.query_tokens.normal_(0, 1)
    return model.eval(), tok


def tiny_llava(seed: int = 0):
    """A random-init ``LlavaForConditionalGeneration`` (CLIP tower, Llama LM, eval mode) and the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = byte_tokenizer()
    llama = LlamaConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_VISION, projection_dim=WIDTH).to_dict(),
                         text_config=llama.to_dict(), image_token_id=tok.unk_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval(), tok


def save_tiny_vlm(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``"blip2"`` or ``"llava"`` checkpoint folder (weights, tokenizer, image processor)."""
    from transformers import BlipImageProcessor, CLIPImageProcessor

    path = Path(path)
    if family == "blip2":
        model, tok = tiny_blip2(seed)
        processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif family == "llava":
        model, tok = tiny_llava(seed)
        processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        raise ValueError(f"family must be 'blip2' or 'llava', not {family!r}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return path
