"""Progress bars and piped tables of the long commands.

A bar is drawn on stderr only when stderr is a terminal: the tests inject a console that claims
to be one (``force_terminal=True``) or set ``FORCE_COLOR=1`` for the console script; piped
(the in-process runs' captured stderr, a subprocess) and ``--no-progress`` draw nothing. Tables
printed to a pipe keep their natural width, so a long run path stays on one line.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from conftest import TINY, run_cli
from fusionkit.cli.main import err_console as PIPED_ERR_CONSOLE
from test_vqa_task import fusionkit

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def bars(text: str) -> list[str]:
    """The progress-bar lines in ``text`` (a run of bar glyphs, then a count ``done/total``)."""
    return re.findall(r"[━╸╺]+ +\d+/\d+", ANSI.sub("", text))


@pytest.fixture(autouse=True)
def no_forced_terminal(monkeypatch):
    """A developer's or CI's FORCE_COLOR / TTY_COMPATIBLE would make rich treat every pipe as a terminal."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)


@pytest.fixture(scope="module")
def vector_rows(tmp_path_factory) -> Path:
    """Three unlabelled rows for the tiny run (views fou: 76 values, kar: 64); the last lacks kar."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows = [{"fou": [0.1] * 76, "kar": [0.0] * 64}, {"fou": [0.0] * 76, "kar": [0.2] * 64}, {"fou": [0.3] * 76}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def commands(run: Path, rows: Path, tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """Each long command on the tiny run: its arguments, a bar's label and its count when it ends."""
    return {
        "eval": (["eval", str(run)], "evaluating test", "400/400"),
        "robustness": (["robustness", str(run), "--corrupt", "fou:gaussian_noise", "--levels", "0,1",
                        "--out", str(tmp / "r")], str(run), "800/800"),  # one bar per run: 2 levels x 400
        "weights": (["weights", str(run), "--corrupt", "fou:gaussian_noise", "--levels", "0,1", "--samples", "2",
                     "--out", str(tmp / "w")], str(run), "800/800"),
        "predict": (["predict", str(run), "--data", str(rows)], "predicting", "3/3"),
        "data demo": (["data", "demo", str(tmp / "demo"), "--n-per-class", "3"], "writing samples", "30/30"),
        "ablate": (["ablate", "--corrupt", "fou:gaussian_noise", "--severity", "0.5", "--variants", "full",
                    "--out", str(tmp / "a"), "modalities=[fou,kar]", *TINY], "training runs", "1/1"),
    }


def run_on(monkeypatch, stderr: Console | None, args: list[str]) -> tuple[str, str]:
    """Run the CLI in this process with ``stderr`` as its stderr console (None: the real one, which
    writes to this process's captured, non-terminal stderr): ``(stdout, what stderr received)``."""
    monkeypatch.setattr("fusionkit.cli.main.err_console", stderr or PIPED_ERR_CONSOLE)
    code, stdout, err = fusionkit(*args)
    shown = stderr.file.getvalue() if stderr is not None else err
    assert code == 0, err + shown
    return stdout, shown


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


@pytest.mark.parametrize("command", ["eval", "robustness", "weights", "predict", "data demo", "ablate"])
def test_long_commands_draw_a_bar_on_a_terminal_only(command, tiny_run, vector_rows, tmp_path, monkeypatch):
    args, label, count = commands(tiny_run, vector_rows, tmp_path / "terminal")[command]
    stdout, shown = run_on(monkeypatch, terminal(), args)
    assert bars(shown) and label in shown and count in ANSI.sub("", shown)  # the bar, at its total at the end
    assert not bars(stdout) and label not in stdout  # results never mix with the bar

    args, _, _ = commands(tiny_run, vector_rows, tmp_path / "quiet")[command]
    _, shown = run_on(monkeypatch, terminal(), [*args, "--no-progress"])
    assert not bars(shown) and "\x1b[?25l" not in shown  # not even the hidden cursor of a live display

    args, _, _ = commands(tiny_run, vector_rows, tmp_path / "piped")[command]
    _, shown = run_on(monkeypatch, None, args)
    assert not bars(shown) and "\x1b[" not in shown  # piped: no bar, no escape codes


def test_console_script_draws_no_bar_into_a_pipe_and_one_with_force_color(tiny_run, tmp_path):
    proc = run_cli("eval", str(tiny_run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing but the results, which go to stdout
    assert "test results" in proc.stdout

    proc = run_cli("eval", str(tiny_run), env={"FORCE_COLOR": "1"})  # rich: FORCE_COLOR means "a terminal"
    assert proc.returncode == 0, proc.stderr
    assert bars(proc.stderr) and "evaluating test" in proc.stderr and "400/400" in ANSI.sub("", proc.stderr)


def test_train_draws_no_bar_into_a_pipe(tmp_path):
    proc = run_cli("train", "--modalities", "fou,kar", "--out", str(tmp_path / "run"), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert not bars(proc.stderr) and "epochs" not in proc.stderr and "\x1b[" not in proc.stderr


# -- tables printed to a pipe ------------------------------------------------------------------
def test_the_piped_console_keeps_a_long_cell_on_one_line(capsys):
    from fusionkit.cli.main import console

    value = "x" * 300 + "-end"
    table = Table(title="t")
    table.add_column("name")
    table.add_column("value")
    table.add_row("a", value)
    console.print(table)
    out = capsys.readouterr().out
    assert any(value in line for line in out.splitlines()) and "…" not in out


@pytest.fixture
def long_run(tiny_run, tmp_path) -> Path:
    """The tiny run copied to a folder whose path is over 200 characters long."""
    run = tmp_path / ("a-run-folder-with-a-long-name-" + "x" * 180)
    shutil.copytree(tiny_run, run)
    return run


def test_eval_and_robustness_tables_keep_a_long_run_path_whole(long_run, tmp_path):
    code, stdout, err = fusionkit("eval", str(long_run))
    assert code == 0, err
    assert f"test results - {long_run}" in stdout.splitlines()  # the title: one line, not wrapped
    assert "…" not in stdout

    code, stdout, err = fusionkit("robustness", str(long_run), "--corrupt", "fou:gaussian_noise", "--levels", "0,1",
                                  "--out", str(tmp_path / "r"))
    assert code == 0, err
    rows = [line for line in stdout.splitlines() if line.startswith(f"│ {long_run.name} ")]
    assert len(rows) == 1 + 2  # the summary row and one row per level, each whole on its line
    assert all(re.search(r"fou \d\.\d\d, kar \d\.\d\d", line) for line in rows[1:])  # mean weights, same line
    assert "…" not in stdout
