"""Checkpoints: safetensors weights + JSON metadata, each written to a temp file then renamed.

A crash mid-write leaves the previous checkpoint intact; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fusionkit.errors import RunDirError


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage. Weights the model rebuilds from its
    # config (a frozen pretrained language model) are left out.
    external = module.external_state() if hasattr(module, "external_state") else set()
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()
            if k not in external}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state into safetensors-friendly tensors + JSON-able hyperparameters."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(directory: Path, name: str, model: nn.Module, metadata: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``name.safetensors`` (+ ``name.optim.safetensors``) and ``name.json`` atomically."""
    directory = Path(directory)
    weights = directory / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(_cpu_state(model), tmp, metadata={"format": "pt"}))
    meta = dict(metadata)
    if optimizer is not None:
        tensors, rest = optimizer_tensors(optimizer)
        atomic_write(directory / f"{name}.optim.safetensors", lambda tmp: save_file(tensors, tmp))
        meta["optimizer"] = rest
    # metadata last: its presence means the weights next to it are complete
    atomic_write_text(directory / f"{name}.json", json.dumps(meta, indent=2, default=str))
    return weights


def optional_keys(model: nn.Module) -> set[str]:
    """State keys a checkpoint may lack: buffers a module lists in ``optional_state`` (added after
    checkpoints were written; their initial value is the exact old behaviour, e.g. temperature 1)."""
    keys = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "optional_state", ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata next to checkpoint ``path`` (``{}`` when absent: load_weights says so)."""
    meta_path = Path(path).with_suffix(".json")
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load ``path`` (a ``.safetensors`` file) into ``model``; returns its JSON metadata."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise RunDirError(f"checkpoint '{path}' is missing or incomplete (no {meta_path.name})")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    external = model.external_state() if hasattr(model, "external_state") else set()  # rebuilt from config
    missing = [k for k in missing if k not in optional_keys(model) and k not in external]  # older checkpoints: defaults hold
    if missing or unexpected:
        raise RunDirError(f"checkpoint '{path}' does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return json.loads(meta_path.read_text())
