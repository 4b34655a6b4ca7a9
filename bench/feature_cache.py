"""End-to-end time of the README's feature-cache example: no cache against a warm cache.

Runs the three commands of README "Feature cache" (digits ``image,text``, frozen bundled
EfficientNet-Lite0 at 64 px and the frozen MiniLM, 3 epochs), each as its own ``fusionkit train``
subprocess, with a fresh cache folder (``FUSIONKIT_CACHE``): one cached run fills the cache
(cold), then the no-cache and the warm cached runs alternate ``--repeats`` times, so drift in the
machine's load hits both alike. Printed last: no-cache seconds / warm seconds, of the minima and
of the medians, whether every run reached the same test accuracy, and the process floor: a fresh
Python importing torch, ``torch._dynamo`` (every optimizer's first ``zero_grad``/``step`` imports
it), Lightning Fabric and fusionkit's CLI, which bounds how fast any warm run can be.

    .venv/bin/python bench/feature_cache.py [--repeats 3] [--threads 1] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENCODER = ["model.encoders.image.model_name=efficientnet_lite0", "model.encoders.image.pretrained=bundled",
           "model.encoders.image.trainable=false", "model.encoders.image.image_size=64",
           "model.encoders.image.in_chans=3"]


FLOOR = "import torch, torch._dynamo, lightning_fabric, fusionkit.cli.main"


def run(out: Path, cache: bool, env: dict[str, str], epochs: int, threads: int) -> tuple[float, float]:
    """Seconds of one ``fusionkit train`` process and its test accuracy."""
    fusionkit = Path(sys.executable).with_name("fusionkit")
    cmd = [str(fusionkit), "train", "--modalities", "image,text", "--epochs", str(epochs), "--out", str(out),
           "--overwrite", "--no-progress", *(["--cache-features"] if cache else []), *ENCODER,
           f"runtime.threads={threads}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "results.json").read_text())["test"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="runtime.threads of every run")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fk-cache-bench-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FUSIONKIT_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cold, acc = run(tmp / "cold", True, env, args.epochs, args.threads)
        print(f"cold (fills the cache): {cold:.2f} s  test accuracy {acc:.4f}", flush=True)
        times: dict[str, list[float]] = {"nocache": [], "warm": []}
        accuracies = {acc}
        for i in range(args.repeats):
            for kind in ("nocache", "warm"):
                seconds, acc = run(tmp / kind, kind == "warm", env, args.epochs, args.threads)
                times[kind].append(seconds)
                accuracies.add(acc)
                print(f"repeat {i + 1} {kind:8s} {seconds:6.2f} s  test accuracy {acc:.4f}", flush=True)
        # the floor of any such run: a fresh process importing what every training run imports,
        # torch._dynamo included (torch.optim's zero_grad/step import it on first call)
        floor = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", FLOOR], env=env, check=True)
            floor.append(time.perf_counter() - t0)
    for kind, values in times.items():
        print(f"{kind:8s} min {min(values):6.2f} s  median {statistics.median(values):6.2f} s")
    print(f"process floor (python + imports: {FLOOR}) min {min(floor):.2f} s; nocache / floor "
          f"{min(times['nocache']) / min(floor):.1f}x is the most any warm run could reach")
    print(f"same test accuracy in every run: {len(accuracies) == 1} ({sorted(accuracies)})")
    print(f"ratio nocache/warm: min {min(times['nocache']) / min(times['warm']):.2f}x  "
          f"median {statistics.median(times['nocache']) / statistics.median(times['warm']):.2f}x")


if __name__ == "__main__":
    main()
