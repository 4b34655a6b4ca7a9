"""The ``fusionkit`` command line (click).

User mistakes (a bad key, an unknown component, a missing file) print one line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fusionkit.errors import FusionkitError

# piped output (scripts, tests) gets wide lines instead of wrapped table cells
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _load_plugins(plugins: tuple[str, ...]) -> None:
    from fusionkit.registry import load_plugin

    for spec in plugins:
        for item in spec.split(","):
            if item.strip():
                load_plugin(item.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plugins", "plugins", multiple=True, metavar="MODULE|FILE.py",
              help="Load a plugin module or .py file before running (repeatable, or comma-separated).")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="fusionkit")
@click.pass_context
def cli(ctx: click.Context, plugins: tuple[str, ...], debug: bool) -> None:
    """fusionkit: fuse any number of modalities with weights chosen per sample."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _load_plugins(plugins)


# -- train ---------------------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML run config.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False),
              help="Your own manifest (.jsonl/.csv): shorthand for data={name: manifest, path: PATH}.")
@click.option("--on-bad-sample", type=click.Choice(["error", "skip"]),
              help="With --data: stop at a bad row/file (error) or leave it out and report it (skip).")
@click.option("--modalities", help="Comma-separated modalities, e.g. image,text.")
@click.option("--fusion", help="Fusion policy name (dms, mean, concat, ...).")
@click.option("--epochs", type=int, help="Training epochs.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<dataset>-<modalities>-<fusion>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--cache-features", is_flag=True,
              help="Compute frozen encoders' outputs once, on disk (~/.cache/fusionkit/features), and reuse them.")
@click.argument("overrides", nargs=-1)
def train(config_path, data_path, on_bad_sample, modalities, fusion, epochs, seed, out, overwrite, no_progress,
          cache_features, overrides):
    """Train a model; OVERRIDES are key.path=value pairs (e.g. train.lr=3e-4)."""
    from fusionkit.config import apply_override, load_raw, resolve
    from fusionkit.training.trainer import load_data, next_free_dir, prepare_run_dir, seed_and_build
    from fusionkit.training.trainer import train as run_train

    raw = load_raw(config_path)
    if fusion:
        current = (raw.get("model") or {}).get("fusion")
        current_name = current.get("name") if isinstance(current, dict) else current
        if current_name != fusion:  # a new policy must not inherit the old one's parameters
            raw.setdefault("model", {})["fusion"] = {"name": fusion}
    if data_path:
        # absolute, so the run folder's config.yaml stays valid from any directory; other keys of
        # a manifest block from --config (sample_rate, classes ...) are kept
        current = raw.get("data")
        keep = current if isinstance(current, dict) and current.get("name") == "manifest" else {}
        raw["data"] = {**keep, "name": "manifest", "path": str(Path(data_path).expanduser().resolve())}
    extra = [f"data.on_bad_sample={on_bad_sample}"] if on_bad_sample else []
    extra += ["train.cache_features=true"] if cache_features else []
    extra += [f"modalities=[{modalities}]"] if modalities else []
    extra += [f"train.epochs={epochs}"] if epochs is not None else []
    extra += [f"seed={seed}"] if seed is not None else []
    for item in [*extra, *overrides]:
        apply_override(raw, item)
    cfg = resolve(raw)
    bundle = load_data(cfg)  # before the run folder exists: bad data or a bad model leaves nothing behind
    model = seed_and_build(cfg, bundle)
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("FUSIONKIT_RUN_DIR"):
        # a DDP worker re-launched by Fabric: rank 0 already chose and created the folder
        run_dir = Path(os.environ["FUSIONKIT_RUN_DIR"])
    elif out:
        run_dir = prepare_run_dir(Path(out), overwrite)
    else:
        name = f"{cfg.data['name']}-{'+'.join(cfg.modalities)}-{cfg.model.fusion['name']}-seed{cfg.seed}"
        run_dir = prepare_run_dir(next_free_dir(Path("runs") / name), overwrite=False)
    os.environ["FUSIONKIT_RUN_DIR"] = str(run_dir.resolve())
    if os.environ.get("LOCAL_RANK", "0") == "0":
        err_console.print(f"[bold]run folder[/] {run_dir}")
    result = run_train(cfg, run_dir, console=err_console, show_progress=not no_progress, bundle=bundle, model=model)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _print_result_table(result.test, f"test results (best epoch {result.best_epoch}) - {run_dir}",
                            result.calibration)
        _print_skipped(result.skipped, run_dir / "skipped.json")


def _print_skipped(rows: list[dict], path: Path | None, limit: int = 50) -> None:
    """Say how many rows were left out and which (manifest ids are line numbers)."""
    if not rows:
        return
    where = f"; all of them in {path}" if path else ""
    err_console.print(f"[yellow]skipped {len(rows)} row(s)[/]{where}", highlight=False, soft_wrap=True)
    for row in rows[:limit]:
        split = f" ({row['split']})" if row.get("split") else ""
        err_console.print(f"  line {row['id']}{split} [{row['stage']}]: {row['reason']}",
                          highlight=False, soft_wrap=True, markup=False)
    if len(rows) > limit:
        err_console.print(f"  ... and {len(rows) - limit} more")


