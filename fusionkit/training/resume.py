"""``fusionkit train --resume``: what may change, and the state a resume restores.

A resume continues a run exactly as its ``config.yaml`` says, from its ``last`` checkpoint:
weights, optimizer, LR schedule, best-so-far, and every random state the next epoch draws from
(python, numpy, torch, CUDA, the train loader's shuffling; augmentations draw from
``(seed, epoch, sample)``), so on the CPU the finished run equals one never interrupted. Only
settings that cannot change the numbers may be overridden (:data:`RESUMABLE`).
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.config import RunConfig, read_yaml, resolve
from fusionkit.errors import ConfigError, RunDirError
from fusionkit.training.checkpoint import atomic_write_text, dumps, find_checkpoint, read_meta

# config keys an override may change on --resume: where and how fast the run computes, not what
# (runtime.precision is not among them: bf16 would change the numbers of the remaining epochs)
RESUMABLE = ("runtime.accelerator", "runtime.devices", "runtime.num_nodes", "runtime.strategy", "runtime.threads",
             "train.num_workers", "train.cache_dir")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The raw ``config.yaml`` of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
    return read_yaml(run_dir / "config.yaml")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def check_resume_config(run_dir: Path, cfg: RunConfig) -> RunConfig:
    """``cfg`` (the run's config.yaml plus the overrides given with --resume) when it differs from
    the stored config only in :data:`RESUMABLE` keys; a :class:`ConfigError` naming the change otherwise."""
    stored = _flat(resolve(run_config(run_dir)).model_dump(mode="json"))
    new = _flat(cfg.model_dump(mode="json"))
    for key in sorted(set(stored) | set(new)):
        if stored.get(key) != new.get(key) and key not in RESUMABLE:
            raise ConfigError(f"--resume continues the run as {Path(run_dir) / 'config.yaml'} describes it; "
                              f"{key} cannot change ({stored.get(key)!r} -> {new.get(key)!r}); only "
                              f"{', '.join(RESUMABLE)} may. Start a new run (--out) for anything else")
    return cfg


def check_resumable(run_dir: Path) -> int:
    """The epoch a resume continues after; a one-line :class:`RunDirError` when the run is complete
    or never finished an epoch. Call it while holding the lock (after :func:`recover`)."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        raise RunDirError(f"run '{run_dir}' is complete (results.json exists); nothing to resume: evaluate it "
                          f"with `fusionkit eval {run_dir}`, or train it again with --out {run_dir} --overwrite")
    last = find_checkpoint(run_dir / "checkpoints", "last")
    if last is None:
        raise RunDirError(f"run folder '{run_dir}' has no checkpoint to resume from (no epoch finished); "
                          f"train it again with --out {run_dir} --overwrite")
    return int(read_meta(last.weights).get("epoch", 0))


# -- random states and metrics rows ---------------------------------------------------------------
def _hex_words(words) -> str:
    return struct.pack(f"<{len(words)}I", *words).hex()


def _words(text: str) -> tuple[int, ...]:
    raw = bytes.fromhex(text)
    return struct.unpack(f"<{len(raw) // 4}I", raw)


def _tensor_hex(state: torch.Tensor) -> str:
    return state.numpy().tobytes().hex()


def _hex_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()


def rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    """Every random state the next epoch draws from (python, numpy, torch, CUDA, the train loader's
    shuffling), as JSON."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, _hex_words(words), gauss],
             "numpy": [kind, keys.astype("<u4").tobytes().hex(), int(pos), int(has_gauss), float(cached)],
             "torch": _tensor_hex(torch.get_rng_state()), "loader": _tensor_hex(loader_generator.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    version, words, gauss = state["python"]
    random.setstate((version, _words(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(bytes.fromhex(keys), dtype="<u4").astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(_hex_tensor(state["torch"]))
    loader_generator.set_state(_hex_tensor(state["loader"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_hex_tensor(s) for s in state["cuda"]])


def metrics_until(run_dir: Path, epoch: int, record: dict[str, Any]) -> None:
    """Make ``metrics.jsonl`` hold exactly the rows of epochs 1..``epoch``: a crash may have come
    after the checkpoint of ``epoch`` but before its row (``record``) or halfway through a line."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < epoch:
            rows.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in [*rows, dumps(record)]))
