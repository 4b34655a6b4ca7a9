"""``fusionkit retrieve``: rank a gallery of texts for one multimodal query with a retrieval run.

The query is one sample given by options (``--query-image x.png``, ``--query-text "..."``, or any
modality of the run as ``--input NAME=VALUE``); modalities left out are missing, as in training.
The gallery is the run's test-split target texts (each distinct text once), or a JSONL file
with a ``text`` per line (``--gallery FILE.jsonl``). The DMS probes score the query's
modalities against the gallery (the candidates), the fused query embedding is compared with
every gallery text by cosine similarity, and the ``--top`` best are printed with their scores.
"""

from __future__ import annotations

from pathlib import Path

import click

from fusionkit.errors import ConfigError, DataError, RunDirError


def read_gallery(path: Path) -> list[str]:
    """Texts of a JSONL gallery (``{"text": ...}`` per line, blank lines skipped); a DataError for
    a bad line or a file without items."""
    from fusionkit.prediction import jsonl_objects

    texts = []
    for n, row in jsonl_objects(path, "--gallery"):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"--gallery '{path}' line {n}: expected an object with a non-empty 'text'")
        texts.append(text.strip())
    if not texts:
        raise DataError(f"--gallery '{path}' has no items; give one {{\"text\": ...}} object per line")
    return texts


def split_texts(bundle) -> list[str]:
    """The distinct target texts of the test split, in split order."""
    from fusionkit.tasks.retrieval import target_text

    split = bundle.splits["test"]
    return list(dict.fromkeys(target_text(t, f"test sample {split.ids[i]!r}") for i, t in enumerate(split.targets)))


@click.command("retrieve")
@click.argument("run_dir", type=click.Path())
@click.option("--query-image", help="Image file for the 'image' modality of the query.")
@click.option("--query-text", help="Text for the 'text' modality of the query.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=VALUE", help="Any modality of the run (repeatable).")
@click.option("--top", type=int, default=5, show_default=True, help="How many matches to print.")
@click.option("--gallery", "gallery_path", type=click.Path(), help="JSONL file with a 'text' per line "
              "(default: the run's test-split target texts).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
def retrieve(run_dir, query_image, query_text, inputs, top, gallery_path, checkpoint):
    """Print the gallery texts that best match one query (a retrieval run)."""
    from fusionkit.cli.main import console, err_console
    from fusionkit.config import read_yaml, resolve
    from fusionkit.prediction import rank_records, run_specs, sample_rows
    from fusionkit.training.trainer import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"'{run_dir}' is not a run folder (no config.yaml)")
    if top < 1:
        raise ConfigError(f"--top must be at least 1 (got {top})")
    cfg = resolve(read_yaml(run_dir / "config.yaml"))
    if cfg.task["name"] != "retrieval":
        raise ConfigError(f"run '{run_dir}' was trained for task '{cfg.task['name']}', not retrieval; "
                          f"use 'fusionkit eval' or 'fusionkit generate'")
    given = {k: v for k, v in (("image", query_image), ("text", query_text)) if v is not None}
    for item in inputs:
        if "=" not in item:
            raise ConfigError(f"--input '{item}' must look like NAME=VALUE")
        k, v = item.split("=", 1)
        given[k.strip()] = v
    if not given:
        raise ConfigError("no query: pass --query-image, --query-text or --input NAME=VALUE")
    gallery = read_gallery(Path(gallery_path)) if gallery_path else None  # before loading the model
    rows = sample_rows(given, run_specs(cfg))
    cfg, bundle, model = load_run(run_dir, checkpoint)
    if gallery is None:
        gallery = split_texts(bundle)
        if not gallery:
            raise DataError(f"run '{run_dir}': the test split has no target texts to search; pass --gallery FILE.jsonl")
    (record,) = rank_records(model, cfg, rows, gallery, top)
    for rank, match in enumerate(record["matches"], start=1):
        console.print(f"{rank}. {match['score']:.4f}  {match['text']}", markup=False, highlight=False)
    weights = ", ".join(f"{m} {w:.3f}" for m, w in record["weights"].items())
    err_console.print(f"DMS weights: {weights}  ({len(gallery)} gallery texts)", markup=False, highlight=False)
