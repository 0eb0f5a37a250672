"""Ranked tables from the Parquet results (and nothing else), in four formats.

Views, all selected on validation rows only:

* ``methods``: per trained configuration (model group), the research note's method
  comparison (§1.3 / §1.8 / §1.9): a block per method (baseline = msp, ensemble, ddu =
  gmm_sum density, ddu+ip, and every other score / density searched) with a row per test
  OOD set (and attack). "+ip" is the method's best ε > 0 on validation.
* ``configs``: per configuration (model group × score × density), a row per OOD set with
  AUROC / AUPRC without ip (ε = 0) and with it side by side (the note's §1.2 tables),
  configurations ranked by their best validation figure.
* ``by`` (``--by backbone,D``): one block per value of the given columns: its best trial
  on validation and that trial's test figures.

Seeds are aggregated as mean ± std. Every view is a list of :class:`Table` (a title and
a DataFrame with numeric ``<metric>`` / ``<metric>_std`` columns); :func:`render` turns
them into markdown, csv, latex or json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from densitune.errors import ConfigError, ResultsError
from densitune.search.ood.metrics import METRICS, check_metric

if TYPE_CHECKING:
    import pyarrow as pa

#: Columns that identify a trained configuration (a model group).
GROUP_COLUMNS = ["backbone", "D", "loss", "center_loss", "spectral"]
#: Columns that identify a method on a model group; ε is what ip varies.
METHOD_COLUMNS = ["score", "density", "density_params"]
CONFIG_COLUMNS = GROUP_COLUMNS + METHOD_COLUMNS

#: Friendly names of the note's methods; others are shown as score[:density].
METHOD_NAMES = {("msp", ""): "baseline (msp)", ("ensemble_msp", ""): "ensemble", ("density", "gmm_sum"): "ddu"}
METHOD_ORDER = ["msp", "ensemble_msp", "density", "ensemble_entropy", "entropy", "gradnorm", "diff"]
VALUES = list(METRICS)
FORMATS = ("markdown", "csv", "latex", "json")
VIEWS = ("all", "methods", "configs")


@dataclass
class Table:
    """One block of a report: a title and its rows."""

    title: str
    frame: pd.DataFrame


# ----------------------------------------------------------------------------- data


def search_frame(table: pa.Table) -> pd.DataFrame:
    """The search rows of a results table as a DataFrame (nulls made groupable)."""
    df = table.to_pandas()
    df = df[df["stage"] == "search"].copy()
    if df.empty:
        raise ResultsError("the results hold no search rows (run `densitune search` first)")
    df["density"] = df["density"].fillna("")
    df["density_params"] = df["density_params"].fillna("{}")
    df["n_models"] = df["checkpoints"].map(lambda c: 1 if c is None else len(c))
    df["ensemble"] = df["ensemble"].fillna(False).astype(bool)
    return df


def trial_objectives(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per trial: config, ε, validation figure ``val`` (mean over seeds), seeds, models.

    ``val`` is the validation row's ``metric``; for protocols without an OOD side
    (id-only) it is the stored objective. Sorted best-first (ties: smaller ε, trial id).
    """
    check_metric(metric)
    val = df[df["split"] == "val"].copy()
    if val.empty:
        raise ResultsError("no validation rows among the selected results: selection needs them "
                           "(filter trials with --where, but keep split = 'val' rows)")
    kinds = set(val["protocol"].fillna("").str.startswith("id-only"))
    if len(kinds) > 1:
        raise ResultsError("the results mix id-only (log-likelihood) and OOD-metric selections, which do not rank "
                           "together: pick one with --where \"protocol LIKE 'id-only%'\" or its negation")
    val["_v"] = val[metric].where(val[metric].notna(), val["objective"])
    keys = ["experiment", "trial_id", *CONFIG_COLUMNS, "eps", "protocol"]
    out = (
        val.groupby(keys, dropna=False)
        .agg(val=("_v", "mean"), seeds=("seed", "nunique"), n_models=("n_models", "max"), ensemble=("ensemble", "max"),
             val_ood=("ood_dataset", "first"))
        .reset_index()
    )
    worst = out["protocol"].fillna("").str.endswith(":min")  # several validation sets, --val-agg min
    if worst.any():  # as the search's objective: each set's mean over seeds, then the worst set
        per_set = val.groupby([*keys, "ood_dataset"], dropna=False)["_v"].mean()
        pick = per_set.groupby(level=list(range(len(keys))), dropna=False)
        agg = (pick.max() if METRICS[metric].direction == "min" else pick.min()).rename("_worst").reset_index()
        out = out.merge(agg, on=keys, how="left")
        out["val"] = out["_worst"].where(worst, out["val"])
        out = out.drop(columns="_worst")
    asc = _ascending(out, metric)
    return out.sort_values(["val", "eps", "trial_id"], ascending=[asc, True, True], kind="mergesort")


