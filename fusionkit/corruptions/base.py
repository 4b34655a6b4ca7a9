"""Test-time input corruptions: the base class, shared helpers, and the two entry points.

A corruption takes one raw sample of one modality (what a dataset hands to an encoder, before
preprocessing) and returns a NEW corrupted value; the input is never modified::

    corruption = build("corruptions", {"name": "gaussian_blur", "max_sigma": 2.0})
    blurred = apply_corruption(corruption, image, severity=0.5, kind="image", seed=0, sample_index=7)

Every corruption follows the same contract, enforced here by :meth:`Corruption.__call__`:

- ``severity`` is a number in ``[0, 1]``; severity 0 returns a value equal to the input.
- the amount of change grows with severity (in expectation, for random corruptions).
- all randomness comes from the ``rng`` argument, so one seed gives one output.
- ``kind`` (``"image"``, ``"text"``, ...) must be one the corruption lists in ``kinds``.

:func:`apply_corruption` derives the generator from ``(seed, sample_index, name)``, so a
sample is corrupted the same way whatever batch or worker it lands in.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from fusionkit.errors import ConfigError, DataError, unknown_choice
from fusionkit.registry import registry

MODALITY_KINDS = ("image", "text", "audio", "video", "vector")


class CorruptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Corruption:
    """A test-time corruption of one modality kind; subclasses implement :meth:`corrupt`.

    Attributes:
        kinds: modality kinds this corruption applies to; ``("*",)`` means any kind.
        drops_modality: True when the corruption removes the modality (returns None) instead
            of changing its value; the caller then marks the modality missing in the mask.
        stochastic: False for deterministic corruptions (blur, contrast), whose output does
            not depend on the seed.
    """

    Config = CorruptionConfig
    kinds: tuple[str, ...] = ()
    drops_modality: bool = False
    stochastic: bool = True
    registry_name: str = "corruption"  # replaced by @register

    def __init__(self, config: BaseModel | None = None):
        self.config = config or self.Config()

    @classmethod
    def from_config(cls, config: BaseModel) -> Corruption:
        return cls(config)

    def __call__(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        """Return a corrupted copy of ``x`` (or None when the modality is dropped).

        Args:
            x: one raw sample of modality kind ``kind``.
            severity: strength in ``[0, 1]``; 0 returns a copy equal to ``x``.
            rng: the only source of randomness.
            kind: the modality kind of ``x``; must be in ``self.kinds``.

        Raises:
            ConfigError: severity outside ``[0, 1]``, or a kind this corruption does not handle.
            DataError: ``x`` is not a value of the expected format.
        """
        severity = check_severity(severity, self.registry_name)
        self.check_kind(kind)
        if severity == 0.0:
            return copy.deepcopy(x)
        return self.corrupt(x, severity, rng, kind)

    def check_kind(self, kind: str) -> None:
        if "*" in self.kinds or kind in self.kinds:
            return
        raise ConfigError(
            f"corruption '{self.registry_name}' applies to {', '.join(self.kinds)} data, "
            f"not {kind!r}; pick a corruption made for {kind!r}"
        )

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        """Corrupt ``x`` at ``severity`` in ``(0, 1]`` (already validated); return a new value."""
        raise NotImplementedError


def check_severity(severity: Any, name: str = "corruption") -> float:
    """``severity`` as a float in ``[0, 1]``, or a ConfigError that says so."""
    try:
        value = float(severity)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(severity, bool) or not 0.0 <= value <= 1.0:  # NaN fails the comparison too
        raise ConfigError(f"severity for corruption '{name}' must be a number in [0, 1] "
                          f"(got {severity!r})")
    return value


def stochastic_round(value: float, rng: np.random.Generator) -> int:
    """``floor(value)`` or ``ceil(value)``, rounding up with probability ``frac(value)``.

    Counts like "how many words to drop" then equal ``value`` in expectation, so a small
    severity still changes short inputs sometimes instead of never.
    """
    low = math.floor(value)
    return low + int(rng.random() < value - low)


# -- pixel values (images and video frames) ---------------------------------------------------
def to_unit_float(x: Any, kind: str) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """Pixels as float64 in ``[0, 1]``, plus a function that converts back to ``x``'s type.

    Accepts a float array in ``[0, 1]``, a uint8 array in ``0..255`` or (images) a PIL image
    with 8-bit channels; the restore function clips to the valid range, rounds for uint8, and
    returns the same type and dtype as given.
    """
    if type(x).__module__.startswith("PIL."):
        from PIL import Image

        arr = np.asarray(x)
        if arr.dtype != np.uint8 or x.mode == "P":
            raise DataError(f"{kind} corruption: PIL mode {x.mode!r} is not 8 bits per channel; "
                            "convert it first, e.g. img.convert('RGB')")
        mode = x.mode
        return arr / 255.0, lambda y: Image.fromarray(_to_uint8(y), mode=mode)
    if not isinstance(x, np.ndarray):
        raise DataError(f"{kind} corruption expects a numpy array"
                        f"{' or PIL.Image' if kind == 'image' else ''} (got {type(x).__name__})")
    if x.dtype == np.uint8:
        return x / 255.0, _to_uint8
    if np.issubdtype(x.dtype, np.floating):
        dtype = x.dtype
        return x.astype(np.float64), lambda y: np.clip(y, 0.0, 1.0).astype(dtype)
    raise DataError(f"{kind} corruption expects uint8 pixels in 0..255 or floats in [0, 1] "
                    f"(got dtype {x.dtype})")


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def check_ndim(arr: np.ndarray, allowed: tuple[int, ...], kind: str, layout: str) -> None:
    """DataError unless ``arr.ndim`` is one of ``allowed``; ``layout`` names the expected shape."""
    if arr.ndim not in allowed:
        raise DataError(f"{kind} corruption expects shape {layout} (got {tuple(arr.shape)})")


def float_array(x: Any, allowed: tuple[int, ...], kind: str, layout: str) -> np.ndarray:
    """``x`` as a float numpy array of an allowed rank (audio, vectors), or a DataError."""
    if not (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)):
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{kind} corruption expects a float numpy array {layout} (got {got})")
    check_ndim(x, allowed, kind, layout)
    return x


# -- entry points -----------------------------------------------------------------------------
def parse_corruption_spec(spec: str) -> tuple[str, str]:
    """Split a command-line spec into ``(modality, corruption name)``.

    Two forms: ``MODALITY:CORRUPTION`` (``image:gaussian_noise``) and ``missing:MODALITY``
    (``missing:text``, read as "text is missing"). A first part equal to ``missing`` always
    means the second form.

    Raises:
        ConfigError: a malformed spec, or an unknown corruption name (with a did-you-mean).
    """
    parts = spec.split(":") if isinstance(spec, str) else []
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"corruption spec {spec!r} must look like MODALITY:CORRUPTION "
                          "(e.g. image:gaussian_noise) or missing:MODALITY (e.g. missing:text)")
    first, second = (p.strip() for p in parts)
    if first == "missing":
        modality, name = second, "missing"
    else:
        modality, name = first, second
    corruptions = registry("corruptions")
    if name not in corruptions:
        raise ConfigError(f"{spec}: {unknown_choice('a corruption', name, corruptions.names())}")
    return modality, name


def corruption_rng(name: str, seed: int, sample_index: int) -> np.random.Generator:
    """The generator for one (corruption, sample): independent of batch order and workers.

    The name is hashed with crc32 (stable across processes, unlike ``hash()``) so two
    corruptions applied to the same sample draw independent numbers.
    """
    if seed < 0 or sample_index < 0:
        raise ConfigError(f"corruption seed and sample index must be >= 0 "
                          f"(got seed={seed}, sample_index={sample_index})")
    return np.random.default_rng([int(seed), int(sample_index), zlib.crc32(name.encode("utf-8"))])


def apply_corruption(corruption: Corruption | str, x: Any, severity: float, kind: str,
                     seed: int, sample_index: int) -> Any:
    """Corrupt one sample reproducibly: the result depends only on the arguments.

    Args:
        corruption: a built corruption, or a registered name (built with its defaults).
        x: the raw sample.
        severity: strength in ``[0, 1]``.
        kind: modality kind of ``x`` (``"image"``, ``"text"``, ...).
        seed: run-level seed.
        sample_index: the sample's index in the dataset (not in the batch).

    Returns:
        The corrupted value, or None when a ``drops_modality`` corruption dropped it.
    """
    if isinstance(corruption, str):
        corruption = registry("corruptions").build(corruption, path="corruption")
    rng = corruption_rng(corruption.registry_name, seed, sample_index)
    return corruption(x, severity, rng, kind)
