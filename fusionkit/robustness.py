"""Robustness evaluation: how trained runs hold up as test-time corruptions grow.

A :class:`CorruptedSplit` wraps a dataset split and corrupts the RAW values of chosen modalities
(before encoder preprocessing) at one severity. Every run evaluated with the same
``(seed, corruptions, severity, protocol, p)`` sees exactly the same corrupted inputs:

- the corruption's generator is seeded with ``(seed, sample index, corruption name, modality)``,
  so it does not depend on batch order, the run, or which other corruptions are applied; the
  same noise draw is scaled by the severity, so the levels of one curve differ only in strength.
- ``protocol="all"``: every corruption spec applies to every sample.
- ``protocol="random_subset"``: each modality named by a spec is corrupted in a sample with
  probability ``p``, decided by a generator seeded with ``(seed, sample index, modality)``,
  independently per modality (QMF's scheme, generalised to N modalities); the chosen subset is the
  same at every severity.
- a corruption that returns None (``missing``) makes the modality absent, which the collate turns
  into a False mask entry. Rule: a drop that would leave a sample with no modality at all is
  skipped (the value is kept as it was), so the last present modality is never dropped.
- torch's generator is seeded with ``seed`` (inside a forked RNG state) before each evaluation, so
  stochastic scorers (MC dropout) draw the same numbers at every level and in every run.

Definitions used in :func:`robustness_report` (levels sorted, ``s_0 < ... < s_n``; accuracies on
the chosen split):

- clean accuracy ``a_clean``: accuracy at severity 0 (an extra evaluation when 0 is not a level).
- drop at level s: ``drop_points = 100 * (a_clean - a(s))`` (percentage points) and
  ``drop_percent = 100 * (a_clean - a(s)) / a_clean`` (None when ``a_clean`` is 0).
- relative robustness ``auc``: the trapezoid area under ``a(s)`` over the given levels divided by
  ``s_n - s_0``, i.e. the mean accuracy over the severity span, in ``[0, 1]``; with one level it is
  the accuracy at that level. ``auc_ratio = auc / a_clean`` (1 = no degradation; None when
  ``a_clean`` is 0).
- effective robustness ``effective_robustness = auc(run) - auc(baseline)``: how much more accuracy
  the run keeps over the severity span than the baseline (0 for the baseline itself). It is an
  absolute difference, so a run with better clean accuracy scores higher even at equal
  degradation; compare ``auc_ratio`` to separate the two.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionkit.corruptions.base import Corruption, check_severity, parse_corruption_spec
from fusionkit.encoders.base import ModalitySpec
from fusionkit.errors import ConfigError, RunDirError, unknown_choice
from fusionkit.evaluation import collect, signal_stats, summarize
from fusionkit.registry import registry

PROTOCOLS = ("all", "random_subset")
DEFAULT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
REPORT_FILES = ("report.json", "report.md", "curves.png")
WEIGHT_FILES = ("weights.json", "sample_weights.png", "weights_vs_severity.png")
DEFINITIONS = {
    "drop_points": "100 * (clean accuracy - accuracy at the level)",
    "drop_percent": "100 * (clean accuracy - accuracy at the level) / clean accuracy",
    "auc": "trapezoid area under accuracy vs severity over the levels / (last level - first level)",
    "auc_ratio": "auc / clean accuracy",
    "effective_robustness": "auc(run) - auc(baseline)",
}


# -- corruption specs and levels ----------------------------------------------------------------
@dataclass(frozen=True)
class CorruptionSpec:
    """One ``--corrupt`` spec resolved against a run: which modality, which built corruption."""

    text: str  # as given, e.g. "fou:gaussian_noise" or "missing:text"
    modality: str
    kind: str  # the modality's kind ("vector", "image", ...)
    corruption: Corruption


def resolve_specs(specs: Sequence[str], modalities: dict[str, ModalitySpec], where: str = "") -> list[CorruptionSpec]:
    """Parse ``MOD:NAME`` / ``missing:MOD`` specs and check them against a run's modalities.

    Raises:
        ConfigError: no spec, an unknown corruption or modality (with a did-you-mean), or a
            corruption that does not handle the modality's kind.
    """
    if not specs:
        raise ConfigError("no corruption given; pass --corrupt MODALITY:CORRUPTION (e.g. fou:gaussian_noise)")
    suffix = f" (run '{where}')" if where else ""
    out = []
    for text in specs:
        modality, name = parse_corruption_spec(text)
        if modality not in modalities:
            raise ConfigError(f"{text}: " + unknown_choice("a modality of this run", modality, modalities) + suffix)
        corruption = registry("corruptions").build(name, path="corruption")
        kind = modalities[modality].kind
        try:
            corruption.check_kind(kind)
        except ConfigError as err:
            raise ConfigError(f"{text}: {err} (modality '{modality}' is {kind} data){suffix}") from None
        out.append(CorruptionSpec(text, modality, kind, corruption))
    return out


def parse_levels(levels: str | Sequence[float]) -> list[float]:
    """Severity levels from ``"0,0.2,0.5"`` (or a sequence): validated, sorted, de-duplicated."""
    items = [x.strip() for x in levels.split(",") if x.strip()] if isinstance(levels, str) else list(levels)
    if not items:
        raise ConfigError("--levels: give at least one severity, e.g. --levels 0,0.5,1")
    out = set()
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"--levels: {item!r} is not a number; give severities in [0, 1] "
                              "separated by commas") from None
        if not 0.0 <= value <= 1.0:  # NaN fails the comparison too
            raise ConfigError(f"--levels: severity must be a number in [0, 1] (got {item})")
        out.add(value + 0.0)  # + 0.0 turns -0.0 into 0.0
    return sorted(out)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))  # stable across processes, unlike hash()


# -- the corrupted view of a split --------------------------------------------------------------
class CorruptedSplit(Dataset):
    """A read-only view of ``split`` whose items carry corrupted raw values.

    Args:
        split: a dataset whose items are ``{"inputs": {modality: raw or None}, "target", "index"}``
            (a :class:`fusionkit.datasets.base.MultimodalSplit`); it is never modified.
        specs: resolved corruption specs, applied in the given order.
        severity: strength in ``[0, 1]`` for every spec.
        seed: fixes every random choice (see the module docstring).
        protocol: ``"all"`` or ``"random_subset"``.
        p: for ``random_subset``, the probability that a named modality is corrupted in a sample.
    """

    def __init__(self, split: Dataset, specs: Sequence[CorruptionSpec], severity: float, *, seed: int = 0,
                 protocol: str = "all", p: float = 1.0):
        if protocol not in PROTOCOLS:
            raise ConfigError(unknown_choice("a robustness protocol", protocol, PROTOCOLS))
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"--p must be a probability in [0, 1] (got {p!r})")
        if int(seed) < 0:
            raise ConfigError(f"--seed must be >= 0 (got {seed})")
        self.split = split
        self.specs = list(specs)
        self.severity = check_severity(severity, ", ".join(s.text for s in self.specs) or "corruption")
        self.seed = int(seed)
        self.protocol = protocol
        self.p = float(p)
        self.modalities = sorted({s.modality for s in self.specs})
        columns = getattr(split, "columns", None)
        for m in self.modalities if columns is not None else ():
            if m not in columns:
                raise ConfigError(unknown_choice("a modality of this split", m, columns))
        self.ids = getattr(split, "ids", None)  # error messages of EncodedDataset name samples by id

    def __len__(self) -> int:
        return len(self.split)

    def chosen(self, index: int) -> list[str]:
        """The modalities corrupted in sample ``index`` (all named ones under protocol ``all``)."""
        if self.protocol == "all":
            return list(self.modalities)
        return [m for m in self.modalities
                if np.random.default_rng([self.seed, index, _crc(m)]).random() < self.p]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.split[i]
        index = int(item["index"])
        chosen = self.chosen(index)
        if self.severity == 0.0 or not chosen:
            return item
        inputs = dict(item["inputs"])  # a new dict: the split's own item is never modified
        for spec in self.specs:
            value = inputs.get(spec.modality)
            if spec.modality not in chosen or value is None:  # not picked, or the sample lacks it
                continue
            rng = np.random.default_rng([self.seed, index, _crc(spec.corruption.registry_name), _crc(spec.modality)])
            out = spec.corruption(value, self.severity, rng, spec.kind)
            if out is None and sum(v is not None for v in inputs.values()) == 1:
                continue  # never drop the last present modality: a sample with none cannot be fused
            inputs[spec.modality] = out
        return {**item, "inputs": inputs}


Advance = Callable[[int], None]  # told how many samples were just evaluated
StartTask = Callable[[str, int], Advance]  # (description, total samples) -> that stage's Advance


def collect_corrupted(model, cfg, split: Dataset, specs: Sequence[CorruptionSpec], severity: float, *,
                      seed: int = 0, protocol: str = "all", p: float = 1.0,
                      progress: Advance | None = None) -> dict[str, torch.Tensor]:
    """:func:`fusionkit.evaluation.collect` on ``CorruptedSplit(split, ...)``, with torch seeded."""
    from fusionkit.training.trainer import make_loader

    data = CorruptedSplit(split, specs, severity, seed=seed, protocol=protocol, p=p)
    loader = make_loader(model, data, cfg, shuffle=False)
    return collect(model, loader, seed=seed, progress=progress)  # seeds MC dropout in a forked RNG state


def curve_auc(levels: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoid area under accuracy vs severity divided by the level span (one level: its value)."""
    if len(levels) == 1:
        return float(accuracies[0])
    area = sum((b - a) * (ya + yb) / 2 for a, b, ya, yb in zip(levels, levels[1:], accuracies, accuracies[1:]))
    return float(area / (levels[-1] - levels[0]))


