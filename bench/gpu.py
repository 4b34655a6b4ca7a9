"""Issue 12's GPU figures in one process: the DMS layer, the six-view train step and the LM path.

Every part compares DMS against static ``mean`` fusion on the same device, in interleaved blocks
(so drift in clocks or load hits both alike), timed with CUDA events after warm-up; printed are
dms / mean of the fastest blocks ("min") and of the medians. ``bf16`` is autocast to bfloat16,
what ``runtime.precision=bf16-mixed`` does; ``fp32`` is plain float32 (TF32 matmuls off).

- layer: forward+backward of the fusion layer alone (``bench/dms_layer.py``'s setup: M = 4,
  d = 512, K = 10, T = 10 MC passes, ~10% of the entries missing) at B = 256 (the CPU figure's
  size; on a GPU it is launch-bound) and B = 4096, eager (fp32 and bf16) and ``torch.compile``-d
  (bf16);
- memory: the peak of the CUDA allocator's bytes above the step's start during one
  forward+backward at B = 4096, M = 8 (``torch.cuda.max_memory_allocated``);
- step: the whole six-view training step (``bench/train_step.py``: forward, loss terms, backward,
  clipping, fused AdamW) at batch 64 and 1024;
- lm: the captioning model of ``bench/lm_tasks.py`` on digits (a ResNet-18 on the picture plus
  two UCI feature views, LLaVA-style prefix) in front of a frozen, random-init LM with
  SmolLM2-135M's shape (30 layers, width 576, 9 heads / 3 KV heads, 49,152-token vocabulary):
  training samples/s (forward, loss, backward, AdamW on the trainable parts) and generation
  samples/s (``max_new_tokens`` greedy tokens), DMS against mean. The weights are random because
  throughput does not depend on them and nothing can be downloaded on the device machine.

    python bench/gpu.py [--parts layer,memory,step,lm] [--device cuda] [--quick]

``--quick`` shrinks every size and repeat (a smoke test on the CPU: ``--device cpu --quick``).
Results also go to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from dms_layer import make_layers, step as layer_step  # noqa: E402

from fusionkit.config import apply_override, read_yaml, resolve  # noqa: E402
from fusionkit.training.trainer import load_data, make_loader, make_optimizer, seed_and_build  # noqa: E402

RESULTS: dict[str, dict] = {}


class Timer:
    """Elapsed seconds of a block: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def interleave(arms: dict, run, blocks: int) -> dict[str, list[float]]:
    """``run(arm) -> seconds`` for each arm, alternating the order per block; block 0 warms up."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for b in range(blocks + 1):
        for name in (names if b % 2 == 0 else names[::-1]):
            t = run(arms[name])
            if b:
                times[name].append(t)
    return times


def report(key: str, times: dict[str, list[float]], batch: int | None = None, extra: dict | None = None):
    """Print and record time ``dms / mean`` of the min and the median, and each arm's best
    (ms per call, or samples/s when ``batch`` is given)."""
    lo = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio_min, ratio_med = lo["dms"] / lo["mean"], med["dms"] / med["mean"]
    if batch is None:
        arms = ", ".join(f"{k} {1e3 * lo[k]:.3f} ms" for k in times)
    else:
        arms = ", ".join(f"{k} {batch / lo[k]:.0f} samples/s" for k in times)
    print(f"{key:36s} time dms/mean {ratio_min:.3f} (min) / {ratio_med:.3f} (median)   [{arms}]", flush=True)
    RESULTS[key] = {"dms_over_mean_min": ratio_min, "dms_over_mean_median": ratio_med,
                    "min_s": lo, "median_s": med, **(extra or {})}


def part_layer(args, device: torch.device) -> None:
    sizes = [64] if args.quick else [256, 4096]
    for batch in sizes:
        layers, z, mask, target = make_layers(batch, 4, 512 if not args.quick else 64, 10, 10)
        layers = {k: v.to(device) for k, v in layers.items()}
        z = {k: v.detach().to(device).requires_grad_() for k, v in z.items()}
        mask, target = mask.to(device), target.to(device)
        for dtype in ("fp32", "bf16"):
            modes = [None] + (["default", "reduce-overhead"] if dtype == "bf16" and device.type == "cuda" else
                              ["default"] if dtype == "bf16" else [])
            for mode in modes:
                # a fresh compile per batch size: static shapes, as runtime.compile does it
                torch._dynamo.reset()
                calls = {k: (v if mode is None else torch.compile(v, mode=None if mode == "default" else mode,
                                                                  dynamic=False)) for k, v in layers.items()}

                def run(call, dtype=dtype):
                    with Timer(device) as t:
                        for _ in range(args.steps):
                            torch.compiler.cudagraph_mark_step_begin()
                            with autocast(device, dtype):
                                layer_step(call, z, mask, target)
                    return t.seconds / args.steps

                for call in calls.values():  # warm up (and compile) outside the timed blocks
                    for _ in range(3):
                        run(call)
                report(f"layer B={batch} {dtype} {'eager' if mode is None else 'compiled ' + mode}",
                       interleave(calls, run, args.blocks))


def part_memory(args, device: torch.device) -> None:
    if device.type != "cuda":
        print("memory: CUDA only (bench/dms_layer.py --memory measures the CPU)")
        return
    batch = 512 if args.quick else 4096
    for dtype in ("fp32", "bf16"):
        peaks = {}
        for name in ("mean", "dms"):
            layers, z, mask, target = make_layers(batch, 8, 512, 10, 10)
            layer = layers[name].to(device)
            z = {k: v.detach().to(device).requires_grad_() for k, v in z.items()}
            mask, target = mask.to(device), target.to(device)
            with autocast(device, dtype):
                layer_step(layer, z, mask, target)  # warm up: lazily allocated state, cuBLAS workspaces
            torch.cuda.synchronize()
            for v in z.values():
                v.grad = None
            layer.zero_grad(set_to_none=True)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with autocast(device, dtype):
                layer_step(layer, z, mask, target)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
            del layers, layer, z
            torch.cuda.empty_cache()
        ratio = peaks["dms"] / peaks["mean"]
        print(f"{'memory B=' + str(batch) + ' M=8 ' + dtype:36s} peak dms/mean {ratio:.3f}   "
              f"[mean {peaks['mean'] / 2**20:.1f} MiB, dms {peaks['dms'] / 2**20:.1f} MiB above the start]", flush=True)
        RESULTS[f"memory B={batch} M=8 {dtype}"] = {"dms_over_mean": ratio, "peak_bytes": peaks}


def build_arm(config: str, overrides: list[str], device: torch.device):
    raw = read_yaml(REPO / config)
    for item in ["runtime.accelerator=cpu", *overrides]:
        apply_override(raw, item)
    cfg = resolve(raw)
    bundle = load_data(cfg)
    model = seed_and_build(cfg, bundle).train().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = make_loader(model, bundle.splits["train"], cfg, True)
    # full batches only: the same shapes every step
    batches = [to_device(b, device) for b in loader][: len(bundle.splits["train"]) // cfg.train.batch_size]
    return cfg, model, params, make_optimizer(cfg, params), batches


def train_steps(arm, steps: int, device: torch.device, dtype: str) -> float:
    cfg, model, params, optimizer, batches = arm
    with Timer(device) as t:
        for i in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            batch = batches[i % len(batches)]
            with autocast(device, dtype):
                out = model(batch)
                loss = sum(model.loss_terms(out, batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
    return t.seconds / steps


def part_step(args, device: torch.device) -> None:
    variants = [(b, d, None) for b in ([64] if args.quick else [64, 1024]) for d in ("fp32", "bf16")]
    variants.append((64, "bf16", "default"))  # the fusion layer compiled as runtime.compile does it
    if device.type == "cuda":
        variants.append((64, "bf16", "reduce-overhead"))  # and replayed as CUDA graphs
    for batch, dtype, mode in variants:
        common = [f"train.batch_size={batch}", "train.cache_features=false"]
        arms = {name: build_arm("configs/presets/digits-views.yaml", [*common, f"model.fusion={{name: {name}}}"],
                                device) for name in ("mean", "dms")}
        if mode is not None:
            torch._dynamo.reset()
            for arm in arms.values():
                arm[1].fusion.compile(mode=None if mode == "default" else mode, dynamic=False)
        report(f"step six views batch {batch} {dtype}" + ("" if mode is None else f" fusion {mode}"),
               interleave(arms, lambda a, dtype=dtype: train_steps(a, args.steps, device, dtype), args.blocks))


def smollm2_shaped_lm(path: Path, quick: bool) -> Path:
    """A random-init Llama of SmolLM2-135M's shape with the byte tokenizer, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusionkit.lm.testing import byte_tokenizer

    tokenizer = byte_tokenizer()
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if quick else
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3))
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def part_lm(args, device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lm = smollm2_shaped_lm(Path(tmp) / "lm", args.quick)
        for batch in ([8] if args.quick else [16, 64]):
            common = ["data={name: digits, task: captioning, val_fraction: 0.1, test_fraction: 0.1}",
                      "modalities=[image,mor,zer]", f"train.batch_size={batch}", "train.lr=2e-3",
                      "train.cache_features=false"]
            decoder = f"model.decoder={{name: llava, lm: '{lm}', trainable: frozen, max_tokens: 4, " \
                      f"prompt: 'Caption:', max_new_tokens: 12, max_answer_tokens: 16}}"
            for dtype in ("fp32", "bf16"):
                arms = {name: build_arm("configs/easy-captioning.yaml",
                                        [*common, decoder, f"model.fusion={{name: {name}}}"], device)
                        for name in ("mean", "dms")}
                times = interleave(arms, lambda a, dtype=dtype: train_steps(a, args.steps, device, dtype), args.blocks)
                report(f"lm train batch {batch} {dtype}", times, batch,
                       extra={"samples_per_s": {k: batch / min(v) for k, v in times.items()}})

                def gen(arm, dtype=dtype):
                    model, batches = arm[1].eval(), arm[4]
                    with Timer(device) as t, torch.no_grad(), autocast(device, dtype):
                        for i in range(args.gen_steps):
                            model.generate(batches[i % len(batches)])
                    model.train()
                    return t.seconds / args.gen_steps

                times = interleave(arms, gen, max(2, args.blocks // 3))
                report(f"lm generate batch {batch} {dtype}", times, batch,
                       extra={"samples_per_s": {k: batch / min(v) for k, v in times.items()}})
                del arms
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="memory,step,lm,layer")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--gen-steps", type=int, default=3, help="generate() calls per timed block")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and repeats (CPU smoke test)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        torch.set_num_threads(1)
    parts = {"layer": part_layer, "memory": part_memory, "step": part_step, "lm": part_lm}
    failed = []
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:  # one part failing (a missing package on a borrowed machine) must not cost the others
            parts[name](args, device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
        print(f"-- {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    if failed:
        raise SystemExit(f"parts failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
