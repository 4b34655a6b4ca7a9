"""Checkpoints: one folder per checkpoint, swapped into place as a unit.

A checkpoint is the folder ``checkpoints/<name>/`` holding

- ``model.safetensors``: the weights (frozen pretrained weights the model rebuilds are left out:
  an LM decoder's, and every frozen encoder that takes all of its weights from files its config
  names, whose sha256 ``meta.json`` records under ``rebuilt_encoders`` and loading checks);
- ``optim.safetensors``: the optimizer's tensors (only when an optimizer is saved, i.e. ``last``);
- ``meta.json``: epoch, validation metrics, task state, optimizer hyperparameters and, for
  ``last``, everything ``fusionkit train --resume`` needs (LR schedule, RNG states, best so far).

Both safetensors headers repeat the epoch of ``meta.json``, so a reader can check that the parts
belong together. :func:`save_checkpoint` never touches the current checkpoint before a complete
new one exists:

1. every part is written and fsynced into ``checkpoints/.<name>.tmp-<random>/``;
2. the current ``<name>/`` is renamed to ``.<name>.old`` (POSIX cannot rename a folder over a
   non-empty one, so the swap takes two renames);
3. the temporary folder is renamed to ``<name>/``;
4. ``.<name>.old`` is deleted.

A kill at any moment leaves a complete ``<name>/`` (old or new) or, between steps 2 and 3, only a
complete ``.<name>.old``: :func:`find_checkpoint` falls back to it, and :func:`recover` (run
under the run folder's lock before a resume or an overwrite) renames it back and deletes stale
temporary files and folders. Run folders written before this layout (``checkpoints/<name>.safetensors`` next to
``<name>.json``) still load. Nothing is ever unpickled.

Every file written here (and by :func:`atomic_write`) is created with the process umask, like
``open()``: 0644 under umask 022.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fusionkit.errors import RunDirError

WEIGHTS, OPTIMIZER, META = "model.safetensors", "optim.safetensors", "meta.json"


# -- files written whole or not at all -------------------------------------------------------------
def _fsync(path: Path | str) -> None:
    """Flush ``path`` (a file or a folder) to disk, so a power cut cannot undo a rename after it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path | str) -> None:
    """Give ``path`` the mode ``open()`` would have: a writer that replaced it (safetensors'
    ``save_file`` does) may have created it 0600."""
    os.chmod(path, 0o666 & ~_umask())