def _ascending(trials: pd.DataFrame, metric: str) -> bool:
    """Lower is better only for fpr95 (an id-only log-likelihood is always higher-is-better)."""
    return METRICS[metric].direction == "min" and not trials["protocol"].fillna("").str.startswith("id-only").all()


@dataclass
class ConfigResult:
    """A configuration's no-ip trial and its validation-selected ip trial."""

    config: dict[str, Any]
    plain: pd.Series | None  # the ε = 0 trial
    ip: pd.Series | None  # the best ε > 0 trial on validation
    rank_value: float


def config_results(df: pd.DataFrame, metric: str, columns: list[str] = CONFIG_COLUMNS) -> list[ConfigResult]:
    """Configurations (grouped by ``columns``) ranked by their best validation figure (ip or not)."""
    trials = trial_objectives(df, metric)
    asc = _ascending(trials, metric)
    results = []
    for key, grp in trials.groupby(columns, dropna=False, sort=False):
        plain, ip = grp[grp["eps"] == 0], grp[grp["eps"] > 0]  # grp is sorted best-first
        results.append(ConfigResult(dict(zip(columns, key)), plain.iloc[0] if len(plain) else None,
                                    ip.iloc[0] if len(ip) else None, grp.iloc[0]["val"]))
    results.sort(key=lambda r: (r.rank_value if asc else -r.rank_value))
    return results


def same(column: pd.Series, value: Any) -> pd.Series:
    """``column == value``, where a null equals a null (``center_loss`` of a "ce" network is null)."""
    return (column == value) | (column.isna() & pd.isna(value))


def _trial_rows(df: pd.DataFrame, trial: pd.Series | None) -> pd.DataFrame:
    if trial is None:
        return df.iloc[0:0]
    return df[(df["trial_id"] == trial["trial_id"]) & (df["experiment"] == trial["experiment"])]


