"""WebDataset tar shards: list them, read their samples, count them, and deal them to DDP ranks
and DataLoader workers (the reading side of :mod:`fusionkit.datasets.webdataset`).

A sample is the run of consecutive tar members sharing a key, as the ``webdataset`` package
groups them: the member name up to the first dot of its file name is the key, the rest the
extension (``dir/000017.seg.png`` -> ``dir/000017``, ``seg.png``).
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionkit.errors import DataError

KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/000017.seg.png" -> ("dir/000017", "seg.png")


def expand_shards(patterns: list[str], what: str) -> list[str]:
    """Shard files of ``patterns`` ({a..b} ranges, {x,y} lists, globs), in order.

    Raises:
        DataError: no file matches, or some files a brace range names do not exist.
    """
    from braceexpand import braceexpand

    names: list[str] = []
    for pattern in patterns:
        for name in braceexpand(pattern):
            names.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
    missing = [n for n in names if not Path(n).is_file()]
    shown = patterns[0] if len(patterns) == 1 else patterns
    if not names or len(missing) == len(names):
        raise DataError(f"{what}: no shard matches {shown!r}" + (f" (looked for {missing[0]})" if missing else ""))
    if missing:
        raise DataError(f"{what}: {len(missing)} of the {len(names)} shards of {shown!r} do not exist "
                        f"(first: {missing[0]})")
    return names


def _unreadable(shard: str, err: Exception) -> DataError:
    reason = "not a tar file, or a truncated one" if isinstance(err, (tarfile.ReadError, EOFError)) else err
    return DataError(f"webdataset shard '{shard}' cannot be read: {reason}")


def _key_ext(name: str) -> tuple[str, str] | None:
    match = KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def iter_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a shard, read sequentially.

    Raises:
        DataError: the shard is not a readable tar file.
    """
    key, files = None, {}
    try:
        with tarfile.open(shard, "r|*") as tf:
            for member in tf:
                split = _key_ext(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if files:
                        yield key, files
                    key, files = split[0], {}
                files[split[1]] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise _unreadable(shard, err) from None
    if files:
        yield key, files


@dataclass
class ShardScan:
    """A split's shards read once (headers and label files): samples per shard, labels, extensions."""

    counts: list[int]
    labels: list[tuple[str, str | None]]  # (sample id, label text or None) in shard order
    exts: Counter = field(default_factory=Counter)  # extension -> samples that have it
    first: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # extension -> (sample id, bytes)


def scan_shards(shards: list[str], label: str, keep_first: Callable[[str], bool] = lambda ext: False) -> ShardScan:
    """Count each shard's samples and read their label files; media are skipped (seeked over).
    ``keep_first(ext)``: also keep the first file with that extension (in ``first``)."""
    scan = ShardScan([], [])
    for shard in shards:
        key, n = None, 0
        try:
            with tarfile.open(shard) as tf:  # random access: the data of other members is not read
                for member in tf:
                    split = _key_ext(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key:
                        key, n = split[0], n + 1
                        scan.labels.append((f"{Path(shard).name}:{key}", None))
                    scan.exts[split[1]] += 1
                    if split[1] == label:
                        text = tf.extractfile(member).read().decode("utf-8", "replace").strip()
                        scan.labels[-1] = (scan.labels[-1][0], text)
                    elif split[1] not in scan.first and keep_first(split[1]):
                        scan.first[split[1]] = (scan.labels[-1][0], tf.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as err:
            raise _unreadable(shard, err) from None
        scan.counts.append(n)
    return scan


def rank_world() -> tuple[int, int]:
    """This process's DDP rank and the world size (forked DataLoader workers inherit them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))), int(os.environ.get("WORLD_SIZE", 1))


def plan(n_shards: int, rank: int, world: int, worker: int, workers: int) -> tuple[list[int], int, int]:
    """What one (rank, worker) reads: ``(shards, every, offset)``, keeping the samples whose
    ordinal ``o`` over those shards (in order) has ``o % every == offset``.

    Shards are dealt round-robin to ranks, then a rank's shards to its workers; where there are
    fewer shards than takers, the samples are dealt instead. The parts are disjoint and together
    cover every sample once.
    """
    if n_shards >= world:
        mine = list(range(rank, n_shards, world))
        if len(mine) >= workers:
            return mine[worker::workers], 1, 0
        return mine, workers, worker
    return list(range(n_shards)), world * workers, rank + world * worker


def kept(counts: list[int], shards: list[int], every: int, offset: int) -> int:
    return len(range(offset, sum(counts[s] for s in shards), every))


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a buffer of ``size`` items: each new item swaps out a random held one."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]