def _create_temp(path: Path) -> Path:
    """An empty new file next to ``path``, created with the umask (mkstemp would force 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(str(tmp))
        _file_mode(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf and so never produces invalid JSON."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# -- what goes into a checkpoint -------------------------------------------------------------------
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


def optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_tensors`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _pause(stage: str, name: str, epoch: Any) -> None:
    """Testing hook: with ``FUSIONKIT_TEST_CHECKPOINT_PAUSE=<seconds>`` say which step of a write is
    next (on stderr) and wait, so a test can kill the process at exactly that step."""
    seconds = os.environ.get("FUSIONKIT_TEST_CHECKPOINT_PAUSE")
    if seconds:
        print(f"[checkpoint {name} epoch {epoch}: {stage}]", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


@dataclass
class CheckpointState:
    """What a checkpoint holds, copied off the model (to the CPU) so it can be written later,
    while training goes on (:class:`CheckpointWriter`)."""

    meta: str  # meta.json's text (serialised at snapshot time: later changes to the dicts do not reach it)
    epoch: Any
    weights: dict[str, torch.Tensor] | None  # None: hard-linked from another checkpoint of the same weights
    optimizer: dict[str, torch.Tensor] | None = None


def snapshot(model: nn.Module, metadata: dict[str, Any], optimizer: torch.optim.Optimizer | None = None, *,
             with_weights: bool = True) -> CheckpointState:
    """Copy ``model``'s weights (unless ``with_weights`` is False), ``optimizer``'s state and the
    metadata now; :func:`write_checkpoint` writes them."""
    meta = dict(metadata)
    if hasattr(model, "rebuilt_encoders"):  # left out of the weights: say which weights they must be
        meta["rebuilt_encoders"] = {m: model.weights_digest(m) for m in model.rebuilt_encoders()}
    tensors = None
    if optimizer is not None:
        tensors, meta["optimizer"] = optimizer_tensors(optimizer)
    return CheckpointState(dumps(meta, indent=2, default=str), metadata.get("epoch"),
                           _cpu_state(model) if with_weights else None, tensors)


def save_checkpoint(directory: Path, name: str, model: nn.Module, metadata: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, weights_from: Path | None = None) -> Path:
    """Write checkpoint ``directory/name/`` of ``model`` as it is now, as one unit (see the module
    docstring); :func:`write_checkpoint` has the arguments. Returns the path of its ``model.safetensors``."""
    state = snapshot(model, metadata, optimizer, with_weights=weights_from is None)
    return write_checkpoint(directory, name, state, weights_from)


def write_checkpoint(directory: Path, name: str, state: CheckpointState, weights_from: Path | None = None) -> Path:
    """Write checkpoint ``directory/name/`` from ``state`` as one unit (see the module docstring).

    Args:
        weights_from: the ``model.safetensors`` of another checkpoint with exactly these weights
            (``best`` of the same epoch) when ``state`` holds none: hard-linked instead of written
            again (copied where links are not possible). Checkpoint files are never changed in place.

    Returns the path of its ``model.safetensors``.
    """
    if state.weights is None and weights_from is None:
        raise ValueError("write_checkpoint: the state holds no weights; pass weights_from")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final, old = directory / name, directory / f".{name}.old"
    tmp = directory / f".{name}.tmp-{secrets.token_hex(4)}"
    epoch = state.epoch
    header = {"format": "pt", **({"epoch": str(epoch)} if epoch is not None else {})}
    os.mkdir(tmp)  # with the umask, like every other folder of the run
    try:
        if state.weights is None:
            try:
                os.link(weights_from, tmp / WEIGHTS)
            except OSError:  # a file system without hard links
                shutil.copyfile(weights_from, tmp / WEIGHTS)
        else:
            save_file(state.weights, str(tmp / WEIGHTS), metadata=header)
        if state.optimizer is not None:
            _pause("weights written, optimizer next", name, epoch)
            save_file(state.optimizer, str(tmp / OPTIMIZER), metadata=header)
        (tmp / META).write_text(state.meta)
        for part in tmp.iterdir():
            _file_mode(part)
            _fsync(part)
        _fsync(tmp)
        _pause("complete in its temporary folder", name, epoch)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier crash after step 3
            os.rename(final, old)
            _pause("previous checkpoint moved aside", name, epoch)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory)
    _pause("new checkpoint in place", name, epoch)
    shutil.rmtree(old, ignore_errors=True)
    return final / WEIGHTS


class CheckpointWriter:
    """Writes each epoch's checkpoints (and its metrics row) in a background thread while the
    next epoch trains: the file writes and fsyncs leave the training loop.

    One job at a time, in order: :meth:`submit` first waits for the previous job. :meth:`wait`
    waits for the current one and raises its error, if any; call it before reading checkpoints
    and before leaving (a ``finally``), so a stopped run's last epoch is complete on disk.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="fusionkit-checkpoint", daemon=False)
        self._thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as err:  # raised in the training thread by wait()
            self._error = err

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.wait()
        else:  # the loop's own error comes first; the files are complete all the same
            try:
                self.wait()
            except BaseException:
                pass

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


# -- finding and reading checkpoints ---------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """The files of one checkpoint (``optimizer`` is None when it holds no optimizer state)."""

    weights: Path
    meta: Path
    optimizer: Path | None = None

    @classmethod
    def at(cls, path: Path) -> Checkpoint:
        """The checkpoint at ``path``: its folder, its ``model.safetensors``, or an old-layout
        ``<name>.safetensors`` (next to ``<name>.json`` and ``<name>.optim.safetensors``)."""
        path = Path(path)
        if path.name == WEIGHTS and not path.is_dir():
            path = path.parent
        if path.is_dir():
            optim = path / OPTIMIZER
            return cls(path / WEIGHTS, path / META, optim if optim.is_file() else None)
        optim = path.with_name(f"{path.stem}.optim.safetensors")
        return cls(path, path.with_suffix(".json"), optim if optim.is_file() else None)


def find_checkpoint(directory: Path, name: str) -> Checkpoint | None:
    """Checkpoint ``name`` in ``directory`` (a run's ``checkpoints/``), or None when there is none.

    The one place that knows the layouts: ``<name>/``; ``.<name>.old/`` when a crash came between
    the two renames of a swap; ``<name>.safetensors`` in run folders of earlier versions.
    """
    directory = Path(directory)
    for candidate in (directory / name, directory / f".{name}.old"):
        if candidate.is_dir():
            return Checkpoint.at(candidate)
    old_layout = directory / f"{name}.safetensors"
    return Checkpoint.at(old_layout) if old_layout.is_file() else None


