"""Cost of the DMS fusion layer against static mean fusion: time and memory, in one process.

Time: both layers are built at B=256, M=4, d=512, K=10 with T=10 MC-dropout passes (the
paper's signals: confidence, MC-dropout uncertainty, alignment; a mask with ~10% of the
entries missing; train mode) and run forward+backward (``fused.square().mean()`` plus the
fusion's own loss terms) in interleaved blocks, so drift in machine load hits both alike. The
figures printed are the dms / mean ratio of the fastest runs ("min") and of the medians.

Memory (``--memory``): at B=4096, M=8 each layer runs one forward+backward in a fresh
subprocess; printed are the bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
each storage once, parameters and inputs left out), the peak of the bytes held by the tensor
allocator during the step (the running sum of ``torch.profiler``'s per-event memory deltas) and
the growth of the peak resident set over the process's size just before the step, with their
dms / mean ratios.

    .venv/bin/python bench/dms_layer.py                 # eager, threads = 1
    .venv/bin/python bench/dms_layer.py --compile       # both layers through torch.compile
    .venv/bin/python bench/dms_layer.py --shared-masks  # MC-dropout masks shared by the batch
    .venv/bin/python bench/dms_layer.py --memory        # time, then memory at B=4096, M=8
    .venv/bin/python bench/dms_layer.py --ablate        # each scorer's share: added one at a time
    .venv/bin/python bench/dms_layer.py --compile-ab    # eager vs inductor's defaults vs runtime.compile's options
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

from fusionkit import build
from fusionkit.training.trainer import compile_options


def make_layers(batch: int, modalities: int, dim: int, classes: int, passes: int, seed: int = 0,
                per_sample_masks: bool = True):
    """``({"mean": layer, "dms": layer}, z, mask, target)``, both layers in train mode."""
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(modalities)]
    z = {m: torch.randn(batch, dim, requires_grad=True) for m in names}  # each (B, d)
    mask = torch.rand(batch, modalities) > 0.1  # (B, M), ~10% missing
    mask[:, 0] = True  # no sample without a modality
    target = torch.randint(0, classes, (batch,))  # (B,)
    common = dict(modalities=names, dim=dim, num_classes=classes)
    scorers = ["confidence", {"name": "mc_dropout", "passes": passes, "per_sample_masks": per_sample_masks},
               "alignment"]
    layers = {"mean": build("fusions", "mean", **common).train(),
              "dms": build("fusions", {"name": "dms", "scorers": scorers}, **common).train()}
    return layers, z, mask, target


def ablation_layers(args) -> tuple[dict[str, nn.Module], dict[str, Tensor], Tensor, Tensor]:
    """``mean``, then DMS with no scorer and the benchmark's scorers added one at a time (the last
    is the benchmark's ``dms``), each built from the same seed, with the same inputs."""
    layers, z, mask, target = make_layers(args.batch, args.modalities, args.dim, args.classes, args.passes,
                                          per_sample_masks=not args.shared_masks)
    common = dict(modalities=sorted(z), dim=args.dim, num_classes=args.classes)
    variants = {"mean": layers["mean"]}
    for label, scorers in (("dms, no scorer", []), ("+ confidence", ["confidence"]),
                           ("+ alignment", ["confidence", "alignment"])):
        torch.manual_seed(0)
        variants[label] = build("fusions", {"name": "dms", "scorers": scorers}, **common).train()
    variants["+ mc_dropout"] = layers["dms"]  # confidence, mc_dropout, alignment: the full layer
    return variants, z, mask, target


def step(fusion: nn.Module, z: dict[str, Tensor], mask: Tensor, target: Tensor) -> None:
    """One forward+backward: a task-like loss on the fused vector plus the fusion's own terms."""
    for v in z.values():
        v.grad = None
    fusion.zero_grad(set_to_none=True)
    out = fusion(z, mask)
    loss = out.fused.square().mean() + fusion.loss(out, target)
    loss.backward()


def time_block(fusion, z, mask, target, runs: int) -> list[tuple[float, float]]:
    """``(wall, thread CPU)`` seconds of each of ``runs`` forward+backward steps."""
    times = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        step(fusion, z, mask, target)
        times.append((time.perf_counter() - t0, time.thread_time() - c0))
    return times


