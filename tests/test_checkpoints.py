"""Run-folder reliability: checkpoints as one unit, kill -9 at any moment, file modes, the run lock,
impossible --out folders, damaged checkpoints, and seeds numpy cannot take."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import FUSIONKIT, TINY
from fusionkit.config import load_raw, read_yaml, resolve
from fusionkit.errors import RunDirError
from fusionkit.training import checkpoint as ck
from fusionkit.training.checkpoint import find_checkpoint, load_optimizer, load_weights, save_checkpoint
from fusionkit.training.run_folder import RunLock, recover_run_dir
from fusionkit.training.trainer import load_data, make_model, prepare_run_dir, train

STEPS_PER_EPOCH = 10  # 1200 digits training samples in batches of 128


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``fusionkit ARGS`` in this process: (exit code, stderr)."""
    from fusionkit.cli.main import main

    monkeypatch.delenv("FUSIONKIT_RUN_DIR", raising=False)  # the train command sets it; undone afterwards
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch run on two vector views."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = resolve(load_raw(None, ["modalities=[fou, kar]", *TINY]))
    train(cfg, prepare_run_dir(out, False), show_progress=False)
    return out


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return model, opt


# -- 1. one checkpoint, one folder -------------------------------------------------------------------
def test_a_checkpoint_is_one_folder_whose_parts_name_their_epoch(tmp_path):
    model, opt = _model()
    path = save_checkpoint(tmp_path, "last", model, {"epoch": 3}, optimizer=opt)
    assert path == tmp_path / "last" / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp folder, no .old left
    parts = sorted(p.name for p in (tmp_path / "last").iterdir())
    assert parts == ["meta.json", "model.safetensors", "optim.safetensors"]
    for part in ("model.safetensors", "optim.safetensors"):
        with safe_open(str(tmp_path / "last" / part), "pt") as f:
            assert f.metadata()["epoch"] == "3"
    other, other_opt = _model(seed=1)
    found = find_checkpoint(tmp_path, "last")
    meta = load_weights(other, found.weights)
    load_optimizer(other_opt, found.weights, meta)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert find_checkpoint(tmp_path, "best") is None


def test_parts_of_different_epochs_are_refused(tmp_path):
    model, opt = _model()
    save_checkpoint(tmp_path / "a", "last", model, {"epoch": 1}, optimizer=opt)
    save_checkpoint(tmp_path / "b", "last", model, {"epoch": 2}, optimizer=opt)
    shutil.copy(tmp_path / "b" / "last" / "model.safetensors", tmp_path / "a" / "last" / "model.safetensors")
    with pytest.raises(RunDirError, match="holds epoch 2 but its meta.json says epoch 1"):
        load_weights(_model()[0], tmp_path / "a" / "last")


def test_a_crash_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model()
    save_checkpoint(tmp_path, "last", model, {"epoch": 1}, optimizer=opt)
    renames, rename = [], os.rename

    def crash_on_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the temporary folder -> last
            raise KeyboardInterrupt("killed")
        rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "last", model, {"epoch": 2}, optimizer=opt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.old"]  # the new one never got in place
    found = find_checkpoint(tmp_path, "last")
    assert load_weights(_model()[0], found.weights)["epoch"] == 1
    (tmp_path / ".best.tmp-dead").mkdir()  # a temp folder and an old-style temp file of a killed run
    (tmp_path / ".best.safetensors.x1.tmp").write_bytes(b"")
    ck.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_weights(_model()[0], find_checkpoint(tmp_path, "last").weights)["epoch"] == 1


def test_run_folders_of_earlier_versions_still_load(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    best = old / "checkpoints" / "best"
    shutil.move(best / "model.safetensors", old / "checkpoints" / "best.safetensors")
    shutil.move(best / "meta.json", old / "checkpoints" / "best.json")
    best.rmdir()
    cfg = resolve(read_yaml(old / "config.yaml"))
    found = find_checkpoint(old / "checkpoints", "best")
    assert found.weights == old / "checkpoints" / "best.safetensors"
    assert load_weights(make_model(cfg, load_data(cfg)), found.weights)["epoch"] == 1


# -- 2. file modes ---------------------------------------------------------------------------------
def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        ck.atomic_write_text(tmp_path / "results.json", "{}")
        model, opt = _model()
        save_checkpoint(tmp_path / "checkpoints", "last", model, {"epoch": 1}, optimizer=opt)
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    last = tmp_path / "checkpoints" / "last"
    assert last.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in last.iterdir()} == {
        "model.safetensors": 0o644, "optim.safetensors": 0o644, "meta.json": 0o644}


