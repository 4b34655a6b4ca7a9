"""The softmax rule's temperature: clean accuracy against robustness for the default DMS.

Trains the default ``dms`` with ``model.fusion.scheduler.temperature`` set to each value, seeds
0-4, on one setting of ``bench/robustness_benchmark.py`` (without augmentation), and prints clean
accuracy and the drop at severity 1 per corruption (mean over seeds):

    .venv/bin/python bench/dms_temperature.py --setting six-views --temperatures 1,2,4 --out bench-results/tau
    .venv/bin/python bench/dms_temperature.py --setting image-text --temperatures 2 --out bench-results/tau
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fusionkit.config import load_raw, resolve
from fusionkit.robustness import robustness_report
from fusionkit.training.trainer import prepare_run_dir, train

VIEWS = ["fac", "fou", "kar", "mor", "pix", "zer"]
SETTINGS = {
    "six-views": ([f"modalities=[{','.join(VIEWS)}]", "train.epochs=20"],
                  {"noise on 5 of 6 views": [f"{v}:gaussian_noise" for v in VIEWS if v != "fac"]}),
    "image-text": (["modalities=[image,text]", "model.encoders.image.image_size=16", "train.epochs=8"],
                   {s: [s] for s in ("image:gaussian_noise", "image:occlusion", "text:typos", "missing:image")}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=Path("bench-results/tau"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides, corruptions = SETTINGS[args.setting]
    for tau in (float(t) for t in args.temperatures.split(",")):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            run = args.out / f"{args.setting}-tau{tau:g}-seed{seed}"
            if not (run / "results.json").is_file():
                fusion = f"model.fusion={{name: dms, scheduler: {{name: softmax, standardize: true, temperature: {tau}}}}}"
                cfg = resolve(load_raw(None, [*overrides, f"seed={seed}", fusion, "runtime.accelerator=cpu"]))
                train(cfg, prepare_run_dir(run, overwrite=True), show_progress=False)
            runs.append(run)
        for name, specs in corruptions.items():
            report = [robustness_report([r], specs, [0.0, 1.0])["runs"][0] for r in runs]
            clean = [x["clean"]["accuracy"] for x in report]
            drop = [x["clean"]["accuracy"] - x["levels"][-1]["accuracy"] for x in report]
            print(f"tau {tau:g} | {name} | clean {100 * statistics.mean(clean):.2f} +/- "
                  f"{100 * statistics.stdev(clean) if len(clean) > 1 else 0:.2f} | drop @1 {100 * statistics.mean(drop):.2f} pts",
                  flush=True)


if __name__ == "__main__":
    main()
