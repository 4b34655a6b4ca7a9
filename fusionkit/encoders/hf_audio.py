"""Audio encoder: a Hugging Face audio model (wav2vec2, HuBERT, WavLM, AST, ...) with its feature extractor.

``preprocess`` (CPU, one clip) downmixes, resamples to the feature extractor's rate and crops to
``max_seconds``; ``collate`` runs the feature extractor on the batch (waveform models: padded to
the longest clip, with the true lengths kept); ``forward`` pools the last hidden states.

Mean pooling over a waveform model uses the model's frame mask, derived from each clip's true
length (``_get_feature_vector_attention_mask``), so a padded clip pools the same frames as it
would alone. The attention mask itself reaches the model only when its feature extractor says
so (``return_attention_mask``): wav2vec2-base style models (group-norm feature encoder) are
meant to see zero padding without a mask. The mask is always requested from the extractor,
though: without it ``do_normalize`` would standardise each clip together with its padding.

Tokens (``encode``): the last hidden states ``(B, L, hidden)``; the mask is that frame mask for
waveform models (padded frames zeroed) and all True for fixed-length spectrogram models (AST).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput
from fusionkit.encoders.mel_cnn import dataset_rate, prepare_waveform
from fusionkit.errors import ConfigError
from fusionkit.registry import register

_LAYER_LISTS = ("layer", "layers", "blocks", "block", "h")  # names HF models give their block list


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """A HF model as blocks in input-to-output order: embeddings, each layer, what follows.

    The layer list is the longest ``ModuleList`` named like one (``encoder.layer``, ``layers``,
    ...); parameters outside it go to the group before or after it, by registration order.
    """
    lists = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS]
    if not lists:
        return list(model.children())
    layers = max(lists, key=len)
    in_layers = {id(p) for p in layers.parameters()}
    before, after, seen = [], [], False
    for p in model.parameters():
        if id(p) in in_layers:
            seen = True
        else:
            (after if seen else before).append(p)
    # ParameterLists over existing parameters: throw-away groups, not registered anywhere
    return [nn.ParameterList(before), *layers, nn.ParameterList(after)]


def from_config_dict(config: dict[str, Any], who: str):
    """A transformers config from ``{"model_type": ..., **fields}`` (random-init models)."""
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"encoder {who}: config needs a 'model_type' (e.g. 'wav2vec2')")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"encoder {who}: config: {str(err).splitlines()[0]}") from None


def matching_kwargs(cls: type, hf_config: Any) -> dict[str, Any]:
    """Arguments of ``cls`` that the model config also holds (AST: num_mel_bins, max_length)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: getattr(hf_config, k) for k in params
            if k not in ("self", "kwargs") and k in hf_config.to_dict()}