def _stats(rows: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """mean and std (over seeds) of each metric of ``rows``."""
    out = {}
    for m in VALUES:
        v = rows[m].dropna()
        out[f"{m}{prefix}"] = float(v.mean()) if len(v) else math.nan
        out[f"{m}{prefix}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
    return out


def _group_title(cfg: dict[str, Any]) -> str:
    lam = "" if cfg["loss"] == "ce" else f" λ={cfg['center_loss']:g}"
    sn = "" if cfg["spectral"] else " no-SN"
    return f"{cfg['backbone']} D={cfg['D']} {cfg['loss']}{lam}{sn}"


def short_params(density: str, params: str | None) -> str:
    """The density parameters that differ from its defaults, as ``k=v`` (rows store them all)."""
    if not density or not params or params == "{}":
        return ""
    from densitune.search.ood.densities import create_density

    given = json.loads(params)
    try:
        defaults = create_density(density).get_params()
    except Exception:  # noqa: BLE001 - a density that no longer exists: show everything
        defaults = {}
    return ",".join(f"{k}={v}" for k, v in sorted(given.items()) if defaults.get(k, object()) != v)


def _method_title(cfg: dict[str, Any]) -> str:
    dens = f" {cfg['density']}" if cfg.get("density") else ""
    params = short_params(cfg.get("density", ""), cfg.get("density_params"))
    return f"score={cfg['score']}{dens}{' ' + params if params else ''}"


def _members(trial: pd.Series) -> str:
    if trial["ensemble"]:
        return f"ensemble of {int(trial['n_models'])}"
    return f"seeds {int(trial['seeds'])}"


def _accuracy(rows: pd.DataFrame) -> str:
    test = rows[rows["split"] == "test"]
    acc = test.assign(_models=test["checkpoints"].map(lambda c: () if c is None else tuple(c))).drop_duplicates(["seed", "_models"])["id_accuracy"].dropna()
    if acc.empty:
        return "-"
    return f"{acc.mean():.4f}" + (f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else "")


def _method_name(score: str, density: str, params: str, ip: bool) -> str:
    short = short_params(density, params)
    name = (None if short else METHOD_NAMES.get((score, density))) or (f"{score}:{density}" if density and density != score else score)
    if short:
        name += f" ({short})"
    return name + ("+ip" if ip else "")


# ----------------------------------------------------------------------------- views


def configs_tables(df: pd.DataFrame, metric: str = "auroc", top: int | None = None) -> list[Table]:
    """Per configuration: OOD set × (metrics without ip, metrics with the validation-chosen ip)."""
    results = config_results(df, metric)
    tables = []
    for rank, r in enumerate(results[:top] if top is not None else results, 1):
        plain, ip = _trial_rows(df, r.plain), _trial_rows(df, r.ip)
        rows = []
        for split in ("val", "test"):
            for s in sorted(set(plain["ood_dataset"].dropna()) | set(ip["ood_dataset"].dropna())):
                a = plain[(plain["ood_dataset"] == s) & (plain["split"] == split)]
                b = ip[(ip["ood_dataset"] == s) & (ip["split"] == split)]
                if a.empty and b.empty:
                    continue
                rows.append({"ood_dataset": s, "split": split, **_stats(a), **_stats(b, "_ip")})
        first = r.plain if r.plain is not None else r.ip
        eps = f"{r.ip['eps']:.4g}" if r.ip is not None else "-"
        v: Callable[[pd.Series | None], str] = lambda t: "-" if t is None else f"{t['val']:.4f}"  # noqa: E731
        title = (f"{rank}. {_group_title(r.config)} {_method_title(r.config)} — ID test accuracy "
                 f"{_accuracy(plain if len(plain) else ip)}; {_members(first)}; ip ε = {eps} (chosen on validation); "
                 f"val {metric}: no ip {v(r.plain)}, ip {v(r.ip)}")
        cols = ["ood_dataset", "split"] + [f"{m}{p}{s}" for p in ("", "_ip") for m in ("auroc", "auprc") for s in ("", "_std")]
        tables.append(Table(title, pd.DataFrame(rows, columns=cols)))
    return tables


def methods_tables(df: pd.DataFrame, metric: str = "auroc") -> list[Table]:
    """The note's method comparison per model group: method | ε | OOD set | AUROC | AUPRC (test rows)."""
    tables = []
    for g in config_results(df, metric, GROUP_COLUMNS):
        gdf = df
        for c in GROUP_COLUMNS:
            gdf = gdf[same(gdf[c], g.config[c])]
        methods = config_results(gdf, metric, METHOD_COLUMNS)
        methods.sort(key=lambda m: (METHOD_ORDER.index(m.config["score"]) if m.config["score"] in METHOD_ORDER else 99,
                                    m.config["density"] != "gmm_sum", m.config["density"], m.config["density_params"]))
        rows = []
        for m in methods:
            for trial, ip in ((m.plain, False), (m.ip, True)):
                if trial is None:
                    continue
                trows = _trial_rows(gdf, trial)
                name = _method_name(m.config["score"], m.config["density"], m.config["density_params"], ip)
                for s, t in trows[trows["split"] == "test"].groupby("ood_dataset"):
                    st = _stats(t)
                    rows.append({"method": name, "eps": trial["eps"], "ood_dataset": s,
                                 **{k: st[k] for k in ("auroc", "auroc_std", "auprc", "auprc_std")}})
        title = f"{_group_title(g.config)} — test figures, every +ip ε chosen on validation {metric}"
        tables.append(Table(title, pd.DataFrame(rows, columns=["method", "eps", "ood_dataset", "auroc", "auroc_std", "auprc", "auprc_std"])))
    return tables


def by_tables(df: pd.DataFrame, by: list[str], metric: str = "auroc") -> list[Table]:
    """For each value of the ``by`` columns: its best trial on validation and that trial's test figures."""
    unknown = [c for c in by if c not in df.columns]
    if unknown:
        raise ConfigError(f"unknown --by column(s) {unknown}; columns: {', '.join(c for c in df.columns if not c.startswith('_'))}")
    trials = trial_objectives(df, metric)
    extra = [c for c in by if c not in trials.columns]
    if extra:  # a column that is not part of the trial key: take it from the rows
        trials = trials.merge(df.drop_duplicates("trial_id")[["trial_id", *extra]], on="trial_id")
    rows = []
    for key, grp in trials.groupby(by, dropna=False, sort=True):
        top = grp.iloc[0]  # best-first
        trows = _trial_rows(df, top)
        for s, t in trows[trows["split"] == "test"].groupby("ood_dataset"):
            rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "score": top["score"],
                         "density": top["density"], "eps": top["eps"], f"val_{metric}": top["val"],
                         "ood_dataset": s, **_stats(t)})
    return [Table(f"best trial per {', '.join(by)} (selected on validation {metric}; test figures)", pd.DataFrame(rows))]


