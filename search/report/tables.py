"""Ranked tables from the Parquet results (and nothing else), in four formats.

Views, all selected on validation rows only:

* ``summary`` (the CLI's default): methods x test OOD sets, AUROC and FPR95 in % as mean ±
  std over seeds, OOD sets grouped near / far (the data registry's ``ood_groups``), the best
  per set in bold; one tidy frame underneath (:func:`summary_frame`) for csv and json.
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
them into markdown, latex, or tidy csv / json (rows with their block's keys, no prose cells).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from densitune.errors import ConfigError, ResultsError
from densitune.ood_groups import ood_group
from densitune.results.sql import referenced_columns
from densitune.search.ood.density_defaults import default_params
from densitune.search.ood.metrics import METRICS, check_metric
from densitune.search.report.diagnostics import BELOW, below_chance
from densitune.search.report.markdown import cell, markdown, mean_std

if TYPE_CHECKING:
    import pyarrow as pa

    from densitune.run.runstore import RunPath

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
VIEWS = ("summary", "all", "methods", "configs", "tune")  # tune: search/report/tune_view.py, its own rows
#: Order of the OOD groups in the summary (``near`` / ``far`` from the data registry, ``attack`` for adv-* sets).
GROUP_ORDER = ("near", "far", "unknown", "attack")
#: The summary's marker of a method whose validation AUROC is below 0.5 (it ranks OOD above ID).
INVERTED = "†"


@dataclass
class Table:
    """One block of a report: a title and its rows.

    ``keys`` are the columns that identify the block (a model group, a configuration): csv and
    json put them into every row instead of the prose title. ``tidy`` (if set) is the long-format
    frame that csv and json write in place of ``frame`` (which is laid out for reading); ``display``
    (if set) is the frame of strings markdown and latex show.
    """

    title: str
    frame: pd.DataFrame
    keys: dict[str, Any] = field(default_factory=dict)
    tidy: pd.DataFrame | None = None
    display: pd.DataFrame | None = None
    #: one line markdown and latex print under the table (csv and json: the rows say it, e.g. ``inverted``)
    note: str | None = None


# ----------------------------------------------------------------------------- data


#: The columns the tables are built from: ``report`` and ``best`` read only these (and those a ``--where`` or
#: ``--by`` names) of the search rows, so thousands of per-trial files cost what these columns cost.
READ_COLUMNS = ["experiment", "trial_id", "stage", "protocol", "id_dataset", "ood_dataset", "ood_kind", "ood_name", "split", *CONFIG_COLUMNS, "eps", "seed",
                "ensemble", "objective", *VALUES, "id_accuracy", "checkpoints"]


def read_search_rows(results_dir: str | RunPath, where: str | None = None, by: list[str] | None = None) -> pa.Table:
    """The search rows under ``results_dir`` that match ``where`` (a ``--where`` expression), with the columns the
    tables need: :data:`READ_COLUMNS`, the ``by`` columns and those ``where`` names (every column if it names them
    in a way that cannot be told, e.g. a parse error, which the filter then reports)."""
    from densitune.results.store import COLUMNS, filter_results, read_results

    columns: set[str] | None = set(READ_COLUMNS) | {c for c in by or [] if c in COLUMNS}
    if where is not None:
        named = referenced_columns(where, COLUMNS, expression=True)
        columns = None if named is None or columns is None else columns | named
    return filter_results(read_results(results_dir, stage="search", columns=columns), where)


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
    if "ood_kind" in df.columns:  # rows written without them (by hand, not by a search): as the tables know the sets
        missing = df["ood_kind"].isna() & df["ood_dataset"].notna()
        df.loc[missing, "ood_kind"] = [ood_group_of(i, o) for i, o in zip(df.loc[missing, "id_dataset"], df.loc[missing, "ood_dataset"])]
        df["ood_name"] = df["ood_name"].fillna(df["ood_dataset"])
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
    given = json.loads(params)
    try:
        defaults = default_params(density)
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
    short = _short_names(df)
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
                rows.append({"ood_dataset": short.get(s, s), "split": split, **_stats(a), **_stats(b, "_ip")})
        first = r.plain if r.plain is not None else r.ip
        v: Callable[[pd.Series | None], str] = lambda t: "-" if t is None else f"{t['val']:.4f}"  # noqa: E731
        title = (f"{rank}. {_group_title(r.config)} {_method_title(r.config)} — ID test accuracy "
                 f"{_accuracy(plain if len(plain) else ip)}; {_members(first)}; {_eps_choice(r)}; "
                 f"val {metric}: no ip {v(r.plain)}, ip {v(r.ip)}")
        cols = ["ood_dataset", "split"] + [f"{m}{p}{s}" for p in ("", "_ip") for m in ("auroc", "auprc") for s in ("", "_std")]
        keys = {"rank": rank, **r.config, "eps_ip": None if r.ip is None else float(r.ip["eps"])}
        tables.append(Table(title, pd.DataFrame(rows, columns=cols), keys=keys))
    return tables


def _short_names(df: pd.DataFrame) -> dict[str, str]:
    """Each OOD set's short name (rows' ``ood_name``: a folder's own name, NAME of ``near:NAME=...``)."""
    if "ood_name" not in df.columns:
        return {}
    sets = df[["ood_dataset", "ood_name"]].dropna().drop_duplicates("ood_dataset")
    return dict(zip(sets["ood_dataset"], sets["ood_name"], strict=True))