# -- run folders ------------------------------------------------------------------------------
def _read_run(path: Path):
    """A run's resolved config, checked cheaply (no data, no weights); load_run's errors otherwise."""
    from fusionkit.config import read_yaml, resolve
    from fusionkit.training.checkpoint import find_checkpoint
    from fusionkit.training.trainer import load_run

    if not (path / "config.yaml").is_file() or find_checkpoint(path / "checkpoints", "best") is None:
        load_run(path)  # raises the RunDirError that names what is missing
    return resolve(read_yaml(path / "config.yaml"))


def _run_modalities(cfg) -> dict[str, ModalitySpec]:
    dataset = registry("datasets").build(cfg.data, "data")
    specs = dataset.modality_specs()
    return {m: specs[m] for m in cfg.modalities}


def _same_run(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def check_output_dir(out: Path, overwrite: bool, runs: Sequence[Path], what: str = "robustness") -> Path:
    """Refuse an output folder inside a run folder, or an existing non-empty one without overwrite."""
    out = Path(out)
    target = out.resolve()
    for run in runs:
        run_resolved = Path(run).resolve()
        if target == run_resolved or run_resolved in target.parents:
            raise RunDirError(f"{what} folder '{out}' is inside run folder '{run}'; evaluation never "
                              "writes into run folders; pass --out to choose another")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{what} folder '{out}' is a file; pass --out to choose another")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{what} folder '{out}' already exists; pass --overwrite to replace it "
                          f"or --out to choose another")
    return out