def report_tables(table: pa.Table, metric: str = "auroc", top: int | None = None, view: str = "all", by: list[str] | None = None) -> list[Table]:
    df = search_frame(table)
    if by:
        return by_tables(df, by, metric)
    if view not in VIEWS:
        raise ConfigError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    tables = []
    if view in ("all", "methods"):
        tables += methods_tables(df, metric)
        from densitune.search.results.diagnostics import diagnostics_tables

        tables += diagnostics_tables(df)  # scores below chance on validation, with the reversed AUROC
    if view in ("all", "configs"):
        tables += configs_tables(df, metric, top)
    return tables


def best_tables(table: pa.Table, metric: str = "auroc") -> list[Table]:
    """The best trial by validation ``metric`` with its test figures (mean ± std over seeds)."""
    df = search_frame(table)
    top = trial_objectives(df, metric).iloc[0]
    rows = _trial_rows(df, top)
    cfg = {c: top[c] for c in CONFIG_COLUMNS}
    title = (f"best configuration by validation {metric} ({top['protocol']}): {_group_title(cfg)} {_method_title(cfg)} "
             f"eps={top['eps']:.4g} — experiment={top['experiment']} trial={top['trial_id']} {_members(top)}; "
             f"validation {metric} = {top['val']:.4f}; ID test accuracy = {_accuracy(rows)}")
    out = [{"ood_dataset": s, **_stats(g)} for s, g in rows[rows["split"] == "test"].groupby("ood_dataset")]
    return [Table(title, pd.DataFrame(out))]


def best_config(table: pa.Table, metric: str = "auroc") -> dict[str, Any]:
    """The best trial as a dict (for programs): config columns, eps, trial_id, val."""
    top = trial_objectives(search_frame(table), metric).iloc[0]
    out = {c: top[c] for c in [*CONFIG_COLUMNS, "eps", "trial_id", "experiment", "val"]}
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- rendering


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Merge ``x`` / ``x_std`` columns into "mean ± std" strings; format floats."""
    out = {}
    for c in frame.columns:
        if c.endswith("_std"):
            continue
        col = frame[c]
        if f"{c}_std" in frame.columns:
            std = frame[f"{c}_std"]
            out[c] = [("-" if pd.isna(m) else f"{m:.4f}" + ("" if pd.isna(s) else f" ± {s:.4f}")) for m, s in zip(col, std)]
        elif pd.api.types.is_float_dtype(col):
            out[c] = [("-" if pd.isna(v) else f"{v:.4g}" if c == "eps" else f"{v:.4f}") for v in col]
        else:
            out[c] = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in col]
    return pd.DataFrame(out, columns=list(out))


def _markdown(t: Table) -> str:
    d = _display(t.frame)
    lines = [f"### {t.title}", "", "| " + " | ".join(d.columns) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in d.astype(str).itertuples(index=False)]
    return "\n".join(lines)


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "ε": r"$\varepsilon$",
          "λ": r"$\lambda$", "—": "--"}


def _latex_escape(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in s)


def _latex(t: Table) -> str:
    d = _display(t.frame)
    lines = [r"\begin{table}[h]", r"\centering", r"\caption{" + _latex_escape(t.title) + "}",
             r"\begin{tabular}{" + "l" * len(d.columns) + "}", r"\toprule",
             " & ".join(_latex_escape(c) for c in d.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in d.astype(str).itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def render(tables: list[Table], fmt: str = "markdown") -> str:
    """The tables as markdown, csv (one table, a ``table`` column naming the block), latex or json."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "markdown":
        return "\n\n".join(_markdown(t) for t in tables)
    if fmt == "latex":
        return "\n\n".join(_latex(t) for t in tables)
    if fmt == "csv":
        frames = [t.frame.assign(table=t.title) for t in tables]
        return pd.concat(frames, ignore_index=True).to_csv(index=False) if frames else ""
    return json.dumps([{"title": t.title, "rows": json.loads(t.frame.to_json(orient="records"))} for t in tables], indent=1)


def report(table: pa.Table, metric: str = "auroc", top: int | None = None, view: str = "all", fmt: str = "markdown",
           by: list[str] | None = None) -> str:
    """The report (see the module docstring) rendered in ``fmt``."""
    return render(report_tables(table, metric, top, view, by), fmt)


def best(table: pa.Table, metric: str = "auroc", fmt: str = "markdown") -> str:
    return render(best_tables(table, metric), fmt)
