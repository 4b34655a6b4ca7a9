"""The hostile-input catalogue: each bad input goes through the real command line and must end
in exit code 2 with exactly one line on stderr that names the fix, no traceback, and (for
``train`` and ``ablate``) no run folder left behind.

Each case runs in-process (``main([...])``), so the catalogue costs no interpreter start-ups; the
one case that has to train runs the console script. Every case here except the two plugin
modules that do not exist failed before issue 11 (a traceback, a silently accepted value that
started a run, a message eaten by rich markup, or a four-line usage error).
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_cli
from fusionkit.cli.main import main

# Files the cases point at, written into the test's working directory.
FILES: dict[str, bytes] = {
    "latin1.yaml": "model:\n  dim: 16  # \u00e9t\u00e9\n".encode("latin-1"),
    "utf16.yaml": "seed: 1\n".encode("utf-16"),  # starts with the byte-order mark ff fe
    "dup.yaml": b"train: {epochs: 1}\ntrain: {lr: 0.5}\n",
    "boom.py": b"x = 1\ny = 2\nz = 1 / 0\n",
    "syntax.py": b"def f(:\n    pass\n",
    "missing_dep.py": b"import fusionkit_no_such_dependency\n",
    "clash.py": b"from fusionkit.fusions.mean import MeanFusion\nfrom fusionkit.registry import register\n\n"
                b"@register('fusions', 'dms')\nclass Clash(MeanFusion):\n    '''Takes a core name.'''\n",
    # registers a fusion, then fails: nothing of it may stay registered
    "half.py": b"from fusionkit.fusions.mean import MeanFusion\nfrom fusionkit.registry import register\n\n"
               b"@register('fusions', 'hostile_half')\nclass Half(MeanFusion):\n    '''Half loaded.'''\n\n"
               b"raise RuntimeError('after registering')\n",
    "plugin_boom.yaml": b"plugins: [boom.py]\n",
    "plugin_syntax.yaml": b"plugins: [syntax.py]\n",
    "plugin_missing.yaml": b"plugins: [fusionkit_no_such_plugin]\n",
    "plugin_empty.yaml": b"plugins: ['']\n",
    "empty.jsonl": b"",
    "header_only.csv": b"image,label\n",
}

# (argv, the one stderr line, or the part of it that names the fix)
CATALOGUE = [
    # 1. a config file that is not UTF-8
    (["train", "--config", "latin1.yaml"],
     "error: config file 'latin1.yaml' is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
    (["train", "--config", "utf16.yaml"],
     "error: config file 'utf16.yaml' is not UTF-8 text (byte 0xff on line 1); save it as UTF-8"),
    (["config", "show", "latin1.yaml"], "error: config file 'latin1.yaml' is not UTF-8 text (byte 0xe9 on line 2)"),
    # 2. plugins that fail to import, from --plugins and from a config file's plugins: [...]
    (["--plugins", "boom.py", "list"],
     "error: plugin 'boom.py' failed to import: ZeroDivisionError: division by zero (line 3); "
     "--debug shows the traceback"),
    (["--plugins", "syntax.py", "list"], "error: plugin 'syntax.py' failed to import: SyntaxError: invalid syntax"),
    (["--plugins", "missing_dep.py", "list"], "error: plugin 'missing_dep.py' failed to import: ModuleNotFoundError: "
                                              "No module named 'fusionkit_no_such_dependency' (line 1)"),
    (["--plugins", "half.py", "list"],
     "error: plugin 'half.py' failed to import: RuntimeError: after registering (line 8)"),
    (["--plugins", "clash.py", "list"],
     "error: plugin 'clash.py': fusions 'dms' is already registered by core; pick another name"),
    (["--plugins", "fusionkit_no_such_plugin", "list"],
     "error: plugin module 'fusionkit_no_such_plugin' cannot be imported; is it installed or on PYTHONPATH?"),
    (["--plugins", "os.path.no_such", "list"], "error: plugin module 'os.path.no_such' cannot be imported"),
    (["train", "--config", "plugin_boom.yaml", "--modalities", "fou"],
     "error: plugin 'boom.py' failed to import: ZeroDivisionError: division by zero (line 3)"),
    (["train", "--config", "plugin_syntax.yaml", "--modalities", "fou"],
     "error: plugin 'syntax.py' failed to import: SyntaxError: invalid syntax"),
    (["train", "--config", "plugin_missing.yaml", "--modalities", "fou"],
     "error: plugin module 'fusionkit_no_such_plugin' cannot be imported"),
    (["train", "--config", "plugin_empty.yaml", "--modalities", "fou"],
     "error: a plugin name is empty; give a module name or a .py file"),
    # 3. --modalities: empty, an empty name, and user text that looks like rich markup or emoji
    (["train", "--modalities", ""], "error: --modalities is empty; give e.g. image,text"),
    (["train", "--modalities", " , "], "error: --modalities is empty; give e.g. image,text"),
    (["train", "--modalities", "fou,,kar"],
     "error: --modalities 'fou,,kar' has an empty name; separate names with single commas, e.g. image,text"),
    (["train", "modalities=[]"], "error: modalities: the list is empty; name some, e.g. [image, text], "
                                 "or leave the key out for the dataset's default"),
    (["train", "modalities=[fou,,kar]"], "error: override 'modalities=[fou,,kar]': the value is not valid YAML"),
    (["train", "--modalities", "[bold]x[/]"], "error: modalities: '[bold]x[/]' is not a modality of dataset 'digits'"),
    (["train", "--modalities", "fou", "train.augment=[{corrupt:x}]"],  # ":x:" must not become an emoji
     "train.augment.0.corrupt:x: unknown key"),
    # 5. ablate --severity names the corruption it is for
    (["ablate", "--corrupt", "image:gaussian_noise", "--severity", "3", "--out", "abl"],
     "error: severity for corruption 'image:gaussian_noise' must be a number in [0, 1] (got 3.0)"),
    # 7. the sweep: silently accepted values and tracebacks
    (["train", "--config", "dup.yaml", "--modalities", "fou"],
     "error: dup.yaml line 2: invalid YAML (key 'train' appears twice in one mapping; keep one)"),
    (["train", "--modalities", "fou", "model.encoders.fou=3"],
     "error: model.encoders.fou: expected an encoder name or a mapping with a 'name' key (got 3)"),
    (["train", "--modalities", "fou", "model.encoders.fou=[mlp]"],
     "error: model.encoders.fou: expected an encoder name or a mapping with a 'name' key (got ['mlp'])"),
    (["train", "--modalities", "fou", "runtime.devices=abc"],
     "error: runtime.devices: give 'auto', a device count >= 1, -1 (all devices) or device indices such as '0,1' "
     "(got 'abc')"),
    (["train", "--modalities", "fou", "runtime.devices=0"], "error: runtime.devices: give 'auto'"),
    (["train", "--modalities", "fou", "train.lr=inf"], "error: train.lr: Input should be a finite number (got 'inf')"),
    (["train", "--modalities", "fou", "train.weight_decay=.inf"],
     "error: train.weight_decay: Input should be a finite number"),
    (["train", "--modalities", "fou", "--fusion", ""], "error: --fusion is empty; give a value or leave the option out"),
    (["train", "--modalities", "fou", "--config", ""], "error: --config is empty; give a value or leave the option out"),
    (["train", "--modalities", "fou", "--data", ""], "error: --data is empty; give a value or leave the option out"),
    (["list", ""], "error: '' is not a component kind (choices: "),
    # usage errors (click) are one line too, with where to look
    (["train", "--config", "."],
     "error: Invalid value for '--config': File '.' is a directory. (see 'fusionkit train --help')"),
    (["train", "--epoch", "2"],
     "error: No such option '--epoch'. Did you mean '--epochs'? (see 'fusionkit train --help')"),
    (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see 'fusionkit --help')"),
    (["eval", "somewhere", "--split", "dev"], "error: Invalid value for '--split': 'dev' is not one of"),
    # manifests: an empty file, a header without rows, a folder given as the manifest
    (["train", "--data", "empty.jsonl"], "is empty (no rows); add one row per sample"),
    (["train", "--data", "header_only.csv"], "has a header row but no sample rows; add one row per sample"),
    (["train", "data={name: manifest, path: adir}"], "/adir' is a folder; give the manifest file inside it"),
    (["train", "--out", "", "--modalities", "fou"], "error: --out is empty; give a value or leave the option out"),
    (["eval", "somewhere", "--checkpoint", "../config"], "error: Invalid value for '--checkpoint': '../config' is not one of"),
]


@pytest.fixture
def hostile_dir(tmp_path, monkeypatch):
    """A working directory holding the catalogue's files; ``runs/`` would appear here."""
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSIONKIT_RUN_DIR", raising=False)
    return tmp_path


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2, one stderr line, no traceback; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,message", CATALOGUE, ids=[" ".join(a)[:60] for a, _ in CATALOGUE])
def test_hostile_input_is_one_line_and_exit_2(argv, message, hostile_dir, capsys):
    line = one_error_line(capsys, argv)
    assert message in line, line
    # nothing was started: no run folder, no ablation folder
    assert not (hostile_dir / "runs").exists() and not (hostile_dir / "abl").exists()


