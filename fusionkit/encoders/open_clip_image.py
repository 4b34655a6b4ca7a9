"""Image encoder: the vision tower of an open_clip model, with open_clip's own preprocessing.

``open_clip.create_model_and_transforms`` returns the model and its matching transform (resize,
centre crop, CLIP mean/std), so the encoder always preprocesses the way its weights expect.
The text tower is dropped; :mod:`fusionkit.encoders.open_clip_text` keeps the other half.
Helpers shared with the text encoder (building, block split) live here.

Tokens: a ViT tower (open_clip ``VisionTransformer``) is switched to ``output_tokens`` at build
time, so every pass returns the projected pooled embedding together with its patch tokens
(``(B, grid*grid, width)``: after ``ln_post``, class token excluded, not projected; an
attentional-pooler tower gives its query outputs instead). Other towers (``ModifiedResNet``,
timm trunks) have no token output: ``encode`` falls back to the pooled vector as one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field
import torch
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput
from fusionkit.errors import ConfigError, DataError, unknown_choice
from fusionkit.registry import register

# Top-level parameter/module names that come before the transformer blocks in open_clip towers;
# everything else outside the blocks (ln_post, proj, ln_final, text_projection, ...) is the head.
_STEM = {"conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout",
         "token_embedding", "cls_emb"}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class OpenClipConfig(EncoderConfig):
    trainable: bool | int = Field(False, description=(
        "frozen by default: a pretrained CLIP tower is already a good feature extractor"))
    model_name: str = Field("ViT-B-32", description=(
        "an open_clip architecture (open_clip.list_models()), or 'hf-hub:org/repo' / "
        "'local-dir:/path' (config and weights from there; pretrained is then ignored)"))
    pretrained: str | bool | None = Field(None, description=(
        "None/false: random init (offline); a tag such as 'laion2b_s34b_b79k' "
        "(open_clip.list_pretrained_tags_by_model): download, for users with a network; "
        "a path: a local open_clip checkpoint file"))
    model_cfg: dict[str, Any] | None = Field(None, description=(
        "top-level keys that replace those of model_name's config (open_clip's model_kwargs), "
        "e.g. a tiny {embed_dim, vision_cfg, text_cfg} for tests; a tag's weights only fit the "
        "unmodified architecture"))


def create_open_clip(cfg: OpenClipConfig, who: str) -> tuple[nn.Module, Any]:
    """``(model, eval transform)`` from an :class:`OpenClipConfig`; user mistakes -> ConfigError."""
    import open_clip

    name, pretrained = cfg.model_name, cfg.pretrained
    has_schema = name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(name) is None:
        raise ConfigError(f"encoder {who}: " + unknown_choice("an open_clip model", name, open_clip.list_models()))
    if pretrained is True:
        raise ConfigError(f"encoder {who}: pretrained: true does not say which weights; name a tag "
                          f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) "
                          f"or a checkpoint file")
    pretrained = pretrained or None
    if isinstance(pretrained, str) and not has_schema and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            if Path(pretrained).suffix in _CHECKPOINT_SUFFIXES or len(Path(pretrained).parts) > 1:
                raise ConfigError(f"encoder {who}: checkpoint file '{pretrained}' does not exist")
            raise ConfigError(f"encoder {who}: " + unknown_choice(
                f"a pretrained tag of {name}", pretrained, tags or ["none; use a checkpoint file"]))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, **(cfg.model_cfg or {}))
    except (RuntimeError, OSError, ValueError, TypeError, KeyError) as err:
        # download failures, a checkpoint that does not fit, a model_cfg key CLIP does not take
        raise ConfigError(f"encoder {who}: cannot build '{name}' (pretrained={pretrained!r}): "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return model, preprocess


def embed_dim(model: nn.Module) -> int:
    """Width of the shared image-text embedding (the output of both towers)."""
    text = getattr(model, "text", None)  # CustomTextCLIP / CoCa keep a separate text tower
    if text is not None and getattr(text, "output_dim", None):
        return int(text.output_dim)
    proj = model.text_projection
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def param_group(params: list[nn.Parameter]) -> nn.Module:
    """A throw-away module over existing parameters, so loose ones can form one 'block'."""
    return nn.ParameterList(params)


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """An open_clip tower as blocks in input-to-output order: stem, transformer blocks, head."""
    if hasattr(tower, "trunk"):  # open_clip TimmModel: a timm trunk plus a projection head
        return [*tower.trunk.children(), tower.head]
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if resblocks is None:  # ModifiedResNet, HF text towers: children are already in order
        return list(tower.children())
    in_blocks = {id(p) for p in resblocks.parameters()}
    stem, head = [], []
    for name, p in tower.named_parameters():
        if id(p) not in in_blocks:
            (stem if name.split(".")[0] in _STEM else head).append(p)
    return [param_group(stem), *resblocks, param_group(head)]


def to_pil(raw: Any) -> Image.Image:
    """PIL image, array (H, W) / (H, W, C) uint8 or float in [0, 1], or tensor (C, H, W) -> PIL."""
    if isinstance(raw, Image.Image):
        return raw
    if isinstance(raw, Tensor):
        raw = raw.detach().cpu().numpy()
        raw = raw.transpose(1, 2, 0) if raw.ndim == 3 else raw  # (C, H, W) -> (H, W, C)
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DataError(f"image has shape {arr.shape}; expected (H, W) or (H, W, C) with C in 1, 3, 4")
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.dtype.kind in "fb" else 1.0  # floats and bools are in [0, 1]
        arr = np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


@register("encoders", "open_clip_image")
class OpenClipImageEncoder(Encoder):
    """Images -> open_clip vision tower (random, tag or local weights) -> (B, embed_dim)."""

    Config = OpenClipConfig
    kinds = ("image",)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        model, self.transform = create_open_clip(self.config, "open_clip_image")
        self.out_dim = embed_dim(model)
        self.visual = model.visual  # the text tower and logit scale are dropped
        # a ViT tower can return its patch tokens with the pooled vector, in the same pass
        self.has_tokens = hasattr(self.visual, "output_tokens") and hasattr(self.visual, "transformer")
        if self.has_tokens:
            self.visual.output_tokens = True
        self.apply_trainable()

    @property
    def token_dim(self) -> int:
        """ViT: the tower's width (its attentional pooler's width if it has one); else ``out_dim``."""
        if not self.has_tokens:
            return self.out_dim
        pooler = getattr(self.visual, "attn_pool", None)
        return int(pooler.query.shape[-1]) if pooler is not None else int(self.visual.transformer.width)

    def preprocess(self, raw: Any) -> Tensor:
        """Image -> open_clip's eval transform (resize, crop, RGB, CLIP mean/std) -> (3, S, S)."""
        return self.transform(to_pil(raw))

    def trainable_blocks(self) -> list[nn.Module]:
        return tower_blocks(self.visual)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x).pooled if self.has_tokens else self.visual(x)  # (B, 3, S, S) -> (B, embed_dim)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Pooled ``(B, embed_dim)`` and the ViT's patch tokens ``(B, grid*grid, width)`` (see module doc)."""
        if not self.has_tokens:
            return super().encode(x)  # no token output: the pooled vector as one token
        pooled, tokens = self.visual(x)  # (B, embed_dim), (B, grid*grid, width)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, L): no padding
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)

