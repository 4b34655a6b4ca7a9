"""A whole training step with DMS fusion against the same step with static ``mean`` fusion.

Both models are the six digit views preset (``configs/presets/digits-views.yaml``: six MLP
encoders, d = 128, batch 64, K = 10) with only ``model.fusion`` changed. Each step is the
trainer's: forward, the model's loss terms, backward, gradient clipping, the fused AdamW step.
Blocks of ``--steps`` steps over the same batches alternate between the two models (threads = 1),
and the figure printed is dms ÷ mean step time: of the fastest blocks ("min") and of the
medians. Target (issue 12): at most 1.05.

    .venv/bin/python bench/train_step.py
    .venv/bin/python bench/train_step.py --set model.fusion.scorers=[confidence,alignment]   # no MC dropout
    .venv/bin/python bench/train_step.py --compile      # both fusion layers through torch.compile (inductor)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusionkit.config import apply_override, read_yaml, resolve
from fusionkit.training.trainer import compile_fusion, load_data, make_loader, make_optimizer, seed_and_build

from trainer_overhead import REPO


def build(fusion: str, overrides: list[str], compiled: bool = False):
    raw = read_yaml(REPO / "configs/presets/digits-views.yaml")
    for item in ["runtime.accelerator=cpu", "runtime.threads=1", f"model.fusion={{name: {fusion}}}", *overrides]:
        apply_override(raw, item)
    cfg = resolve(raw)
    bundle = load_data(cfg)
    model = seed_and_build(cfg, bundle).train()
    if compiled:  # runtime.compile's own call (inductor, on the CPU)
        compile_fusion(model, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return cfg, model, params, make_optimizer(cfg, params), list(make_loader(model, bundle.splits["train"], cfg, True))


def block(model, params, optimizer, batches, clip: float) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        out = model(batch)
        loss = sum(model.loss_terms(out, batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18, help="steps per block (one epoch of digits is 19)")
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--compile", action="store_true", help="torch.compile both fusion layers (runtime.compile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for the DMS model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    arms = {"mean": build("mean", [], args.compile), "dms": build("dms", args.set, args.compile)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for b in range(args.blocks + 1):
        for name in (("mean", "dms") if b % 2 == 0 else ("dms", "mean")):
            cfg, model, params, optimizer, batches = arms[name]
            t = block(model, params, optimizer, batches[: args.steps], cfg.train.grad_clip)
            if b:  # the first block of each warms up
                times[name].append(t / args.steps)
    for name, t in times.items():
        print(f"  {name:4s}: {1e3 * min(t):6.2f} ms/step best, {1e3 * statistics.median(t):6.2f} median")
    print(f"six views train step dms / mean: {min(times['dms']) / min(times['mean']):.3f} (min) / "
          f"{statistics.median(times['dms']) / statistics.median(times['mean']):.3f} (median); target <= 1.05"
          + (f"; dms with {' '.join(args.set)}" if args.set else "") + ("; compiled" if args.compile else ""))


if __name__ == "__main__":
    main()
