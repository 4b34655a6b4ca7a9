"""Run folders: create one, and lock it while a run writes into it.

A process that trains into a run folder holds ``run_dir/.lock`` (an exclusive ``flock``; the file
holds the owner's pid) for the whole run, so a second ``fusionkit train`` into the same folder
stops with one line instead of interleaving its epochs with the first. The kernel drops the lock
when its process dies, even by ``kill -9``: a ``.lock`` left by a dead process is taken over.
Whoever takes the lock of a run folder also repairs what a crash left behind
(:func:`recover_run_dir`).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from fusionkit.errors import RunDirError
from fusionkit.training.checkpoint import find_checkpoint, read_meta, recover

try:
    import fcntl
except ImportError:  # no flock (Windows): the pid in the lock file decides
    fcntl = None

RUN_FILES = ("metrics.jsonl", "results.json", "config.yaml", "skipped.json")


def check_creatable(path: Path, what: str = "run folder") -> Path:
    """Refuse ``path`` when it is a file, lies under one, or cannot be created where it would go
    (tried with an empty probe folder, removed at once), before any work is done for it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} '{path}' is a file; pass --out to choose another")
    if path.is_dir():
        return path
    parent = next(p for p in path.absolute().parents if p.exists() or p.is_symlink())
    if not parent.is_dir():
        raise RunDirError(f"{what} '{path}' cannot be created: '{parent}' is not a folder; "
                          f"pass --out to choose another")
    probe = parent / f".fusionkit-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise RunDirError(f"{what} '{path}' cannot be created ({err.strerror or err} in '{parent}'); "
                          f"pass --out to choose another") from None
    return path


def make_dir(path: Path, what: str = "run folder") -> Path:
    """Create ``path`` (and its parents); an impossible path is a one-line :class:`RunDirError`."""
    path = check_creatable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"{what} '{path}' cannot be created ({err.strerror or err}); "
                          f"pass --out to choose another") from None
    return path


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _in_use(run_dir: Path, pid: int | None) -> RunDirError:
    who = f"fusionkit process {pid}" if pid else "another fusionkit process"
    return RunDirError(f"run folder '{run_dir}' is in use by {who}; wait for it to finish, or pass --out "
                       f"to choose another folder")


class RunLock:
    """The exclusive lock on a run folder (see the module docstring); a context manager."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder); a one-line :class:`RunDirError` when a live
        process holds it."""
        make_dir(self.run_dir)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise _in_use(self.run_dir, _read_pid(self.path)) from None
            else:
                pid = _read_pid(self.path)
                if pid and pid != os.getpid() and _alive(pid):
                    os.close(fd)
                    raise _in_use(self.run_dir, pid)
            try:  # the previous holder may have deleted the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it (see the inode check in acquire)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: Path) -> int | None:
    """The pid of another live process that holds ``run_dir``'s lock, else None."""
    path = Path(run_dir) / ".lock"
    if not path.is_file():
        return None
    pid = _read_pid(path)
    if pid == os.getpid():
        return None
    if fcntl is None:
        return pid if pid and _alive(pid) else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return pid or -1
    finally:
        os.close(fd)  # closing drops a shared lock taken just to look


def recover_run_dir(run_dir: Path) -> None:
    """Repair what a crash left in a run folder: temp files of its atomic writes, and checkpoint
    swaps (:func:`fusionkit.training.checkpoint.recover`). Call it while holding the lock, on a
    folder known to be a run folder (other files are never touched)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink()
    recover(run_dir / "checkpoints")


def resumable_epoch(run_dir: Path) -> int | None:
    """The epoch ``--resume`` would continue after, or None (finished, or no checkpoint)."""
    run_dir = Path(run_dir)
    last = find_checkpoint(run_dir / "checkpoints", "last")
    if (run_dir / "results.json").is_file() or last is None:
        return None
    try:
        return read_meta(last.weights).get("epoch")
    except RunDirError:
        return None


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    """Create ``out``; refuse an existing non-empty folder unless ``overwrite``, and a folder another
    process is training into."""
    out = check_creatable(Path(out))
    if (pid := lock_holder(out)) is not None:
        raise _in_use(out, pid if pid > 0 else None)
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        if not overwrite:
            epoch = resumable_epoch(out)
            hint = f"; it stopped after epoch {epoch}: --resume {out} continues it" if epoch else ""
            raise RunDirError(f"run folder '{out}' already exists; pass --overwrite to replace it "
                              f"or --out to choose another{hint}")
        recover_run_dir(out)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        ckpt = out / "checkpoints"
        for f in ckpt.iterdir() if ckpt.is_dir() else []:
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
    return make_dir(out)


def next_free_dir(base: Path) -> Path:
    """``base`` if free, else ``base-2``, ``base-3`` ... (default run folders never collide)."""
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")
