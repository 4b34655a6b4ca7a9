"""What ``fusionkit train`` costs over a hand-written PyTorch loop on the same model and data.

Both arms train the same model (the six digit views, ``configs/presets/digits-views.yaml``:
DMS fusion, d = 128, batch 64), built by the same seeded call, for the same epochs, and both
validate after every epoch, keep the best weights on disk and evaluate them on the test split
at the end. The hand-written loop is what an engineer would write for data that fits in memory:
each split preprocessed once into stacked tensors, a random permutation per epoch, the trainer's
AdamW (``make_optimizer``: fused) with the same warmup + cosine schedule and gradient clipping, ``torch.save`` of the best
``state_dict``; its validation computes accuracy and NLL only. ``fusionkit train`` runs through
:func:`fusionkit.training.trainer.train` exactly as the CLI calls it (progress display decided
by the trainer, checkpoints, metrics.jsonl, calibration off in both arms for a like-for-like
comparison unless ``--calibrate``).

The arms run in interleaved blocks in one process (threads = 1) and the figure printed is
samples/s of fusionkit ÷ samples/s of the hand loop: of the fastest runs ("min" of the times)
and of the medians. Target (issue 12): at least 0.95.

    .venv/bin/python bench/trainer_overhead.py                   # 5 epochs, 5 repeats
    .venv/bin/python bench/trainer_overhead.py --set train.val_every=5 --set train.eval_batch_size=1024
    .venv/bin/python bench/trainer_overhead.py --profile         # where fusionkit's time goes (cProfile)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusionkit.config import apply_override, read_yaml, resolve
from fusionkit.training.trainer import load_data, lr_lambda, make_optimizer, prepare_run_dir, seed_and_build, train

REPO = Path(__file__).resolve().parents[1]


def make_config(epochs: int, overrides: list[str]):
    raw = read_yaml(REPO / "configs/presets/digits-views.yaml")
    for item in [f"train.epochs={epochs}", "train.calibrate=false", "runtime.accelerator=cpu",
                 "runtime.threads=1", *overrides]:
        apply_override(raw, item)
    return resolve(raw)


def stacked(model, split) -> dict:
    """One split as one batch of stacked tensors (every sample has every view here)."""
    items = [split[i] for i in range(len(split))]
    inputs = {m: enc.collate([enc.preprocess(it["inputs"][m]) for it in items])
              for m, enc in sorted(model.encoders.items())}
    n = len(items)
    return {"inputs": inputs, "target": torch.tensor([it["target"] for it in items]), "n": n}


def sub_batch(data: dict, idx: torch.Tensor, modalities: list[str]) -> dict:
    b = len(idx)
    return {"inputs": {m: data["inputs"][m][idx] for m in modalities},
            "rows": {m: torch.arange(b) for m in modalities},
            "mask": torch.ones(b, len(modalities), dtype=torch.bool), "target": data["target"][idx], "index": idx,
            "skipped": []}


@torch.no_grad()
def hand_eval(model, data: dict, batch_size: int) -> tuple[float, float]:
    model.eval()
    right, nll, n = 0, 0.0, data["n"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for idx in torch.arange(n).split(batch_size):
            batch = sub_batch(data, idx, model.modalities)
            logits = model(batch).logits
            right += int((logits.argmax(1) == batch["target"]).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, batch["target"], reduction="sum"))
    return right / n, nll / n


def hand_loop(cfg, bundle, out: Path) -> tuple[float, float]:
    """The hand-written loop: ``(seconds, test accuracy)``."""
    t0 = time.perf_counter()
    model = seed_and_build(cfg, bundle)
    splits = {name: stacked(model, split) for name, split in bundle.splits.items()}
    train_data, bs = splits["train"], cfg.train.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)  # the trainer's AdamW (fused): only the loop differs
    steps = -(-train_data["n"] // bs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    best = None
    for _ in range(cfg.train.epochs):
        model.train()
        for idx in torch.randperm(train_data["n"], generator=generator).split(bs):
            batch = sub_batch(train_data, idx, model.modalities)
            out_ = model(batch)
            loss = sum(model.loss_terms(out_, batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
        key = hand_eval(model, splits["val"], bs)
        key = (key[0], -key[1])
        if best is None or key > best:
            best = key
            torch.save(model.state_dict(), out / "best.pt")
    model.load_state_dict(torch.load(out / "best.pt"))
    test = hand_eval(model, splits["test"], bs)[0]
    return time.perf_counter() - t0, test


def fusionkit_loop(cfg, bundle, out: Path) -> tuple[float, float]:
    """``fusionkit train`` as the CLI runs it (model built by the same seeded call) into a new run
    folder ``out``: ``(seconds, test accuracy)``. The folder is deleted afterwards, untimed."""
    t0 = time.perf_counter()
    model = seed_and_build(cfg, bundle)
    result = train(cfg, prepare_run_dir(out, overwrite=False), bundle=bundle, model=model)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds, result.test["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the fusionkit arm (e.g. train.val_every=5)")
    ap.add_argument("--profile", action="store_true", help="profile one fusionkit run instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = make_config(args.epochs, [])
    fk_cfg = make_config(args.epochs, args.set)
    bundle = load_data(cfg)
    n_samples = args.epochs * len(bundle.splits["train"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.profile:
            import cProfile
            import pstats

            fusionkit_loop(fk_cfg, bundle, tmp / "warm")
            prof = cProfile.Profile()
            prof.runcall(fusionkit_loop, fk_cfg, bundle, tmp / "fk")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
            return
        fusionkit_loop(fk_cfg, bundle, tmp / "warm")  # imports, allocator, first-call costs: in neither arm
        hand_loop(cfg, bundle, tmp)
        times: dict[str, list[float]] = {"fusionkit": [], "hand": []}
        accs: dict[str, list[float]] = {"fusionkit": [], "hand": []}
        for r in range(args.repeats):
            order = ("fusionkit", "hand") if r % 2 == 0 else ("hand", "fusionkit")
            for arm in order:
                seconds, acc = fusionkit_loop(fk_cfg, bundle, tmp / "fk") if arm == "fusionkit" \
                    else hand_loop(cfg, bundle, tmp)
                times[arm].append(seconds)
                accs[arm].append(acc)
    print(f"six digit views, DMS, {args.epochs} epochs x {len(bundle.splits['train'])} train samples, "
          f"batch {cfg.train.batch_size}, threads 1, {args.repeats} interleaved repeats"
          + (f", fusionkit arm with {' '.join(args.set)}" if args.set else ""))
    for arm in ("hand", "fusionkit"):
        t = times[arm]
        print(f"  {arm:9s}: {n_samples / min(t):7.0f} samples/s best, {n_samples / statistics.median(t):7.0f} median, "
              f"test accuracy {statistics.mean(accs[arm]):.4f}")
    ratio_min = min(times["hand"]) / min(times["fusionkit"])
    ratio_med = statistics.median(times["hand"]) / statistics.median(times["fusionkit"])
    print(f"fusionkit samples/s / hand loop: {ratio_min:.3f} (min) / {ratio_med:.3f} (median); target >= 0.95")


if __name__ == "__main__":
    main()