def prepare_output_dir(out: Path, files: Sequence[str]) -> Path:
    """Create ``out`` (already checked) and remove the previous versions of ``files`` in it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        (out / name).unlink(missing_ok=True)
    return out


def default_output_dir(runs: Sequence[Path], specs: Sequence[str], suffix: str = "") -> Path:
    """``robustness/<first run>-<specs>[-suffix]``, with ``-2``, ``-3`` ... when taken."""
    from fusionkit.training.trainer import next_free_dir

    slug = "+".join(s.replace(":", "-") for s in specs)
    name = f"{Path(runs[0]).resolve().name}-{slug}" + (f"-{suffix}" if suffix else "")
    return next_free_dir(Path("robustness") / name)


# -- the robustness report --------------------------------------------------------------------
def robustness_report(run_dirs: Sequence[str | Path], specs: Sequence[str],
                      levels: Sequence[float] | str = DEFAULT_LEVELS, *, protocol: str = "all",
                      p: float | None = None, baseline: str | Path | None = None, split: str = "test",
                      seed: int = 0, log=None, progress: StartTask | None = None) -> dict[str, Any]:
    """Evaluate each run at each severity; return the report (see the module docstring).

    Args:
        run_dirs: trained run folders, all on the same dataset; never written to.
        specs: ``MOD:NAME`` or ``missing:MOD`` corruption specs.
        levels: severities in ``[0, 1]`` (sorted and de-duplicated).
        protocol: ``"all"`` or ``"random_subset"``.
        p: ``random_subset`` probability (default 0.5); an error with protocol ``all``.
        baseline: run for effective robustness (default: the first run); evaluated too if it is
            not among ``run_dirs``.
        split: ``train``, ``val`` or ``test``.
        seed: fixes every random choice.
        log: optional ``callable(str)`` told which run is being evaluated.
        progress: optional ``start(description, total)`` called once per run with the number of
            samples it evaluates; the function it returns is told each batch's size.

    Raises:
        ConfigError: bad specs, levels, protocol, p or seed, or runs on different datasets.
        RunDirError: a folder that is not a complete run.
    """
    levels = parse_levels(levels)
    if protocol not in PROTOCOLS:
        raise ConfigError(unknown_choice("a robustness protocol", protocol, PROTOCOLS))
    if protocol == "all" and p is not None:
        raise ConfigError("--p only applies to --protocol random_subset")
    p_value = 1.0 if protocol == "all" else (0.5 if p is None else float(p))
    if not 0.0 <= p_value <= 1.0:
        raise ConfigError(f"--p must be a probability in [0, 1] (got {p!r})")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0 (got {seed})")
    for text in specs:  # names first: a typo fails before any run is read
        parse_corruption_spec(text)
    if not run_dirs:
        raise ConfigError("give at least one run folder")

    paths = [Path(r) for r in run_dirs]
    base_path = Path(baseline) if baseline is not None else paths[0]
    if not any(_same_run(base_path, q) for q in paths):
        paths.append(base_path)
    # Pass 1, cheap: every folder is a run, all share one dataset, every spec fits every run.
    cfgs = [_read_run(q) for q in paths]
    for q, cfg in zip(paths[1:], cfgs[1:]):
        if cfg.data != cfgs[0].data:
            raise ConfigError(f"runs use different datasets: '{paths[0]}' has data {cfgs[0].data} but "
                              f"'{q}' has {cfg.data}; compare runs trained on the same data")
    for q, cfg in zip(paths, cfgs):
        resolve_specs(specs, _run_modalities(cfg), str(q))

    # Pass 2: evaluate one run at a time (only one model in memory).
    from fusionkit.training.trainer import load_run

    runs = []
    for q in paths:
        if log:
            log(f"evaluating {q}")
        cfg, bundle, model = load_run(q)
        if split not in bundle.splits:
            raise ConfigError(unknown_choice("a split of this dataset", split, bundle.splits))
        cspecs = resolve_specs(specs, bundle.modalities, str(q))
        data = bundle.splits[split]
        passes = len(levels) + (0.0 not in levels)  # the clean pass is extra when 0 is not a level
        advance = progress(str(q), passes * len(data)) if progress is not None else None

        def evaluate(severity: float) -> dict[str, Any]:
            c = collect_corrupted(model, cfg, data, cspecs, severity, seed=seed, protocol=protocol, p=p_value,
                                  progress=advance)
            return summarize(c, model.modalities, model.task)

        results = {s: evaluate(s) for s in levels}
        clean = results[0.0] if 0.0 in results else evaluate(0.0)
        a_clean = clean["accuracy"]
        rows = []
        for s in levels:
            r = results[s]
            drop = a_clean - r["accuracy"]
            rows.append({"severity": s, "accuracy": r["accuracy"], "drop_points": 100.0 * drop,
                         "drop_percent": 100.0 * drop / a_clean if a_clean > 0 else None,
                         "ece": r["ece"], "nll": r["nll"], "mean_weights": r["mean_weights"],
                         "unimodal_accuracy": r["unimodal_accuracy"], "n": r["n"],
                         "metrics": r})  # the task's full evaluation record (BLEU, CIDEr, R@k, ...)
        auc = curve_auc(levels, [r["accuracy"] for r in rows])
        runs.append({"run": str(q), "name": q.resolve().name, "fusion": cfg.model.fusion["name"],
                     "modalities": list(model.modalities), "baseline": _same_run(q, base_path),
                     "clean": clean, "levels": rows, "auc": auc,
                     "auc_ratio": auc / a_clean if a_clean > 0 else None})
        del model, bundle
    base_auc = next(r["auc"] for r in runs if r["baseline"])
    for r in runs:
        r["effective_robustness"] = r["auc"] - base_auc
    return {"split": split, "seed": seed, "protocol": protocol, "p": p_value if protocol == "random_subset" else None,
            "corruptions": list(specs), "levels": levels, "baseline": str(base_path),
            "definitions": DEFINITIONS, "runs": runs}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _weights_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{m} {w:.2f}" for m, w in weights.items())


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per run: name, fusion, clean accuracy, auc, auc ratio, effective robustness."""
    return [[r["name"] + (" (baseline)" if r["baseline"] else ""), r["fusion"], _fmt(r["clean"]["accuracy"], ".4f"),
             _fmt(r["auc"], ".4f"), _fmt(r["auc_ratio"], ".3f"), _fmt(r["effective_robustness"], "+.4f")]
            for r in report["runs"]]


