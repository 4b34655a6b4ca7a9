"""``fusionkit ablate``: the DMS ablation grid as one table."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="DMS run config (YAML).")
@click.option("--corrupt", "corrupt", multiple=True, required=True, metavar="MOD:NAME",
              help="Corruption for the robust column (repeatable), e.g. image:gaussian_noise.")
@click.option("--severity", type=float, default=0.8, show_default=True, help="Severity of the robust column.")
@click.option("--protocol", type=click.Choice(["all", "random_subset"]), default="all", show_default=True)
@click.option("--p", "p", type=float, default=None, help="random_subset probability.")
@click.option("--variants", default=None, help="Comma-separated subset of the grid (default: every variant that applies).")
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2 (default: the config's seed); "
              "rows show mean +/- std over them.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="New folder for runs and tables.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.argument("overrides", nargs=-1)
def ablate(config_path, corrupt, severity, protocol, p, variants, seeds, out, overwrite, no_progress, overrides):
    """Train the DMS ablation grid and tabulate clean vs corrupted accuracy."""
    from rich.table import Table

    from fusionkit.ablation import run_ablation, variant_configs
    from fusionkit.cli.main import console, err_console
    from fusionkit.cli.terminal import progress_bar, table_title, tasks
    from fusionkit.config import apply_override, load_raw
    from fusionkit.corruptions.base import check_severity
    from fusionkit.training.trainer import prepare_run_dir

    check_severity(severity, ", ".join(corrupt))  # names the --corrupt spec(s) it is for
    raw = load_raw(config_path)
    for item in overrides:
        apply_override(raw, item)
    from fusionkit.ablation import pm
    from fusionkit.errors import ConfigError

    names = [v.strip() for v in variants.split(",")] if variants else None
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: {seeds!r} must be integers separated by commas, e.g. 0,1,2") from None
    if seed_list is not None and (not seed_list or len(set(seed_list)) != len(seed_list)):
        raise ConfigError(f"--seeds: give distinct integers, e.g. 0,1,2 (got {seeds!r})")
    variant_configs(raw, names)  # every variant validates before anything is written
    out_dir = prepare_run_dir(Path(out), overwrite)
    with progress_bar(err_console, not no_progress) as bar:
        result = run_ablation(raw, out_dir, list(corrupt), severity, variants=names, seeds=seed_list,
                              protocol=protocol, p=p, overwrite=overwrite, progress=tasks(bar),
                              log=lambda s: err_console.print(s, style="dim", markup=False, highlight=False))
    table = Table(title=table_title(f"ablation: clean vs {', '.join(corrupt)} at severity {severity}, seeds "
                                    f"{result['seeds']}, accuracy in % ({out_dir})"))
    for col in ("variant", "clean acc", "corrupted acc", "drop (pts)", "AUC"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        table.add_row(r["variant"], pm(r["clean_accuracy"], r["clean_accuracy_std"]),
                      pm(r["corrupted_accuracy"], r["corrupted_accuracy_std"]),
                      pm(r["drop_points"], r["drop_points_std"], 1.0), pm(r["auc"], r["auc_std"]))
    console.print(table)
