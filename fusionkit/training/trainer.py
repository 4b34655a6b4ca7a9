"""The one training loop: plain PyTorch, with device, precision and DDP left to Lightning Fabric."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, IterableDataset

from fusionkit.config import RunConfig, to_yaml
from fusionkit.data.cache import CacheStats, CachedSplit, PrecomputedEncoder, encoder_key, precompute
from fusionkit.data.cache import default_root as cache_root
from fusionkit.data.cached_encoders import CachedEncoder, EncoderBuilder
from fusionkit.data.loader import Collate, as_batch, decodes_media, encoded, prepare
from fusionkit.datasets.base import DatasetBundle
from fusionkit.errors import ConfigError, RunDirError
from fusionkit.evaluation import collect, evaluate, forward_call
from fusionkit.model import MultimodalModel, build_model
from fusionkit.registry import build, registry
from fusionkit.strategies.runner import start_strategies
from fusionkit.tasks.targets import has_label
from fusionkit.training.augment import AugmentedSplit, resolve_augment
from fusionkit.training.calibration import calibrate_heads
from fusionkit.training.checkpoint import (
    CheckpointState,
    CheckpointWriter,
    atomic_write_text,
    check_rebuilt_encoders,
    dumps,
    find_checkpoint,
    finite_json,
    load_optimizer,
    load_weights,
    read_meta,
    save_checkpoint,
    snapshot,
    write_checkpoint,
)
from fusionkit.training.loggers import RunLoggers
from fusionkit.training.resume import metrics_until, rng_state, set_rng_state
from fusionkit.training.run_folder import RunLock, next_free_dir, prepare_run_dir, recover_run_dir  # noqa: F401


def make_fabric(cfg: RunConfig):
    """Lightning Fabric from the runtime block (CPU, one GPU, DDP/FSDP, bf16 ...)."""
    from lightning_fabric import Fabric

    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    accelerator = "cuda" if rt.accelerator == "gpu" else rt.accelerator
    try:
        fabric = Fabric(accelerator=accelerator, devices=rt.devices, num_nodes=rt.num_nodes,
                        strategy=rt.strategy, precision=rt.precision)
    except (ValueError, RuntimeError, TypeError) as err:
        raise ConfigError(f"runtime: {str(err).splitlines()[0]}") from None
    return fabric


def load_data(cfg: RunConfig) -> DatasetBundle:
    """Load the configured dataset restricted to the configured modalities."""
    dataset = build("datasets", cfg.data, "data")
    bundle = dataset.load()
    bundle.splits = {name: split.select(cfg.modalities) for name, split in bundle.splits.items()}
    bundle.modalities = {m: bundle.modalities[m] for m in cfg.modalities}
    # rows a split left out because none of the chosen modalities is present (manifest datasets)
    dropped = [row for split in bundle.splits.values() for row in getattr(split, "dropped", ())]
    if dropped:
        bundle.info["skipped"] = [*bundle.info.get("skipped", ()), *dropped]
    return bundle


def track_skipped(loader, split: str, seen: dict[tuple[str, Any], str]):
    """Yield ``loader``'s batches that still hold samples; record skipped ones in ``seen``.

    With ``data.on_bad_sample: skip`` the collate function drops samples that failed to decode
    and lists them in ``batch["skipped"]``; a batch of only such samples is empty (B = 0).
    """
    for batch in loader:
        for ident, reason in batch.get("skipped", ()):
            seen[(split, ident)] = reason
        if batch["mask"].shape[0]:
            yield batch


def _id_order(split: str, ident: Any) -> tuple:
    return ("train", "val", "test").index(split) if split in ("train", "val", "test") else 3, \
        (0, ident, "") if isinstance(ident, int) else (1, 0, str(ident))


def skipped_rows(bundle: DatasetBundle, seen: dict[tuple[str, Any], str]) -> list[dict[str, Any]]:
    """Every left-out row: at load time (bundle.info["skipped"]) and at access time (``seen``)."""
    access = [{"split": split, "id": ident, "stage": "access", "reason": reason}
              for (split, ident), reason in sorted(seen.items(), key=lambda kv: _id_order(*kv[0]))]
    return [*bundle.info.get("skipped", ()), *access]


def make_task(cfg: RunConfig, bundle: DatasetBundle | None = None, state: dict[str, Any] | None = None):
    """The configured task, its probe space taken from ``state`` (a checkpoint's) or derived from ``bundle``."""
    task = build("tasks", cfg.task, "task")
    if state is not None:
        task.load_state(state)
    else:
        task.setup(bundle)
    return task


def seed_and_build(cfg: RunConfig, bundle: DatasetBundle) -> MultimodalModel:
    """Seed every RNG as :func:`train` does, then build the model: passing the result to ``train``
    gives exactly the run ``train`` would have built itself."""
    from lightning_fabric.utilities.seed import seed_everything

    seed_everything(cfg.seed, verbose=False)
    return make_model(cfg, bundle, feature_cache=cfg.train.cache_features)


def make_model(cfg: RunConfig, bundle: DatasetBundle, task=None, *, feature_cache: bool = False) -> MultimodalModel:
    """The model of ``cfg`` for ``bundle``'s data.

    Args:
        feature_cache: for training with ``train.cache_features``: a frozen encoder whose
            features of every sample of ``bundle`` are cached is not built; a weightless
            :class:`~fusionkit.data.cached_encoders.CachedEncoder` carries those features to
            :func:`use_feature_cache` instead (the model's other weights are the same).
    """
    task = task if task is not None else make_task(cfg, bundle)
    builder = None
    if feature_cache:
        live = {a.modality for a in resolve_augment(cfg.train.augment, bundle.modalities) if a.changes_values}
        tokens = bool(getattr(registry("decoders").get(cfg.model.decoder["name"]), "needs_tokens", False))
        builder = EncoderBuilder(cache_dir(cfg), bundle.splits, tokens, live, workers=cfg.train.num_workers)
    model = build_model(cfg.model, bundle.modalities, cfg.modalities, task, make_encoder=builder)
    if builder is not None:
        model.weights_digests.update(builder.digests)
    if task.generative and not getattr(model.decoder, "generative", False):
        raise ConfigError(f"task '{cfg.task['name']}' generates text: choose a generative decoder "
                          f"(model.decoder={{name: llava}}), not '{cfg.model.decoder['name']}'")
    return model


def make_loader(model: MultimodalModel, split, cfg: RunConfig, shuffle: bool, seed: int = 0,
                batch_size: int | None = None) -> DataLoader:
    encoders = {m: (PrecomputedEncoder(e.out_dim, e.token_dim if model.needs_tokens else None)
                    if m in model.precomputed else e) for m, e in model.encoders.items()}
    generator = torch.Generator().manual_seed(seed)
    # workers decode media; a split in memory (or all served by the feature cache) is read here.
    # They are started anew each epoch (not persistent): then the shuffle draws from the generator
    # exactly as without workers, so a run's numbers do not depend on how many there are (the
    # manifest's default follows the machine's cores), and an augmented split's set_epoch reaches them
    workers = cfg.train.num_workers if decodes_media(split) else 0
    batch_size = batch_size or cfg.train.batch_size
    prepared = prepare(split, encoders, model.task.collate_targets)
    if prepared is not None:  # in memory: preprocessed once, a whole batch per call (same batches)
        return DataLoader(prepared, batch_size=batch_size, shuffle=shuffle, collate_fn=as_batch, generator=generator)
    dataset = encoded(split, encoders)
    shuffle = shuffle and not isinstance(dataset, IterableDataset)  # a stream (webdataset) shuffles itself
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, collate_fn=Collate(encoders, model.task.collate_targets),
                      generator=generator)


