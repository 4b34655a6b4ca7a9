"""``fusionkit generate``: text from a trained generative run (VQA answers, captions).

One sample from options (``--image x.png --text "what color is the shape?"``, any modality of the
run as ``--input NAME=VALUE``), or a whole JSONL file (``--data rows.jsonl --out answers.jsonl``,
one object per line with the run's modality names as keys; relative paths are read from the
file's folder; answers are not needed). Prints the generated text and the sample's DMS weights.
Rows are read and run exactly as by ``fusionkit predict`` (:mod:`fusionkit.prediction`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fusionkit.errors import ConfigError, RunDirError


def _not_generative(run_dir: Path, cfg) -> ConfigError:
    return ConfigError(f"run '{run_dir}' was trained for task '{cfg.task['name']}', which does not generate "
                       f"text; use 'fusionkit eval' for its metrics, or 'fusionkit predict' for new inputs")


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
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def generate(run_dir, image, text, audio, video, inputs, data_path, out_path, overwrite, checkpoint, no_progress):
    """Generate text (an answer, a caption) for one sample or a JSONL file of samples."""
    from fusionkit.cli.main import console, err_console
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.config import read_yaml, resolve
    from fusionkit.prediction import predict_records, read_rows, run_specs, sample_rows
    from fusionkit.registry import registry
    from fusionkit.training.trainer import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
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
    specs = run_specs(cfg)
    rows = read_rows(Path(data_path), specs) if data_path else sample_rows(given, specs)  # checked before loading
    cfg, _, model = load_run(run_dir, checkpoint)
    with progress_bar(err_console, not no_progress and len(rows) > 1) as bar:
        advance = tasks(bar)("generating", len(rows))
        records = predict_records(model, cfg, rows, progress=advance)
    results = [{"id": r["line"], "text": r["text"], "weights": r["weights"], "present": r["present"]} for r in records]
    if out_path:
        from fusionkit.training.checkpoint import atomic_write_text

        atomic_write_text(Path(out_path), "".join(json.dumps(r) + "\n" for r in results))
        err_console.print(f"wrote {len(results)} answers to {out_path}", highlight=False, markup=False)
        return
    for r in results:
        weights = ", ".join(f"{m} {w:.3f}" for m, w in r["weights"].items())
        console.print(r["text"], markup=False, highlight=False)
        err_console.print(f"DMS weights: {weights}", markup=False, highlight=False)
