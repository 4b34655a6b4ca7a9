"""Forward+backward time of the DMS fusion layer (T=10 MC passes) against static mean fusion.

Both layers run in this process on the same inputs: B=256, M=4, d=512, K=10 on the CPU.
DMS's extra work is the T stochastic head passes (on the heads' small hidden layer), the
alignment scores and the scheduler; the figure printed last is the ratio dms / mean.

    .venv/bin/python bench/fusion_overhead.py [--repeats 50] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusionkit import build


def time_layer(fusion, z, mask, target, repeats: int, warmup: int = 5) -> list[float]:
    """Seconds per forward+backward (task-like loss + the fusion's own loss terms)."""
    times = []
    for i in range(warmup + repeats):
        for v in z.values():
            v.grad = None
        t0 = time.perf_counter()
        out = fusion(z, mask)
        loss = out.fused.square().mean() + fusion.loss(out, target)
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--modalities", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(args.modalities)]
    z = {m: torch.randn(args.batch, args.dim, requires_grad=True) for m in names}
    mask = torch.rand(args.batch, args.modalities) > 0.1
    mask[:, 0] = True
    target = torch.randint(0, args.classes, (args.batch,))
    common = dict(modalities=names, dim=args.dim, num_classes=args.classes)
    layers = {
        "mean": build("fusions", "mean", **common).train(),
        "dms": build("fusions", {"name": "dms", "scorers": ["confidence", {"name": "mc_dropout", "passes": args.passes},
                                                             "alignment"]}, **common).train(),
    }
    # interleave the two so drift in machine load hits both equally
    results: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(5):
        for name, layer in layers.items():
            results[name] += time_layer(layer, z, mask, target, args.repeats // 5 or 1)
    print(f"B={args.batch} M={args.modalities} d={args.dim} K={args.classes} T={args.passes} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    for name, ms in med.items():
        print(f"{name:>5}: median {ms:.2f} ms per forward+backward ({len(results[name])} runs)")
    print(f"ratio dms/mean: {med['dms'] / med['mean']:.2f}")


if __name__ == "__main__":
    main()
