"""Text corruptions on raw strings: keyboard typos, masked words, dropped words.

Words are maximal runs of non-whitespace; the whitespace between kept words is preserved,
so line breaks survive.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from fusionkit.corruptions.base import Corruption, CorruptionConfig, stochastic_round
from fusionkit.errors import DataError
from fusionkit.registry import register

# Keys that touch each letter on a QWERTY keyboard (same row and the rows above and below).
# The map is symmetric: if b is a neighbour of a, a is a neighbour of b.
QWERTY_NEIGHBOURS: dict[str, str] = {
    "q": "wa", "w": "qeas", "e": "wrsd", "r": "etdf", "t": "ryfg",
    "y": "tugh", "u": "yihj", "i": "uojk", "o": "ipkl", "p": "ol",
    "a": "qwsz", "s": "awedzx", "d": "serfxc", "f": "drtgcv", "g": "ftyhvb",
    "h": "gyujbn", "j": "huiknm", "k": "jiolm", "l": "kop",
    "z": "asx", "x": "zsdc", "c": "xdfv", "v": "cfgb", "b": "vghn", "n": "bhjm", "m": "njk",
}

_WORD = re.compile(r"\S+")


def _text(x: Any) -> str:
    if not isinstance(x, str):
        raise DataError(f"text corruption expects a str (got {type(x).__name__})")
    return x


@register("corruptions", "typos")
class Typos(Corruption):
    """Replace a fraction severity * max_rate of letters with a QWERTY neighbour (case kept)."""

    class Config(CorruptionConfig):
        max_rate: float = Field(0.6, gt=0, le=1, description=(
            "fraction of letters replaced at severity 1; at 0.6 a MiniLM caption head on "
            "digits falls from 69% to ~13% (chance 10%)"))

    kinds = ("text",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        chars = list(_text(x))
        letters = [i for i, ch in enumerate(chars) if ch.lower() in QWERTY_NEIGHBOURS]
        count = stochastic_round(severity * self.config.max_rate * len(letters), rng)
        for i in rng.choice(letters, size=count, replace=False) if count else ():
            original = chars[i]
            typo = rng.choice(list(QWERTY_NEIGHBOURS[original.lower()]))
            chars[i] = typo.upper() if original.isupper() else typo
        return "".join(chars)


@register("corruptions", "word_mask")
class WordMask(Corruption):
    """Replace a fraction severity of the words with the mask token."""

    class Config(CorruptionConfig):
        token: str = Field("[MASK]", description=(
            "replacement for a masked word; BERT-style tokenizers know '[MASK]'"))

    kinds = ("text",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        text = _text(x)
        spans = [m.span() for m in _WORD.finditer(text)]
        count = stochastic_round(severity * len(spans), rng)
        masked = set(rng.choice(len(spans), size=count, replace=False).tolist()) if count else set()
        pieces, cursor = [], 0
        for i, (start, end) in enumerate(spans):
            pieces.append(text[cursor:start])  # whitespace before the word
            pieces.append(self.config.token if i in masked else text[start:end])
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces)


@register("corruptions", "word_drop")
class WordDrop(Corruption):
    """Delete a fraction severity of the words, always keeping at least one."""

    kinds = ("text",)

    def corrupt(self, x: Any, severity: float, rng: np.random.Generator, kind: str) -> Any:
        text = _text(x)
        spans = [m.span() for m in _WORD.finditer(text)]
        if not spans:
            return text
        count = min(stochastic_round(severity * len(spans), rng), len(spans) - 1)
        dropped = set(rng.choice(len(spans), size=count, replace=False).tolist()) if count else set()
        kept = [i for i in range(len(spans)) if i not in dropped]
        # Leading whitespace, then each kept word preceded by the whitespace that preceded it
        # in the original (none for the first kept word), then trailing whitespace.
        pieces = [text[:spans[0][0]], text[slice(*spans[kept[0]])]]
        for i in kept[1:]:
            gap_start = spans[i - 1][1]
            pieces.append(text[gap_start:spans[i][0]] + text[slice(*spans[i])])
        pieces.append(text[spans[-1][1]:])
        return "".join(pieces)
