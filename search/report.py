"""Ranked tables from the Parquet results (and nothing else).

Shape of the research note's tables: per configuration, one row per OOD set with
AUROC / AUPRC, without input perturbation (ε = 0) and with it (the ε > 0 chosen on
*validation* data) side by side. Seeds are aggregated as mean ± std.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from search.spec import METRICS
from trainables.errors import ConfigError, ResultsError

#: Columns that identify a configuration (one table each); ε is what ip varies.
CONFIG_COLUMNS = ["backbone", "D", "loss", "lam", "spectral", "density", "score"]


def search_frame(table) -> pd.DataFrame:
    """The search rows of a results table as a DataFrame (``lam`` nulls -> NaN kept comparable)."""
    df = table.to_pandas()
    df = df[df["stage"] == "search"].copy()
    if df.empty:
        raise ResultsError("the results hold no search rows (run `densitune search` first)")
    df["lam"] = df["lam"].fillna(-1.0)  # ce has no λ; -1 keeps groupby from dropping it
    return df


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    if len(v) == 1:
        return f"{v.iloc[0]:.4f}"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def trial_objectives(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial: its config, ε, and the mean validation metric over seeds."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    val = df[df["split"] == "val"]
    keys = ["experiment", "trial_id", *CONFIG_COLUMNS, "eps", "ood_dataset", "protocol"]
    out = val.groupby(keys, dropna=False).agg(val=(metric, "mean"), seeds=("seed", "nunique")).reset_index()
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


def config_results(df: pd.DataFrame, metric: str) -> list[ConfigResult]:
    """Configurations ranked by their best validation figure (ip or not)."""
    trials = trial_objectives(df, metric)
    asc = METRICS[metric] == "min"
    results = []
    for key, grp in trials.groupby(CONFIG_COLUMNS, dropna=False, sort=False):
        plain = grp[grp["eps"] == 0]
        ip = grp[grp["eps"] > 0]
        p = plain.iloc[0] if len(plain) else None
        i = ip.iloc[0] if len(ip) else None  # grp is sorted best-first
        best = grp.iloc[0]["val"]
        results.append(ConfigResult(dict(zip(CONFIG_COLUMNS, key)), p, i, best))
    results.sort(key=lambda r: (r.rank_value if asc else -r.rank_value))
    return results


def _title(cfg: dict) -> str:
    lam = "" if cfg["loss"] == "ce" else f" λ={cfg['lam']:g}"
    sn = "" if cfg["spectral"] else " no-SN"
    dens = f" {cfg['density']}" if cfg["density"] else ""
    return f"{cfg['backbone']} D={cfg['D']} {cfg['loss']}{lam}{sn}{dens} score={cfg['score']}"


def _trial_rows(df: pd.DataFrame, trial: pd.Series | None) -> pd.DataFrame:
    if trial is None:
        return df.iloc[0:0]
    return df[(df["trial_id"] == trial["trial_id"]) & (df["experiment"] == trial["experiment"])]


def render_config(df: pd.DataFrame, r: ConfigResult, metric: str) -> str:
    """One markdown table: OOD set x (AUROC, AUPRC) without / with ip."""
    plain, ip = _trial_rows(df, r.plain), _trial_rows(df, r.ip)
    sets = sorted(set(plain["ood_dataset"]) | set(ip["ood_dataset"]))
    acc_src = plain if len(plain) else ip
    acc = _fmt(acc_src[acc_src["split"] == "test"].drop_duplicates("seed")["id_accuracy"])
    eps = f"{r.ip['eps']:.4g}" if r.ip is not None else "-"
    seeds = int((r.plain if r.plain is not None else r.ip)["seeds"])
    head = (
        f"### {_title(r.config)}\n"
        f"ID test accuracy {acc}; seeds {seeds}; ip ε = {eps} (chosen on validation); "
        f"val {metric}: no ip {_v(r.plain)}, ip {_v(r.ip)}\n\n"
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


def _v(trial: pd.Series | None) -> str:
    return "-" if trial is None else f"{trial['val']:.4f}"


def report(table, metric: str = "auroc", top: int | None = None) -> str:
    """Markdown: configurations ranked by validation ``metric``, each as a note-shaped table."""
    df = search_frame(table)
    results = config_results(df, metric)
    if top is not None:
        results = results[:top]
    parts = [f"## Ranked configurations ({len(results)}; ranked by validation {metric}, test sets never used to select)"]
    parts += [f"{i}. " + render_config(df, r, metric) for i, r in enumerate(results, 1)]
    return "\n\n".join(parts)


def best(table, metric: str = "auroc") -> str:
    """The best trial by validation ``metric`` with its test figures (mean ± std over seeds)."""
    df = search_frame(table)
    top = trial_objectives(df, metric).iloc[0]
    rows = _trial_rows(df, top)
    cfg = {c: top[c] for c in CONFIG_COLUMNS}
    lines = [
        f"best configuration by validation {metric} ({top['protocol']}):",
        f"  {_title(cfg)} eps={top['eps']:.4g}",
        f"  experiment={top['experiment']} trial={top['trial_id']} seeds={int(top['seeds'])}",
        f"  validation {metric} = {top['val']:.4f}",
        f"  ID test accuracy = {_fmt(rows[rows['split'] == 'test'].drop_duplicates('seed')['id_accuracy'])}",
        "",
        "| OOD set (test) | AUROC | AUPRC | FPR@95 |",
        "|---|---|---|---|",
    ]
    test = rows[rows["split"] == "test"]
    for s, g in test.groupby("ood_dataset"):
        lines.append(f"| {s} | {_fmt(g['auroc'])} | {_fmt(g['auprc'])} | {_fmt(g['fpr95'])} |")
    return "\n".join(lines)


def best_config(table, metric: str = "auroc") -> dict:
    """The best trial as a dict (for programs): config columns, eps, trial_id, val."""
    top = trial_objectives(search_frame(table), metric).iloc[0]
    out = {c: top[c] for c in [*CONFIG_COLUMNS, "eps", "trial_id", "experiment", "val"]}
    if out["lam"] == -1.0:
        out["lam"] = None
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}