def recover(directory: Path) -> None:
    """Finish or undo what a crash interrupted in ``directory``: delete temporary files and
    folders, and put back a checkpoint left under ``.<name>.old``.

    Call it only while holding the run folder's lock (nobody else may be writing).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.startswith(".") and path.name.endswith(".old") and path.is_dir():
            final = directory / path.name[1:-len(".old")]
            if final.is_dir():
                shutil.rmtree(path)  # the crash came after the new checkpoint was in place
            else:
                os.rename(path, final)  # ... or between the two renames
        elif path.name.startswith(".") and (".tmp-" in path.name or path.name.endswith(".tmp")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def optional_keys(model: nn.Module) -> set[str]:
    """State keys a checkpoint may lack: buffers a module lists in ``optional_state`` (added after
    checkpoints were written; their initial value is the exact old behaviour, e.g. temperature 1)."""
    keys = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "optional_state", ()):
            keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


_DAMAGED = "the checkpoint is damaged; evaluate another one (--checkpoint last) or train the run again"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"checkpoint metadata '{path}' cannot be read ({err}); {_DAMAGED}") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"checkpoint metadata '{path}' is not a JSON object; {_DAMAGED}")
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of the checkpoint at ``path`` (``{}`` when absent: load_weights says so)."""
    meta = Checkpoint.at(path).meta
    return _read_json(meta) if meta.is_file() else {}


def _load_tensors(path: Path, epoch: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, checked to come from ``epoch`` when its header names one."""
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RunDirError(f"checkpoint file '{path}' cannot be read ({str(err).splitlines()[0]}): it is "
                          f"truncated or not a safetensors file; {_DAMAGED}") from None
    if epoch is not None and "epoch" in header and header["epoch"] != str(epoch):
        raise RunDirError(f"checkpoint file '{path}' holds epoch {header['epoch']} but its {META} says "
                          f"epoch {epoch}; {_DAMAGED}")
    return tensors


def load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (see :meth:`Checkpoint.at`) into ``model``; returns its metadata.

    Raises:
        RunDirError: a part is missing, unreadable (truncated, not safetensors), from another
            epoch than the metadata, or the weights do not fit ``model``.
    """
    ck = Checkpoint.at(path)
    for part in (ck.weights, ck.meta):
        if not part.is_file():
            raise RunDirError(f"checkpoint '{path}' is missing or incomplete (no {part.name}); {_DAMAGED}")
    meta = _read_json(ck.meta)
    state = _load_tensors(ck.weights, meta.get("epoch"))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: "size mismatch for fusion.x: copying a param with shape ..."
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                      str(err).splitlines()[0])
        raise RunDirError(f"checkpoint '{ck.weights}' does not fit the model built from its config ({detail}); "
                          f"if the run's config.yaml was edited after training, restore it") from None
    external = model.external_state() if hasattr(model, "external_state") else set()  # rebuilt from config
    missing = [k for k in missing if k not in optional_keys(model) and k not in external]  # older checkpoints: defaults hold
    if missing or unexpected:
        raise RunDirError(f"checkpoint '{ck.weights}' does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return meta


def check_rebuilt_encoders(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Check that the encoders a checkpoint left out (``meta["rebuilt_encoders"]``), rebuilt from
    the run's config, have the weights the run was trained with.

    Raises:
        RunDirError: a weights file changed since (another download, an edited file).
    """
    for m, digest in (meta.get("rebuilt_encoders") or {}).items():
        if m not in getattr(model, "encoders", {}):
            raise RunDirError(f"checkpoint '{path}' was trained with an encoder for '{m}' that this model lacks; "
                              f"if the run's config.yaml was edited after training, restore it")
        actual = model.weights_digest(m)
        if actual != digest:
            raise RunDirError(f"checkpoint '{path}': encoder '{m}' built from the run's config.yaml has other "
                              f"weights (sha256 {actual[:12]}) than the run was trained with ({digest[:12]}); its "
                              f"weights file changed since: restore that file, or train the run again")


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    """Restore ``optimizer`` from the checkpoint at ``path`` whose metadata is ``meta``."""
    ck = Checkpoint.at(path)
    if ck.optimizer is None or "optimizer" not in meta:
        raise RunDirError(f"checkpoint '{path}' holds no optimizer state, so it cannot be resumed; "
                          f"train the run again with --overwrite")
    optimizer.load_state_dict(optimizer_state(_load_tensors(ck.optimizer, meta.get("epoch")), meta["optimizer"]))
