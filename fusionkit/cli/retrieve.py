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
    from fusionkit.cli.generate import jsonl_objects

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
@click.option("--checkpoint", default="best", show_default=True, help="best or last.")
def retrieve(run_dir, query_image, query_text, inputs, top, gallery_path, checkpoint):
    """Print the gallery texts that best match one query (a retrieval run)."""
    import torch

    from fusionkit.cli.generate import _sample_value
    from fusionkit.cli.main import console, err_console
    from fusionkit.config import read_yaml, resolve
    from fusionkit.data.loader import Collate
    from fusionkit.tasks.retrieval import embed_queries
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
    cfg, bundle, model = load_run(run_dir, checkpoint)
    unknown = sorted(set(given) - set(bundle.modalities))
    if unknown:
        raise ConfigError(f"this run's modalities are {sorted(bundle.modalities)}; it has no {unknown}")
    if gallery is None:
        gallery = split_texts(bundle)
        if not gallery:
            raise DataError(f"run '{run_dir}': the test split has no target texts to search; pass --gallery FILE.jsonl")
    encoders = dict(model.encoders.items())
    item = {m: (encoders[m].preprocess(_sample_value(bundle.modalities[m].kind, given[m], None)) if m in given
                else None) for m in model.modalities}
    batch = Collate(encoders, model.task.collate_targets)([{"inputs": item, "target": None, "index": 0}])
    with torch.no_grad():
        candidates = model.decoder.embed_texts(gallery)  # (N, E)
        query, fused = embed_queries(model, batch, candidates)  # (1, E)
        scores = (query @ candidates.T)[0]  # (N,): cosine similarity
    best = scores.topk(min(top, len(gallery)))
    for rank, (score, j) in enumerate(zip(best.values.tolist(), best.indices.tolist()), start=1):
        console.print(f"{rank}. {score:.4f}  {gallery[j]}", markup=False, highlight=False)
    weights = ", ".join(f"{m} {float(fused.weights[0, j]):.3f}" for j, m in enumerate(model.modalities))
    err_console.print(f"DMS weights: {weights}  ({len(gallery)} gallery texts)", markup=False, highlight=False)