def _eps_choice(r: ConfigResult) -> str:
    """What validation chose for ε, in words: an ip ε only when it won (ties go to ε = 0, as in the ranking)."""
    if r.ip is None:
        return "ε = 0 (no ip searched)"
    if r.plain is None or (r.rank_value == r.ip["val"] and r.plain["val"] != r.rank_value):
        return f"ip ε = {r.ip['eps']:.4g} (chosen on validation)"
    return f"ε = 0 (chosen on validation; best ip ε = {r.ip['eps']:.4g})"


def methods_tables(df: pd.DataFrame, metric: str = "auroc") -> list[Table]:
    """The note's method comparison per model group: method | ε | OOD set | AUROC | AUPRC (test rows)."""
    short = _short_names(df)
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
                    rows.append({"method": name, "eps": trial["eps"], "ood_dataset": short.get(s, s),
                                 **{k: st[k] for k in ("auroc", "auroc_std", "auprc", "auprc_std")}})
        title = f"{_group_title(g.config)} — test figures, every +ip ε chosen on validation {metric}"
        tables.append(Table(title, pd.DataFrame(rows, columns=["method", "eps", "ood_dataset", "auroc", "auroc_std", "auprc", "auprc_std"]),
                            keys={c: g.config[c] for c in GROUP_COLUMNS}))
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


def ood_group_of(id_dataset: str | None, ood_dataset: str) -> str:
    """``near`` / ``far`` as the data registry knows them, ``attack`` for ``adv-*`` rows, else ``unknown``
    (what a row without ``ood_kind`` is grouped by; a search records each set's kind, :mod:`densitune.ood_groups`)."""
    if ood_dataset.startswith("adv-"):
        return "attack"
    return ood_group(id_dataset or "", ood_dataset) or "unknown"


def _method_order(score: str, density: str) -> tuple[int, bool, str]:
    return (METHOD_ORDER.index(score) if score in METHOD_ORDER else len(METHOD_ORDER), density != "gmm_sum", density)


#: Columns of the summary's tidy frame (one row per method x test OOD set).
SUMMARY_COLUMNS = ["method", "score", "density", "density_params", *GROUP_COLUMNS, "eps", "eps_tuned", "val", "protocol",
                   "inverted", "ood_group", "ood_dataset", "ood_name", "n_seeds", "auroc", "auroc_std", "auprc", "auprc_std", "fpr95", "fpr95_std",
                   "best_auroc", "best_fpr95"]


