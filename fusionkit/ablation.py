"""The DMS ablation grid: train each variant, evaluate clean and under one corruption.

Variants (each a set of overrides on a DMS run config; names are stable for scripts):

========================  =============================================================
``full``                  DMS as configured
``no_confidence``         alpha = 0 (scheduler ignores entropy confidence)
``no_uncertainty``        beta = 0 (scheduler ignores MC-dropout uncertainty)
``no_alignment``          gamma = 0 (scheduler ignores cross-modal agreement)
``learned_scheduler``     the MLP scheduler instead of the softmax rule
``no_mwcl``               lambda = 0 (no Modality Weight Consistency Loss)
``static_mean``           reference: uniform static weights (the ``mean`` fusion)
========================  =============================================================

With the rule scheduler, switching a factor off sets its coefficient to 0 (the scorer still
runs, so cost is unchanged); ``learned_scheduler`` replaces the rule with the MLP.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

from fusionkit.config import apply_override, resolve
from fusionkit.errors import ConfigError, unknown_choice

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_confidence": ["model.fusion.scheduler.alpha=0"],
    "no_uncertainty": ["model.fusion.scheduler.beta=0"],
    "no_alignment": ["model.fusion.scheduler.gamma=0"],
    "learned_scheduler": ["model.fusion.scheduler={name: mlp}"],
    "no_mwcl": ["model.fusion.mwcl_weight=0"],
    "static_mean": ["model.fusion={name: mean}"],
}
RULE_ONLY = {"no_confidence", "no_uncertainty", "no_alignment"}


def variant_configs(raw: dict[str, Any], names: list[str] | None = None) -> dict[str, Any]:
    """Resolved config per variant, from a raw DMS config mapping."""
    names = names or list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            raise ConfigError("--variants: " + unknown_choice("an ablation variant", n, VARIANTS))
    base = resolve(copy.deepcopy(raw))
    fusion = base.model.fusion
    if fusion["name"] != "dms":
        raise ConfigError(f"ablate needs a config whose model.fusion is dms (got '{fusion['name']}')")
    rule = fusion["scheduler"]["name"] == "softmax"
    out = {}
    for n in names:
        if n in RULE_ONLY and not rule:
            raise ConfigError(f"variant '{n}' switches off a coefficient of the softmax rule, but the config "
                              f"uses the '{fusion['scheduler']['name']}' scheduler; drop it from --variants")
        data = base.model_dump(mode="json")
        for item in VARIANTS[n]:
            apply_override(data, item)
        if n == "static_mean":
            data["model"]["fusion"] = {"name": "mean", "aux_weight": fusion["aux_weight"],
                                       "head_hidden": fusion["head_hidden"], "head_dropout": fusion["head_dropout"]}
        out[n] = resolve(data)
    return out


def ablation_table(report: dict[str, Any], run_names: dict[str, str]) -> list[dict[str, Any]]:
    """One row per variant from a robustness report over ``{variant: run folder}``."""
    by_run = {r["run"]: r for r in report["runs"]}
    rows = []
    for variant, run in run_names.items():
        r = by_run[run]
        levels = r["levels"]
        rows.append({"variant": variant, "clean_accuracy": r["clean"]["accuracy"],
                     "corrupted_accuracy": levels[-1]["accuracy"], "severity": levels[-1]["severity"],
                     "drop_points": levels[-1]["drop_points"], "auc": r["auc"],
                     "mean_weights_corrupted": levels[-1]["mean_weights"], "run": run})
    return rows


def run_ablation(raw: dict[str, Any], out: Path, corrupt: list[str], severity: float, *,
                 variants: list[str] | None = None, protocol: str = "all", p: float | None = None,
                 overwrite: bool = False, train_fn: Callable | None = None,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train every variant into ``out/<variant>`` and evaluate each clean and at ``severity``."""
    from fusionkit.robustness import robustness_report
    from fusionkit.training.trainer import prepare_run_dir, train

    train_fn = train_fn or train
    configs = variant_configs(raw, variants)
    runs = {}
    for name, cfg in configs.items():
        log(f"training variant {name}")
        run_dir = prepare_run_dir(out / name, overwrite=overwrite)
        train_fn(cfg, run_dir, show_progress=False)
        runs[name] = str(run_dir)
    report = robustness_report(list(runs.values()), corrupt, [0.0, severity], protocol=protocol, p=p,
                               baseline=runs.get("static_mean") or next(iter(runs.values())), log=log)
    rows = ablation_table(report, runs)
    result = {"corrupt": corrupt, "severity": severity, "protocol": protocol, "p": p, "rows": rows,
              "robustness": report}
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    (out / "ablation.md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    spec = ", ".join(result["corrupt"])
    lines = [f"| variant | clean acc | acc @ {spec} s={result['severity']} | drop (pts) | AUC |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['clean_accuracy']:.4f} | {r['corrupted_accuracy']:.4f} | "
                     f"{r['drop_points']:.2f} | {r['auc']:.4f} |")
    return "\n".join(lines) + "\n"
