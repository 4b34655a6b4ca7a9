"""``fusionkit predict``: a trained run's predictions for a JSONL file of new, unlabelled inputs.

One JSON line per input row, in file order (the row format and the record keys are described in
:mod:`fusionkit.prediction`): classification runs give ``label``, ``probs`` and each modality's
head; VQA and captioning runs the generated ``text``; retrieval runs the ``--top`` gallery
``matches``. Every record holds the per-sample fusion ``weights`` (0 for a missing modality).
Lines go to stdout, or to ``--out`` (written whole, atomically; an existing file needs
``--overwrite``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fusionkit.errors import ConfigError, RunDirError


@click.command("predict")
@click.argument("run_dir", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="JSONL file: one sample per line, keyed by the run's modality names; no labels needed.")
@click.option("--out", "out_path", type=click.Path(), help="Write the JSON lines here instead of printing them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--top", type=int, default=5, show_default=True, help="Retrieval runs: gallery matches per row.")
@click.option("--gallery", "gallery_path", type=click.Path(),
              help="Retrieval runs: JSONL with a 'text' per line (default: the run's test-split target texts).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def predict(run_dir, data_path, out_path, overwrite, checkpoint, top, gallery_path, no_progress):
    """Predict for every row of a JSONL file (no labels needed; missing modalities allowed)."""
    from fusionkit.cli.main import err_console
    from fusionkit.cli.retrieve import read_gallery, split_texts
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.config import read_yaml, resolve
    from fusionkit.errors import DataError
    from fusionkit.prediction import predict_records, rank_records, read_rows, run_specs
    from fusionkit.training.trainer import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
    if out_path is not None:
        out = Path(out_path)
        if out.is_dir():
            raise RunDirError(f"--out '{out}' is a folder; give a file name, e.g. {out / 'predictions.jsonl'}")
        if out.exists() and not overwrite:
            raise RunDirError(f"'{out}' already exists; pass --overwrite to replace it or choose another --out")
    cfg = resolve(read_yaml(run_dir / "config.yaml"))
    retrieval = cfg.task["name"] == "retrieval"
    if not retrieval and gallery_path:
        raise ConfigError(f"--gallery is for retrieval runs; run '{run_dir}' was trained for task '{cfg.task['name']}'")
    if top < 1:
        raise ConfigError(f"--top must be at least 1 (got {top})")
    rows = read_rows(Path(data_path), run_specs(cfg))  # every row checked before the model loads
    gallery = read_gallery(Path(gallery_path)) if gallery_path else None
    cfg, bundle, model = load_run(run_dir, checkpoint)
    if retrieval and gallery is None:
        gallery = split_texts(bundle)
        if not gallery:
            raise DataError(f"run '{run_dir}': the test split has no target texts to search; pass --gallery FILE.jsonl")
    with progress_bar(err_console, not no_progress) as bar:
        advance = tasks(bar)("predicting", len(rows))
        records = rank_records(model, cfg, rows, gallery, top, progress=advance) if retrieval else \
            predict_records(model, cfg, rows, progress=advance)
    lines = [json.dumps(r) for r in records]
    if out_path is None:
        for line in lines:
            click.echo(line)
        return
    from fusionkit.training.checkpoint import atomic_write_text

    atomic_write_text(Path(out_path), "".join(line + "\n" for line in lines))
    err_console.print(f"wrote {len(lines)} predictions to {out_path}", highlight=False, markup=False)