def summary_frame(df: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """The default report as a tidy frame: one row per method and test OOD set (or attack).

    A method is a score (with its density). Its model group and density parameters are chosen
    on validation ``metric``, and so is ε where ε > 0 was searched (``eps_tuned``): when
    validation chose ε > 0 there are two rows, ``<method>`` (ε = 0, no input perturbation) and
    ``<method>+ip`` (the chosen ε); when it chose ε = 0, one row ``<method>`` with
    ``eps_tuned`` set, so no row is called "+ip" that validation did not pick. Figures are the test rows' mean and
    sample std over seeds (``n_seeds`` values; an ensemble is one value). ``best_auroc`` /
    ``best_fpr95`` mark the best method per OOD set (to the two decimals of a percentage
    that the tables show). ``density_params`` holds every parameter as a dict.
    """
    trials = trial_objectives(df, metric)  # best-first
    methods = sorted({(r.score, r.density) for r in trials[["score", "density"]].itertuples()}, key=lambda m: _method_order(*m))
    records = []
    for score, density in methods:
        mt = trials[(trials["score"] == score) & (trials["density"] == density)]
        plain, tuned = mt[mt["eps"] == 0], mt.iloc[0] if (mt["eps"] > 0).any() else None
        picks: list[tuple[pd.Series, bool]] = []  # (trial, ε chosen on validation among several)
        if tuned is not None and tuned["eps"] == 0:  # validation preferred no perturbation: one row says so
            picks.append((tuned, True))
        else:
            if len(plain):
                picks.append((plain.iloc[0], False))
            if tuned is not None:
                picks.append((tuned, True))
        for trial, eps_tuned in picks:
            name = _method_name(score, density, "", bool(trial["eps"] > 0))
            rows = _trial_rows(df, trial)
            val_auroc = rows[rows["split"] == "val"].groupby("ood_dataset")["auroc"].mean()
            for ood, t in rows[rows["split"] == "test"].groupby("ood_dataset"):
                st = _stats(t)
                records.append({"method": name, "score": score, "density": density,
                                "density_params": json.loads(trial["density_params"] or "{}"),
                                **{c: trial[c] for c in GROUP_COLUMNS}, "eps": float(trial["eps"]), "eps_tuned": eps_tuned,
                                "val": float(trial["val"]), "inverted": bool((val_auroc < BELOW).any()),
                                "protocol": trial["protocol"], "ood_group": t["ood_kind"].iloc[0],
                                "ood_dataset": ood, "ood_name": t["ood_name"].iloc[0], "n_seeds": int(t["auroc"].notna().sum()),
                                **{k: st[k] for k in ("auroc", "auroc_std", "auprc", "auprc_std", "fpr95", "fpr95_std")}})
    out = pd.DataFrame.from_records(records, columns=[c for c in SUMMARY_COLUMNS if not c.startswith("best_")])
    for m, pick in (("auroc", "max"), ("fpr95", "min")):
        shown = (out[m] * 100).round(2)
        out[f"best_{m}"] = shown == shown.groupby(out["ood_dataset"]).transform(pick)
    return out.rename(columns={"val": f"val_{metric}"})


def _percent(mean: float, std: float, bold: bool) -> str:
    if pd.isna(mean):
        return "-"
    text = f"{100 * mean:.2f}" + ("" if pd.isna(std) else f" ± {100 * std:.2f}")
    return f"**{text}**" if bold else text


def _set_columns(tidy: pd.DataFrame) -> list[str]:
    sets = tidy[["ood_group", "ood_dataset", "ood_name"]].drop_duplicates("ood_dataset")
    order = sets["ood_group"].map(lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER))
    sets = sets.assign(_g=order).sort_values(["_g", "ood_name", "ood_dataset"], kind="mergesort")
    return list(sets["ood_dataset"])


def _header(tidy: pd.DataFrame, ood: str) -> str:
    """A set's column header: its kind and short name (the full text, e.g. a folder's path, stays in the rows)."""
    row = tidy.loc[tidy["ood_dataset"] == ood].iloc[0]
    return row["ood_name"] if row["ood_group"] in ("unknown", "attack") else f"{row['ood_group']}: {row['ood_name']}"


def _wide(tidy: pd.DataFrame, sets: list[str], metrics: list[str], label: Callable[[str, str], str]) -> pd.DataFrame:
    """Methods x (set, metric) cells "mean ± std" in percent, the best per column in bold."""
    methods = list(dict.fromkeys(tidy["method"]))
    out = pd.DataFrame({"method": methods})
    for ood in sets:
        for m in metrics:
            sub = tidy[tidy["ood_dataset"] == ood].set_index("method")
            out[label(ood, m)] = [_percent(sub.at[k, m], sub.at[k, f"{m}_std"], bool(sub.at[k, f"best_{m}"]))
                                  if k in sub.index else "" for k in methods]
    return out[[c for c in out.columns if c == "method" or (out[c] != "").any()]].loc[
        lambda d: (d.drop(columns="method") != "").any(axis=1)].reset_index(drop=True)