def cache_dir(cfg: RunConfig) -> Path:
    """The feature cache folder: ``train.cache_dir``, else ``~/.cache/fusionkit/features``."""
    return Path(cfg.train.cache_dir) if cfg.train.cache_dir else cache_root()


def use_feature_cache(model: MultimodalModel, cfg: RunConfig, bundle: DatasetBundle, console=None,
                      exclude: set[str] = frozenset(), device: torch.device | str | None = None) -> CacheStats:
    """Serve every frozen encoder's outputs from the on-disk cache (computing the missing ones).

    The splits of ``bundle`` are replaced by :class:`CachedSplit` views and the model is told to
    skip those encoders. A frozen encoder whose weights come from files (rebuilt from the config,
    never saved in checkpoints) is replaced by a weightless
    :class:`~fusionkit.data.cached_encoders.CachedEncoder`; the others keep their weights.
    Modalities in ``exclude`` (those ``train.augment`` rewrites) keep running their encoder.

    Args:
        device: where missing features are computed (the run's device; default: where the
            encoders are). The features do not depend on it beyond floating-point rounding.
    """
    root = cache_dir(cfg)
    stats = CacheStats()
    for m in exclude:  # a stand-in cannot encode: an excluded modality needs its real encoder
        if isinstance(model.encoders[m], CachedEncoder):
            model.encoders[m] = model.encoders[m].materialize()
    frozen = [m for m, e in model.encoders.items()
              if m not in exclude and not any(p.requires_grad for p in e.parameters())]
    features: dict[str, dict[str, list]] = {}
    for m in frozen:
        enc, block = model.encoders[m], cfg.model.encoders[m]
        feats = enc.features if isinstance(enc, CachedEncoder) else {}
        if all(name in feats and len(feats[name]) == len(split) for name, split in bundle.splits.items()):
            for name in bundle.splits:  # the model was built for this data: every feature is cached
                stats.add(m, sum(f is not None and not isinstance(f, dict) for f in feats[name]), 0)
        else:
            if isinstance(enc, CachedEncoder):  # built for other data: the missing features need the encoder
                enc = model.encoders[m] = enc.materialize()
            key = encoder_key(model.weights_digest(m), block)  # the weights are hashed once
            feats = {name: precompute(enc, block, split, m, root, stats, batch_size=cfg.train.batch_size,
                                      tokens=model.needs_tokens, key=key, device=device,
                                      workers=cfg.train.num_workers)
                     for name, split in bundle.splits.items()}
        features[m] = feats
        if getattr(enc, "rebuilt", False):  # its weights are rebuilt from the config when needed: drop them now
            model.encoders[m] = CachedEncoder.replacing(enc, block, model.weights_digest(m))
    for name, split in list(bundle.splits.items()):
        if frozen:
            bundle.splits[name] = CachedSplit(split, {m: features[m][name] for m in frozen})
    model.precomputed = set(frozen)
    if console is not None and frozen:
        console.print(f"feature cache {root}: {stats.hits} hits, {stats.misses} computed "
                      f"({', '.join(frozen)})", markup=False, highlight=False, soft_wrap=True)
    return stats