# -- kill -9 at any moment --------------------------------------------------------------------------
def _killed_run(out: Path, marker: str | None, delay: float = 0.0) -> None:
    """Train 3 epochs into ``out`` and kill -9 the process when a checkpoint write announces
    ``marker`` (``None``: the first write), ``delay`` seconds later."""
    env = {**os.environ, "FUSIONKIT_TEST_CHECKPOINT_PAUSE": "0.1"}
    proc = subprocess.Popen([str(FUSIONKIT), "train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                             *TINY, "train.epochs=3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stderr:
        if line.startswith("[checkpoint") and (marker is None or marker in line):
            break
    time.sleep(delay)
    proc.kill()
    proc.wait()
    proc.stderr.close()


def _check_consistent(out: Path, model: torch.nn.Module) -> int:
    """Every checkpoint present loads, and its weights, metadata and optimizer are of one epoch;
    metrics.jsonl holds no row past the last checkpoint. Returns the epoch of ``last`` (0: none)."""
    assert not [p for p in (out / "checkpoints").rglob("*") if p.is_file() and p.stat().st_size == 0]
    epochs = {}
    for name in ("best", "last"):
        found = find_checkpoint(out / "checkpoints", name)
        if found is None:
            continue
        meta = load_weights(model, found.weights)  # raises if a part is from another epoch
        with safe_open(str(found.weights), "pt") as f:
            assert f.metadata()["epoch"] == str(meta["epoch"])
        if name == "last":
            with safe_open(str(found.optimizer), "pt") as f:
                assert f.metadata()["epoch"] == str(meta["epoch"])
                assert f.get_tensor("0.step").item() == meta["epoch"] * STEPS_PER_EPOCH  # AdamW's own count
        epochs[name] = meta["epoch"]
    last = epochs.get("last", 0)
    assert epochs.get("best", 0) <= last + 1  # best is written just before last
    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert [json.loads(r)["epoch"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) <= last
    return last


def test_kill_9_at_any_moment_leaves_only_whole_checkpoints_and_resume_finishes_the_run(tmp_path, capsys,
                                                                                        monkeypatch):
    markers = ["best epoch 1: complete", "last epoch 1: weights written",
               "last epoch 2: previous checkpoint moved aside", "last epoch 2: new checkpoint in place"]
    rng = random.Random(0)
    kills = [(m, 0.0) for m in markers] + [(None, rng.uniform(0.0, 2.0)) for _ in range(2)]
    threads = [threading.Thread(target=_killed_run, args=(tmp_path / f"k{i}", m, d)) for i, (m, d) in enumerate(kills)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    cfg = resolve(load_raw(None, ["modalities=[fou, kar]", *TINY, "train.epochs=3"]))
    model = make_model(cfg, load_data(cfg))
    lasts = [_check_consistent(tmp_path / f"k{i}", model) for i in range(len(kills))]
    assert lasts[:4] == [0, 0, 1, 2]  # moved aside: .last.old (epoch 1) is found
    # whoever takes the lock next repairs the folder: no temp folder, no .old, the same checkpoints
    for i in range(len(kills)):
        with RunLock(tmp_path / f"k{i}"):
            recover_run_dir(tmp_path / f"k{i}")
            left = sorted(p.name for p in (tmp_path / f"k{i}" / "checkpoints").iterdir())
        assert set(left) <= {"best", "last"}, left
        assert _check_consistent(tmp_path / f"k{i}", model) == lasts[i]
    # the run killed between the two renames of a swap resumes to the very run never interrupted
    code, err = cli(capsys, monkeypatch, "train", "--resume", str(tmp_path / "k2"), "--no-progress")
    assert code == 0 and "resuming after epoch 1 of 3" in err, err
    reference = train(cfg, prepare_run_dir(tmp_path / "reference", False), show_progress=False)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "seconds" not in k}  # noqa: E731
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("k2", "reference")]
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]]
    assert json.loads((tmp_path / "k2" / "results.json").read_text())["test"] == reference.test


