"""Where robustness matters: DMS against static and quality-aware baselines under strong corruption.

Three settings (``--settings``), each trained for every method and seed, then evaluated on the
test split clean and under each corruption at severities 0..1 (every run sees identical
corrupted inputs; severity 1 leaves the corrupted modality's own head near chance):

- ``image-text``: digits ``image,text``; image gaussian_noise, image occlusion, text typos, image missing.
- ``six-views``: the six UCI digit views as vectors; gaussian_noise on five views at once (only
  ``fac`` stays clean and must carry the answer).
- ``demo``: the four-modality files of ``fusionkit data demo`` (image, text, audio, video);
  audio white_noise, image gaussian_noise, audio missing.

Methods: ``dms-paper`` (configs/presets/dms-paper.yaml), ``dms`` (the default configuration),
``dms+augment`` (the default plus corruption-aware training: the best documented configuration),
``mean``, ``mean+augment`` (the same augmentation for static fusion, to separate what DMS adds from
what augmentation adds), ``late``, ``qmf``, ``tmc``; and the issue-13 methods ``qadm``, ``micinet``
(fusions) and ``mean+aim``, ``mean+modalimmune`` (training strategies on static ``mean`` fusion,
so the difference to ``mean`` is the strategy's). ``--methods`` picks any of them; a suffix
``+augment``, ``+aim`` or ``+modalimmune`` works on any method.

    .venv/bin/python bench/robustness_benchmark.py --out bench-results/robust             # all, 5 seeds
    .venv/bin/python bench/robustness_benchmark.py --out /tmp/r --settings six-views --seeds 0 --epochs 2

Writes ``results.json`` and ``benchmarks.md`` under ``--out`` (runs in ``runs/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fusionkit.config import read_yaml, resolve
from fusionkit.robustness import robustness_report
from fusionkit.training.trainer import prepare_run_dir, train

REPO = Path(__file__).resolve().parents[1]
LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]
VIEWS = ["fac", "fou", "kar", "mor", "pix", "zer"]


def augment(entries: list[tuple[str, float]], missing: float) -> str:
    items = [f'{{corrupt: "{c}", p: {p}}}' for c, p in entries] + [f'{{corrupt: "missing:any", p: {missing}}}']
    return "train.augment=[" + ", ".join(items) + "]"


SETTINGS = {
    "image-text": {
        "overrides": ["modalities=[image,text]", "model.encoders.image.image_size=16", "train.epochs={epochs}"],
        "epochs": 8,
        "augment": augment([("image:gaussian_noise", 0.25), ("image:occlusion", 0.15), ("text:typos", 0.25)], 0.15),
        "corruptions": {"image gaussian_noise": ["image:gaussian_noise"], "image occlusion": ["image:occlusion"],
                        "text typos": ["text:typos"], "image missing": ["missing:image"]},
    },
    "six-views": {
        "overrides": [f"modalities=[{','.join(VIEWS)}]", "train.epochs={epochs}"],
        "epochs": 20,
        "augment": augment([(f"{v}:gaussian_noise", 0.2) for v in VIEWS], 0.1),
        "corruptions": {"noise on 5 of 6 views": [f"{v}:gaussian_noise" for v in VIEWS if v != "fac"],
                        "5 of 6 views missing": [f"missing:{v}" for v in VIEWS if v != "fac"]},
    },
    "demo": {
        "overrides": ["modalities=[audio,image,text,video]", "train.epochs={epochs}", "train.batch_size=16",
                      # pretrained, frozen image/frame towers (bundled ImageNet weights), cached where not augmented
                      "model.encoders.image={name: timm, model_name: efficientnet_lite0, pretrained: bundled, "
                      "trainable: false, image_size: 64}",
                      "model.encoders.video={name: frames, num_frames: 4, image: {name: timm, model_name: "
                      "efficientnet_lite0, pretrained: bundled, trainable: false, image_size: 64}}",
                      "train.cache_features=true"],
        "epochs": 10,
        "augment": augment([("audio:white_noise", 0.25), ("image:gaussian_noise", 0.25)], 0.15),
        "corruptions": {"audio white_noise": ["audio:white_noise"], "image gaussian_noise": ["image:gaussian_noise"],
                        "audio missing": ["missing:audio"]},
    },
}
METHODS = ["dms-paper", "dms", "dms+augment", "mean", "mean+augment", "late", "qmf", "tmc"]
EXTRA_METHODS = ["qadm", "micinet", "mean+aim", "mean+modalimmune",  # issue 13: --methods picks them
                 "dms+typicality",  # DMS plus examples/typicality_scorer.py
                 "dms+shared_masks"]  # MC-dropout masks shared by the batch in training
STRATEGIES = ("aim", "modalimmune")


def method_overrides(method: str, setting: dict) -> tuple[dict, list[str]]:
    """``(raw config, overrides)`` for one method."""
    raw = read_yaml(REPO / "configs/presets/dms-paper.yaml") if method == "dms-paper" else {}
    name, *suffixes = method.split("+")
    extra = [] if name.startswith("dms") else [f"model.fusion={{name: {name}}}"]
    if "augment" in suffixes:
        extra.append(setting["augment"])
    strategies = [x for x in suffixes if x in STRATEGIES]
    if strategies:
        extra.append(f"train.strategies=[{', '.join(strategies)}]")
    if "typicality" in suffixes:  # the example scorer plugin (examples/typicality_scorer.py) added to DMS
        if name != "dms":
            raise SystemExit(f"method {method!r}: +typicality adds a scorer to the default DMS; use dms+typicality")
        extra += [f"plugins=[{REPO / 'examples' / 'typicality_scorer.py'}]",
                  "model.fusion.scorers=[confidence, mc_dropout, agreement, typicality]",
                  "model.fusion.scheduler.coefficients={typicality: 1.0}"]
    if "shared_masks" in suffixes:  # MC dropout with T masks per step shared by the batch in training
        if name != "dms" or "typicality" in suffixes:
            raise SystemExit(f"method {method!r}: +shared_masks changes the default DMS's mc_dropout; "
                             f"use dms+shared_masks")
        extra.append("model.fusion.scorers=[confidence, {name: mc_dropout, per_sample_masks: false}, agreement]")
    unknown = [x for x in suffixes if x not in ("augment", "typicality", "shared_masks") and x not in STRATEGIES]
    if unknown:
        raise SystemExit(f"method {method!r}: unknown suffix {unknown[0]!r}; use +augment, +aim, +modalimmune, "
                         f"+typicality or +shared_masks")
    return raw, extra


def data_overrides(name: str, out: Path) -> list[str]:
    if name != "demo":
        return []
    demo = out / "demo-data"
    if not (demo / "manifest.jsonl").is_file():
        subprocess.run([str(Path(sys.executable).with_name("fusionkit")), "data", "demo", str(demo)], check=True)
    return [f"data={{name: manifest, path: {(demo / 'manifest.jsonl').resolve()}}}"]


def fmt(values: list[float], scale: float = 100.0) -> str:
    m = scale * statistics.mean(values)
    s = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} +/- {s:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-only", action="store_true", help="train the missing runs, skip evaluation "
                    "(to train seeds in parallel processes, then evaluate all of them in one call)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"settings": {}}
    results["machine"] = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    for sname in args.settings.split(","):
        setting = SETTINGS[sname]
        epochs = args.epochs or setting["epochs"]
        base = [o.replace("{epochs}", str(epochs)) for o in setting["overrides"]] + data_overrides(sname, out) \
            + ["runtime.accelerator=cpu", f"runtime.threads={args.threads}"]
        t0 = time.time()
        runs: dict[str, dict[int, str]] = {m: {} for m in methods}
        train_seconds: dict[str, list[float]] = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:
                run_dir = out / "runs" / sname / f"{method}-seed{seed}"
                if not (run_dir / "results.json").is_file():  # resumable: finished runs are kept
                    raw, extra = method_overrides(method, setting)
                    cfg = resolve(_apply(raw, [*base, *extra, f"seed={seed}"]))
                    t = time.time()
                    train(cfg, prepare_run_dir(run_dir, overwrite=True), show_progress=False)
                    train_seconds[method].append(time.time() - t)
                runs[method][seed] = str(run_dir)
                print(f"[{sname}] trained {method} seed {seed}", flush=True)
        if args.train_only:
            continue
        reports = {}
        for cname, specs in setting["corruptions"].items():
            reports[cname] = [robustness_report([runs[m][s] for m in methods], specs, LEVELS,
                                                baseline=runs["mean"][s] if "mean" in runs else None, seed=0)
                              for s in seeds]
            print(f"[{sname}] evaluated {cname}", flush=True)
        results["settings"][sname] = {"seeds": seeds, "epochs": epochs, "methods": methods, "levels": LEVELS,
                                      "reports": reports, "train_seconds": train_seconds,
                                      "minutes": (time.time() - t0) / 60}
        results_path.write_text(json.dumps(results, indent=1))
    if results["settings"]:
        (out / "benchmarks.md").write_text(render(results))
        print(render(results))


def _apply(raw: dict, overrides: list[str]) -> dict:
    from copy import deepcopy

    from fusionkit.config import apply_override

    data = deepcopy(raw)
    for item in overrides:
        apply_override(data, item)
    return data


def summary(setting: dict, cname: str) -> dict[str, dict]:
    """Per method: clean, per-level and full-severity numbers over seeds."""
    reps = setting["reports"][cname]
    out = {}
    for i, method in enumerate(setting["methods"]):
        per = [rep["runs"][i] for rep in reps]
        clean = [p["clean"]["accuracy"] for p in per]
        full = [p["levels"][-1]["accuracy"] for p in per]
        out[method] = {
            "clean": clean, "levels": [[p["levels"][j]["accuracy"] for p in per] for j in range(len(setting["levels"]))],
            "full": full, "drop": [c - f for c, f in zip(clean, full)],
            "rel_drop": [(c - f) / c if c else 0.0 for c, f in zip(clean, full)],
            "auc": [p["auc"] for p in per], "auc_ratio": [p["auc_ratio"] or 0.0 for p in per],
            "eff": [p["effective_robustness"] for p in per],
            "w_clean": {m: statistics.mean(p["clean"]["mean_weights"][m] for p in per) for m in per[0]["modalities"]},
            "w_full": {m: statistics.mean(p["levels"][-1]["mean_weights"][m] for p in per) for m in per[0]["modalities"]},
        }
    return out


def render(results: dict) -> str:
    lines = [f"Machine: {results['machine']}.", ""]
    for sname, setting in results["settings"].items():
        lines += [f"### Setting `{sname}`: seeds {setting['seeds']}, {setting['epochs']} epochs, "
                  f"{setting['minutes']:.1f} min", ""]
        for cname in setting["reports"]:
            s = summary(setting, cname)
            lines += [f"#### {cname} (accuracy in %, mean +/- std over seeds)", "",
                      "| method | clean | " + " | ".join(f"s={x:g}" for x in setting["levels"][1:])
                      + " | drop @1 (pts) | rel. drop @1 | AUC / clean | eff. robustness vs mean (pts) | weights clean -> @1 |",
                      "|---" * (len(setting["levels"]) + 6) + "|"]
            for method, r in s.items():
                weights = ", ".join(f"{m} {r['w_clean'][m]:.2f}->{r['w_full'][m]:.2f}" for m in r["w_clean"]) \
                    if not method.startswith(("mean", "late")) else "uniform"
                lines.append(f"| {method} | {fmt(r['clean'])} | " + " | ".join(fmt(v) for v in r["levels"][1:])
                             + f" | {fmt(r['drop'])} | {fmt(r['rel_drop'])} % | {statistics.mean(r['auc_ratio']):.3f} | "
                             f"{fmt(r['eff'])} | {weights} |")
            if "mean" in s:
                best = max((m for m in s if not m.startswith("dms")), key=lambda m: statistics.mean(s[m]["clean"]))
                for dms in (m for m in s if m.startswith("dms")):
                    ratio = statistics.mean(s[dms]["drop"]) / max(statistics.mean(s["mean"]["drop"]), 1e-9)
                    gap = 100 * (statistics.mean(s[best]["clean"]) - statistics.mean(s[dms]["clean"]))
                    lines.append(f"\n- `{dms}`: drop at severity 1 is {ratio:.2f}x static `mean`'s (target <= 0.5: "
                                 f"{'met' if ratio <= 0.5 else 'missed'}); clean accuracy {gap:+.2f} pts below the "
                                 f"best baseline `{best}` (target <= 0.5: {'met' if gap <= 0.5 else 'missed'})")
            lines.append("")
        first = next(iter(setting["reports"].values()))
        mods = first[0]["runs"][0]["modalities"]
        lines += ["#### each modality's own head, clean test accuracy (%, mean +/- std over seeds)", "",
                  "| method | " + " | ".join(mods) + " |", "|---" * (len(mods) + 1) + "|"]
        for i, method in enumerate(setting["methods"]):
            per = [rep["runs"][i]["clean"]["unimodal_accuracy"] for rep in first]
            lines.append(f"| {method} | " + " | ".join(fmt([p[m] for p in per]) for m in mods) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
