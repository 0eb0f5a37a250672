"""Ranked tables from the Parquet results (and nothing else).

Two views, both in the research note's shapes, both selected on validation rows only:

* ``methods``: per trained configuration (model group), the note's method comparison
  (its §1.3 / §1.8 / §1.9 tables): one block per method (baseline = msp, ensemble,
  ddu = gmm_sum density, ddu+ip, and every other score / density searched), a row
  per test OOD set (and attack) with AUROC and AUPRC. A method "+ip" is its best ε > 0
  on validation.
* ``configs``: per configuration (model group × score × density), a row per OOD set with
  AUROC / AUPRC without input perturbation (ε = 0) and with it side by side (the note's
  §1.2 tables), configurations ranked by their best validation figure.

Seeds are aggregated as mean ± std.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from search.spec import METRICS
from trainables.errors import ConfigError, ResultsError

#: Columns that identify a trained configuration (a model group).
GROUP_COLUMNS = ["backbone", "D", "loss", "lam", "spectral"]
#: Columns that identify a method on a model group; ε is what ip varies.
METHOD_COLUMNS = ["score", "density", "density_params"]
CONFIG_COLUMNS = GROUP_COLUMNS + METHOD_COLUMNS

#: Friendly names of the note's methods; others are shown as score[:density].
METHOD_NAMES = {("msp", ""): "baseline (msp)", ("ensemble_msp", ""): "ensemble", ("density", "gmm_sum"): "ddu"}
METHOD_ORDER = ["msp", "ensemble_msp", "density", "ensemble_entropy", "entropy", "gradnorm", "diff"]


def search_frame(table) -> pd.DataFrame:
    """The search rows of a results table as a DataFrame (``lam`` nulls -> -1 so groupby keeps them)."""
    df = table.to_pandas()
    df = df[df["stage"] == "search"].copy()
    if df.empty:
        raise ResultsError("the results hold no search rows (run `densitune search` first)")
    df["lam"] = df["lam"].fillna(-1.0)
    df["density"] = df["density"].fillna("")
    df["density_params"] = df["density_params"].fillna("{}")
    df["n_models"] = df["checkpoint"].fillna("").str.count(",") + 1
    return df


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    if len(v) == 1:
        return f"{v.iloc[0]:.4f}"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def trial_objectives(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial: its config, ε, the mean validation metric, seeds and models per member."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    val = df[df["split"] == "val"]
    keys = ["experiment", "trial_id", *CONFIG_COLUMNS, "eps", "ood_dataset", "protocol"]
    out = (
        val.groupby(keys, dropna=False)
        .agg(val=(metric, "mean"), seeds=("seed", "nunique"), n_models=("n_models", "max"))
        .reset_index()
    )
    asc = METRICS[metric] == "min"
    # Deterministic order: best validation figure, then smaller ε, then trial id.
    return out.sort_values(["val", "eps", "trial_id"], ascending=[asc, True, True], kind="mergesort")


@dataclass
class ConfigResult:
    """A configuration's no-ip trial and its validation-selected ip trial."""

    config: dict
    plain: pd.Series | None  # the ε = 0 trial
    ip: pd.Series | None  # the best ε > 0 trial on validation
    rank_value: float


def config_results(df: pd.DataFrame, metric: str, columns: list[str] = CONFIG_COLUMNS) -> list[ConfigResult]:
    """Configurations (grouped by ``columns``) ranked by their best validation figure (ip or not)."""
    trials = trial_objectives(df, metric)
    asc = METRICS[metric] == "min"
    results = []
    for key, grp in trials.groupby(columns, dropna=False, sort=False):
        plain, ip = grp[grp["eps"] == 0], grp[grp["eps"] > 0]  # grp is sorted best-first
        results.append(
            ConfigResult(
                dict(zip(columns, key)),
                plain.iloc[0] if len(plain) else None,
                ip.iloc[0] if len(ip) else None,
                grp.iloc[0]["val"],
            )
        )
    results.sort(key=lambda r: (r.rank_value if asc else -r.rank_value))
    return results


def _group_title(cfg: dict) -> str:
    lam = "" if cfg["loss"] == "ce" else f" λ={cfg['lam']:g}"
    sn = "" if cfg["spectral"] else " no-SN"
    return f"{cfg['backbone']} D={cfg['D']} {cfg['loss']}{lam}{sn}"


def _method_title(cfg: dict) -> str:
    dens = f" {cfg['density']}" if cfg.get("density") else ""
    params = cfg.get("density_params", "{}")
    params = "" if params in ("{}", "", None) else f" {params}"
    return f"score={cfg['score']}{dens}{params}"


def _members(trial: pd.Series) -> str:
    if trial["seeds"] == 0:  # ensemble rows carry no single seed
        return f"ensemble of {int(trial['n_models'])}"
    return f"seeds {int(trial['seeds'])}"


def _trial_rows(df: pd.DataFrame, trial: pd.Series | None) -> pd.DataFrame:
    if trial is None:
        return df.iloc[0:0]
    return df[(df["trial_id"] == trial["trial_id"]) & (df["experiment"] == trial["experiment"])]


def _v(trial: pd.Series | None) -> str:
    return "-" if trial is None else f"{trial['val']:.4f}"


def _accuracy(rows: pd.DataFrame) -> str:
    test = rows[rows["split"] == "test"]
    return _fmt(test.drop_duplicates(["seed", "checkpoint"])["id_accuracy"])