def _print_result_table(metrics: dict, title: str, calibration: dict | None = None) -> None:
    """Fused and per-head accuracy with mean weights; with ``calibration`` (a training result), each
    head's temperature and its ECE before and after on the validation split, and test ECE."""
    table = Table(title=title)
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("mean weight", justify="right")
    table.add_column("head ECE (test)", justify="right")
    if calibration:
        table.add_column("temperature", justify="right")
        table.add_column("val ECE before -> after", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    generative = "vqa_accuracy" in metrics or "cider" in metrics
    what = " (generated answers)" if "vqa_accuracy" in metrics else " (generated captions: CIDEr)" \
        if "cider" in metrics else " (mean R@1)" if "q2t_r1" in metrics else ""
    table.add_row("[bold]fused[/]" + what, fmt(metrics["accuracy"]), "", fmt(metrics.get("ece")))
    for m, acc in metrics["unimodal_accuracy"].items():
        row = [f"{m} {'probe' if generative else 'head'}", fmt(acc), f"{metrics['mean_weights'][m]:.3f}",
               fmt(metrics.get("unimodal_ece", {}).get(m))]
        if calibration:
            c = calibration.get(m, {})
            row += [f"{c.get('temperature', 1.0):.3f}", f"{fmt(c.get('ece_before'))} -> {fmt(c.get('ece_after'))}"]
        table.add_row(*row)
    console.print(table)
    if "vqa_accuracy" in metrics:
        per_type = "  ".join(f"{t}={v['accuracy']:.4f} (n={v['n']})" for t, v in metrics.get("per_type", {}).items())
        console.print(f"n={metrics['n']}  vqa_accuracy={metrics['vqa_accuracy']:.4f}  "
                      f"exact_match={metrics['exact_match']:.4f}  answer nll={fmt(metrics['nll'])}  {per_type}")
    elif "cider" in metrics or "q2t_r1" in metrics:  # captioning, retrieval: their own metrics
        keys = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider") if "cider" in metrics else \
            tuple(f"{d}_{k}" for d in ("q2t", "t2q") for k in ("r1", "r5", "r10", "median_rank"))
        console.print(f"n={metrics['n']}  " + "  ".join(f"{k}={fmt(metrics[k])}" for k in keys)
                      + (f"  caption nll={fmt(metrics['nll'])}" if "cider" in metrics else ""))
    else:
        console.print(f"n={metrics['n']}  nll={metrics['nll']:.4f}  ece={metrics['ece']:.4f}")


# -- eval ----------------------------------------------------------------------------------
@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--checkpoint", default="best", show_default=True, help="best or last.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_cmd(run_dir, split, checkpoint, as_json):
    """Evaluate a trained run folder on a split."""
    from fusionkit.evaluation import collect, summarize
    from fusionkit.training.trainer import load_run, make_loader, skipped_rows, track_skipped

    cfg, bundle, model = load_run(Path(run_dir), checkpoint)
    loader = make_loader(model, bundle.splits[split], cfg, shuffle=False)
    seen: dict = {}
    metrics = summarize(collect(model, track_skipped(loader, split, seen)), model.modalities, model.task)
    _print_skipped([r for r in skipped_rows(bundle, seen) if r.get("split") in (split, None)], None)
    metrics = {"split": split, **metrics}
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        _print_result_table(metrics, f"{split} results - {run_dir}")


# -- list ----------------------------------------------------------------------------------
@cli.command("list")
@click.argument("kind", required=False)
def list_cmd(kind):
    """List registered components (all kinds, or one KIND)."""
    from fusionkit.registry import REGISTRIES, load_entry_point_plugins, registry

    load_entry_point_plugins()
    kinds = [registry(kind).kind] if kind else sorted(REGISTRIES)
    for k in kinds:
        table = Table(title=k, title_justify="left", show_header=True)
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("from")
        for entry in registry(k).entries():
            table.add_row(entry.name, entry.description, entry.source)
        console.print(table)


# -- config --------------------------------------------------------------------------------
@cli.group()
def config():
    """Inspect configs."""


@config.command("show")
@click.argument("target", type=click.Path())
@click.argument("overrides", nargs=-1)
def config_show(target, overrides):
    """Print the resolved config of a run folder or YAML file (with OVERRIDES applied)."""
    from fusionkit.config import load_raw, resolve, to_yaml

    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FusionkitError(f"'{path}' is not a run folder (no config.yaml)")
        path = path / "config.yaml"
    click.echo(to_yaml(resolve(load_raw(path, list(overrides)))), nl=False)


# -- robustness, weights (own file: fusionkit/cli/robustness.py) ---------------------------
from fusionkit.cli.robustness import robustness, weights  # noqa: E402

cli.add_command(robustness)
cli.add_command(weights)

from fusionkit.cli.ablate import ablate  # noqa: E402
from fusionkit.cli.generate import generate  # noqa: E402
from fusionkit.cli.retrieve import retrieve  # noqa: E402

cli.add_command(generate)
cli.add_command(retrieve)

cli.add_command(ablate)

# -- data (own file: fusionkit/cli/data.py) -------------------------------------------------
from fusionkit.cli.data import data  # noqa: E402

cli.add_command(data)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors with exit code 2 for user mistakes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="fusionkit", standalone_mode=False)
    except FusionkitError as err:
        if debug:
            raise
        err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
