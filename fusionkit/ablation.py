"""The DMS ablation grid: train each variant over seeds, evaluate clean and under one corruption.

Variants are switches relative to the DMS config given (names are stable for scripts); a
variant that would switch off something the config does not use is left out of the default
grid, and asking for it by name is an error that says why:

=====================  ==================================================================
``full``               DMS as configured
``no_confidence``      without the ``confidence`` scorer (entropy confidence)
``no_uncertainty``     without the ``mc_dropout`` scorer
``no_alignment``       without the ``alignment`` scorer (the paper's cosine agreement)
``no_agreement``       without the ``agreement`` scorer (prediction agreement)
``rule_scheduler``     the softmax rule instead of a learned scheduler (no routing loss)
``learned_scheduler``  the learned MLP scheduler instead of the softmax rule
``no_standardize``     the scheduler reads raw signals instead of standardised ones
``no_route``           the learned scheduler without the routing loss (route_weight = 0)
``no_mwcl``            lambda = 0 (no Modality Weight Consistency Loss)
``no_augment``         no corruption-aware training (``train.augment: []``)
``no_calibration``     no temperature scaling of the heads (``train.calibrate: false``)
``static_mean``        reference: uniform static weights (``mean``), same training otherwise
=====================  ==================================================================

Switching a factor off removes its scorer, so the rule and the learned scheduler are ablated
the same way (the paper's "alpha = 0" for the rule).
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any, Callable

from fusionkit.config import RunConfig, resolve
from fusionkit.errors import ConfigError, unknown_choice

SCORER_VARIANTS = {"no_confidence": "confidence", "no_uncertainty": "mc_dropout",
                   "no_alignment": "alignment", "no_agreement": "agreement"}
VARIANTS = ["full", *SCORER_VARIANTS, "rule_scheduler", "learned_scheduler", "no_standardize", "no_route",
            "no_mwcl", "no_augment", "no_calibration", "static_mean"]


def _scorer_names(fusion: dict[str, Any]) -> list[str]:
    return [s["name"] if isinstance(s, dict) else s for s in fusion["scorers"]]


def _applies(name: str, cfg: RunConfig) -> str | None:
    """None if variant ``name`` changes something in ``cfg``; else why it does not apply."""
    fusion = cfg.model.fusion
    sched = fusion["scheduler"]
    if name in SCORER_VARIANTS:
        return None if SCORER_VARIANTS[name] in _scorer_names(fusion) else \
            f"the config has no '{SCORER_VARIANTS[name]}' scorer"
    return {
        "rule_scheduler": None if sched["name"] != "softmax" else "the config already uses the softmax rule",
        "learned_scheduler": None if sched["name"] != "mlp" else "the config already uses the mlp scheduler",
        "no_standardize": None if sched.get("standardize") else "the config's scheduler does not standardise",
        "no_route": None if fusion.get("route_weight", 0) > 0 and sched["name"] == "mlp"
        else "the config has no learned scheduler with route_weight > 0",
        "no_mwcl": None if fusion["mwcl_weight"] > 0 else "the config's mwcl_weight is 0",
        "no_augment": None if cfg.train.augment else "the config has no train.augment",
        "no_calibration": None if cfg.train.calibrate else "the config has train.calibrate false",
    }.get(name)


def _variant(name: str, base: RunConfig) -> RunConfig:
    data = base.model_dump(mode="json")
    fusion, train = data["model"]["fusion"], data["train"]
    sched = fusion["scheduler"]
    if name in SCORER_VARIANTS:
        fusion["scorers"] = [s for s in fusion["scorers"]
                             if (s["name"] if isinstance(s, dict) else s) != SCORER_VARIANTS[name]]
    elif name == "rule_scheduler":
        fusion["scheduler"] = {"name": "softmax", "standardize": sched.get("standardize", False)}
        fusion["route_weight"] = 0.0
    elif name == "learned_scheduler":
        fusion["scheduler"] = {"name": "mlp", "standardize": sched.get("standardize", False)}
    elif name == "no_standardize":
        sched["standardize"] = False
    elif name == "no_route":
        fusion["route_weight"] = 0.0
    elif name == "no_mwcl":
        fusion["mwcl_weight"] = 0.0
    elif name == "no_augment":
        train["augment"] = []
    elif name == "no_calibration":
        train["calibrate"] = False
    elif name == "static_mean":
        data["model"]["fusion"] = {"name": "mean", "aux_weight": fusion["aux_weight"],
                                   "head_hidden": fusion["head_hidden"], "head_dropout": fusion["head_dropout"]}
    return resolve(data)


def variant_configs(raw: dict[str, Any], names: list[str] | None = None) -> dict[str, RunConfig]:
    """Resolved config per variant, from a raw DMS config mapping (default: every variant that applies)."""
    for n in names or ():
        if n not in VARIANTS:
            raise ConfigError("--variants: " + unknown_choice("an ablation variant", n, VARIANTS))
    base = resolve(copy.deepcopy(raw))
    if base.model.fusion["name"] != "dms":
        raise ConfigError(f"ablate needs a config whose model.fusion is dms (got '{base.model.fusion['name']}')")
    if names is None:
        names = [n for n in VARIANTS if _applies(n, base) is None]
    for n in names:
        why = _applies(n, base)
        if why is not None:
            raise ConfigError(f"variant '{n}' has nothing to switch off: {why}; drop it from --variants")
    return {n: _variant(n, base) for n in names}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def ablation_rows(reports: dict[int, dict[str, Any]], runs: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    """One row per variant over seeds: mean and std of clean and corrupted accuracy, drop and AUC.

    ``reports[seed]`` is a robustness report over the runs ``runs[seed] = {variant: folder}``.
    """
    seeds = sorted(reports)
    per: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        by_run = {r["run"]: r for r in reports[seed]["runs"]}
        for variant, run in runs[seed].items():
            r = by_run[run]
            last = r["levels"][-1]
            per.setdefault(variant, []).append({
                "seed": seed, "clean_accuracy": r["clean"]["accuracy"], "corrupted_accuracy": last["accuracy"],
                "severity": last["severity"], "drop_points": last["drop_points"], "auc": r["auc"],
                "mean_weights_clean": r["clean"]["mean_weights"], "mean_weights_corrupted": last["mean_weights"],
                "run": run})
    rows = []
    for variant, items in per.items():
        row = {"variant": variant, "seeds": [i["seed"] for i in items], "severity": items[0]["severity"]}
        for key in ("clean_accuracy", "corrupted_accuracy", "drop_points", "auc"):
            s = _stats([i[key] for i in items])
            row[key], row[f"{key}_std"] = s["mean"], s["std"]
        for key in ("mean_weights_clean", "mean_weights_corrupted"):
            row[key] = {m: statistics.mean(i[key][m] for i in items) for m in items[0][key]}
        row["per_seed"] = items
        rows.append(row)
    return rows


def run_ablation(raw: dict[str, Any], out: Path, corrupt: list[str], severity: float, *,
                 variants: list[str] | None = None, seeds: list[int] | None = None, protocol: str = "all",
                 p: float | None = None, overwrite: bool = False, train_fn: Callable | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Train every variant for every seed into ``out/<variant>[/seed<k>]``; evaluate each clean and at
    ``severity``; write ``ablation.json`` and ``ablation.md`` (mean +/- std over seeds).

    ``progress``: optional ``start(description, total)`` (see :func:`fusionkit.robustness.robustness_report`);
    one stage counts the trained runs, then one per evaluated run counts its samples.
    """
    from fusionkit.robustness import robustness_report
    from fusionkit.training.trainer import prepare_run_dir, train

    train_fn = train_fn or train
    seeds = seeds or [resolve(copy.deepcopy(raw)).seed]
    runs: dict[int, dict[str, str]] = {}
    reports: dict[int, dict[str, Any]] = {}
    trained = None
    for seed in seeds:
        seeded = copy.deepcopy(raw)
        seeded["seed"] = seed
        configs = variant_configs(seeded, variants)
        if trained is None and progress is not None:
            trained = progress("training runs", len(seeds) * len(configs))
        runs[seed] = {}
        for name, cfg in configs.items():
            log(f"training variant {name}, seed {seed}")
            folder = out / name if len(seeds) == 1 else out / name / f"seed{seed}"
            run_dir = prepare_run_dir(folder, overwrite=overwrite)
            train_fn(cfg, run_dir, show_progress=False)
            runs[seed][name] = str(run_dir)
            if trained is not None:
                trained(1)
        reports[seed] = robustness_report(list(runs[seed].values()), corrupt, [0.0, severity], protocol=protocol,
                                          p=p, baseline=runs[seed].get("static_mean") or next(iter(runs[seed].values())),
                                          log=log, progress=progress)
    rows = ablation_rows(reports, runs)
    result = {"corrupt": corrupt, "severity": severity, "protocol": protocol, "p": p, "seeds": seeds, "rows": rows,
              "robustness": reports}
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    (out / "ablation.md").write_text(render_markdown(result))
    return result


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """``mean +/- std`` scaled (accuracies as percentages by default)."""
    return f"{scale * mean:.{digits}f} +/- {scale * std:.{digits}f}"


def render_markdown(result: dict[str, Any]) -> str:
    spec = ", ".join(result["corrupt"])
    lines = [f"Seeds {result['seeds']}; accuracies in %, mean +/- std over seeds.", "",
             f"| variant | clean acc | acc @ {spec} s={result['severity']} | drop (pts) | AUC |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {pm(r['clean_accuracy'], r['clean_accuracy_std'])} | "
                     f"{pm(r['corrupted_accuracy'], r['corrupted_accuracy_std'])} | "
                     f"{pm(r['drop_points'], r['drop_points_std'], 1.0)} | {pm(r['auc'], r['auc_std'])} |")
    return "\n".join(lines) + "\n"