def level_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per (run, level): accuracy, drop in points and percent, ECE, mean weights."""
    return [[r["name"], _fmt(x["severity"], "g"), _fmt(x["accuracy"], ".4f"), _fmt(x["drop_points"], "+.2f"),
             _fmt(x["drop_percent"], "+.1f"), _fmt(x["ece"], ".4f"), _weights_text(x["mean_weights"])]
            for r in report["runs"] for x in r["levels"]]


SUMMARY_HEADER = ["run", "fusion", "clean acc", "AUC", "AUC / clean", "effective robustness"]
LEVEL_HEADER = ["run", "severity", "accuracy", "drop (pts)", "drop (%)", "ECE", "mean weights"]


def title(report: dict[str, Any]) -> str:
    protocol = report["protocol"] + (f", p={report['p']:g}" if report["p"] is not None else "")
    return (f"robustness to {', '.join(report['corruptions'])} ({protocol}) - "
            f"{report['split']} split, seed {report['seed']}")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a per-run summary table, then one row per run and level."""

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]

    lines = [f"# {title(report)}", "", *table(SUMMARY_HEADER, summary_rows(report)), "",
             *table(LEVEL_HEADER, level_rows(report)), "", "Definitions:", ""]
    lines += [f"- `{k}` = {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs severity, one line per run, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["runs"]:
        ax.plot(report["levels"], [x["accuracy"] for x in r["levels"]], marker="o",
                label=f"{r['name']} (AUC {r['auc']:.3f})")
    ax.set(xlabel="severity", ylabel="accuracy", ylim=(0, 1.02), title=title(report))
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``curves.png`` into ``out`` (already prepared)."""
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_curves(report, out / "curves.png")
    return [out / name for name in REPORT_FILES]


# -- weight diagnostics -----------------------------------------------------------------------
def sample_positions(n: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``0..n-1`` (splits are often sorted by class)."""
    if count <= 0 or n == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(count, n))})