def compile_options(backend: str, device: torch.device) -> dict[str, Any] | None:
    """The inductor options ``runtime.compile`` uses on ``device`` (None: the backend's defaults).

    On the CPU, inductor's own random numbers (dropout, the MC-dropout masks' bytes) are computed
    element by element in its generated C++ and cost more than the ops themselves: at the six digit
    views' size the compiled DMS layer took 2.6 ms per forward+backward with them and 2.0 ms with
    ``fallback_random`` (PyTorch's own random kernels, called from the compiled graph), and mean's
    1.8 and 1.5 ms (``bench/dms_layer.py --compile-ab``). On a GPU inductor's fused random numbers
    are the fast path, so nothing is changed there."""
    return {"fallback_random": True} if backend == "inductor" and device.type == "cpu" else None


def compile_fusion(model: MultimodalModel, cfg: RunConfig, device: torch.device) -> None:
    """``torch.compile`` the fusion layer in place (``runtime.compile``) for a run on ``device``:
    its parameters and checkpoint keys stay as they are. The retrieval decoder re-maps the probes
    every batch, which would recompile every batch, so it is refused."""
    if getattr(model.decoder, "retrieval", False):
        raise ConfigError("runtime.compile: the retrieval decoder maps the probes anew every batch, which "
                          "would recompile every batch; leave runtime.compile off for retrieval")
    backend = cfg.runtime.compile_backend
    # static shapes (each batch size its own specialised graph, and CUDA graphs possible): the
    # last, smaller batch compiles once more
    model.fusion.compile(backend=backend, dynamic=False, options=compile_options(backend, device))


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW from the train block: the fused kernel on CPU and CUDA (one kernel for all parameters,
    4x faster than the per-parameter loop on CPU), the default implementation elsewhere (MPS,
    sharded strategies such as FSDP)."""
    fused = cfg.runtime.accelerator in ("auto", "cpu", "cuda", "gpu") \
        and not any(word in str(cfg.runtime.strategy).lower() for word in ("fsdp", "deepspeed", "xla"))
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)


def lr_lambda(cfg: RunConfig, steps_per_epoch: int):
    """Linear warmup for ``warmup_epochs``, then cosine to 0 (or constant)."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows left out (on_bad_sample=skip)
    cache: dict[str, Any] | None = None  # feature-cache hits/misses (train.cache_features)
    calibration: dict[str, Any] | None = None  # per head: temperature, val ECE before/after (train.calibrate)


