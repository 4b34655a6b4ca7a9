"""``fusionkit generate``: text from a trained generative run (VQA answers, captions).

One sample from options (``--image x.png --text "what color is the shape?"``, any modality of the
run as ``--input NAME=VALUE``), or a whole JSONL file (``--data rows.jsonl --out answers.jsonl``,
one object per line with the run's modality names as keys; relative paths are read from the
file's folder; answers are not needed). Prints the generated text and the sample's DMS weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fusionkit.errors import ConfigError, DataError, RunDirError


def _sample_value(kind: str, value: str, base: Path | None) -> Any:
    """A command-line or JSONL value -> what the run's dataset would hand its encoder."""
    from fusionkit.data import media

    if kind == "text":
        return value
    if not isinstance(value, str):
        raise DataError(f"a {kind} value must be a file path, got {type(value).__name__}")
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if kind == "image":
        return media.load_image(path)
    if kind == "audio":
        return media.load_audio(path, 16000)
    if kind == "video":
        return media.load_video(path, 8)[0]
    if kind == "vector":
        import numpy as np

        try:
            return np.load(path, allow_pickle=False).astype("float32")
        except (OSError, ValueError) as err:
            raise DataError(f"vector file '{path}' cannot be read: {err}") from None
    raise ConfigError(f"modality kind '{kind}' cannot be given on the command line")


def jsonl_objects(path: Path, option: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file given as ``option``;
    a one-line DataError for a missing file or a line that is not a JSON object."""
    if not path.is_file():
        raise DataError(f"{option} '{path}' is not a file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{option} '{path}' line {n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{option} '{path}' line {n}: expected a JSON object")
        rows.append((n, row))
    return rows


def _rows_from_jsonl(path: Path, modalities: dict) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, row in jsonl_objects(path, "--data"):
        values = {m: (None if row.get(m) in (None, "") else _sample_value(spec.kind, row[m], path.parent))
                  for m, spec in modalities.items()}
        if all(v is None for v in values.values()):
            raise DataError(f"--data '{path}' line {n}: none of the run's modalities {sorted(modalities)} is present")
        rows.append((n, values))
    if not rows:
        raise DataError(f"--data '{path}' is empty")
    return rows


def _not_generative(run_dir: Path, cfg) -> ConfigError:
    return ConfigError(f"run '{run_dir}' was trained for task '{cfg.task['name']}', which does not generate "
                       f"text; use 'fusionkit eval' for its metrics")


def generate_rows(run_dir: Path, rows: list[tuple[Any, dict[str, Any]]], checkpoint: str = "best",
                  batch_size: int | None = None, progress=None) -> list[dict[str, Any]]:
    """Generate for ``rows`` (``(id, {modality: raw value or None})``) with the run's model."""
    from torch.utils.data import DataLoader

    from fusionkit.data.loader import Collate, EncodedDataset
    from fusionkit.datasets.base import MultimodalSplit
    from fusionkit.training.trainer import load_run

    cfg, bundle, model = load_run(run_dir, checkpoint)
    if not model.task.generative:
        raise _not_generative(run_dir, cfg)
    columns = {m: [values.get(m) for _, values in rows] for m in model.modalities}
    split = MultimodalSplit(columns, [None] * len(rows), [ident for ident, _ in rows])
    encoders = dict(model.encoders.items())
    loader = DataLoader(EncodedDataset(split, encoders), batch_size=batch_size or cfg.train.batch_size,
                        collate_fn=Collate(encoders, model.task.collate_targets))
    results = []
    for batch in loader:
        z, tokens = model.encode(batch)
        fused = model.fusion(z, batch["mask"])
        texts = model.decoder.generate(fused, tokens, batch)
        for i, text in enumerate(texts):
            idx = int(batch["index"][i])
            results.append({"id": split.ids[idx], "text": text,
                            "weights": {m: round(float(fused.weights[i, j]), 4) for j, m in enumerate(model.modalities)},
                            "present": [m for j, m in enumerate(model.modalities) if bool(fused.mask[i, j])]})
        if progress is not None:
            progress(len(texts))
    return results


@click.command("generate")
@click.argument("run_dir", type=click.Path())
@click.option("--image", help="Image file for the 'image' modality.")
@click.option("--text", help="Text for the 'text' modality (e.g. the question).")
@click.option("--audio", help="Audio file for the 'audio' modality.")
@click.option("--video", help="Video file for the 'video' modality.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=VALUE", help="Any modality of the run (repeatable).")
@click.option("--data", "data_path", type=click.Path(), help="JSONL file: one sample per line, modality columns.")
@click.option("--out", "out_path", type=click.Path(), help="With --data: write one JSON line per sample here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--checkpoint", default="best", show_default=True, help="best or last.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def generate(run_dir, image, text, audio, video, inputs, data_path, out_path, overwrite, checkpoint, no_progress):
    """Generate text (an answer, a caption) for one sample or a JSONL file of samples."""
    import sys

    from rich.progress import Progress

    from fusionkit.cli.main import console, err_console
    from fusionkit.training.trainer import load_run  # noqa: F401  (fails fast on a bad run folder below)

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
    from fusionkit.config import read_yaml, resolve
    from fusionkit.registry import registry
    from fusionkit.training.trainer import load_data

    given = {k: v for k, v in (("image", image), ("text", text), ("audio", audio), ("video", video)) if v is not None}
    for item in inputs:
        if "=" not in item:
            raise ConfigError(f"--input '{item}' must look like NAME=VALUE")
        k, v = item.split("=", 1)
        given[k.strip()] = v
    if data_path and given:
        raise ConfigError("give either --data FILE or per-modality values (--image, --text, --input), not both")
    if not data_path and not given:
        raise ConfigError("nothing to generate from: pass --image/--text/--audio/--video/--input or --data FILE")
    if out_path and not data_path:
        raise ConfigError("--out goes with --data (one sample prints to the terminal)")
    if out_path and Path(out_path).exists() and not overwrite:
        raise RunDirError(f"'{out_path}' already exists; pass --overwrite to replace it or choose another --out")
    cfg = resolve(read_yaml(run_dir / "config.yaml"))
    if not registry("tasks").get(cfg.task["name"]).generative:  # before the inputs: none of them could help
        raise _not_generative(run_dir, cfg)
    modalities = load_data(cfg).modalities
    if data_path:
        rows = _rows_from_jsonl(Path(data_path), modalities)
    else:
        unknown = sorted(set(given) - set(modalities))
        if unknown:
            raise ConfigError(f"this run's modalities are {sorted(modalities)}; it has no {unknown}")
        rows = [(0, {m: (_sample_value(modalities[m].kind, given[m], None) if m in given else None)
                     for m in modalities})]
    with Progress(console=err_console, disable=no_progress or len(rows) == 1 or not sys.stderr.isatty()) as bar:
        task = bar.add_task("generating", total=len(rows))
        results = generate_rows(run_dir, rows, checkpoint, progress=lambda n: bar.advance(task, n))
    if out_path:
        from fusionkit.training.checkpoint import atomic_write_text

        atomic_write_text(Path(out_path), "".join(json.dumps(r) + "\n" for r in results))
        err_console.print(f"wrote {len(results)} answers to {out_path}")
        return
    for r in results:
        weights = ", ".join(f"{m} {w:.3f}" for m, w in r["weights"].items())
        console.print(r["text"], markup=False, highlight=False)
        err_console.print(f"DMS weights: {weights}", markup=False, highlight=False)
