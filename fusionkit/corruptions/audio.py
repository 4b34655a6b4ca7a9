"""Audio corruptions on raw waveforms: float arrays ``(T,)`` or ``(C, T)``."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_validator

from fusionkit.corruptions.base import Corruption, CorruptionConfig, float_array, stochastic_round
from fusionkit.registry import register

_LAYOUT = "(T,) or (C, T)"


@register("corruptions", "white_noise")
class WhiteNoise(Corruption):
    """Gaussian noise at snr_db = max_snr - severity * (max_snr - min_snr) of the waveform's power."""

    class Config(CorruptionConfig):
        max_snr: float = Field(40.0, description=(
            "SNR in dB as severity approaches 0; 40 dB is barely audible"))
        min_snr: float = Field(-20.0, description=(
            "SNR in dB at severity 1; -20 dB means noise 100 times the signal's power, which "
            "buries speech, so severity 1 removes most of the modality's information"))

        @model_validator(mode="after")
        def _ordered(self):
            if self.min_snr >= self.max_snr:
                raise ValueError(f"min_snr ({self.min_snr}) must be below max_snr ({self.max_snr})")
            return self

    kinds = ("audio",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        wave = float_array(x, (1, 2), kind, _LAYOUT)  # (T,) or (C, T)
        snr_db = self.config.max_snr - severity * (self.config.max_snr - self.config.min_snr)
        signal_power = float(np.mean(wave.astype(np.float64) ** 2))  # a silent wave stays silent
        noise_std = np.sqrt(signal_power / 10.0 ** (snr_db / 10.0))
        return (wave + rng.normal(0.0, noise_std, size=wave.shape)).astype(wave.dtype)


@register("corruptions", "time_dropout")
class TimeDropout(Corruption):
    """Zero random chunks (all channels) covering a fraction severity of the samples."""

    class Config(CorruptionConfig):
        chunks: int = Field(20, ge=1, description=(
            "the waveform is cut into this many equal chunks and severity picks the fraction "
            "zeroed; 20 gives 5% steps, independent of the sample rate"))

    kinds = ("audio",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        wave = float_array(x, (1, 2), kind, _LAYOUT)  # (T,) or (C, T)
        length = wave.shape[-1]
        chunks = min(self.config.chunks, length)
        edges = np.linspace(0, length, chunks + 1).astype(int)  # (chunks + 1,)
        count = stochastic_round(severity * chunks, rng)
        out = wave.copy()
        for c in rng.choice(chunks, size=count, replace=False) if count else ():
            out[..., edges[c]:edges[c + 1]] = 0.0
        return out
