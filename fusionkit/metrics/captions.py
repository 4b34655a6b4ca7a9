"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr, computed by the COCO caption code.

The numbers come from ``pycocoevalcap`` (the MS-COCO caption evaluation), on text tokenised the
way the COCO server does it (its ``PTBTokenizer``: lower case, punctuation removed):

- BLEU-n: corpus-level, clipped n-gram precisions with the brevity penalty against each
  candidate's closest reference length (``option='closest'``);
- METEOR 1.5 (exact, stem, synonym and paraphrase matches; a Java program);
- ROUGE-L: F-measure (beta 1.2) of the longest common subsequence, best reference, mean over samples;
- CIDEr (the CIDEr-D variant COCO reports: sigma 6, clipped n-gram counts, x10), with document
  frequencies taken from the references of the evaluated set itself.

The tokenizer and METEOR run on Java. Where ``java`` is not on ``PATH``, :func:`simple_tokenize`
(lower case, punctuation stripped) replaces the tokenizer, METEOR is reported as ``None`` and one
warning line says so (once per process); BLEU, ROUGE-L and CIDEr are still computed. SPICE is not
offered: it downloads Stanford models at run time.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusionkit.errors import DataError

log = logging.getLogger(__name__)
KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def java_available() -> bool:
    return shutil.which("java") is not None


@lru_cache(maxsize=1)
def _warn_no_java() -> None:
    log.warning("caption metrics: no 'java' on PATH, so METEOR is unavailable (reported as null) and a simple "
                "lower-case, punctuation-stripping tokenizer replaces the PTB tokenizer; install a JRE for both")


@lru_cache(maxsize=1)
def _meteor():
    """One METEOR process per Python process: it takes seconds to start (JVM + paraphrase table)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def simple_tokenize(text: str) -> str:
    """Lower case, every run of characters other than letters and digits is a word break."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def ptb_tokenize(lines: list[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer`` (Stanford PTB tokenizer, lower case, its punctuation list
    removed) on one caption per line, fed through stdin with the JVM's log silenced (the wrapper
    writes a temporary file into the installed package and lets Java log to our stderr)."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    cmd = ["java", "-cp", ptb.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase"]
    text = "\n".join(line.replace("\n", " ") for line in lines)
    proc = subprocess.run(cmd, cwd=Path(ptb.__file__).parent, input=text.encode(), capture_output=True, check=False)
    out = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(out) < len(lines):
        raise DataError(f"caption metrics: the PTB tokenizer (java) failed: {proc.stderr.decode().strip()[-200:]}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in out[: len(lines)]]


def tokenize(captions: dict[Any, list[str]], java: bool) -> dict[Any, list[str]]:
    """``{key: [caption, ...]}`` -> the same with each caption tokenised (PTB with Java, else simple)."""
    if not java:
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    flat = ptb_tokenize([c for v in captions.values() for c in v])
    out, i = {}, 0
    for k, v in captions.items():
        out[k], i = flat[i : i + len(v)], i + len(v)
    return out


def check_references(references: list[list[str]]) -> None:
    """Every sample needs at least one non-empty reference caption (a DataError names the first that has none)."""
    for i, refs in enumerate(references):
        if not refs:
            raise DataError(f"caption metrics: sample {i} has no reference caption")
        if any(not isinstance(r, str) or not r.strip() for r in refs):
            raise DataError(f"caption metrics: sample {i} has an empty reference caption ({refs!r:.80})")


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``predictions`` against their ``references``.

    Args:
        predictions: one generated caption per sample (an empty string scores 0).
        references: one or more reference captions per sample.

    Returns:
        ``{bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l, cider}``: floats (``meteor`` is None
        without Java); every value is 0 for an empty set.

    Raises:
        DataError: different lengths, or a sample with no (or an empty) reference.
    """
    if len(predictions) != len(references):
        raise DataError(f"caption metrics: {len(predictions)} predictions for {len(references)} reference lists")
    check_references(references)
    java = java_available()
    if not java:
        _warn_no_java()
    if not predictions:
        return {k: (0.0 if k != "meteor" or java else None) for k in KEYS}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # one tokenizer call (one JVM start) for candidates and references together
    tokens = tokenize({**{("ref", i): list(r) for i, r in enumerate(references)},
                       **{("hyp", i): [p or ""] for i, p in enumerate(predictions)}}, java)
    gts = {i: tokens[("ref", i)] for i in range(len(references))}
    res = {i: tokens[("hyp", i)] for i in range(len(predictions))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    meteor = float(_meteor().compute_score(gts, res)[0]) if java else None
    return {"bleu_1": float(bleu[0]), "bleu_2": float(bleu[1]), "bleu_3": float(bleu[2]), "bleu_4": float(bleu[3]),
            "meteor": meteor, "rouge_l": float(rouge), "cider": float(cider)}