def interleave(calls: dict[str, nn.Module], z, mask, target, blocks: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    """``{name: [(wall, thread CPU), ...]}``: ``blocks`` blocks of ``runs`` steps per layer, the
    layers taking turns (and alternating which goes first), so drift in machine load hits all alike."""
    for call in calls.values():  # warm up (and compile)
        time_block(call, z, mask, target, 5)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}
    order = list(calls)
    for block in range(blocks):
        for name in order if block % 2 == 0 else order[::-1]:
            results[name] += time_block(calls[name], z, mask, target, runs)
    return results


def bench_ablate(args) -> None:
    """Where the DMS layer's time goes: the marginal cost of each scorer, measured in the layer."""
    variants, z, mask, target = ablation_layers(args)
    results = interleave(variants, z, mask, target, args.blocks, args.runs)
    masks = "shared by the batch" if args.shared_masks else "per sample"
    print(f"B={args.batch} M={args.modalities} d={args.dim} K={args.classes} T={args.passes} eager, MC masks "
          f"{masks}, threads={torch.get_num_threads()}, thread CPU time of {len(results['mean'])} runs per layer")
    print(f"{'layer':>15} {'min ms':>7} {'median':>7} {'ratio to mean (min / median)':>29} "
          f"{'added by this step (min / median)':>34}")
    lo = {k: min(t[1] for t in v) * 1e3 for k, v in results.items()}
    med = {k: statistics.median(t[1] for t in v) * 1e3 for k, v in results.items()}
    previous = None
    for name in variants:
        added = "" if previous is None else f"{lo[name] - lo[previous]:+.3f} / {med[name] - med[previous]:+.3f} ms"
        print(f"{name:>15} {lo[name]:7.3f} {med[name]:7.3f} {lo[name] / lo['mean']:>14.2f} / "
              f"{med[name] / med['mean']:.2f} {added:>34}")
        previous = name
    # the per-sample masks' random bytes alone: the part of mc_dropout no rewrite with the same
    # masks can remove (one draw of T x B x M x h bytes from the global generator)
    if not args.shared_masks:
        from fusionkit.fusions.base import random_bytes
        head = variants["+ mc_dropout"].heads
        shape = (args.passes, args.batch, args.modalities, head.w1.shape[-1])
        draws = []
        for _ in range(args.blocks * args.runs):
            c0 = time.thread_time()
            random_bytes(shape, z[next(iter(z))].device)
            draws.append(time.thread_time() - c0)
        print(f"of mc_dropout: its {math.prod(shape):,} random mask bytes alone take {min(draws) * 1e3:.3f} / "
              f"{statistics.median(draws) * 1e3:.3f} ms")


def bench_compile_ab(args) -> None:
    """Eager, compiled with inductor's defaults, and compiled as ``runtime.compile`` does it on the
    CPU (``compile_options``), for both layers, interleaved in one process."""
    calls = {}
    for mode in ("eager", "inductor defaults", "as runtime.compile"):
        layers, z, mask, target = make_layers(args.batch, args.modalities, args.dim, args.classes, args.passes,
                                              per_sample_masks=not args.shared_masks)
        options = compile_options("inductor", torch.device("cpu")) if mode == "as runtime.compile" else None
        for name, layer in layers.items():
            calls[f"{name}, {mode}"] = layer if mode == "eager" else torch.compile(layer, dynamic=False, options=options)
    results = interleave(calls, z, mask, target, args.blocks, args.runs)
    print(f"B={args.batch} M={args.modalities} d={args.dim} K={args.classes} T={args.passes}, "
          f"threads={torch.get_num_threads()}, thread CPU time of {len(results['mean, eager'])} runs per layer; "
          f"runtime.compile's options on the CPU: {compile_options('inductor', torch.device('cpu'))}")
    lo = {k: min(t[1] for t in v) * 1e3 for k, v in results.items()}
    med = {k: statistics.median(t[1] for t in v) * 1e3 for k, v in results.items()}
    for mode in ("eager", "inductor defaults", "as runtime.compile"):
        d, m = f"dms, {mode}", f"mean, {mode}"
        print(f"{mode:>19}: mean {lo[m]:.3f} / {med[m]:.3f} ms, dms {lo[d]:.3f} / {med[d]:.3f} ms (min / median), "
              f"dms/mean {lo[d] / lo[m]:.2f} / {med[d] / med[m]:.2f}")