def weight_report(run_dir: str | Path, specs: Sequence[str], levels: Sequence[float] | str = DEFAULT_LEVELS, *,
                  samples: int = 8, split: str = "test", seed: int = 0,
                  progress: StartTask | None = None) -> dict[str, Any]:
    """Fusion weights of one run under corruption: the mean per modality at each severity, and
    per-sample weights for ``samples`` samples, clean vs at the highest level (protocol ``all``).
    ``progress``: as in :func:`robustness_report`.

    Raises:
        ConfigError: bad specs or levels, or ``samples`` < 0.
        RunDirError: a folder that is not a complete run.
    """
    from fusionkit.training.trainer import load_run

    levels = parse_levels(levels)
    if samples < 0:
        raise ConfigError(f"--samples must be >= 0 (got {samples})")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0 (got {seed})")
    for text in specs:
        parse_corruption_spec(text)
    path = Path(run_dir)
    cfg = _read_run(path)
    resolve_specs(specs, _run_modalities(cfg), str(path))
    cfg, bundle, model = load_run(path)
    if split not in bundle.splits:
        raise ConfigError(unknown_choice("a split of this dataset", split, bundle.splits))
    cspecs = resolve_specs(specs, bundle.modalities, str(path))
    data = bundle.splits[split]
    passes = len(levels) + (0.0 not in levels)
    advance = progress(str(path), passes * len(data)) if progress is not None else None
    collected = {s: collect_corrupted(model, cfg, data, cspecs, s, seed=seed, progress=advance) for s in levels}
    if 0.0 not in collected:
        collected[0.0] = collect_corrupted(model, cfg, data, cspecs, 0.0, seed=seed, progress=advance)
    per_level = []
    for s in levels:
        summary = summarize(collected[s], model.modalities, model.task)
        per_level.append({"severity": s, "mean_weights": summary["mean_weights"], "accuracy": summary["accuracy"],
                          "signals": signal_stats(collected[s], model.modalities)})
    top = levels[-1]
    picked = []
    for i in sample_positions(len(data), samples):
        entry: dict[str, Any] = {"index": i, "id": data.ids[i] if getattr(data, "ids", None) else i}
        for label, c in (("clean", collected[0.0]), ("corrupted", collected[top])):
            row = int((c["index"] == i).nonzero()[0, 0])  # loader order == split order, but do not rely on it
            entry["target"] = c["target"][row].tolist()  # a class, or a soft row (captioning, retrieval)
            entry[label] = {m: float(c["weights"][row, j]) for j, m in enumerate(model.modalities)}
            entry[f"{label}_present"] = {m: bool(c["mask"][row, j]) for j, m in enumerate(model.modalities)}
        picked.append(entry)
    scheduler = getattr(model.fusion, "scheduler", None)
    return {"run": str(path), "name": path.resolve().name, "fusion": cfg.model.fusion["name"], "split": split,
            "seed": seed, "corruptions": list(specs), "levels": levels, "modalities": list(model.modalities),
            "mean_weights": per_level, "samples_severity": top, "samples": picked,
            # the scheduler's standardisation statistics (None when it reads raw signals)
            "signal_scale": scheduler.signal_scale() if hasattr(scheduler, "signal_scale") else None,
            "temperature": dict(zip(model.modalities, model.fusion.heads.temperature.tolist()))}