def summary_tables(df: pd.DataFrame, metric: str = "auroc") -> list[Table]:
    """The default ``report``: methods x test OOD sets, AUROC and FPR95 (%), mean ± std over seeds.

    Blocks over one tidy frame (:func:`summary_frame`, what csv and json write): test AUROC with
    what validation chose per method (model group, non-default parameters, ε), test FPR95, OOD
    sets ordered near, far, other; attacks (if any) in a block of their own.
    """
    tidy = summary_frame(df, metric)
    protocol = ", ".join(sorted(set(tidy["protocol"].dropna())))
    ood_sets = [s for s in _set_columns(tidy) if not s.startswith("adv-")]
    attacks = [s for s in _set_columns(tidy) if s.startswith("adv-")]
    tables: list[Table] = []
    note: str | None = None
    for m in ("auroc", "fpr95"):
        if not ood_sets:
            break
        wide = _wide(tidy[tidy["ood_dataset"].isin(ood_sets)], ood_sets, [m], lambda o, _m: _header(tidy, o))
        better = "higher" if METRICS[m].direction == "max" else "lower"
        title = f"test {m.upper()} (%, {better} is better), mean ± std over seeds, best per OOD set in bold"
        if m == "auroc":  # what validation chose, once
            first = tidy.drop_duplicates("method").set_index("method")
            models = []
            for k in wide["method"]:
                r = first.loc[k]
                params = short_params(r["density"], json.dumps(r["density_params"]))
                models.append(_group_title(r.to_dict()) + (f" {params}" if params else ""))
            wide.insert(1, "model", models)
            wide.insert(2, "ε", [f"{first.at[k, 'eps']:g}" + (" (tuned)" if first.at[k, "eps_tuned"] else "")
                                 for k in wide["method"]])
            title += (f"; model and parameters of each method chosen on validation {metric} ({protocol}), "
                      "ε too where marked (tuned)")
            inverted = [bool(first.at[k, "inverted"]) for k in wide["method"]]
            if any(inverted):  # a score that ranks OOD above ID on validation: marked here, not only under --full
                wide["method"] = [f"{k} {INVERTED}" if inv else k for k, inv in zip(wide["method"], inverted)]
                note = (f"{INVERTED} validation AUROC below 0.5: the score ranks OOD inputs above ID inputs (its sign "
                        "is kept; `report --full` shows the reversed AUROC; `search --orient validation` adds a negated variant)")
        tables.append(Table(title, wide, tidy=tidy if not tables else tidy.iloc[0:0], display=wide,
                            note=note if m == "auroc" else None))
    if attacks:
        wide = _wide(tidy[tidy["ood_dataset"].isin(attacks)], attacks, ["auroc", "fpr95"], lambda o, m: f"{o} {m.upper()}")
        tables.append(Table("adversarial detection, clean vs attacked ID test inputs (%), mean ± std over seeds, "
                            "best per column in bold", wide, tidy=tidy if not tables else tidy.iloc[0:0], display=wide))
    return tables


def diagnostics_tables(df: pd.DataFrame) -> list[Table]:
    """The report's diagnostics section: one table of below-chance scores, or nothing when every score is >= 0.5."""
    bad = below_chance(df)
    if bad.empty:
        return []
    bad = bad.rename(columns={"ood_dataset": "val_ood", "auroc": "val_auroc", "auroc_reversed": "reversed_val_auroc"})
    title = ("diagnostics: validation AUROC below 0.5 — these scores rank OOD inputs above ID inputs; the reversed "
             "score's AUROC (1 − AUROC) is shown beside it; selection keeps each score's sign")
    return [Table(title, bad)]


def report_tables(table: pa.Table, metric: str = "auroc", top: int | None = None, view: str = "all", by: list[str] | None = None) -> list[Table]:
    df = search_frame(table)
    if by:
        return by_tables(df, by, metric)
    if view not in VIEWS:
        raise ConfigError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    if view == "summary":
        return summary_tables(df, metric)
    tables = []
    if view in ("all", "methods"):
        tables += methods_tables(df, metric)
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
    keys = {**cfg, "eps": float(top["eps"]), "experiment": top["experiment"], "trial_id": top["trial_id"]}
    return [Table(title, pd.DataFrame(out), keys=keys)]