def bench_time(args) -> None:
    layers, z, mask, target = make_layers(args.batch, args.modalities, args.dim, args.classes, args.passes,
                                          per_sample_masks=not args.shared_masks)
    calls = dict(layers)
    if args.compile:
        options = compile_options(args.backend, torch.device("cpu"))  # as runtime.compile sets them
        calls = {k: torch.compile(v, backend=args.backend, options=options) for k, v in layers.items()}
    results = interleave(calls, z, mask, target, args.blocks, args.runs)
    mode = (f"compile({args.backend})" if args.compile else "eager") \
        + (", MC masks shared by the batch" if args.shared_masks else "")
    print(f"B={args.batch} M={args.modalities} d={args.dim} K={args.classes} T={args.passes} {mode} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} runs={len(results['dms'])} per layer")
    # wall time is what a user waits; the thread's CPU time leaves out the time the OS ran other
    # processes, so it is the steadier figure on a shared machine
    for i, clock in enumerate(("wall", "thread CPU")):
        lo = {k: min(t[i] for t in v) * 1e3 for k, v in results.items()}
        med = {k: statistics.median(t[i] for t in v) * 1e3 for k, v in results.items()}
        for name in calls:
            print(f"{clock:>10} {name:>4}: min {lo[name]:.2f} ms, median {med[name]:.2f} ms per forward+backward")
        print(f"{clock:>10} ratio dms/mean: min {lo['dms'] / lo['mean']:.2f}, median {med['dms'] / med['mean']:.2f}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_child(args) -> None:
    """Run in a subprocess: one layer, one forward+backward; print a JSON line of byte counts."""
    layers, z, mask, target = make_layers(args.batch, args.modalities, args.dim, args.classes, args.passes)
    fusion = layers[args.memory_child]
    known = {t.untyped_storage().data_ptr() for t in [*fusion.parameters(), *fusion.buffers(), *z.values()]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    before = rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(fusion, z, mask, target)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    # the allocator's view, independent of how malloc returns memory to the OS: a second step
    # under the profiler, its allocations and frees summed in time order
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fusion, z, mask, target)
    held = peak_held = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak_held = max(peak_held, held)
    print(json.dumps({"saved": sum(saved.values()), "peak_allocated": peak_held, "peak_rss_growth": peak_rss - before}))


def bench_memory(args) -> None:
    sizes = {}
    for name in ("mean", "dms"):
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.mem_batch),
               "--modalities", str(args.mem_modalities), "--dim", str(args.dim),
               "--classes", str(args.classes), "--passes", str(args.passes)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        sizes[name] = json.loads(out.strip().splitlines()[-1])
    print(f"memory at B={args.mem_batch} M={args.mem_modalities} d={args.dim} K={args.classes} T={args.passes}:")
    for name, s in sizes.items():
        print(f"{name:>5}: saved for backward {s['saved'] / 2**20:.1f} MiB, peak allocated "
              f"{s['peak_allocated'] / 2**20:.1f} MiB, peak RSS growth {s['peak_rss_growth'] / 2**20:.1f} MiB")
    dms, mean = sizes["dms"], sizes["mean"]
    print(f"ratio dms/mean: saved {dms['saved'] / mean['saved']:.2f}, "
          f"peak allocated {dms['peak_allocated'] / mean['peak_allocated']:.2f}, "
          f"peak RSS {dms['peak_rss_growth'] / mean['peak_rss_growth']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--modalities", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=10, help="interleaved blocks per layer")
    ap.add_argument("--runs", type=int, default=10, help="forward+backward runs per block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="time torch.compile'd layers")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    ap.add_argument("--shared-masks", action="store_true",
                    help="MC-dropout masks shared by the batch in training (mc_dropout.per_sample_masks: false)")
    ap.add_argument("--compile-ab", action="store_true",
                    help="instead: both layers eager, compiled with inductor's defaults and as runtime.compile does it")
    ap.add_argument("--ablate", action="store_true",
                    help="instead: DMS with no scorer, then each scorer added in turn, against mean")
    ap.add_argument("--memory", action="store_true", help="also measure memory at --mem-batch, --mem-modalities")
    ap.add_argument("--mem-batch", type=int, default=4096)
    ap.add_argument("--mem-modalities", type=int, default=8)
    ap.add_argument("--memory-child", choices=["mean", "dms"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.ablate:
        bench_ablate(args)
        return
    if args.compile_ab:
        bench_compile_ab(args)
        return
    bench_time(args)
    if args.memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
