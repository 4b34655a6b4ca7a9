"""VQA with a language-model decoder: DMS against static ``mean`` fusion on easy_vqa.

Same encoders (bundled ImageNet EfficientNet-Lite0 for the image, MiniLM for the question, both
frozen, features cached), same frozen SmolLM2-135M-Instruct behind the LLaVA-style decoder, same
budget; only ``model.fusion`` differs. Every run is evaluated on the identical corrupted test
questions: image gaussian_noise at severities 0..1, question typos and word_mask, image missing.

    .venv/bin/python bench/easy_vqa.py --out bench-results/vqa                       # 3 seeds
    .venv/bin/python bench/easy_vqa.py --out /tmp/v --seeds 0 --train-questions 300 --test-questions 50 --epochs 1

Writes ``results.json`` and ``benchmarks.md`` under ``--out`` (runs in ``runs/``; finished runs are
reused, so an interrupted benchmark resumes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# this file's name equals the `easy_vqa` package the dataset reads: keep bench/ off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from fusionkit.config import load_raw, resolve  # noqa: E402
from fusionkit.robustness import robustness_report  # noqa: E402
from fusionkit.training.trainer import prepare_run_dir, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["dms", "mean"]
CORRUPTIONS = {  # name -> (specs, levels)
    "image gaussian_noise": (["image:gaussian_noise"], [0.0, 0.25, 0.5, 0.75, 1.0]),
    "question typos": (["text:typos"], [0.0, 0.5, 1.0]),
    "question word_mask": (["text:word_mask"], [0.0, 0.5, 1.0]),
    "image missing": (["missing:image"], [0.0, 1.0]),
}


def fmt(values: list[float], scale: float = 100.0) -> str:
    m = scale * statistics.mean(values)
    s = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} +/- {s:.2f}"


def train_run(method: str, seed: int, args, out: Path) -> Path:
    run_dir = out / "runs" / f"{method}-seed{seed}"
    if (run_dir / "results.json").is_file():
        return run_dir
    overrides = [f"model.fusion={{name: {method}}}", f"seed={seed}", f"train.epochs={args.epochs}",
                 f"data.max_train_questions={args.train_questions}", f"data.max_test_questions={args.test_questions}",
                 f"runtime.threads={args.threads}", "runtime.accelerator=" + args.accelerator]
    cfg = resolve(load_raw(REPO / "configs/easy-vqa.yaml", overrides))
    train(cfg, prepare_run_dir(run_dir, overwrite=True), show_progress=False)
    return run_dir


def throughput(run_dir: Path) -> float:
    """Training samples per second over all epochs (training loop only, validation excluded)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["train_samples"] for r in rows) / sum(r["train_seconds"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train-questions", type=int, default=2000, help="train + val questions (seeded subset)")
    ap.add_argument("--test-questions", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    corruptions = {c: CORRUPTIONS[c] for c in args.corruptions.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = {m: {s: train_run(m, s, args, args.out) for s in seeds} for m in methods}
    train_minutes = (time.time() - t0) / 60
    reports = {}
    for cname, (specs, levels) in corruptions.items():
        reports[cname] = [robustness_report([runs[m][s] for m in methods], specs, levels, seed=0,
                                            baseline=runs[methods[-1]][s]) for s in seeds]
        print(f"evaluated {cname}", flush=True)
    results = {"machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
               "seeds": seeds, "methods": methods, "epochs": args.epochs, "train_questions": args.train_questions,
               "test_questions": args.test_questions, "train_minutes": train_minutes,
               "minutes": (time.time() - t0) / 60,
               "throughput": {m: [throughput(runs[m][s]) for s in seeds] for m in methods},
               "reports": reports}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    (args.out / "benchmarks.md").write_text(text)
    print(text)


def render(results: dict) -> str:
    methods = results["methods"]
    lines = [f"Machine: {results['machine']}; seeds {results['seeds']}; {results['epochs']} epochs on "
             f"{results['train_questions']} train+val questions; {results['test_questions']} test questions; "
             f"{results['minutes']:.1f} min in all.", "",
             "| method | training samples/s |", "|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {statistics.mean(results['throughput'][m]):.1f} |")
    lines.append("")
    drops: dict[str, dict[str, float]] = {}
    for cname, reps in results["reports"].items():
        levels = reps[0]["levels"]
        lines += [f"#### {cname} (VQA accuracy in %, mean +/- std over seeds)", "",
                  "| method | clean | " + " | ".join(f"s={x:g}" for x in levels[1:])
                  + " | drop @1 (pts) | rel. drop @1 | weights clean -> @1 |", "|---" * (len(levels) + 4) + "|"]
        for i, m in enumerate(methods):
            per = [rep["runs"][i] for rep in reps]
            clean = [p["clean"]["accuracy"] for p in per]
            at = [[p["levels"][j]["accuracy"] for p in per] for j in range(len(levels))]
            drop = [c - f for c, f in zip(clean, at[-1])]
            rel = [d / c if c else 0.0 for d, c in zip(drop, clean)]
            drops.setdefault(cname, {})[m] = statistics.mean(rel)
            mods = per[0]["modalities"]
            w = ", ".join(f"{mod} {statistics.mean(p['clean']['mean_weights'][mod] for p in per):.2f}->"
                          f"{statistics.mean(p['levels'][-1]['mean_weights'][mod] for p in per):.2f}" for mod in mods)
            lines.append(f"| {m} | {fmt(clean)} | " + " | ".join(fmt(v) for v in at[1:])
                         + f" | {fmt(drop)} | {fmt(rel)} % | {w} |")
        if "dms" in drops[cname] and "mean" in drops[cname]:
            ratio = drops[cname]["dms"] / max(drops[cname]["mean"], 1e-9)
            lines.append(f"\nDMS relative drop / mean's: {ratio:.2f} (target <= 0.6)")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