class HFAudioConfig(EncoderConfig):
    trainable: bool | int = Field(False, description=(
        "frozen by default: a pretrained speech/audio model is already a good feature extractor; "
        "N fine-tunes the last N transformer layers"))
    model: str | None = Field(None, description=(
        "a Hugging Face hub id ('facebook/wav2vec2-base', 'MIT/ast-finetuned-audioset-10-10-0.4593') "
        "or a local folder holding the model and its feature extractor"))
    config: dict[str, Any] | None = Field(None, description=(
        "instead of model: a transformers config ({model_type: wav2vec2, hidden_size: ...}) for a "
        "random-init model, paired with its feature extractor class at defaults (offline tests)"))
    feature_extractor: dict[str, Any] = Field(default_factory=dict, description=(
        "overrides for the feature extractor (e.g. return_attention_mask, do_normalize)"))
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "mean over real frames, or the first token (AST's [CLS]; waveform models have none)"))
    max_seconds: float = Field(10.0, gt=0, description="longer clips are cropped (attention cost grows with length^2)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("set exactly one of model (hub id or folder) or config (random init)")
        return self


@register("encoders", "hf_audio")
class HFAudioEncoder(Encoder):
    """Audio -> HF feature extractor + AutoModel (wav2vec2/HuBERT/AST...) -> masked mean or CLS (B, H)."""

    Config = HFAudioConfig
    kinds = ("audio",)

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        from transformers import AutoFeatureExtractor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cfg = self.config
        if cfg.config is not None:
            from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING

            hf_config = from_config_dict(cfg.config, "hf_audio")
            self.model = AutoModel.from_config(hf_config)
            if type(hf_config) not in FEATURE_EXTRACTOR_MAPPING:
                raise ConfigError(f"encoder hf_audio: model_type '{hf_config.model_type}' has no feature extractor")
            fe_cls = FEATURE_EXTRACTOR_MAPPING[type(hf_config)]
            defaults = matching_kwargs(fe_cls, hf_config)
            if hasattr(hf_config, "feat_extract_norm"):  # what HF ships: a mask only for layer-norm encoders
                defaults["return_attention_mask"] = hf_config.feat_extract_norm == "layer"
            self.feature_extractor = fe_cls(**{**defaults, **cfg.feature_extractor})
        else:
            try:
                self.feature_extractor = AutoFeatureExtractor.from_pretrained(cfg.model, **cfg.feature_extractor)
                self.model = AutoModel.from_pretrained(cfg.model)
            except OSError as err:
                where = "folder" if Path(cfg.model).exists() else "hub id (no network, or not on the hub?)"
                raise ConfigError(f"encoder hf_audio: cannot load '{cfg.model}' as a {where}: "
                                  f"{str(err).splitlines()[0]}") from None
        self.input_rate = dataset_rate(spec)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.min_samples = self._receptive_field()
        self.out_dim = self.model.config.hidden_size
        self.apply_trainable()

    def _receptive_field(self) -> int:
        """Samples a waveform model needs for one output frame (1 for spectrogram models)."""
        kernels = getattr(self.model.config, "conv_kernel", None)
        strides = getattr(self.model.config, "conv_stride", None)
        if not kernels or not strides:
            return 1
        field = 1
        for k, s in zip(reversed(kernels), reversed(strides)):
            field = (field - 1) * s + k
        return field

    def preprocess(self, raw: Any) -> Tensor:
        """Waveform at the dataset's rate -> mono ``(T,)`` at the feature extractor's rate (CPU)."""
        return prepare_waveform(raw, self.input_rate, self.sampling_rate, self.config.max_seconds,
                                min_samples=self.min_samples)

    def collate(self, items: list[Tensor]) -> dict[str, Tensor]:
        """Clips -> the feature extractor's batch plus ``lengths (B,)`` in samples."""
        fe = self.feature_extractor
        kwargs: dict[str, Any] = {}
        padding = inspect.signature(fe.__call__).parameters.get("padding")
        if padding is not None and padding.default is False:  # waveform extractors: pad to the longest
            # with the mask, do_normalize uses each clip's own samples and the padding stays 0
            kwargs.update(padding="longest", return_attention_mask=True)
        out = fe([x.numpy() for x in items], sampling_rate=self.sampling_rate, return_tensors="pt", **kwargs)
        batch = {k: v for k, v in out.items() if isinstance(v, Tensor)}
        if not getattr(fe, "return_attention_mask", False):
            batch.pop("attention_mask", None)  # this model is meant to see zero padding, unmasked
        batch["lengths"] = torch.tensor([x.numel() for x in items], dtype=torch.long)
        return batch

    def trainable_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.model)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.encode(x).pooled  # (B, H)

    def encode(self, x: dict[str, Tensor]) -> EncoderOutput:
        """Pooled ``(B, H)`` and the last hidden states ``(B, L, H)`` with the frame mask."""
        inputs = {k: v for k, v in x.items() if k != "lengths"}
        states = self.model(**inputs).last_hidden_state  # (B, L, H)
        mask = self._frame_mask(x, states.shape[1])
        if mask is None:  # fixed-length spectrogram models (AST): every token is real
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)  # (B, L)
            pooled = states[:, 0] if self.config.pooling == "cls" else states.mean(1)  # (B, H)
            return EncoderOutput(pooled=pooled, tokens=states, token_mask=mask)
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        tokens = states * m  # (B, L, H), zeros on padded frames
        pooled = states[:, 0] if self.config.pooling == "cls" else tokens.sum(1) / m.sum(1).clamp(min=1.0)
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)  # pooled (B, H)

    def _frame_mask(self, x: dict[str, Tensor], num_frames: int) -> Tensor | None:
        """``(B, L)`` bool of output frames that come from real samples, when the model can say."""
        values = x.get("input_values")
        to_frames = getattr(self.model, "_get_feature_vector_attention_mask", None)
        if values is None or values.dim() != 2 or to_frames is None:
            return None
        lengths = x["lengths"].to(values.device)
        samples = torch.arange(values.shape[1], device=values.device) < lengths[:, None]  # (B, T)
        return to_frames(num_frames, samples.long()).bool()  # (B, L)