def best_config(table: pa.Table, metric: str = "auroc") -> dict[str, Any]:
    """The best trial as a dict (for programs): config columns, eps, trial_id, val."""
    top = trial_objectives(search_frame(table), metric).iloc[0]
    out = {c: top[c] for c in [*CONFIG_COLUMNS, "eps", "trial_id", "experiment", "val"]}
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- rendering


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Merge ``x`` / ``x_std`` columns into "mean ± std" strings; format floats (:mod:`.markdown`'s cell rules)."""
    out = {}
    for c in frame.columns:
        if c.endswith("_std"):
            continue
        col = frame[c]
        if f"{c}_std" in frame.columns:
            out[c] = [mean_std(m, s) for m, s in zip(col, frame[f"{c}_std"])]
        else:
            floating = pd.api.types.is_float_dtype(col)
            out[c] = [cell(v, c, floating) for v in col]
    return pd.DataFrame(out, columns=list(out))


def _markdown(t: Table) -> str:
    d = _display(t.frame)
    return markdown(t.title, list(d.columns), d.astype(str).itertuples(index=False))


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "ε": r"$\varepsilon$",
          "λ": r"$\lambda$", "—": "--", "†": r"\dag{}"}


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


def _records(t: Table) -> pd.DataFrame:
    """A block as tidy rows: its identifying ``keys`` as columns, then its tidy (or plain) frame."""
    frame = (t.tidy if t.tidy is not None else t.frame).copy()
    for i, (k, v) in enumerate(t.keys.items()):
        if k not in frame.columns:
            frame.insert(i, k, [v] * len(frame))
    if "density_params" in frame.columns:  # stored as JSON text; a nested object here
        frame["density_params"] = [json.loads(v or "{}") if isinstance(v, str) else v for v in frame["density_params"]]
    return frame


def _tidy(tables: list[Table]) -> pd.DataFrame:
    frames = [f for f in (_records(t) for t in tables) if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _csv(tables: list[Table]) -> str:
    frame = _tidy(tables)
    if frame.empty and not len(frame.columns):
        return ""
    if "density_params" in frame.columns:  # one column per parameter, as pandas.json_normalize names them
        params = pd.json_normalize([v if isinstance(v, dict) else {} for v in frame["density_params"]]).add_prefix("density_params.")
        i = list(frame.columns).index("density_params")
        frame = pd.concat([frame.iloc[:, :i], params.set_index(frame.index), frame.iloc[:, i + 1:]], axis=1)
    return str(frame.to_csv(index=False))


def _pandas_markdown(t: Table) -> str:
    assert t.display is not None
    return f"### {t.title}\n\n" + str(t.display.to_markdown(index=False, disable_numparse=True)) + (
        f"\n\n{t.note}" if t.note else "")


def _pandas_latex(t: Table) -> str:
    assert t.display is not None
    d = t.display.map(lambda v: re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", _latex_escape(str(v))))
    d.columns = [_latex_escape(str(c)) for c in d.columns]
    return (str(d.style.hide(axis="index").to_latex(caption=_latex_escape(t.title), hrules=True, position="h",
                                               position_float="centering", environment="table"))) + (
        f"\n{_latex_escape(t.note)}\n" if t.note else "")


def render(tables: list[Table], fmt: str = "markdown") -> str:
    """The tables as markdown, latex, or tidy csv / json (one record per row, no prose cells).

    csv and json write each block's rows with its identifying ``keys`` as columns (no titles);
    ``density_params`` is a nested object in json and one ``density_params.<name>`` column per
    parameter in csv. Blocks with a ``display`` frame render it through pandas (``to_markdown``,
    ``Styler.to_latex``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "markdown":
        return "\n\n".join(_pandas_markdown(t) if t.display is not None else _markdown(t) for t in tables)
    if fmt == "latex":
        return "\n\n".join(_pandas_latex(t) if t.display is not None else _latex(t) for t in tables)
    if fmt == "csv":
        return _csv(tables)
    frame = _tidy(tables)
    return json.dumps(json.loads(frame.to_json(orient="records", force_ascii=False, double_precision=15)), indent=1, ensure_ascii=False)


def report(table: pa.Table, metric: str = "auroc", top: int | None = None, view: str = "all", fmt: str = "markdown",
           by: list[str] | None = None) -> str:
    """The report (see the module docstring) rendered in ``fmt``."""
    return render(report_tables(table, metric, top, view, by), fmt)


def best(table: pa.Table, metric: str = "auroc", fmt: str = "markdown") -> str:
    return render(best_tables(table, metric), fmt)
