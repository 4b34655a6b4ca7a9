"""Reproduction on the UCI handwritten digits, all six feature views as vectors.

1. Clean test accuracy, mean +/- std over seeds, for DMS and every baseline fusion.
2. Noise sweep: gaussian_noise on three of the six views at severities 0..1 (protocol ``all``)
   and the ``random_subset`` protocol at p = 0.5, for dms, mean, concat, late, tmc and qmf:
   accuracy per level, relative robustness (AUC), effective robustness against ``mean``, ECE.

Everything is written under ``--out`` (runs, ``results.json``, ``benchmarks.md``).

    .venv/bin/python bench/digits_benchmark.py --out bench-results/digits        # full: 5 seeds
    .venv/bin/python bench/digits_benchmark.py --out /tmp/q --seeds 0 --epochs 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fusionkit.config import load_raw, resolve
from fusionkit.robustness import robustness_report
from fusionkit.training.trainer import prepare_run_dir, train

VIEWS = ["fac", "fou", "kar", "mor", "pix", "zer"]
NOISY = ["fou", "kar", "pix"]  # three of the six views get the noise
CLEAN_METHODS = ["dms", "mean", "concat", "late", "attention", "gated", "modality_dropout", "tmc", "qmf"]
SWEEP_METHODS = ["dms", "mean", "concat", "late", "tmc", "qmf"]
LEVELS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def fmt(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} +/- {s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", default=",".join(CLEAN_METHODS))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = prepare_run_dir(args.out, overwrite=False)
    t_start = time.time()

    runs: dict[str, dict[int, str]] = {m: {} for m in methods}
    clean: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        for seed in seeds:
            cfg = resolve(load_raw(None, [f"modalities=[{','.join(VIEWS)}]", f"model.fusion.name={method}",
                                          f"seed={seed}", f"train.epochs={args.epochs}", "runtime.accelerator=cpu"]))
            run_dir = prepare_run_dir(out / "runs" / f"{method}-seed{seed}", overwrite=False)
            result = train(cfg, run_dir, show_progress=False)
            runs[method][seed] = str(run_dir)
            clean[method].append(result.test["accuracy"])
            print(f"{method} seed {seed}: test {result.test['accuracy']:.4f}", flush=True)

    sweep_methods = [m for m in SWEEP_METHODS if m in methods]
    sweeps = {}
    for name, specs, kw in [
        ("gaussian_noise", [f"{v}:gaussian_noise" for v in NOISY], {"protocol": "all"}),
        ("random_subset_p0.5", [f"{v}:gaussian_noise" for v in NOISY], {"protocol": "random_subset", "p": 0.5}),
    ]:
        per_seed = []
        for seed in seeds:
            report = robustness_report([runs[m][seed] for m in sweep_methods], specs, LEVELS,
                                       baseline=runs["mean"][seed] if "mean" in runs else None, seed=0, **kw)
            per_seed.append(report)
        sweeps[name] = {"specs": specs, **kw, "reports": per_seed}

    results = {"seeds": seeds, "epochs": args.epochs, "views": VIEWS, "noisy_views": NOISY, "clean": clean,
               "runs": runs, "sweeps": sweeps, "seconds": time.time() - t_start,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "benchmarks.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    lines = [f"Seeds {r['seeds']}, {r['epochs']} epochs, split 1200/400/400 (stratified, split_seed 0); "
             f"{r['machine']}; {r['seconds'] / 60:.1f} min in all.", "",
             "### Clean test accuracy (%)", "", "| fusion | accuracy (mean +/- std) |", "|---|---|"]
    for m, accs in r["clean"].items():
        lines.append(f"| {m} | {fmt(accs)} |")
    for name, sweep in r["sweeps"].items():
        lines += ["", f"### {name}: gaussian_noise on {', '.join(r['noisy_views'])}"
                  + (f" (random_subset, p = {sweep.get('p')})" if sweep.get("protocol") == "random_subset" else ""), ""]
        methods = [run["fusion"] for run in sweep["reports"][0]["runs"]]
        levels = sweep["reports"][0]["levels"]
        lines.append("| fusion | " + " | ".join(f"acc @ {s:g}" for s in levels)
                     + " | AUC | AUC / clean | eff. robustness vs mean | ECE @ 1.0 |")
        lines.append("|---" * (len(levels) + 5) + "|")
        for i, m in enumerate(methods):
            per = [rep["runs"][i] for rep in sweep["reports"]]
            accs = [fmt([p["levels"][j]["accuracy"] for p in per]) for j in range(len(levels))]
            auc = fmt([p["auc"] for p in per])
            ratio = statistics.mean(p["auc_ratio"] for p in per)
            eff = 100 * statistics.mean(p["effective_robustness"] for p in per)
            ece = statistics.mean(p["levels"][-1]["ece"] for p in per)
            lines.append(f"| {m} | " + " | ".join(accs) + f" | {auc} | {ratio:.3f} | {eff:+.2f} pts | {ece:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
