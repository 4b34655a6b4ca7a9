"""runtime.compile: the fusion layer compiled in place trains to the eager run's numbers."""

from __future__ import annotations

import json

import pytest
from conftest import TINY

from fusionkit.cli.main import main


def _run(out, *extra):
    main(["train", "--out", str(out), "--no-progress", "--modalities", "fou,kar", *TINY, "train.epochs=2", *extra])
    return json.loads((out / "results.json").read_text())


def test_compiled_fusion_trains_like_eager(tmp_path):
    eager = _run(tmp_path / "eager")
    compiled = _run(tmp_path / "compiled", "runtime.compile=true", "runtime.compile_backend=aot_eager")
    assert compiled["test"]["n"] == eager["test"]["n"]
    assert compiled["test"]["accuracy"] == pytest.approx(eager["test"]["accuracy"], abs=0.01)
    assert compiled["test"]["nll"] == pytest.approx(eager["test"]["nll"], rel=1e-3)
    for m, w in eager["test"]["mean_weights"].items():
        assert compiled["test"]["mean_weights"][m] == pytest.approx(w, abs=1e-3)
    # the checkpoint keys are the eager model's (no _orig_mod prefix): eval loads it as usual
    keys = (tmp_path / "compiled" / "checkpoints" / "best").iterdir()
    assert "model.safetensors" in {k.name for k in keys}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "compiled" / "checkpoints" / "best" / "model.safetensors"), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


def test_compile_is_refused_for_retrieval():
    from fusionkit.errors import ConfigError
    from fusionkit.training.trainer import compile_fusion

    class Stub:  # what compile_fusion reads of a model whose decoder is the retrieval head
        decoder = type("D", (), {"retrieval": True})()

    with pytest.raises(ConfigError, match="runtime.compile: the retrieval decoder"):
        compile_fusion(Stub(), None, None)


def test_inductor_on_the_cpu_uses_pytorchs_random_kernels():
    """runtime.compile on the CPU passes fallback_random to inductor (its own per-element random
    numbers cost more than the ops); on CUDA and with other backends the defaults stay."""
    import torch

    from fusionkit.training.trainer import compile_fusion, compile_options

    assert compile_options("inductor", torch.device("cpu")) == {"fallback_random": True}
    assert compile_options("inductor", torch.device("cuda", 0)) is None
    assert compile_options("aot_eager", torch.device("cpu")) is None

    calls = []

    class Fusion:
        def compile(self, **kwargs):
            calls.append(kwargs)

    class Model:
        decoder = object()
        fusion = Fusion()

    class Cfg:
        runtime = type("R", (), {"compile_backend": "inductor"})()

    compile_fusion(Model(), Cfg(), torch.device("cpu"))
    compile_fusion(Model(), Cfg(), torch.device("cuda", 0))
    assert calls == [{"backend": "inductor", "dynamic": False, "options": {"fallback_random": True}},
                     {"backend": "inductor", "dynamic": False, "options": None}]
