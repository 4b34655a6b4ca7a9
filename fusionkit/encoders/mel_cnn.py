"""Audio encoder: log-mel spectrogram -> any timm CNN over the (1, n_mels, frames) "image".

Where the spectrogram is computed: in :meth:`MelCNNEncoder.preprocess`, on the CPU, one clip
at a time in the DataLoader workers. That keeps the accelerator for the CNN, lets workers
overlap the STFT with training, and makes each clip's normalisation see only its own frames
(padding is added later, in ``collate``). The STFT and mel filterbank are the functional form
of ``torchaudio.transforms.MelSpectrogram`` with plain (unregistered) tensors, so moving the
model to a GPU never moves the preprocessing with it.

Variable lengths: ``collate`` pads spectrograms with zeros (the mean after normalisation) and
passes the frame counts; ``forward`` averages the CNN's feature map over the real frames only.

Tokens (``encode``): one per time step of the CNN's feature map, ``(B, T', C)`` after a mean
over frequency, with the same real-frame mask the pooling uses (padded steps are zero). A
transformer backbone (no time axis) gives its own tokens, all marked real.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from fusionkit.encoders.base import Encoder, EncoderConfig, EncoderOutput, ModalitySpec
from fusionkit.errors import ConfigError, DataError
from fusionkit.registry import register

DEFAULT_SAMPLE_RATE = 16000  # what an audio dataset means when its spec does not say


def prepare_waveform(raw: Any, from_rate: int, to_rate: int, max_seconds: float | None,
                     min_samples: int = 1) -> Tensor:
    """A raw clip -> mono float32 ``(T,)`` at ``to_rate``, at most ``max_seconds`` long.

    Args:
        raw: numpy/tensor waveform ``(C, T)`` or ``(T,)`` at ``from_rate`` Hz.
        from_rate: the dataset's rate (``spec.extra["sample_rate"]``).
        to_rate: the encoder's rate; resampled with ``torchaudio.functional.resample`` if different.
        max_seconds: crop longer clips (before resampling, so long files cost little); None keeps all.
        min_samples: zero-pad shorter clips to this many samples (at ``to_rate``).

    Raises:
        DataError: wrong number of dimensions, zero samples, or NaN/inf values.
    """
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32))
    if x.dim() == 2:
        x = x.mean(0)  # (C, T) -> (T,): downmix to mono
    if x.dim() != 1:
        raise DataError(f"audio has shape {tuple(x.shape)}; expected (C, T) or (T,)")
    if x.numel() == 0:
        raise DataError("audio clip has zero samples")
    if not torch.isfinite(x).all():
        raise DataError("audio clip holds NaN or infinite samples")
    if max_seconds is not None:
        x = x[: max(1, int(round(max_seconds * from_rate)))]
    if from_rate != to_rate:
        import torchaudio.functional as AF  # imported here: torchaudio takes a second to import

        x = AF.resample(x, int(from_rate), int(to_rate))  # (T,) -> (T * to / from,)
    if x.numel() < min_samples:
        x = torch.nn.functional.pad(x, (0, min_samples - x.numel()))
    return x.contiguous()


def dataset_rate(spec: ModalitySpec) -> int:
    """The sample rate a dataset hands its audio at (16 kHz when the spec does not say)."""
    return int((spec.extra or {}).get("sample_rate", DEFAULT_SAMPLE_RATE))


class MelCNNConfig(EncoderConfig):
    sample_rate: int = Field(16000, ge=1000, description=(
        "rate the spectrogram is computed at; clips at another rate are resampled"))
    n_mels: int = Field(64, ge=4, description="mel bands: the height of the spectrogram image")
    n_fft: int = Field(400, ge=16, description="STFT window (400 = 25 ms at 16 kHz)")
    hop_length: int = Field(160, ge=1, description="STFT hop (160 = 10 ms at 16 kHz): one frame per hop")
    f_min: float = Field(0.0, ge=0, description="lowest mel band edge (Hz)")
    f_max: float | None = Field(None, gt=0, description="highest mel band edge (Hz); None = sample_rate / 2")
    eps: float = Field(1e-6, gt=0, description="log(mel + eps): keeps silence finite")
    max_seconds: float = Field(10.0, gt=0, description="longer clips are cropped (memory and time per batch)")
    pad_to_max: bool = Field(False, description=(
        "true: every clip is zero-padded to max_seconds (fixed-size inputs); false: a batch is "
        "padded to its longest clip and the padding is masked out of the pooling"))
    model_name: str = Field("resnet18", description="any timm model; it sees a 1-channel image")
    pretrained: bool | str = Field(False, description=(
        "as the timm encoder: false = random init; a path = local weights; true or a hub tag = "
        "download (ImageNet weights, the stem summed to one channel by timm)"))
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the (removed) classifier")


@register("encoders", "mel_cnn")
class MelCNNEncoder(Encoder):
    """Audio -> log-mel spectrogram (CPU, per clip) -> timm CNN -> masked mean over time (B, C)."""

    Config = MelCNNConfig
    kinds = ("audio",)

    @classmethod
    def weight_files(cls, config: MelCNNConfig):
        from fusionkit.encoders.timm_image import timm_weight_files

        return timm_weight_files(config.model_name, config.pretrained)  # the mel filterbank is computed

    def __init__(self, config=None, *, spec):
        super().__init__(config, spec=spec)
        import torchaudio.functional as AF

        from fusionkit.encoders.timm_image import TimmConfig, TimmImageEncoder

        cfg = self.config
        if cfg.f_max is not None and cfg.f_max <= cfg.f_min:
            raise ConfigError(f"encoder mel_cnn: f_max ({cfg.f_max}) must be above f_min ({cfg.f_min})")
        self.input_rate = dataset_rate(spec)
        # plain tensors, not buffers: preprocessing runs on the CPU in DataLoader workers
        self.window = torch.hann_window(cfg.n_fft)
        self.filterbank = AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max or cfg.sample_rate / 2,
                                             cfg.n_mels, cfg.sample_rate)  # (n_freqs, n_mels)
        try:  # the timm encoder already resolves random / local / hub / bundled weights
            timm_cfg = TimmConfig(model_name=cfg.model_name, pretrained=cfg.pretrained, in_chans=1,
                                  drop_rate=cfg.drop_rate)
            self.backbone = TimmImageEncoder(timm_cfg, spec=ModalitySpec("image", channels=1)).backbone
        except ConfigError as err:
            raise ConfigError("encoder mel_cnn: " + str(err).removeprefix("encoder timm: ")) from None
        self.out_dim = self.backbone.num_features
        self.apply_trainable()

    def log_mel(self, wave: Tensor) -> Tensor:
        """Mono waveform ``(T,)`` -> normalised log-mel ``(n_mels, frames)``."""
        import torchaudio.functional as AF

        cfg = self.config
        power = AF.spectrogram(wave, pad=0, window=self.window, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                               win_length=cfg.n_fft, power=2.0, normalized=False)  # (n_freqs, frames)
        mel = (power.transpose(0, 1) @ self.filterbank).transpose(0, 1)  # (n_mels, frames)
        x = torch.log(mel + cfg.eps)
        return (x - x.mean()) / (x.std() + 1e-5)  # per spectrogram: loudness and gain drop out

    def preprocess(self, raw: Any) -> Tensor:
        """Waveform at the dataset's rate -> normalised log-mel ``(n_mels, frames)`` (CPU)."""
        cfg = self.config
        target = int(round(cfg.max_seconds * cfg.sample_rate)) if cfg.pad_to_max else cfg.n_fft
        wave = prepare_waveform(raw, self.input_rate, cfg.sample_rate, cfg.max_seconds, min_samples=target)
        return self.log_mel(wave)

    def collate(self, items: list[Tensor]) -> dict[str, Tensor]:
        """Spectrograms of different lengths -> ``spec (B, 1, n_mels, T_max)`` and ``frames (B,)``."""
        frames = torch.tensor([x.shape[-1] for x in items], dtype=torch.long)
        spec = torch.zeros(len(items), 1, items[0].shape[0], int(frames.max()))  # (B, 1, n_mels, T_max)
        for i, x in enumerate(items):
            spec[i, 0, :, : x.shape[-1]] = x
        return {"spec": spec, "frames": frames}

    def trainable_blocks(self):
        return list(self.backbone.children())

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.encode(x).pooled  # (B, C)

    def encode(self, x: dict[str, Tensor]) -> EncoderOutput:
        """Pooled ``(B, C)`` and one token per feature-map time step ``(B, T', C)``, padding masked."""
        spec, frames = x["spec"], x["frames"]
        feats = self.backbone.forward_features(spec)  # (B, C, F', T') for a CNN
        if feats.dim() != 4:  # a transformer's tokens (B, N, C): no time axis to mask, use its own head
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)  # (B, N)
            return EncoderOutput(pooled=self.backbone.forward_head(feats), tokens=feats, token_mask=mask)
        t_out = feats.shape[-1]
        # output frames whose receptive field starts inside the clip: ceil(frames * T' / T)
        valid = torch.ceil(frames.to(feats.device) * t_out / spec.shape[-1]).clamp(1, t_out)  # (B,)
        mask = torch.arange(t_out, device=feats.device) < valid[:, None]  # (B, T')
        steps = feats.mean(2) * mask[:, None, :].to(feats.dtype)  # (B, C, F', T') -> (B, C, T'), zeros on padding
        pooled = steps.sum(-1) / valid[:, None].to(feats.dtype)  # (B, C, T') -> (B, C)
        tokens = steps.transpose(1, 2)  # (B, C, T') -> (B, T', C)
        return EncoderOutput(pooled=pooled, tokens=tokens, token_mask=mask)