def plot_weights(report: dict[str, Any], sample_path: Path, severity_path: Path) -> None:
    """``sample_path``: per-sample weights, clean vs corrupted (one panel per modality);
    ``severity_path``: mean weight per modality vs severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities, samples = report["modalities"], report["samples"]
    heading = f"{report['name']}: {', '.join(report['corruptions'])}"
    fig, axes = plt.subplots(len(modalities), 1, figsize=(max(5, 0.6 * len(samples) + 2), 2.2 * len(modalities)),
                             sharex=True, squeeze=False)
    x = np.arange(len(samples))
    for ax, m in zip(axes[:, 0], modalities):
        ax.bar(x - 0.2, [s["clean"][m] for s in samples], width=0.4, label="clean")
        ax.bar(x + 0.2, [s["corrupted"][m] for s in samples], width=0.4,
               label=f"severity {report['samples_severity']:g}")
        ax.set(ylabel=f"w[{m}]", ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(heading, fontsize=9)
    axes[-1, 0].set_xticks(x, [str(s["id"]) for s in samples], fontsize=7)
    axes[-1, 0].set_xlabel("sample id")
    fig.tight_layout()
    fig.savefig(sample_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modalities:
        ax.plot(report["levels"], [x["mean_weights"][m] for x in report["mean_weights"]], marker="o", label=m)
    ax.set(xlabel="severity", ylabel="mean weight", ylim=(0, 1.02))
    ax.set_title(heading, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(severity_path, dpi=120)
    plt.close(fig)


def write_weights(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``weights.json`` and the two weight plots into ``out`` (already prepared)."""
    out = Path(out)
    (out / "weights.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_weights(report, out / "sample_weights.png", out / "weights_vs_severity.png")
    return [out / name for name in WEIGHT_FILES]
