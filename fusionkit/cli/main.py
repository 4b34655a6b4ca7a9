"""The ``fusionkit`` command line (click).

User mistakes (a bad key, an unknown component, a missing file) print one line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fusionkit.errors import ConfigError, FusionkitError

# piped output (scripts, tests): tables keep their natural width, never wrapped or cut with "..."
# (a console width is only a maximum; nothing fusionkit prints pads lines to it)
PIPE_WIDTH = 100_000
console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)


def _modality_list(text: str) -> list[str]:
    """``--modalities image,text`` as a list; an empty value or an empty name is a one-line error."""
    names = [m.strip() for m in text.split(",")]
    if not any(names):
        raise ConfigError("--modalities is empty; give e.g. image,text")
    if "" in names:
        raise ConfigError(f"--modalities {text!r} has an empty name; separate names with single commas, "
                          "e.g. image,text")
    return names


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
@click.option("--resume", "resume", type=click.Path(file_okay=False),
              help="Continue the interrupted run in this folder after its last saved epoch, as its config.yaml "
                   "says (overrides may only change where it runs: runtime.threads, runtime.accelerator ...).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--cache-features", is_flag=True,
              help="Compute frozen encoders' outputs once, on disk (~/.cache/fusionkit/features), and reuse them.")
@click.argument("overrides", nargs=-1)
def train(config_path, data_path, on_bad_sample, modalities, fusion, epochs, seed, out, overwrite, resume,
          no_progress, cache_features, overrides):
    """Train a model; OVERRIDES are key.path=value pairs (e.g. train.lr=3e-4)."""
    from fusionkit.config import apply_override, load_raw, resolve
    from fusionkit.datasets.base import untrained_class_warning
    from fusionkit.training.resume import check_resumable, check_resume_config, run_config
    from fusionkit.training.run_folder import RunLock, recover_run_dir
    from fusionkit.training.trainer import load_data, next_free_dir, prepare_run_dir, seed_and_build
    from fusionkit.training.trainer import train as run_train

    for option, value in (("--config", config_path), ("--data", data_path), ("--fusion", fusion), ("--out", out)):
        if value is not None and not value.strip():  # e.g. an unset shell variable: never silently the default
            raise ConfigError(f"{option} is empty; give a value or leave the option out")
    if resume and (config_path or out or overwrite):
        raise ConfigError("--resume continues a run as its own config.yaml says, in its own folder: "
                          "leave out --config, --out and --overwrite")
    raw = run_config(Path(resume)) if resume else load_raw(config_path)
    if modalities is not None:
        raw["modalities"] = _modality_list(modalities)
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
    extra += [f"train.epochs={epochs}"] if epochs is not None else []
    extra += [f"seed={seed}"] if seed is not None else []
    for item in [*extra, *overrides]:
        apply_override(raw, item)
    cfg = resolve(raw)
    worker = os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("FUSIONKIT_RUN_DIR")
    if resume and not worker:  # before any data is loaded: a finished run or a changed model fails fast
        check_resume_config(Path(resume), cfg)
        check_resumable(Path(resume))
    bundle = load_data(cfg)  # before the run folder exists: bad data or a bad model leaves nothing behind
    if (summary := bundle.info.get("summary")) and not worker:  # which column became which modality
        err_console.print(summary, highlight=False, soft_wrap=True, markup=False)
    if (warning := untrained_class_warning(bundle)) and os.environ.get("LOCAL_RANK", "0") == "0":
        err_console.print(Text.assemble(("warning: ", "yellow"), warning), highlight=False, soft_wrap=True)
    model = seed_and_build(cfg, bundle)
    if worker:  # a DDP worker re-launched by Fabric: rank 0 already chose, locked and created the folder
        run_dir = Path(os.environ["FUSIONKIT_RUN_DIR"])
    else:
        name = f"{cfg.data['name']}-{'+'.join(cfg.modalities)}-{cfg.model.fusion['name']}-seed{cfg.seed}"
        run_dir = Path(resume or out or next_free_dir(Path("runs") / name))
    try:
        # the lock is held for the whole run: a second process training into run_dir stops here
        with contextlib.nullcontext() if worker else RunLock(run_dir) as lock:
            if resume and not worker:
                recover_run_dir(run_dir)  # a checkpoint swap or a write that a crash cut short
                check_resumable(run_dir)
            elif not worker:
                prepare_run_dir(run_dir, overwrite=overwrite and bool(out))
            os.environ["FUSIONKIT_RUN_DIR"] = str(run_dir.resolve())
            if not worker:
                err_console.print(Text.assemble(("run folder ", "bold"), str(run_dir)), highlight=False, soft_wrap=True)
            result = run_train(cfg, run_dir, console=err_console,
                               show_progress=not no_progress,  # a bar on a terminal, else a line per epoch
                               bundle=bundle, model=model, resume=bool(resume), lock=lock)
    except KeyboardInterrupt:
        if not worker:
            err_console.print(f"interrupted; `fusionkit train --resume {run_dir}` continues after the last "
                              f"saved epoch", highlight=False, soft_wrap=True, markup=False)
        sys.exit(130)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _print_result_table(result.test, f"test results (best epoch {result.best_epoch}) - {run_dir}",
                            result.calibration)
        _print_skipped(result.skipped, run_dir / "skipped.json")


def _print_skipped(rows: list[dict], path: Path | None, limit: int = 50) -> None:
    """Say how many rows were left out and which (manifest ids are line numbers)."""
    if not rows:
        return
    where = f"; all of them in {path}" if path else ""
    err_console.print(Text.assemble((f"skipped {len(rows)} row(s)", "yellow"), where), highlight=False, soft_wrap=True)
    for row in rows[:limit]:
        split = f" ({row['split']})" if row.get("split") else ""
        err_console.print(f"  line {row['id']}{split} [{row['stage']}]: {row['reason']}",
                          highlight=False, soft_wrap=True, markup=False)
    if len(rows) > limit:
        err_console.print(f"  ... and {len(rows) - limit} more")


def _print_result_table(metrics: dict, title: str, calibration: dict | None = None) -> None:
    """Fused and per-head accuracy with mean weights; with ``calibration`` (a training result), each
    head's temperature and its ECE before and after on the validation split, and test ECE."""
    from fusionkit.cli.terminal import table_title

    table = Table(title=table_title(title))  # Text: a run folder like runs/[a] is not markup, nor wrapped
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
        row = [Text(f"{m} {'probe' if generative else 'head'}"), fmt(acc), f"{metrics['mean_weights'][m]:.3f}",
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
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_cmd(run_dir, split, checkpoint, as_json, no_progress):
    """Evaluate a trained run folder on a split."""
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.evaluation import collect, summarize
    from fusionkit.training.trainer import load_run, make_loader, skipped_rows, track_skipped

    cfg, bundle, model = load_run(Path(run_dir), checkpoint)
    loader = make_loader(model, bundle.splits[split], cfg, shuffle=False)
    seen: dict = {}
    with progress_bar(err_console, not no_progress) as bar:
        advance = tasks(bar)(f"evaluating {split}", len(bundle.splits[split]))
        c = collect(model, track_skipped(loader, split, seen), progress=advance)
    metrics = summarize(c, model.modalities, model.task)
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
    kinds = [registry(kind).kind] if kind is not None else sorted(REGISTRIES)
    for k in kinds:
        table = Table(title=k, title_justify="left", show_header=True)
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("from")
        for entry in registry(k).entries():
            # Text, not str: a docstring's "[z_1; ...; z_M]" or ":x:" is shown as written, not as markup
            table.add_row(Text(entry.name), Text(entry.description), Text(entry.source))
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
from fusionkit.cli.predict import predict  # noqa: E402

cli.add_command(predict)

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
        # Text, not markup: the message quotes user input ("got '[fou,,kar]'", paths, names)
        err_console.print(Text.assemble(("error:", "red"), " ", str(err)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as err:
        err.show()  # `fusionkit` alone: the help text
        sys.exit(err.exit_code)
    except click.UsageError as err:  # a bad option or command: one line, like every other user mistake
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        message = " ".join(err.format_message().split())
        err_console.print(Text.assemble(("error:", "red"), f" {message}{where}"), highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
