"""Media loading: fusionkit's manifest loader against a plain decode loop over the same files.

Both read every row of a manifest (default: ``fusionkit data demo``'s 600 digits, each an 8x8 PNG,
a WAV and a 48x48 H.264 MP4) in this process:

- plain: what a user would write with the same libraries and their defaults: Pillow
  ``Image.open(...).convert("RGB")``, ``soundfile.read``, PyAV decoding every frame to RGB;
- fusionkit: the manifest dataset's splits (``fusionkit.data.media`` decoding, ``max_frames``
  frames kept per clip, audio checked and at ``data.sample_rate``) through a DataLoader with
  ``num_workers=0``, so the figure is work, not parallelism.

The two alternate ``--repeats`` times; printed last: fusionkit / plain (min and median), then the
trainer's loader for the same data with its default ``train.num_workers`` against ``num_workers=0``.

    .venv/bin/python bench/media_loader.py [--data demo-digits/manifest.jsonl] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader


def plain_loop(manifest: Path) -> int:
    """Decode every media file of the manifest the plain way; returns the number of files."""
    import av
    import soundfile as sf
    from PIL import Image

    n = 0
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if not isinstance(value, str) or "/" not in value:
                continue
            path = manifest.parent / value
            if path.suffix == ".png":
                np.asarray(Image.open(path).convert("RGB"))
            elif path.suffix == ".wav":
                sf.read(path, dtype="float32", always_2d=True)
            elif path.suffix == ".mp4":
                with av.open(str(path)) as container:
                    np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            n += 1
    return n


def fusionkit_loader(bundle) -> int:
    """Iterate every split of the loaded manifest (decoding each row); returns the rows seen."""
    n = 0
    for split in bundle.splits.values():
        for batch in DataLoader(split, batch_size=32, num_workers=0, collate_fn=list):
            n += len(batch)
    return n


def trainer_epoch(cfg, bundle, model, workers: int) -> float:
    """Seconds for one pass of the trainer's own loader over the train split (decode + preprocess)."""
    from fusionkit.training.trainer import make_loader

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})
    t0 = time.perf_counter()
    for _ in make_loader(model, bundle.splits["train"], cfg, shuffle=True):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a manifest; default: a fresh `fusionkit data demo`")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fk-media-bench-") as tmp:
        manifest = args.data
        if manifest is None:
            fusionkit = Path(sys.executable).with_name("fusionkit")
            subprocess.run([str(fusionkit), "data", "demo", f"{tmp}/demo"], check=True, capture_output=True)
            manifest = Path(tmp) / "demo" / "manifest.jsonl"
        from fusionkit.config import load_raw, resolve
        from fusionkit.training.trainer import load_data, seed_and_build

        cfg = resolve(load_raw(None, [f"data={{name: manifest, path: '{manifest.resolve()}'}}",
                                      "runtime.accelerator=cpu", "train.cache_features=false"]))
        times: dict[str, list[float]] = {"plain": [], "fusionkit": []}
        for i in range(args.repeats + 1):  # the first round warms the file cache and imports
            for kind in ("plain", "fusionkit"):
                t0 = time.perf_counter()
                count = plain_loop(manifest) if kind == "plain" else fusionkit_loader(load_data(cfg))
                if i:
                    times[kind].append(time.perf_counter() - t0)
                    unit = "files" if kind == "plain" else "rows"
                    print(f"repeat {i} {kind:9s} {times[kind][-1]:6.2f} s ({count} {unit})", flush=True)
        for kind, values in times.items():
            print(f"{kind:9s} min {min(values):6.2f} s  median {statistics.median(values):6.2f} s")
        print(f"ratio fusionkit/plain: min {min(times['fusionkit']) / min(times['plain']):.2f}  "
              f"median {statistics.median(times['fusionkit']) / statistics.median(times['plain']):.2f}")
        bundle = load_data(cfg)
        model = seed_and_build(cfg, bundle)
        workers = cfg.train.num_workers
        epochs = {w: min(trainer_epoch(cfg, bundle, model, w) for _ in range(2)) for w in sorted({0, workers})}
        print("trainer's loader, one epoch of train (decode + preprocess): "
              + "  ".join(f"num_workers={w}: {s:.2f} s" for w, s in epochs.items())
              + f"  (default train.num_workers for this manifest: {workers})")


if __name__ == "__main__":
    main()
