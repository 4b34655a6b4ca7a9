"""The README's embedding example is the file examples/embed_dms.py and runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_readme_example_is_the_example_file_and_runs():
    readme = (REPO / "README.md").read_text()
    example = (REPO / "examples" / "embed_dms.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert example in blocks, "README's embedding example drifted from examples/embed_dms.py"
    assert len([line for line in example.splitlines() if line.strip()]) <= 15
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "embed_dms.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # torch prints in scientific notation when a weight is tiny (the example draws a random model)
    number = r"(\d\.\d*(?:e[+-]\d+)?)"
    rows = re.findall(rf"\[\s*{number},\s*{number}\]", proc.stdout)
    assert len(rows) == 8, proc.stdout
    assert all(0 <= float(a) <= 1 and 0 <= float(b) <= 1 for a, b in rows)
    assert all(abs(float(a) + float(b) - 1.0) < 2e-4 for a, b in rows), proc.stdout


def test_readme_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    assert "scripts/setup.sh" in first_block and "fusionkit train --modalities image,text" in first_block
    assert "bash scripts/test.sh" in first_block
    assert (REPO / ".ci" / "run").read_text().count("scripts/test.sh") == 1


def test_readme_plugin_snippet_runs_next_to_the_installed_example_plugin(tmp_path):
    """The plugin section's Python block, saved as the file its command names, loads with
    --plugins beside the installed example plugin (no name clash) and trains as written."""
    import shlex

    from conftest import TINY, run_cli

    readme = (REPO / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "@register(" in b)
    command = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "--plugins my_scorer.py" in b)
    (tmp_path / "my_scorer.py").write_text(snippet)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "fusionkit"
    listing = run_cli("--plugins", "my_scorer.py", "list", "scorers", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "top_prob" in listing.stdout and "margin" in listing.stdout  # beside the installed plugin's scorer
    out = tmp_path / "run"
    proc = run_cli(*argv[1:], "--out", str(out), "--no-progress", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = run_cli("--plugins", "my_scorer.py", "config", "show", str(out), cwd=tmp_path).stdout
    assert "name: top_prob" in shown and "top_prob: 2.0" in shown
