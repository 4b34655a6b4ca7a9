"""Language-model tasks (issue 10): captioning and retrieval DMS vs ``mean``, and BLIP-2 vs LLaVA on VQA.

Same frozen encoders (the dataset's bundled ImageNet EfficientNet-Lite0 for the image, MiniLM for
text; features cached) and the same frozen SmolLM2-135M-Instruct in every generative run; the arms
of a part differ only where named:

- ``captioning`` (configs/easy-captioning.yaml): DMS vs ``mean`` fusion; CIDEr, BLEU-4 and METEOR
  (x100) clean, under image gaussian_noise (severity 0, 0.5, 1) and image missing (0, 1), and the
  relative drop of each metric at severity 1.
- ``retrieval`` (configs/easy-retrieval.yaml): DMS vs ``mean``; R@1 and R@5 in both directions
  (image->text = the task's ``q2t_*``, text->image = ``t2q_*``), same corruptions.
- ``decoders`` (configs/easy-vqa.yaml, DMS fusion in both): the default ``llava`` decoder vs a small
  ``blip2`` Q-Former (``--qformer-queries`` queries, ``--qformer-layers`` blocks); VQA accuracy and
  training samples/s side by side.

Target check, per corruption and metric (captioning, retrieval): DMS's relative drop at severity 1
<= 0.6 x mean's, and DMS's clean score at most 1 point (CIDEr: 2 points; scores x100) below mean's.

By default captioning and retrieval run on the ``digits`` data (``--lm-data digits``): a fusion
comparison needs several inputs, and easy_vqa's captioning data has one (the picture), so DMS
and ``mean`` would both give it weight 1. Digits has the 16x15 picture (``image``, a ResNet-18
trained from scratch) plus two real UCI feature views of the same handwritten digit, ``zer``
(47 Zernike moments) and ``mor`` (6 morphological features), each with its own MLP encoder;
the references are template-made ("a handwritten seven, with no closed loop, tall and narrow"
plus seeded rephrasings; see fusionkit/datasets/digits.py). ``--lm-data easy_vqa`` runs the
single-image configs as they are (``missing:image`` is then skipped: robustness never drops a
sample's last present modality). ``--set`` adds config overrides to one part, e.g.
``--set 'captioning:train.epochs=2'``.

The default sizes keep each generative part near 30-60 min on one thread (3 seeds x 2 arms;
digits captioning 1,600 train / 200 val / 200 test samples and 1 epoch, VQA 800 / 250
questions); retrieval is cheap and uses every sample:

    .venv/bin/python bench/lm_tasks.py --out bench-results/lm-tasks --threads 1          # 3 seeds
    .venv/bin/python bench/lm_tasks.py --out /tmp/lm --seeds 0 --epochs 1 --lm-data easy_vqa \\
        --caption-train-images 40 --caption-test-images 20 --retrieval-train-images 40 --retrieval-test-images 20 \\
        --vqa-train-questions 40 --vqa-test-questions 20                             # smoke run

Writes ``results.json`` and ``benchmarks.md`` under ``--out`` (runs in ``runs/<part>/``; finished
runs are reused, so an interrupted benchmark resumes; a finished run whose config differs from the
requested one is an error: choose another ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# bench/easy_vqa.py (a sibling of this file) would shadow the `easy_vqa` package the datasets read:
# keep bench/ off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from fusionkit.config import load_raw, read_yaml, resolve  # noqa: E402
from fusionkit.robustness import robustness_report  # noqa: E402
from fusionkit.training.trainer import prepare_run_dir, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("captioning", "retrieval", "decoders")
CORRUPTIONS = {  # name -> (specs, levels)
    "image gaussian_noise": (["image:gaussian_noise"], [0.0, 0.5, 1.0]),
    "image missing": (["missing:image"], [0.0, 1.0]),
}
METRICS = {  # part -> [(summarize key, label, clean tolerance in points)]
    "captioning": [("cider", "CIDEr", 2.0), ("bleu_4", "BLEU-4", 1.0), ("meteor", "METEOR", 1.0)],
    "retrieval": [("q2t_r1", "R@1 image->text", 1.0), ("q2t_r5", "R@5 image->text", 1.0),
                  ("t2q_r1", "R@1 text->image", 1.0), ("t2q_r5", "R@5 text->image", 1.0)],
}
RATIO_TARGET = 0.6


def arms(part: str, args) -> dict[str, list[str]]:
    """Arm name -> the overrides that make it (the last arm is the baseline)."""
    if part in ("captioning", "retrieval"):
        return {"dms": ["model.fusion={name: dms}"], "mean": ["model.fusion={name: mean}"]}
    blip2 = (f"model.decoder={{name: blip2, lm: 'bundled:smollm2-135m-instruct', trainable: frozen, max_tokens: 4, "
             f"max_new_tokens: 4, num_queries: {args.qformer_queries}, qformer_layers: {args.qformer_layers}, "
             f"qformer_width: {args.qformer_width}, qformer_heads: 4}}")
    return {"blip2": ["model.fusion={name: dms}", blip2], "llava": ["model.fusion={name: dms}"]}


# digits for captioning and retrieval (--lm-data digits): three inputs of one digit; a batch of 16
# and lr 2e-3 let the frozen LM's prefix learn the long template captions in one epoch
DIGITS = {"captioning": ["data={name: digits, task: captioning, val_fraction: 0.1, test_fraction: 0.1}",
                         "modalities=[image,mor,zer]", "train.batch_size=16", "train.lr=2e-3",
                         "train.epochs=1"],
          "retrieval": ["data={name: digits, task: captioning, val_fraction: 0.1, test_fraction: 0.1}",
                        "modalities=[image,mor,zer]"]}


def part_overrides(part: str, args) -> tuple[str, list[str]]:
    """The part's config file and its size / epoch / runtime overrides."""
    if part == "decoders":
        config = "configs/easy-vqa.yaml"
        sizes = [f"data.max_train_questions={args.vqa_train_questions}",
                 f"data.max_test_questions={args.vqa_test_questions}"]
    elif args.lm_data == "digits":
        config, sizes = f"configs/easy-{part}.yaml", DIGITS[part]
    else:
        config = f"configs/easy-{part}.yaml"
        prefix = "caption" if part == "captioning" else "retrieval"
        sizes = [f"data.max_train_images={getattr(args, prefix + '_train_images')}",
                 f"data.max_test_images={getattr(args, prefix + '_test_images')}"]
    common = [f"runtime.threads={args.threads}", f"runtime.accelerator={args.accelerator}"]
    if args.epochs is not None:
        common.append(f"train.epochs={args.epochs}")
    extra = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == part]
    return config, sizes + common + extra


