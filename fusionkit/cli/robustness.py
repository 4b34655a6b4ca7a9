"""``fusionkit robustness`` and ``fusionkit weights``: evaluate trained runs under corruption.

The library code lives in :mod:`fusionkit.robustness`; torch and matplotlib are imported inside
the commands so ``fusionkit --help`` stays fast. Nothing is ever written into a run folder.
Tables go to stdout and the progress bar to stderr, through the consoles of
:mod:`fusionkit.cli.main` (so piped tables keep their full width).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

LEVELS_HELP = "Comma-separated severities in [0, 1]."
CORRUPT_HELP = ("Corruption spec MODALITY:CORRUPTION (e.g. fou:gaussian_noise) or missing:MODALITY "
                "(repeatable; `fusionkit list corruptions` shows the names).")


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    from fusionkit.cli.terminal import table_title

    table = Table(title=table_title(title), title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 or name in ("fusion", "mean weights") else "right")
    for row in rows:
        table.add_row(*row)
    return table


@click.command("robustness")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--corrupt", "corrupt", multiple=True, required=True, metavar="MOD:NAME", help=CORRUPT_HELP)
@click.option("--levels", default="0,0.2,0.4,0.6,0.8,1.0", show_default=True, help=LEVELS_HELP)
@click.option("--protocol", type=click.Choice(["all", "random_subset"]), default="all", show_default=True,
              help="all: every spec corrupts every sample; random_subset: each named modality is "
                   "corrupted per sample with probability --p.")
@click.option("--p", "p", type=float, default=None,
              help="random_subset: probability that a named modality is corrupted in a sample [default: 0.5].")
@click.option("--baseline", type=click.Path(), help="Run for effective robustness (default: the first RUN_DIR).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes every corruption draw.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default: robustness/<first run>-<specs>).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs in an existing folder.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of tables.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def robustness(run_dirs, corrupt, levels, protocol, p, baseline, split, seed, out, overwrite, as_json, no_progress):
    """Accuracy, calibration and fusion weights of RUN_DIRs as corruption severity grows."""
    from fusionkit.cli.main import console, err_console
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.robustness import (
        LEVEL_HEADER,
        REPORT_FILES,
        SUMMARY_HEADER,
        check_output_dir,
        default_output_dir,
        level_rows,
        prepare_output_dir,
        robustness_report,
        summary_rows,
        title,
        write_report,
    )
    from fusionkit.training.run_folder import check_creatable, make_dir

    runs = [Path(r) for r in run_dirs] + ([Path(baseline)] if baseline else [])
    out_dir = check_output_dir(Path(out), overwrite, runs) if out else default_output_dir(runs, corrupt)
    check_creatable(out_dir, "robustness folder")  # before the evaluation: a bad --out fails in one line
    with progress_bar(err_console, not no_progress) as bar:
        report = robustness_report(run_dirs, corrupt, levels, protocol=protocol, p=p, baseline=baseline,
                                   split=split, seed=seed, progress=tasks(bar),
                                   log=lambda msg: err_console.print(msg, highlight=False, markup=False))
    write_report(report, prepare_output_dir(make_dir(out_dir, "robustness folder"), REPORT_FILES))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console.print(_table(title(report), SUMMARY_HEADER, summary_rows(report)))
        console.print(_table("per severity", LEVEL_HEADER, level_rows(report)))
    err_console.print(Text.assemble(("robustness folder ", "bold"), str(out_dir)), highlight=False, soft_wrap=True)


@click.command("weights")
@click.argument("run_dir", type=click.Path())
@click.option("--corrupt", "corrupt", multiple=True, required=True, metavar="MOD:NAME", help=CORRUPT_HELP)
@click.option("--levels", default="0,0.2,0.4,0.6,0.8,1.0", show_default=True, help=LEVELS_HELP)
@click.option("--samples", type=int, default=8, show_default=True,
              help="Samples (spread over the split) whose weights are shown clean vs at the highest level.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes every corruption draw.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default: robustness/<run>-<specs>-weights).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs in an existing folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def weights(run_dir, corrupt, levels, samples, split, seed, out, overwrite, no_progress):
    """Fusion weights of RUN_DIR under corruption: mean per modality vs severity, and per sample."""
    from fusionkit.cli.main import console, err_console
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.robustness import (
        WEIGHT_FILES,
        check_output_dir,
        default_output_dir,
        prepare_output_dir,
        weight_report,
        write_weights,
    )
    from fusionkit.training.run_folder import check_creatable, make_dir

    out_dir = check_output_dir(Path(out), overwrite, [Path(run_dir)], "weights") if out else \
        default_output_dir([Path(run_dir)], corrupt, "weights")
    check_creatable(out_dir, "weights folder")
    with progress_bar(err_console, not no_progress) as bar:
        report = weight_report(run_dir, corrupt, levels, samples=samples, split=split, seed=seed,
                               progress=tasks(bar))
    write_weights(report, prepare_output_dir(make_dir(out_dir, "weights folder"), WEIGHT_FILES))
    modalities = report["modalities"]
    rows = [[f"{x['severity']:g}", f"{x['accuracy']:.4f}", *(f"{x['mean_weights'][m]:.3f}" for m in modalities)]
            for x in report["mean_weights"]]
    console.print(_table(f"mean weights - {report['name']}: {', '.join(corrupt)}",
                         ["severity", "accuracy", *modalities], rows))
    signals = sorted({sig for x in report["mean_weights"] for sig in x["signals"]})
    if signals:  # the scale of each quality signal: mean (std) per modality, clean and at the top level
        scale = report["signal_scale"] or {}
        srows = []
        for sig in signals:
            for x in (report["mean_weights"][0], report["mean_weights"][-1]):
                per = x["signals"].get(sig, {})
                srows.append([sig, f"{x['severity']:g}",
                              *(f"{per[m]['mean']:.4g} ({per[m]['std']:.2g})" if m in per else "-" for m in modalities),
                              f"{scale[sig]['mean']:.4g} / {scale[sig]['std']:.3g}" if sig in scale else "raw"])
        console.print(_table("quality signals: mean (std) per modality; scheduler standardisation mean / std",
                             ["signal", "severity", *modalities, "standardised by"], srows))
    err_console.print(Text.assemble(("weights folder ", "bold"), str(out_dir)), highlight=False, soft_wrap=True)