def render_config(df: pd.DataFrame, r: ConfigResult, metric: str) -> str:
    """One markdown table: OOD set x (AUROC, AUPRC) without / with ip."""
    plain, ip = _trial_rows(df, r.plain), _trial_rows(df, r.ip)
    sets = sorted(set(plain["ood_dataset"]) | set(ip["ood_dataset"]))
    eps = f"{r.ip['eps']:.4g}" if r.ip is not None else "-"
    head = (
        f"### {_group_title(r.config)} {_method_title(r.config)}\n"
        f"ID test accuracy {_accuracy(plain if len(plain) else ip)}; {_members(r.plain if r.plain is not None else r.ip)}; "
        f"ip ε = {eps} (chosen on validation); val {metric}: no ip {_v(r.plain)}, ip {_v(r.ip)}\n\n"
        "| OOD set | split | AUROC | AUPRC | AUROC +ip | AUPRC +ip |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for split in ("val", "test"):
        for s in sets:
            a = plain[(plain["ood_dataset"] == s) & (plain["split"] == split)]
            b = ip[(ip["ood_dataset"] == s) & (ip["split"] == split)]
            if a.empty and b.empty:
                continue
            lines.append(f"| {s} | {split} | {_fmt(a['auroc'])} | {_fmt(a['auprc'])} | {_fmt(b['auroc'])} | {_fmt(b['auprc'])} |")
    return "\n".join(lines)


def configs_report(table, metric: str = "auroc", top: int | None = None) -> str:
    """Configurations ranked by validation ``metric``, each as a no-ip / ip table."""
    df = search_frame(table)
    results = config_results(df, metric)
    shown = results[:top] if top is not None else results
    parts = [f"## Ranked configurations (top {len(shown)} of {len(results)} by validation {metric}; test sets never used to select)"]
    parts += [f"{i}. " + render_config(df, r, metric) for i, r in enumerate(shown, 1)]
    return "\n\n".join(parts)


def _method_name(score: str, density: str, params: str, ip: bool) -> str:
    name = METHOD_NAMES.get((score, density)) or (f"{score}:{density}" if density else score)
    if params not in ("{}", ""):
        name += f" {params}"
    return name + ("+ip" if ip else "")


def methods_report(table, metric: str = "auroc") -> str:
    """The note's method comparison per model group: Method | OOD set | AUROC | AUPRC (test rows)."""
    df = search_frame(table)
    groups = config_results(df, metric, GROUP_COLUMNS)
    parts = [f"## Method comparison (test figures; ε of every +ip method chosen on validation {metric})"]
    for g in groups:
        gdf = df
        for c in GROUP_COLUMNS:
            gdf = gdf[gdf[c] == g.config[c]]
        methods = config_results(gdf, metric, METHOD_COLUMNS)
        methods.sort(key=lambda m: (METHOD_ORDER.index(m.config["score"]) if m.config["score"] in METHOD_ORDER else 99,
                                    m.config["density"] != "gmm_sum", m.config["density"], m.config["density_params"]))
        lines = [f"### {_group_title(g.config)}", "", "| Method | ε | OOD set | AUROC | AUPRC |", "|---|---|---|---|---|"]
        for m in methods:
            for trial, ip in ((m.plain, False), (m.ip, True)):
                if trial is None:
                    continue
                rows = _trial_rows(gdf, trial)
                name = _method_name(m.config["score"], m.config["density"], m.config["density_params"], ip)
                test = rows[rows["split"] == "test"]
                for s, t in test.groupby("ood_dataset"):
                    lines.append(f"| {name} | {trial['eps']:.4g} | {s} | {_fmt(t['auroc'])} | {_fmt(t['auprc'])} |")
                    name = ""  # the method name once per block, as in the note
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


VIEWS = ("all", "methods", "configs")


def report(table, metric: str = "auroc", top: int | None = None, view: str = "all") -> str:
    """Markdown report: the method comparison and/or the ranked configurations."""
    if view not in VIEWS:
        raise ConfigError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    parts = []
    if view in ("all", "methods"):
        parts.append(methods_report(table, metric))
    if view in ("all", "configs"):
        parts.append(configs_report(table, metric, top))
    return "\n\n".join(parts)


def best(table, metric: str = "auroc") -> str:
    """The best trial by validation ``metric`` with its test figures (mean ± std over seeds)."""
    df = search_frame(table)
    top = trial_objectives(df, metric).iloc[0]
    rows = _trial_rows(df, top)
    cfg = {c: top[c] for c in CONFIG_COLUMNS}
    lines = [
        f"best configuration by validation {metric} ({top['protocol']}):",
        f"  {_group_title(cfg)} {_method_title(cfg)} eps={top['eps']:.4g}",
        f"  experiment={top['experiment']} trial={top['trial_id']} {_members(top)}",
        f"  validation {metric} = {top['val']:.4f}",
        f"  ID test accuracy = {_accuracy(rows)}",
        "",
        "| OOD set (test) | AUROC | AUPRC | FPR@95 |",
        "|---|---|---|---|",
    ]
    for s, g in rows[rows["split"] == "test"].groupby("ood_dataset"):
        lines.append(f"| {s} | {_fmt(g['auroc'])} | {_fmt(g['auprc'])} | {_fmt(g['fpr95'])} |")
    return "\n".join(lines)


def best_config(table, metric: str = "auroc") -> dict:
    """The best trial as a dict (for programs): config columns, eps, trial_id, val."""
    top = trial_objectives(search_frame(table), metric).iloc[0]
    out = {c: top[c] for c in [*CONFIG_COLUMNS, "eps", "trial_id", "experiment", "val"]}
    if out["lam"] == -1.0:
        out["lam"] = None
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