def comparable(cfg_dict: dict) -> dict:
    return {k: v for k, v in cfg_dict.items() if k != "runtime"}


def train_run(part: str, arm: str, seed: int, args) -> Path:
    config, overrides = part_overrides(part, args)
    # the arm first: a --set on model.fusion (e.g. model.fusion.mwcl_weight=0) then refines it
    cfg = resolve(load_raw(REPO / config, arms(part, args)[arm] + overrides + [f"seed={seed}"]))
    run_dir = args.out / "runs" / part / f"{arm}-seed{seed}"
    if (run_dir / "results.json").is_file():
        saved = resolve(read_yaml(run_dir / "config.yaml"))
        if comparable(saved.model_dump(mode="json")) != comparable(cfg.model_dump(mode="json")):
            raise SystemExit(f"{run_dir} was trained with another config (sizes, epochs or --set changed?); "
                             f"use another --out or delete that run")
        return run_dir
    print(f"training {part} {arm} seed {seed}", flush=True)
    t0 = time.time()
    train(cfg, prepare_run_dir(run_dir, overwrite=True), show_progress=False)
    (run_dir / "bench-wall.json").write_text(json.dumps({"train_wall_seconds": time.time() - t0}))
    return run_dir


def run_info(run_dir: Path) -> dict:
    """Test record, throughput and per-epoch costs of a finished run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((run_dir / "results.json").read_text())
    wall = run_dir / "bench-wall.json"
    train_s, samples = sum(r["train_seconds"] for r in rows), sum(r["train_samples"] for r in rows)
    val_s = sum(r["seconds"] - r["train_seconds"] for r in rows)
    val_n = sum(r["val"]["n"] for r in rows)
    return {"test": res["test"], "epochs": len(rows), "train_samples_per_epoch": rows[0]["train_samples"],
            "val_samples": rows[0]["val"]["n"], "throughput": samples / train_s,
            "train_s_per_100": 100 * train_s / samples, "val_s_per_100": 100 * val_s / max(val_n, 1),
            "train_wall_seconds": json.loads(wall.read_text())["train_wall_seconds"] if wall.is_file() else None}


def single_modality_noop(specs: list[str], run_dir: Path) -> bool:
    """A missing-modality corruption on a run with that modality alone changes nothing."""
    mods = resolve(read_yaml(run_dir / "config.yaml")).modalities or []
    return len(mods) == 1 and all(s.startswith("missing:") for s in specs)


def report(part: str, cname: str, run_dirs: list[Path], seed: int, args) -> dict:
    """The robustness report of one seed's runs (the last is the baseline), reused when it is newer
    than every run it covers."""
    path = args.out / "reports" / part / f"{cname.replace(' ', '-')}-seed{seed}.json"
    if path.is_file() and all(path.stat().st_mtime > (r / "results.json").stat().st_mtime for r in run_dirs):
        return json.loads(path.read_text())
    specs, levels = CORRUPTIONS[cname]
    t0 = time.time()
    rep = robustness_report(run_dirs, specs, levels, seed=0, baseline=run_dirs[-1])
    rep["bench_eval_seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep))
    return rep


def run_part(part: str, args, seeds: list[int]) -> dict:
    names = list(arms(part, args))
    runs = {a: [train_run(part, a, s, args) for s in seeds] for a in names}
    infos = {a: [run_info(r) for r in runs[a]] for a in names}
    train_minutes = sum(i["train_wall_seconds"] or 0.0 for a in names for i in infos[a]) / 60
    out = {"config": part_overrides(part, args)[0], "overrides": part_overrides(part, args)[1],
           "arms": {a: arms(part, args)[a] for a in names}, "train_minutes": train_minutes,
           "runs": infos, "reports": {}, "skipped": {},
           "eval_seconds": {}}
    if part in METRICS:
        for cname, (specs, levels) in CORRUPTIONS.items():
            if single_modality_noop(specs, runs[names[0]][0]):
                out["skipped"][cname] = ("single-modality runs: a missing-modality corruption never drops a "
                                         "sample's last present modality, so it is a no-op")
                continue
            out["reports"][cname] = [report(part, cname, [runs[a][i] for a in names], seed, args)
                                     for i, seed in enumerate(seeds)]
            out["eval_seconds"][cname] = sum(r["bench_eval_seconds"] for r in out["reports"][cname])
            print(f"evaluated {part}: {cname}", flush=True)
    out["minutes"] = train_minutes + sum(out["eval_seconds"].values()) / 60  # also when runs were reused
    return out


def size(text: str) -> int | str:
    """A subset size: a positive count, or ``all`` (the config's null)."""
    if text in ("all", "null"):
        return "null"
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive count or 'all'")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="every part (default: each config's own)")
    ap.add_argument("--lm-data", choices=("digits", "easy_vqa"), default="digits",
                    help="captioning and retrieval data: digits (3 inputs) or easy_vqa (the image alone)")
    ap.add_argument("--caption-train-images", type=size, default=600, help="easy_vqa: train + val images (seeded subset; all)")
    ap.add_argument("--caption-test-images", type=size, default=120, help="test images (all: ~1,000)")
    ap.add_argument("--retrieval-train-images", type=size, default="null",
                    help="train + val images (default all, ~4,000: retrieval is cheap)")
    ap.add_argument("--retrieval-test-images", type=size, default="null", help="default all, ~1,000")
    ap.add_argument("--vqa-train-questions", type=size, default=800, help="train + val questions (seeded subset)")
    ap.add_argument("--vqa-test-questions", type=size, default=250)
    ap.add_argument("--qformer-queries", type=int, default=8)
    ap.add_argument("--qformer-layers", type=int, default=2)
    ap.add_argument("--qformer-width", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="PART:KEY=VALUE",
                    help="an extra config override for one part (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--accelerator", default="cpu")
    args = ap.parse_args()
    parts = args.parts.split(",")
    for p in parts + [s.split(":", 1)[0] for s in args.set]:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
    results.update({"machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
                    "seeds": seeds})
    for part in parts:  # earlier parts of the same --out are kept in results.json
        results["parts"][part] = {**run_part(part, args, seeds), "seeds": seeds}
        path.write_text(json.dumps(results, indent=1))
    text = render(results)
    (args.out / "benchmarks.md").write_text(text)
    print(text)


# -- markdown -----------------------------------------------------------------------------------
def fmt(values: list[float | None], scale: float = 100.0, unit: str = "") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = scale * statistics.mean(values)
    s = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} +/- {s:.2f}{unit}"


def rel_drop(clean: float | None, corrupted: float | None) -> float | None:
    if clean is None or corrupted is None or clean <= 0:
        return None
    return (clean - corrupted) / clean


def mean_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def cost_table(part: dict, names: list[str]) -> list[str]:
    lines = ["| arm | epochs | samples per epoch (train / val) | train samples/s | train s per 100 samples "
             "per epoch | val s per 100 samples | training wall min per run |", "|---|---|---|---|---|---|---|"]
    for a in names:
        info = part["runs"][a]
        walls = [i["train_wall_seconds"] / 60 for i in info if i["train_wall_seconds"] is not None]
        lines.append(f"| {a} | {info[0]['epochs']} | {info[0]['train_samples_per_epoch']} / {info[0]['val_samples']} | "
                     f"{statistics.mean(i['throughput'] for i in info):.1f} | "
                     f"{statistics.mean(i['train_s_per_100'] for i in info):.2f} | "
                     f"{statistics.mean(i['val_s_per_100'] for i in info):.2f} | "
                     f"{statistics.mean(walls) if walls else float('nan'):.1f} |")
    return lines


def render_robustness(name: str, part: dict) -> list[str]:
    names = list(part["arms"])
    dms, base = names[0], names[-1]
    n_test = None
    lines = []
    for cname, reps in part["reports"].items():
        levels = reps[0]["levels"]
        n_test = reps[0]["runs"][0]["clean"]["n"]
        lines += [f"#### {name}: {cname} (scores x100, mean +/- std over seeds)", "",
                  "| metric | fusion | clean | " + " | ".join(f"s={x:g}" for x in levels[1:])
                  + f" | rel. drop @{levels[-1]:g} |", "|---" * (len(levels) + 3) + "|"]
        check = []
        for key, label, tol in METRICS[name]:
            rel_of, clean_of = {}, {}
            for i, a in enumerate(names):
                per = [rep["runs"][i] for rep in reps]
                clean = [p["clean"].get(key) for p in per]
                at = [[p["levels"][j]["metrics"].get(key) for p in per] for j in range(len(levels))]
                rel = [rel_drop(c, f) for c, f in zip(clean, at[-1])]
                rel_of[a], clean_of[a] = mean_or_none(rel), mean_or_none(clean)
                lines.append(f"| {label} | {a} | {fmt(clean)} | " + " | ".join(fmt(v) for v in at[1:])
                             + f" | {fmt(rel, unit=' %')} |")
            ratio = (rel_of[dms] / rel_of[base] if rel_of[dms] is not None and rel_of[base] is not None
                     and rel_of[base] > 0 else None)
            gap = 100 * (clean_of[dms] - clean_of[base]) if None not in (clean_of[dms], clean_of[base]) else None
            ok = ratio is not None and ratio <= RATIO_TARGET and gap is not None and gap >= -tol
            check.append(f"| {label} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{'-' if gap is None else f'{gap:+.2f}'} | >= -{tol:g} | {'yes' if ok else 'no'} |")
        weights = []
        for i, a in enumerate(names):
            per = [rep["runs"][i] for rep in reps]
            mods = per[0]["modalities"]
            weights.append(f"{a}: " + ", ".join(
                f"{m} {statistics.mean(p['clean']['mean_weights'][m] for p in per):.2f} -> "
                f"{statistics.mean(p['levels'][-1]['mean_weights'][m] for p in per):.2f}" for m in mods))
        lines += ["", f"Mean fusion weights clean -> s={levels[-1]:g}: " + "; ".join(weights) + ".", "",
                  f"Target check ({dms} vs {base}): relative drop ratio <= {RATIO_TARGET} and clean gap within "
                  f"the tolerance.", "",
                  f"| metric | rel. drop {dms} / {base} | clean {dms} - {base} (pts) | tolerance | met |",
                  "|---|---|---|---|---|", *check, ""]
    for cname, why in part["skipped"].items():
        lines += [f"#### {name}: {cname}", "", f"Not evaluated: {why}.", ""]
    head = f"{n_test} test images; " if n_test is not None else ""
    return [f"### {name}", "", f"{head}config {part['config']} with {', '.join(part['overrides'])}; "
            f"{part['minutes']:.1f} min in all (training {part['train_minutes']:.1f}).", "",
            *cost_table(part, names), "", *lines]


def render_decoders(part: dict) -> list[str]:
    names = list(part["arms"])
    lines = ["### decoders (VQA on easy_vqa, DMS fusion in both; mean +/- std over seeds)", "",
             f"config {part['config']} with {', '.join(part['overrides'])}; blip2: "
             f"{part['arms'][names[0]][-1].split('=', 1)[1]}; {part['minutes']:.1f} min in all.", "",
             "| decoder | VQA accuracy (%) | exact match (%) | yes/no | color | shape | train samples/s | "
             "train s per 100 samples per epoch | val s per 100 samples | mean weights (test) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in names:
        info = part["runs"][a]
        tests = [i["test"] for i in info]
        per_type = lambda t: fmt([x["per_type"].get(t, {}).get("accuracy") for x in tests])  # noqa: E731
        w = ", ".join(f"{m} {statistics.mean(x['mean_weights'][m] for x in tests):.2f}" for m in tests[0]["mean_weights"])
        lines.append(f"| {a} | {fmt([x['accuracy'] for x in tests])} | {fmt([x.get('exact_match') for x in tests])} | "
                     f"{per_type('yes/no')} | {per_type('color')} | {per_type('shape')} | "
                     f"{fmt([i['throughput'] for i in info], scale=1)} | "
                     f"{statistics.mean(i['train_s_per_100'] for i in info):.2f} | "
                     f"{statistics.mean(i['val_s_per_100'] for i in info):.1f} | {w} |")
    tests = {a: [i["test"]["n"] for i in part["runs"][a]] for a in names}
    return lines + ["", f"{tests[names[0]][0]} test questions; epochs {part['runs'][names[0]][0]['epochs']}.", ""]


def render(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; seeds {results['seeds']}.", ""]
    for name, part in results["parts"].items():
        lines += render_decoders(part) if name == "decoders" else render_robustness(name, part)
        if name != "decoders" and any(part["eval_seconds"].values()):
            cost = []
            for c, seconds in part["eval_seconds"].items():
                n = part["reports"][c][0]["runs"][0]["clean"]["n"]
                evals = len(part["seeds"]) * len(part["arms"]) * len(CORRUPTIONS[c][1])
                cost.append(f"{c}: {seconds / 60:.1f} min, {100 * seconds / evals / max(n, 1):.1f} s per 100 test "
                            f"samples per run and level")
            lines += ["Robustness evaluation: " + "; ".join(cost) + ".", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