def calibrate(fmodel, model: MultimodalModel, val_batches, fabric) -> dict[str, Any]:
    """Fit each head's temperature on the validation batches and store it in the model."""
    heads = model.fusion.heads
    heads.temperature.fill_(1.0)
    c = collect(fmodel, val_batches, fabric, predict=False)
    labelled = has_label(c["target"]).unsqueeze(1)  # samples outside the probe space carry no label
    temps, report = calibrate_heads(c["unimodal_logits"], c["mask"] & labelled, c["target"], model.modalities)
    heads.temperature.copy_(temps.to(heads.temperature))
    return report


def _write_epoch(ckpt_dir: Path, best: CheckpointState | None, last: CheckpointState, loggers: RunLoggers,
                 epoch: int, row: dict[str, Any]) -> None:
    """One epoch's files, in this order: ``best`` (if it improved), ``last`` (linking best's
    weights), then the metrics row (a resume can always rebuild the row from ``last``)."""
    best_weights = write_checkpoint(ckpt_dir, "best", best) if best is not None else None
    write_checkpoint(ckpt_dir, "last", last, weights_from=best_weights)
    loggers.log_epoch(epoch, row)


def _calibrate_and_test(cfg: RunConfig, fmodel, model: MultimodalModel, val_loader, test_loader,
                        seen_skipped: dict[tuple[str, Any], str], fabric) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The model holds the best weights: ``(calibration report or None, test evaluation)``;
    ``train.calibrate`` fits the heads' temperatures on the validation split first."""
    calibration = None
    if cfg.train.calibrate:
        calibration = calibrate(fmodel, model, track_skipped(val_loader, "val", seen_skipped), fabric)
    return calibration, evaluate(fmodel, track_skipped(test_loader, "test", seen_skipped), fabric)


def _diverged(cfg: RunConfig, ckpt_dir: Path, saved_epoch: int, what: str) -> ConfigError:
    kept = f"the checkpoints of epoch {saved_epoch} in {ckpt_dir} are kept" if saved_epoch \
        else "no epoch finished, so nothing was saved"
    return ConfigError(f"{what}: training diverged and stopped ({kept}); lower train.lr (now {cfg.train.lr:g}), "
                       f"set train.grad_clip, or look for NaN/inf values in the data")