def test_a_failed_plugin_leaves_nothing_registered(hostile_dir, capsys):
    from fusionkit.registry import registry

    for _ in range(2):  # the second attempt fails the same way: a failed import is not "loaded"
        assert "after registering" in one_error_line(capsys, ["--plugins", "half.py", "list"])
    assert "hostile_half" not in registry("fusions")


def test_list_shows_docstring_brackets_verbatim(capsys):
    # rich markup used to eat "[z_1; ...; z_M]" from the concat fusion's description
    main(["list", "fusions"])
    out = capsys.readouterr().out
    assert "Static: h = MLP([z_1; ...; z_M]) with missing modalities zeroed" in out


def test_class_missing_from_train_warns_on_one_line(tmp_path):
    """6. A class seen only in val/test: training goes on (a valid run), with one warning line that
    names each such class and where it is; the result table shows a run folder with brackets."""
    rows = [{"feat": [float(i % 5), float(i % 3), float(i % 2)], "label": label, "split": split}
            for split, labels in (("train", "ab"), ("val", "abc"), ("test", "abcd"))
            for i in range(4) for label in labels]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run[a]"
    proc = run_cli("train", "--data", str(tmp_path / "m.jsonl"), "--out", str(out), "--no-progress", *TINY,
                   "model.dim=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: classes 'c' (4 in val, 4 in test), 'd' (4 in test) have no training sample, "
                        "so the model cannot predict them and those samples count as errors; "
                        "add training rows for them"]
    assert f"test results (best epoch 1) - {out}" in proc.stdout  # the folder name kept its brackets


def test_untrained_class_warning_is_silent_for_complete_and_generative_data():
    from fusionkit.datasets.base import DatasetBundle, MultimodalSplit, untrained_class_warning

    split = lambda targets: MultimodalSplit({"x": [None] * len(targets)}, targets)  # noqa: E731
    full = DatasetBundle({"train": split([0, 1]), "val": split([1]), "test": split([0])}, ["a", "b"], {})
    assert untrained_class_warning(full) is None
    generative = DatasetBundle({"train": split([{"answers": ["x"]}]), "test": split([{"answers": ["y"]}])}, [], {})
    assert untrained_class_warning(generative) is None
    one = DatasetBundle({"train": split([0]), "val": split([1, 1]), "test": split([0])}, ["a", "b"], {})
    assert untrained_class_warning(one).startswith("class 'b' (2 in val) has no training sample, so the model "
                                                   "cannot predict it")