# -- 3. the run lock ---------------------------------------------------------------------------------
def test_a_second_training_into_a_running_folder_stops_and_a_dead_owner_is_taken_over(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    env = {**os.environ, "FUSIONKIT_TEST_CHECKPOINT_PAUSE": "2"}  # the first run holds the lock a while
    first = subprocess.Popen([str(FUSIONKIT), "train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                              *TINY, "train.epochs=3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        for line in first.stderr:
            if line.startswith("[checkpoint"):
                break
        second = subprocess.run([str(FUSIONKIT), "train", "--modalities", "fou,kar", "--out", str(out),
                                 "--no-progress", "--overwrite", *TINY], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == f"error: run folder '{out}' is in use by fusionkit process {first.pid}; " \
                                        "wait for it to finish, or pass --out to choose another folder"
        assert first.poll() is None  # untouched, still training
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert (out / ".lock").read_text().strip() == str(first.pid)  # left behind by kill -9 ...
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou,kar", "--out", str(out), "--no-progress",
                    "--overwrite", *TINY)
    assert code == 0, err  # ... and taken over: its owner is dead
    assert not (out / ".lock").exists()
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirError, match="is in use by fusionkit process"):
            RunLock(tmp_path / "run").acquire()
        with pytest.raises(RunDirError, match="is in use"):
            train(resolve(load_raw(None, ["modalities=[fou]", *TINY])), tmp_path / "run", show_progress=False)
    assert sorted(os.listdir(tmp_path / "run")) == []  # released: .lock removed


def test_a_folder_another_process_trains_into_is_never_prepared_over(tmp_path):
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from fusionkit.training.run_folder import RunLock\n"
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run / "metrics.jsonl").write_text("precious\n")
        with pytest.raises(RunDirError, match=f"is in use by fusionkit process {holder.pid}"):
            prepare_run_dir(run, overwrite=True)  # what the benchmarks call before train()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_a_refused_out_folder_is_left_exactly_as_it_was(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    (mine / "checkpoints" / ".epoch3.old").mkdir(parents=True)  # someone else's files, named like ours
    (mine / ".notes.tmp").write_text("keep")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou", "--out", str(mine), "--no-progress", *TINY)
    assert code == 2 and "already exists; pass --overwrite" in err, err
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before


# -- 4. --out folders that cannot be, and seeds numpy cannot take -------------------------------------
@pytest.mark.parametrize("where,message", [
    ("file/run", "cannot be created: '{file}' is not a folder"),
    ("file", "'{file}' is a file"),
    ("/proc/fusionkit-no/run", "cannot be created ("),
])
def test_an_impossible_out_folder_is_one_line(where, message, tmp_path, capsys, monkeypatch, run):
    (tmp_path / "file").write_text("not a folder")
    out = where if where.startswith("/") else str(tmp_path / where)
    message = message.format(file=tmp_path / "file")
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou", "--out", out, "--no-progress", *TINY)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, err = cli(capsys, monkeypatch, "robustness", str(run), "--corrupt", "fou:gaussian_noise", "--levels", "0",
                    "--out", out, "--no-progress")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args", [["seed=99999999999"], ["--seed", "4294967296"], ["seed=-1"]])
def test_a_seed_numpy_cannot_take_is_refused_before_the_run_folder_exists(args, tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, monkeypatch, "train", "--modalities", "fou", "--out", str(tmp_path / "run"), *TINY, *args)
    assert code == 2 and err.startswith("error: seed: Input should be") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# -- 5. damaged checkpoints and edited configs ---------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle(path: Path) -> None:
    torch.save({"w": torch.zeros(3)}, path)


DAMAGES = {
    "truncated weights": (lambda r: _truncate(r / "checkpoints/best/model.safetensors"),
                          "checkpoint file '{run}/checkpoints/best/model.safetensors' cannot be read"),
    "truncated metadata": (lambda r: _truncate(r / "checkpoints/best/meta.json"),
                           "checkpoint metadata '{run}/checkpoints/best/meta.json' cannot be read"),
    "a pickle renamed": (lambda r: _pickle(r / "checkpoints/best/model.safetensors"),
                         "truncated or not a safetensors file"),
    "an edited config": (lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text().replace(
        "dim: 32", "dim: 48", 1)), "does not fit the model built from its config (size mismatch for "),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_is_one_line_naming_the_file(damage, run, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    harm, message = DAMAGES[damage]
    harm(copy)
    code, err = cli(capsys, monkeypatch, "eval", str(copy), "--no-progress")
    assert code == 2 and message.format(run=copy) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--checkpoint last" in err or "restore it" in err  # what to do