def train(cfg: RunConfig, run_dir: Path, console: Console | None = None, show_progress: bool = True,
          bundle: DatasetBundle | None = None, model: MultimodalModel | None = None, *,
          resume: bool = False, lock: RunLock | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (already prepared) and evaluate the best checkpoint on test.

    Args:
        bundle, model: the loaded data and the built model if the caller already has them (the
            CLI builds both before it creates the run folder, so a data or model error leaves
            nothing behind).
        resume: continue after the run's ``last`` checkpoint (weights, optimizer, LR schedule,
            RNG states, best so far) instead of starting at epoch 1; ``cfg`` is the run's own
            config (:func:`fusionkit.training.resume.check_resume_config`).
        lock: the run folder's lock when the caller holds it already (the CLI takes it before it
            prepares the folder); otherwise rank 0 holds one for the whole run.

    Raises:
        ConfigError: the loss, the gradients or the weights became NaN or infinite; the run stops
            and its checkpoints keep the last good epoch.
        RunDirError: another process trains into ``run_dir``, or ``resume`` finds no checkpoint.
        KeyboardInterrupt: after epoch N when ``FUSIONKIT_STOP_AFTER_EPOCH=N`` (a testing hook: Ctrl-C
            right after epoch N is saved).
    """
    console = console or Console(stderr=True)
    fabric = make_fabric(cfg)
    fabric.launch()
    if model is None:  # a caller that built the model seeded before building it (see seed_and_build)
        fabric.seed_everything(cfg.seed, verbose=False)
    own_lock = RunLock(run_dir) if fabric.global_rank == 0 and lock is None else None
    if own_lock is not None:
        own_lock.acquire()
        if resume:
            recover_run_dir(run_dir)
    fabric.barrier()  # other ranks read the checkpoints only once they are repaired
    try:
        return _train(cfg, Path(run_dir), fabric, console, show_progress, bundle, model, resume)
    finally:
        if own_lock is not None:
            own_lock.release()


def _train(cfg: RunConfig, run_dir: Path, fabric, console: Console, show_progress: bool,
           bundle: DatasetBundle | None, model: MultimodalModel | None, resume: bool) -> TrainResult:
    rank0 = fabric.global_rank == 0
    ckpt_dir = run_dir / "checkpoints"
    if not cfg.train.lr <= torch.finfo(torch.float32).max:  # AdamW would fail with an overflow deep inside
        raise ConfigError(f"train.lr={cfg.train.lr:g} is beyond float32 (max 3.4e38); use a learning rate like 1e-3")
    last = find_checkpoint(ckpt_dir, "last") if resume else None
    if resume and last is None:
        raise RunDirError(f"run folder '{run_dir}' has no checkpoint to resume from (no epoch finished); "
                          f"train it again with --out {run_dir} --overwrite")
    if rank0 and not resume:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    bundle = bundle or load_data(cfg)
    model = model if model is not None else make_model(cfg, bundle, feature_cache=cfg.train.cache_features)
    resumed = load_weights(model, last.weights) if last is not None else None  # on the CPU, before Fabric moves it
    if resumed is not None and "resume" not in resumed:
        raise RunDirError(f"checkpoint '{last.meta}' holds no resume state (written by an earlier fusionkit); "
                          f"train the run again with --out {run_dir} --overwrite")
    if resumed is not None:
        check_rebuilt_encoders(model, resumed, last.weights)  # frozen weights rebuilt from files: the same files?
    augmentations = resolve_augment(cfg.train.augment, bundle.modalities)
    cache_stats = None
    if cfg.train.cache_features:
        rewritten = {a.modality for a in augmentations if a.changes_values}
        with fabric.rank_zero_first():  # under DDP rank 0 fills the cache, then the others read it
            cache_stats = use_feature_cache(model, cfg, bundle, console if rank0 else None,
                                            exclude=rewritten, device=fabric.device)
    train_split = AugmentedSplit(bundle.splits["train"], augmentations, cfg.seed) if augmentations \
        else bundle.splits["train"]
    train_loader = make_loader(model, train_split, cfg, shuffle=True, seed=cfg.seed)
    shuffling = train_loader.generator
    eval_batch = cfg.train.eval_batch_size  # None: batch_size
    val_loader = make_loader(model, bundle.splits["val"], cfg, shuffle=False, batch_size=eval_batch)
    test_loader = make_loader(model, bundle.splits["test"], cfg, shuffle=False, batch_size=eval_batch)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    if cfg.runtime.compile:
        compile_fusion(model, cfg, fabric.device)
    fmodel, optimizer = fabric.setup(model, optimizer)
    # on the CPU the batches are where the model is: Fabric's walk through every batch is skipped
    train_loader, val_loader, test_loader = fabric.setup_dataloaders(
        train_loader, val_loader, test_loader, move_to_device=fabric.device.type != "cpu")
    # sized now: under DDP setup_dataloaders gives each process its share of the batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(train_loader)))
    strategies = start_strategies(cfg, model, optimizer, fabric, resumed)  # train.strategies (hooks below)

    best: tuple[float, float] | None = None
    best_state_meta: dict[str, Any] | None = None  # meta of the best epoch trained in this process
    seen_skipped: dict[tuple[str, Any], str] = {}  # (split, id) -> reason: samples that failed to decode
    best_epoch, best_val, saved_epoch = 0, {}, 0
    if resumed is not None:
        state = resumed["resume"]
        load_optimizer(optimizer, last.weights, resumed)  # after setup: the state lands on the weights' device
        scheduler.load_state_dict(state["scheduler"])
        best = tuple(state["best"]["key"]) if state["best"]["key"] is not None else None
        best_epoch, best_val, saved_epoch = state["best"]["epoch"], state["best"]["val"], resumed["epoch"]
        seen_skipped = {(split, ident): reason for split, ident, reason in state["skipped"]}
        set_rng_state(state["rng"], shuffling)  # last: nothing may draw between here and the next epoch
        # under DDP, Fabric sets the DistributedSampler's epoch from how often the loader was
        # iterated in this process: continue its count, so epoch e shuffles as in the uninterrupted run
        if hasattr(train_loader, "_num_iter_calls"):
            train_loader._num_iter_calls = saved_epoch
        if rank0:
            metrics_until(run_dir, saved_epoch, state["record"])
            console.print(f"[bold]resuming[/] after epoch {saved_epoch} of {cfg.train.epochs}", highlight=False)
    stop_after = int(os.environ.get("FUSIONKIT_STOP_AFTER_EPOCH", 0))
    batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    check_grads = cfg.runtime.precision != "16-mixed"  # fp16 loss scaling skips steps with inf gradients itself
    # bars on a terminal; elsewhere (a log file, a batch job) one plain line per epoch instead
    bars = show_progress and rank0 and console.is_terminal
    lines = show_progress and rank0 and not console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                        disable=not bars)
    # rank 0 logs (metrics.jsonl always, plus train.loggers); a run that fails marks its loggers failed
    blocks = cfg.train.loggers if rank0 else None
    forward = forward_call(fmodel)  # fmodel(batch) without Fabric's per-output backward hooks
    with RunLoggers(blocks, run_dir, cfg.model_dump(mode="json"), resumed_at=saved_epoch) as loggers:
        writer = CheckpointWriter()
        with progress, writer:
            epochs_task = progress.add_task("epochs", total=cfg.train.epochs, completed=saved_epoch, info="")
            for epoch in range(saved_epoch + 1, cfg.train.epochs + 1):
                if isinstance(train_split, AugmentedSplit):
                    train_split.set_epoch(epoch)
                fmodel.train()
                sums: dict[str, float] = {}
                steps = samples = 0
                t0 = time.perf_counter()
                batch_task = progress.add_task(f"epoch {epoch}", total=len(train_loader), info="")
                for batch in track_skipped(train_loader, "train", seen_skipped):  # drops all-skipped batches
                    if batchnorm and batch["mask"].shape[0] == 1:
                        continue  # BatchNorm cannot normalise one sample: a last batch of one is left out
                    batch = strategies.transform_batch(batch)
                    out = forward(batch)
                    terms = strategies.loss_terms(out, batch, model.loss_terms(out, batch))
                    loss = sum(terms.values())
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise _diverged(cfg, ckpt_dir, saved_epoch, f"epoch {epoch}, step {steps + 1}: the loss is {value}")
                    optimizer.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    strategies.after_backward()  # masks or rescales gradients, before clipping
                    if cfg.train.grad_clip:
                        norm = fabric.clip_gradients(fmodel, optimizer, max_norm=cfg.train.grad_clip,
                                                     error_if_nonfinite=False)
                        if check_grads and norm is not None and not torch.isfinite(norm):
                            raise _diverged(cfg, ckpt_dir, saved_epoch,
                                            f"epoch {epoch}, step {steps + 1}: the gradient norm is {float(norm)}")
                    optimizer.step()
                    scheduler.step()
                    strategies.after_step()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    sums["loss"] = sums.get("loss", 0.0) + value
                    steps += 1
                    samples += int(batch["mask"].shape[0])
                    if bars:
                        progress.update(batch_task, advance=1, info=f"loss {sums['loss'] / steps:.3f}")
                progress.remove_task(batch_task)
                # the last step can break them unseen; one reduction (max |w| is NaN or inf exactly then)
                if not torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)):
                    raise _diverged(cfg, ckpt_dir, saved_epoch, f"epoch {epoch}: the weights became NaN or infinite")
                train_seconds = time.perf_counter() - t0
                # train.val_every: validate every N epochs and after the last one
                validate = epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs
                val = evaluate(fmodel, track_skipped(val_loader, "val", seen_skipped), fabric) if validate else None
                record = {"epoch": epoch, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
                          "lr": scheduler.get_last_lr()[0], **({"val": val} if validate else {}),
                          "seconds": time.perf_counter() - t0, "train_seconds": train_seconds, "train_samples": samples}
                strategies.on_epoch_end(epoch, record)
                improved = False
                if val is not None:
                    nll = val["nll"] if val["nll"] is not None else 0.0
                    key = (val["accuracy"], -nll) if cfg.train.monitor == "accuracy" else (-nll, val["accuracy"])
                    improved = best is None or key > best
                    if improved:
                        best, best_epoch, best_val = key, epoch, val
                meta = {"epoch": epoch, "val": val, "modalities": model.modalities, "classes": bundle.classes,
                        "task": model.task.state()}
                if improved:
                    best_state_meta = meta
                if rank0:  # checkpoints first, then the metrics row: a resume can always rebuild the row
                    best_state = snapshot(model, meta) if improved else None
                    resume_state = {"scheduler": scheduler.state_dict(), "rng": rng_state(shuffling), "record": record,
                                    "best": {"key": list(best) if best is not None else None, "epoch": best_epoch,
                                             "val": best_val},
                                    "skipped": [[split, ident, reason] for (split, ident), reason in seen_skipped.items()],
                                    "strategies": strategies.state_dict()}
                    # the same weights as best's when it improved: linked, not written twice
                    last_state = snapshot(model, {**meta, "resume": resume_state}, optimizer, with_weights=not improved)
                    writer.submit(partial(_write_epoch, ckpt_dir, best_state, last_state, loggers, epoch,
                                          finite_json(record)))  # written while the next epoch trains
                saved_epoch = epoch
                fabric.barrier()
                status = f"val acc {val['accuracy']:.3f} (best {best_val['accuracy']:.3f})" if val is not None \
                    else f"loss {record.get('train_loss', 0.0):.3f}"
                progress.update(epochs_task, advance=1, info=status)
                if lines:
                    console.print(f"epoch {epoch}/{cfg.train.epochs}: train loss {record.get('train_loss', 0.0):.4f}, "
                                  f"{status}, {record['seconds']:.1f} s", markup=False, highlight=False)
                if epoch == stop_after:
                    raise KeyboardInterrupt(f"stopped after epoch {epoch} (FUSIONKIT_STOP_AFTER_EPOCH)")

            # When the last epoch trained here was the best, the model holds best's weights already:
            # calibration and the test split run on them while the writer still writes that
            # epoch's files, and nothing is read back. (A strategy's on_train_end may change the
            # model; with strategies the weights are always read back, as they were saved.)
            in_memory = best_state_meta is not None and best_epoch == saved_epoch and not cfg.train.strategies
            if in_memory:
                strategies.on_train_end()
                best_meta = best_state_meta
                calibration, test = _calibrate_and_test(cfg, fmodel, model, val_loader, test_loader,
                                                        seen_skipped, fabric)

        fabric.barrier()  # rank 0's writer finished with the block above: every rank may read the checkpoints
        if not in_memory:
            strategies.on_train_end()
            best_meta = load_weights(model, find_checkpoint(ckpt_dir, "best").weights)
            calibration, test = _calibrate_and_test(cfg, fmodel, model, val_loader, test_loader, seen_skipped, fabric)
        if calibration is not None:
            if rank0:  # the best checkpoint now carries the temperatures
                save_checkpoint(ckpt_dir, "best", model, {**best_meta, "calibration": calibration})
            fabric.barrier()
        skipped = skipped_rows(bundle, seen_skipped)
        result = TrainResult(run_dir, best_epoch, best_val, test, skipped, calibration=calibration)
        if cache_stats is not None:
            result.cache = {"hits": cache_stats.hits, "misses": cache_stats.misses, "by_modality": cache_stats.by_modality}
        if rank0:
            record = {"best_epoch": best_epoch, "val": best_val, "test": test}
            if calibration is not None:
                record["calibration"] = calibration
            atomic_write_text(run_dir / "results.json", dumps(record, indent=2))
            loggers.log_result(finite_json(record))
            if skipped:  # never a silent drop: every left-out row, with its reason
                atomic_write_text(run_dir / "skipped.json", dumps({"count": len(skipped), "rows": skipped}, indent=2))
        return result


def load_run(run_dir: Path, checkpoint: str = "best"):
    """Rebuild the model of a run folder and load its checkpoint: ``(cfg, bundle, model)``.

    Raises:
        RunDirError: not a run folder, no such checkpoint, or a damaged one (truncated, not
            safetensors, or weights that no longer fit the run's config.yaml).
    """
    from fusionkit.config import read_yaml, resolve

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
    found = find_checkpoint(run_dir / "checkpoints", checkpoint)
    if found is None:
        raise RunDirError(f"run folder '{run_dir}' has no checkpoint '{checkpoint}' "
                          f"(expected {run_dir / 'checkpoints' / checkpoint}); did training finish an epoch?")
    cfg = resolve(read_yaml(run_dir / "config.yaml"))
    bundle = load_data(cfg)
    meta = read_meta(found.weights)
    model = make_model(cfg, bundle, make_task(cfg, bundle, meta.get("task")))
    load_weights(model, found.weights)
    check_rebuilt_encoders(model, meta, found.weights)  # frozen encoders were rebuilt from their files
    model.eval()
    return cfg, bundle, model
