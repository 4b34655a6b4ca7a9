"""``fusionkit data ...``: helpers for datasets on disk (the demo dataset)."""

from __future__ import annotations

import time

import click


@click.group()
def data():
    """Datasets on disk: write a demo dataset in the manifest format."""


@data.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n-per-class", type=click.IntRange(3, 178), default=60, show_default=True,
              help="Samples per digit (10 digits).")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes every random choice.")
@click.option("--overwrite", is_flag=True, help="Replace the demo files in a non-empty OUT_DIR.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def demo(out_dir, n_per_class, seed, overwrite, no_progress):
    """Write a small real image/text/audio/video dataset (handwritten digits) and its manifest."""
    from fusionkit.cli.main import console, err_console
    from fusionkit.cli.terminal import progress_bar, tasks
    from fusionkit.data.demo import write_demo

    t0 = time.perf_counter()
    with progress_bar(err_console, not no_progress) as bar:
        advance = tasks(bar)("writing samples", 10 * n_per_class)
        r = write_demo(out_dir, n_per_class=n_per_class, seed=seed, overwrite=overwrite, progress=advance)
    audio = ("espeak-ng speech" if r.audio_source == "espeak-ng"
             else "synthetic tone sequences (espeak-ng not found on PATH)")
    console.print(f"wrote {r.n_samples} samples to {r.out_dir} in {time.perf_counter() - t0:.1f}s "
                  f"(splits {r.split_sizes})", highlight=False, soft_wrap=True, markup=False)
    console.print(f"audio: {audio}; video codec: {r.video_codec}", highlight=False, soft_wrap=True)
    console.print(f"train: fusionkit train --data {r.out_dir / 'manifest.jsonl'} "
                  f"--modalities image,text,audio,video", highlight=False, soft_wrap=True)
