"""The trainer's fast paths change speed, not results: prepared in-memory batches, validation
every N epochs, the eval batch size, checkpoints written in the background with linked weights,
plain progress lines off a terminal, the fused optimizer."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch
from rich.console import Console

from conftest import TINY
from fusionkit.config import load_raw, resolve
from fusionkit.data.loader import Collate, EncodedDataset, PreparedSplit, prepare
from fusionkit.datasets.base import MultimodalSplit
from fusionkit.errors import DataError
from fusionkit.training import trainer as trainer_module
from fusionkit.training.augment import AugmentedSplit, resolve_augment
from fusionkit.training.checkpoint import CheckpointWriter
from fusionkit.training.trainer import load_data, make_optimizer, prepare_run_dir, seed_and_build, train


def _cfg(*overrides: str):
    return resolve(load_raw(None, ["modalities=[fou, zer]", *TINY, *overrides]))


def _same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["target"], b["target"])
    assert torch.equal(a["index"], b["index"]) and a["skipped"] == b["skipped"]
    for m in a["rows"]:
        assert torch.equal(a["rows"][m], b["rows"][m])
        x, y = a["inputs"][m], b["inputs"][m]
        if x is None or y is None:
            assert x is None and y is None
        elif isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert torch.equal(x, y)


def test_prepared_batches_equal_collated_ones_with_gaps_and_text():
    cfg = resolve(load_raw(None, ["modalities=[fou, image, text]", *TINY]))
    bundle = load_data(cfg)
    model = seed_and_build(cfg, bundle)
    split = bundle.splits["val"]
    n = len(split)
    # gaps: every third sample lacks fou, every fifth lacks text, sample 1 lacks image
    columns = {"fou": [None if i % 3 == 0 else v for i, v in enumerate(split.columns["fou"])],
               "image": [None if i == 1 else v for i, v in enumerate(split.columns["image"])],
               "text": [None if i % 5 == 0 else v for i, v in enumerate(split.columns["text"])]}
    gappy = MultimodalSplit(columns, split.targets, split.ids)
    prepared = prepare(gappy, model.encoders, model.task.collate_targets)
    assert isinstance(prepared, PreparedSplit)
    assert set(prepared.stacked) == {"fou", "image"} and set(prepared.values) == {"text"}  # the tokenizer collates
    assert prepared.complete == set()
    collate, items = Collate(model.encoders, model.task.collate_targets), EncodedDataset(gappy, model.encoders)
    for indices in ([0, 1, 2, 3, 4, 5], [7, 3, 12, 0], [n - 1], [0, 3, 6]):  # the last: no sample has fou
        _same_batch(prepared.__getitems__(indices), collate([items[i] for i in indices]))
    assert prepared.__getitems__([0, 3, 6])["inputs"]["fou"] is None


def test_vector_columns_are_prepared_at_once_with_the_same_batches():
    # feature vectors held in memory go through preprocess_column: one call per modality and split
    cfg = _cfg()
    bundle = load_data(cfg)
    model = seed_and_build(cfg, bundle)
    split = bundle.splits["val"]
    n = len(split)
    columns = {"fou": [None if i % 3 == 0 else v for i, v in enumerate(split.columns["fou"])],
               "zer": [None if i % 4 == 1 else v for i, v in enumerate(split.columns["zer"])]}
    gappy = MultimodalSplit(columns, split.targets, split.ids)
    calls = []
    for enc in model.encoders.values():
        original = enc.preprocess
        enc.preprocess = lambda raw, original=original: calls.append(1) or original(raw)
    prepared = prepare(gappy, model.encoders, model.task.collate_targets)
    assert isinstance(prepared, PreparedSplit) and not calls  # no per-sample preprocess call
    assert set(prepared.stacked) == {"fou", "zer"} and prepared.complete == set()
    collate, items = Collate(model.encoders, model.task.collate_targets), EncodedDataset(gappy, model.encoders)
    for indices in ([0, 1, 2, 3, 4, 5], [7, 3, 12, 0], [n - 1], [0, 3, 6]):
        _same_batch(prepared.__getitems__(indices), collate([items[i] for i in indices]))
    # a vector of the wrong length: the per-sample path runs and names the sample
    columns["zer"][7] = columns["zer"][7][:-1]
    with pytest.raises(DataError, match=rf"sample {split.ids[7]}, modality 'zer': vector has shape \(46,\)"):
        prepare(MultimodalSplit(columns, split.targets, split.ids), model.encoders)


def test_prepared_split_is_refused_where_items_change_or_media_decode():
    cfg = _cfg()
    bundle = load_data(cfg)
    model = seed_and_build(cfg, bundle)
    train_split = bundle.splits["train"]
    assert prepare(train_split, model.encoders) is not None
    augment = _cfg('train.augment=[{corrupt: "fou:gaussian_noise", p: 0.5}]').train.augment
    noisy = AugmentedSplit(train_split, resolve_augment(augment, bundle.modalities), seed=0)
    assert prepare(noisy, model.encoders) is None  # corruptions drawn anew every epoch
    assert prepare(AugmentedSplit(train_split, [], seed=0), model.encoders) is not None
    model.encoders["fou"].deterministic_preprocess = False  # an encoder that augments in preprocess
    assert prepare(train_split, model.encoders) is None


def test_training_through_prepared_batches_gives_the_same_run(tmp_path, monkeypatch):
    cfg = _cfg("train.epochs=2", "model.fusion={name: dms}")
    fast = train(cfg, prepare_run_dir(tmp_path / "fast", False), show_progress=False)
    monkeypatch.setattr(trainer_module, "prepare", lambda *a, **k: None)  # the per-sample path
    slow = train(cfg, prepare_run_dir(tmp_path / "slow", False), show_progress=False)
    assert fast.test == slow.test and fast.val == slow.val
    rows = [(tmp_path / r / "metrics.jsonl").read_text() for r in ("fast", "slow")]
    strip = [[{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in r.splitlines()]
             for r in rows]
    assert strip[0] == strip[1]


def test_validation_every_n_epochs_and_always_after_the_last(tmp_path):
    run = tmp_path / "r"
    result = train(_cfg("train.epochs=5", "train.val_every=2"), prepare_run_dir(run, False), show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows if "val" in r] == [2, 4, 5]
    assert result.best_epoch in (2, 4, 5)
    last = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
    assert last["epoch"] == 5 and last["resume"]["best"]["epoch"] == result.best_epoch


def test_eval_batch_size_does_not_change_the_numbers(tmp_path):
    default = train(_cfg("model.fusion={name: dms}"), prepare_run_dir(tmp_path / "a", False), show_progress=False)
    odd = train(_cfg("model.fusion={name: dms}", "train.eval_batch_size=7"), prepare_run_dir(tmp_path / "b", False),
                show_progress=False)
    assert odd.test["accuracy"] == default.test["accuracy"]
    assert odd.test["nll"] == pytest.approx(default.test["nll"], abs=1e-5)  # float rounding only
    for m, w in default.test["mean_weights"].items():
        assert odd.test["mean_weights"][m] == pytest.approx(w, abs=1e-5)  # float rounding only


def test_last_links_the_weights_best_wrote_in_the_same_epoch(tmp_path):
    run = tmp_path / "r"
    # calibration rewrites best after training (with its temperatures): off here
    result = train(_cfg("train.epochs=2", "train.calibrate=false"), prepare_run_dir(run, False), show_progress=False)
    best, last = run / "checkpoints" / "best" / "model.safetensors", run / "checkpoints" / "last" / "model.safetensors"
    assert result.best_epoch == 2  # the tiny run still improves in its second epoch
    assert best.stat().st_ino == last.stat().st_ino and best.stat().st_nlink == 2
    assert json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["epoch"] == 2


def test_checkpoint_writer_runs_jobs_in_order_and_raises_their_errors():
    done: list[int] = []
    gate = threading.Event()
    writer = CheckpointWriter()
    writer.submit(lambda: (gate.wait(5), done.append(1)))
    gate.set()
    writer.submit(lambda: done.append(2))  # waits for the first job
    writer.wait()
    assert done == [1, 2]
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.wait()  # the error is raised once


def test_progress_off_a_terminal_is_one_plain_line_per_epoch(tmp_path):
    out = io.StringIO()
    train(_cfg("train.epochs=2"), prepare_run_dir(tmp_path / "r", False), console=Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "train loss" in lines[0] and "val acc" in lines[0] and "━" not in out.getvalue()


def test_adamw_is_fused_on_cpu_and_plain_for_sharded_strategies():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(_cfg(), params).defaults["fused"] is True
    assert not make_optimizer(_cfg("runtime.strategy=fsdp"), params).defaults["fused"]


def test_cli_training_off_a_terminal_prints_a_line_per_epoch_unless_told_not_to(tmp_path):
    from conftest import run_cli

    proc = run_cli("train", "--modalities", "fou,zer", "--out", str(tmp_path / "a"), *TINY, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]
    quiet = run_cli("train", "--modalities", "fou,zer", "--out", str(tmp_path / "b"), "--no-progress", *TINY)
    assert quiet.returncode == 0 and not any(line.startswith("epoch ") for line in quiet.stderr.splitlines())


@pytest.mark.parametrize("overrides, reads_back", [
    (["train.epochs=1"], False),  # the last epoch is the best: tested on the weights in memory
    # the weights cannot move, so epoch 2 does not improve on epoch 1: best is read back from disk
    (["train.epochs=2", "train.lr=1e-30", "model.fusion={name: mean}"], True),
], ids=["best-in-memory", "best-read-back"])
def test_the_test_split_is_evaluated_on_the_best_checkpoint(tmp_path, monkeypatch, overrides, reads_back):
    from fusionkit.evaluation import evaluate
    from fusionkit.training.trainer import load_run, make_loader

    reads = []
    load = trainer_module.load_weights
    monkeypatch.setattr(trainer_module, "load_weights", lambda *a, **k: reads.append(1) or load(*a, **k))
    cfg = _cfg(*overrides, "train.calibrate=true")
    result = train(cfg, prepare_run_dir(tmp_path / "r", False), show_progress=False)
    assert result.best_epoch == 1 and bool(reads) == reads_back
    # what `fusionkit eval` reads from the run folder gives the same test numbers and temperatures
    _, bundle, model = load_run(tmp_path / "r")
    assert evaluate(model, make_loader(model, bundle.splits["test"], cfg, shuffle=False)) == result.test
    meta = json.loads((tmp_path / "r" / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["calibration"] == result.calibration and meta["epoch"] == 1
    assert meta["modalities"] == ["fou", "zer"] and "rebuilt_encoders" in meta
