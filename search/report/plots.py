"""Figures from a results directory: the metric against ε, score histograms, ROC curves.

Three kinds of figure, each written in every requested format (``png``, ``svg``, ``pdf``),
all selected on validation rows only (as :mod:`densitune.search.report.tables`), from the
rows a caller selects (``where``: an SQL expression, :mod:`densitune.results.sql`;
``score`` / ``density`` / ``dims``):

* ``<metric>_vs_eps``: for one score (``density`` when the selection has it, else the best
  trial's), the validation metric and the mean over test OOD sets (a third panel for
  attacks, if any) against ε, one line per configuration (D, density, ... named in the
  legend), each point the mean over seeds. The x axis is symlog with its linear part up to
  the smallest ε > 0, so ε = 0 (no input perturbation) is on the axis.
* ``hist_<ood>`` per test OOD set and attack: ID test vs that set's scores of the best
  selected configuration, without ip (ε = 0) and with ip (its best ε > 0 on validation).
* ``roc_best``: the ROC curves of the same configuration on every test OOD set, solid
  without ip, dashed with ip.

Figures are sized for one column of a two-column paper (3.3 in wide, fonts of 7 pt and up,
titles wrapped to the width, legends under the axes); SVG keeps its text as text.

Histograms and ROC curves need raw scores, which the Parquet rows do not hold: the
checkpoints named in the rows are re-evaluated under the search spec stored beside
the rows (``_spec.json``, so the same ``eval_limit`` subsets and data root). A
single-model score uses the first seed's checkpoint; an ensemble score all of them.

Scores are higher = more in-distribution, and ID is the positive class of every ROC.

The figures are built on :class:`matplotlib.figure.Figure` directly, never through
pyplot: no backend is selected, no global figure registry is touched (importing this
module in a notebook does not switch its backend), and ``savefig`` renders PNGs
with Agg.
"""

from __future__ import annotations

import functools
import logging
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

from densitune.errors import CheckpointError, ConfigError, ResultsError
from densitune.results.store import _safe, filter_results, read_results
from densitune.run.files import atomic_write
from densitune.run.runstore import location, refuse_links_below
from densitune.search.ood.metrics import METRICS, auroc, check_metric
from densitune.search.report.tables import (
    GROUP_COLUMNS,
    ConfigResult,
    _group_title,
    _method_title,
    config_results,
    same,
    search_frame,
    short_params,
    trial_objectives,
)
from densitune.search.report.tune_view import tune_frame

if TYPE_CHECKING:  # the model and data code is imported only when scores are computed
    from densitune.search.evaluate import Workspace
    from densitune.search.replay import TrialReplay

log = logging.getLogger(__name__)

__all__ = ["plot_results", "eps_curves", "best_scores", "BestScores"]

#: Columns that tell the lines of the ε plot apart (the score is one per figure).
CURVE_COLUMNS = [*GROUP_COLUMNS, "density", "density_params"]
DPI = 300
FORMATS = ("png", "svg", "pdf")
#: One column of a two-column paper, in inches.
COLUMN_WIDTH = 3.3
#: Paper-column typography: nothing below 7 pt; SVG text stays text (searchable, editable).
STYLE: dict[str, Any] = {"font.size": 7.5, "axes.titlesize": 7.5, "axes.labelsize": 7.5, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 8, "svg.fonttype": "none",
         "pdf.fonttype": 42, "lines.linewidth": 1.1, "lines.markersize": 3.5}
#: Line styles: 10 colours x 4 dash patterns x 7 markers, so that 20 curves never share colour and dash.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X")


@contextmanager
def paper_style() -> Iterator[None]:
    """Matplotlib settings for figures at paper column width (only inside the block)."""
    with mpl.rc_context(cast("Any", STYLE)):  # its stub takes only literal rc keys
        yield


def line_style(i: int) -> dict[str, str]:
    """The i-th curve's colour, dash pattern and marker: no two of the first 20 share colour and dash."""
    return {"color": f"C{i % 10}", "ls": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


def _wrap(text: str, width: int = 50) -> str:
    """A title wrapped to the column width (about 50 characters of 8 pt per 3.3 in)."""
    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def select_rows(df: pd.DataFrame, *, score: Sequence[str] | None = None, density: Sequence[str] | None = None,
                dims: Sequence[int] | None = None) -> pd.DataFrame:
    """Search rows restricted to the given scores, densities and feature dimensions (None: all)."""
    out = df
    for col, values in (("score", score), ("density", density), ("D", dims)):
        if values:
            out = out[out[col].isin(list(values))]
    if out.empty:
        asked = ", ".join(f"{c} in {list(v)}" for c, v in (("score", score), ("density", density), ("D", dims)) if v)
        raise ResultsError(f"no search rows with {asked}")
    return out


# ---------------------------------------------------------------------------- data


def _experiment_frame(df: pd.DataFrame, experiment: str | None, metric: str) -> tuple[str, pd.DataFrame]:
    """The rows of ``experiment``; by default the experiment of the best validation trial."""
    known = sorted(df["experiment"].unique())
    if experiment is None:
        experiment = str(trial_objectives(df, metric).iloc[0]["experiment"])
        if len(known) > 1:
            log.info("plotting experiment %s (best validation %s) of %s", experiment, metric, known)
    elif experiment not in known:
        raise ResultsError(f"no search rows for experiment {experiment!r}; the results hold: {', '.join(known)}")
    return experiment, df[df["experiment"] == experiment]


def plotted_score(df: pd.DataFrame, metric: str) -> str:
    """The score the ε plot draws: ``density`` when the rows have it, else the best validation trial's."""
    if (df["score"] == "density").any():
        return "density"
    return str(trial_objectives(df, metric).iloc[0]["score"])


def eps_curves(df: pd.DataFrame, metric: str, score: str = "density") -> pd.DataFrame:
    """One row per (configuration, ε) of ``score``: the mean ``metric`` per kind of set.

    Columns: :data:`CURVE_COLUMNS`, ``eps``, ``val`` (mean over seeds on the validation
    OOD set), ``test`` (mean over seeds, then over the test OOD sets) and, if attacks
    were evaluated, ``adv`` (the same over the ``adv-*`` sets). Sorted by config, then ε.
    """
    check_metric(metric)
    d = df[df["score"] == score]
    adv = d["ood_dataset"].str.startswith("adv-")
    d = d.assign(kind=np.where(d["split"] == "val", "val", np.where(adv, "adv", "test")))
    keys = [*CURVE_COLUMNS, "eps"]
    # Two stages, so that a set with more seeds (or a repeated trial) does not weigh more.
    per_set = d.groupby([*keys, "kind", "ood_dataset"], dropna=False)[metric].mean()
    out = per_set.groupby([*keys, "kind"], dropna=False).mean().unstack("kind").reset_index()
    out.columns.name = None
    return out.sort_values(keys, kind="mergesort").reset_index(drop=True)


def config_label(r: pd.Series | dict, columns: Sequence[str]) -> str:
    """A readable name of a configuration from ``columns`` (no JSON, no sentinel values)."""
    parts = []
    for c in columns:
        v = r[c]
        if c == "D":
            parts.append(f"D={v}")
        elif c == "loss":
            lam = r.get("center_loss") if hasattr(r, "get") else None
            parts.append(str(v) + ("" if v == "ce" or lam is None or pd.isna(lam) else f" λ={lam:g}"))
        elif c == "density_params":
            parts.append(short_params(str(r.get("density", "")), v))
        elif c == "spectral":
            parts.append("SN" if v else "no SN")
        elif c == "center_loss":
            continue  # shown with the loss
        elif v is not None and not (isinstance(v, float) and pd.isna(v)) and v != "":
            parts.append(str(v) if c in ("backbone", "density", "score") else f"{c}={v}")
    return " ".join(p for p in parts if p)


def _curve_labels(curves: pd.DataFrame) -> pd.Series:
    """A label per row naming D, the density and whichever other config columns vary."""
    configs = curves[CURVE_COLUMNS].drop_duplicates()
    varying = [c for c in CURVE_COLUMNS if c not in ("D", "density") and configs[c].nunique(dropna=False) > 1]
    if "center_loss" in varying and "loss" not in varying:
        varying.insert(varying.index("center_loss"), "loss")
    return curves.apply(lambda r: config_label(r, ["D", "density", *varying]) or "all", axis=1)


@dataclass
class BestScores:
    """Raw test scores of the best configuration, without ip and with its validation-chosen ε > 0.

    ``plain`` / ``ip`` map ``"id"`` and every test OOD set / ``adv-<attack>`` to an (N,)
    float64 array (higher = more ID), or are None when the configuration has no such trial.
    ``members`` says which checkpoints were scored ("seed 0 (the first of 2 seeds)").
    """

    result: ConfigResult
    members: str
    plain: dict[str, np.ndarray] | None
    ip: dict[str, np.ndarray] | None

    @property
    def title(self) -> str:
        return f"{_group_title(self.result.config)} {_method_title(self.result.config)}; {self.members}"

    @property
    def ood_sets(self) -> list[str]:
        # best_scores sets at least one of them
        arrays = cast("dict[str, np.ndarray]", self.plain if self.plain is not None else self.ip)
        return [k for k in arrays if k != "id"]

    @property
    def ip_eps(self) -> float | None:
        return None if self.result.ip is None else float(self.result.ip["eps"])


def _checkpoints(trial: TrialReplay) -> tuple[list[str], str]:
    """The checkpoints to re-evaluate and a phrase that says which they are: an ensemble's members, else the
    first seed's network."""
    if trial.seeds == [None]:
        ((_, ckpts),) = trial.members
        return list(ckpts), f"ensemble of {len(ckpts)} models"
    seed, ckpts = min(((s, c) for s, c in trial.members if s is not None), key=lambda m: m[0])
    n = len(trial.members)
    return list(ckpts), f"seed {seed}" + (f" (the first of {n} seeds)" if n > 1 else "")


def best_scores(results_dir: str | Path, df: pd.DataFrame, metric: str = "auroc", ws: Workspace | None = None) -> BestScores:
    """Re-evaluate the best configuration of ``df`` (one experiment's search rows) on the test sets
    (:mod:`densitune.search.replay`).

    Raises :class:`ResultsError` when the experiment has no stored spec and
    :class:`CheckpointError` when a checkpoint named in its rows no longer exists,
    both before any model is loaded.
    """
    from densitune.search.evaluate import Workspace
    from densitune.search.replay import replay_trial

    experiments = df["experiment"].unique()
    if len(experiments) != 1:
        raise ConfigError(f"best_scores takes the rows of one experiment, got {sorted(experiments)}")
    result = config_results(df, metric)[0]
    ref = cast(pd.Series, result.plain if result.plain is not None else result.ip)  # config_results: one is set
    rows = df[df["trial_id"] == ref["trial_id"]]
    trial = replay_trial(results_dir, rows.to_dict("records"), need_spec=True)
    ckpts, members = _checkpoints(trial)
    for c in ckpts:
        if not location(c).exists():
            raise CheckpointError(f"checkpoint {c} of trial {ref['trial_id']} no longer exists (histograms re-evaluate it)")
    ws = ws or Workspace()

    def arrays(row: pd.Series | None) -> dict[str, np.ndarray] | None:
        if row is None:
            return None
        return {k: v.numpy() for k, v in trial.at_eps(float(row["eps"])).test_scores(ws, ckpts).items()}

    return BestScores(result, members, arrays(result.plain), arrays(result.ip))


# ---------------------------------------------------------------------------- figures


def _eps_axis(ax, eps: np.ndarray) -> None:
    """Symlog ε axis whose linear part ends at the smallest ε > 0, so ε = 0 is shown."""
    positive = eps[eps > 0]
    if positive.size:
        ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.5)
    ticks = np.unique(eps)
    if ticks.size <= 9:
        if ticks.size <= 4:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:  # slanted, so that neighbouring labels of a narrow column never overlap
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_xlabel("ε (input perturbation; 0 = none)")
    ax.grid(True, alpha=0.3)


def eps_figure(df: pd.DataFrame, metric: str, experiment: str, score: str | None = None) -> Figure | None:
    """The metric against ε of every configuration of ``score`` (default :func:`plotted_score`); None if it has no trials.

    Panels are stacked (validation, test mean, attacks); one legend entry per configuration under them.
    """
    score = score or plotted_score(df, metric)
    curves = eps_curves(df, metric, score)
    if curves.empty:
        return None
    curves["label"] = _curve_labels(curves)
    val_sets = sorted(set(df.loc[df["split"] == "val", "ood_dataset"].dropna()))
    panels = [("val", f"validation ({', '.join(val_sets)})"), ("test", "test: mean over OOD sets")]
    if "adv" in curves:
        panels.append(("adv", "test: mean over attacks"))
    n_curves = curves["label"].nunique()
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, 1.75 * len(panels) + 0.6 + 0.12 * n_curves), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True)  # own y ranges: validation and test levels differ
        best = trial_objectives(df[df["score"] == score], metric).iloc[0]
        is_best = np.logical_and.reduce([same(curves[c], best[c]) for c in CURVE_COLUMNS])
        best_label = curves.loc[is_best, "label"].iloc[0]
        for ax, (kind, title) in zip(axes, panels):
            for i, (name, c) in enumerate(curves.groupby("label", sort=False)):
                c = c.dropna(subset=[kind])
                style = line_style(i)
                ax.plot(c["eps"], c[kind], label=name, **style)
                if name == best_label:
                    sel = c[c["eps"] == best["eps"]]
                    ax.plot(sel["eps"], sel[kind], marker="*", ms=9, ls="none", color=style["color"], mec="k", mew=0.5)
            ax.set_title(title)
            ax.set_ylabel(f"{METRICS[metric].label}")
            _eps_axis(ax, curves["eps"].to_numpy())
            if ax is not axes[-1]:
                ax.set_xlabel("")
        handles, labels = axes[0].get_legend_handles_labels()
        two = n_curves >= 4 and max(len(lb) for lb in labels) <= 22  # two columns only where they fit 3.3 in
        fig.legend(handles, labels, loc="outside lower center", ncols=2 if two else 1, title="configuration",
                   frameon=False)
        fig.suptitle(_wrap(f"{experiment}: score={score}, {metric} (mean over seeds) against ε; "
                           f"★ = best on validation: {best_label}, ε={best['eps']:g}"))
    return fig


def _hist_range(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[float, float]:
    """An x range that shows the ID scores and where OOD overlaps them.

    Log-densities far from the data reach -1e4 or -inf; a linear axis over all of them
    would squash the ID scores into one bin, so the range stops 2 ID spreads beyond the
    ID 0.5%..99.5% quantiles (values outside are drawn in the edge bins and counted).
    """
    both = np.concatenate([s_id, s_ood])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return -1.0, 1.0
    fid = s_id[np.isfinite(s_id)]
    lo, hi = float(both.min()), float(both.max())
    if fid.size:
        q_lo, q_hi = np.quantile(fid, [0.005, 0.995])
        span = max(q_hi - q_lo, 1e-9 * max(1.0, abs(q_hi)))
        lo, hi = max(lo, q_lo - 2 * span), min(hi, q_hi + 2 * span)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _hist_panel(ax, s_id: np.ndarray, s_ood: np.ndarray, ood: str, title: str) -> None:
    lo, hi = _hist_range(s_id, s_ood)
    bins = np.linspace(lo, hi, 41)
    for s, name, color in ((s_id, "ID test", "C0"), (s_ood, ood, "C3")):
        below, above = int((s < lo).sum()), int((s > hi).sum())
        extra = ", ".join(f"{k} {where} the axis, drawn in the {edge} bin"
                          for k, where, edge in ((below, "below", "first"), (above, "above", "last")) if k)
        label = f"{name} (n={s.size}{'; ' + extra if extra else ''})"
        clipped = np.clip(np.nan_to_num(s, neginf=lo, posinf=hi), lo, hi)
        w = np.full(s.size, 1.0 / s.size)
        ax.hist(clipped, bins=bins, weights=w, color=color, alpha=0.45, label=_wrap(label, 50))
        ax.hist(clipped, bins=bins, weights=w, color=color, histtype="step", lw=1.0)
    ax.set_title(f"{title}: AUROC {auroc(s_id, s_ood):.3f}")
    ax.set_xlabel("score (higher = more in-distribution)")
    ax.set_ylabel("fraction of the set")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)


def hist_figure(best: BestScores, ood: str) -> Figure:
    """ID test vs ``ood`` scores, without ip (top) and with the validation-chosen ip (bottom)."""
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, 5.0), layout="constrained")
        axes = fig.subplots(2, 1)
        ip_title = f"ip ε={best.ip_eps:g} (best ε > 0 on validation)" if best.ip is not None else "ip"
        for ax, arrays, title, what in ((axes[0], best.plain, "no ip (ε=0)", "ε = 0"), (axes[1], best.ip, ip_title, "ε > 0")):
            if arrays is None:
                ax.text(0.5, 0.5, f"no {what} trial of this configuration",
                        ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            _hist_panel(ax, arrays["id"], arrays[ood], ood, title)
        fig.suptitle(_wrap(f"{best.title}\nID test vs {ood}"))
    return fig


def roc_figure(best: BestScores) -> Figure:
    """ROC curves (ID positive) on every test OOD set; solid without ip, dashed with ip."""
    with paper_style():
        n = len(best.ood_sets) * ((best.plain is not None) + (best.ip is not None))
        fig = Figure(figsize=(COLUMN_WIDTH, 3.4 + 0.13 * n), layout="constrained")
        ax = fig.subplots()
        ip_name = f"ip ε={best.ip_eps:g}" if best.ip is not None else ""
        for i, ood in enumerate(best.ood_sets):
            for arrays, style, name in ((best.plain, "-", "no ip"), (best.ip, "--", ip_name)):
                if arrays is None:
                    continue
                s_id, s_ood = arrays["id"], arrays[ood]
                labels = np.concatenate([np.ones(s_id.size), np.zeros(s_ood.size)])
                # Ranks, not raw scores: the same curve, and -inf log-densities are allowed (cf. densitune.search.ood.metrics).
                fpr, tpr, _ = roc_curve(labels, rankdata(np.concatenate([s_id, s_ood])))
                ax.plot(fpr, tpr, ls=style, color=f"C{i % 10}", label=f"{ood}, {name}: AUROC {auroc(s_id, s_ood):.3f}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="chance")
        ax.set_xlabel("false positive rate (OOD accepted as ID)")
        ax.set_ylabel("true positive rate (ID accepted)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        fig.legend(loc="outside lower center", frameon=False)
        fig.suptitle(_wrap(f"{best.title}\nROC on the test OOD sets (ID positive)"))
    return fig


# ---------------------------------------------------------------------------- entry point


def tune_figure(tune: pd.DataFrame) -> Figure | None:
    """``densitune tune``'s validation objective against D (log scale), one marker per loss: filled where the
    network trained to the last epoch, hollow where the scheduler stopped it (the epochs it reached beside it).
    ``tune``: :func:`densitune.search.report.tune_view.tune_frame`; None when it is empty."""
    if tune.empty:
        return None
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, 2.4), layout="constrained")
        ax = fig.subplots()
        for i, (loss, rows) in enumerate(tune.groupby("loss", sort=True)):
            style = line_style(i)
            for finished, part in rows.groupby(rows["status"] == "finished"):
                ax.scatter(part["D"], part["objective"], marker=style["marker"], color=style["color"],
                           facecolors=style["color"] if finished else "none",
                           label=f"{loss} ({'finished' if finished else 'stopped'})")
            for _, r in rows[rows["status"] == "stopped"].iterrows():
                ax.annotate(f"e{int(r['epochs'])}", (r["D"], r["objective"]), textcoords="offset points", xytext=(3, 3),
                            fontsize="x-small")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("feature dimension D")
        ax.set_ylabel("validation objective")
        ax.legend(fontsize="x-small")
    return fig


def _savefig(fig: Figure, fmt: str, f: BinaryIO) -> None:
    fig.savefig(f, dpi=DPI, format=fmt)


def _save(fig: Figure, path: Path, formats: Sequence[str]) -> list[Path]:
    """``path`` with each format's suffix; SVG and PDF keep text as text (see :data:`STYLE`)."""
    out = []
    with paper_style():  # svg.fonttype / pdf.fonttype are read when saving
        for fmt in formats:
            target = path.parent / f"{path.name}.{fmt}"
            atomic_write(target, functools.partial(_savefig, fig, fmt))  # replaces a link, never follows it
            log.info("wrote %s", target)
            out.append(target)
    return out


def check_formats(formats: Sequence[str]) -> list[str]:
    """Known, de-duplicated figure formats, in the given order."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown figure format(s) {unknown}; known: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def plot_results(
    results_dir: str | Path,
    out_dir: str | Path,
    *,
    experiment: str | None = None,
    metric: str = "auroc",
    scores: bool = True,
    ws: Workspace | None = None,
    where: str | None = None,
    score: Sequence[str] | None = None,
    density: Sequence[str] | None = None,
    dims: Sequence[int] | None = None,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Write the figures of one search experiment to ``out_dir``; returns the paths written.

    What is drawn comes from the rows matching ``where`` (one SQL expression, checked as
    :func:`densitune.results.store.filter_results` does) and the ``score`` /
    ``density`` / ``dims`` lists; the histograms and ROC curves show the best of those on
    validation. ``experiment`` defaults to the experiment of the best selected validation
    trial. With ``scores=False`` only the ε plot is drawn (no checkpoints or spec needed);
    with ``scores=True`` the spec and checkpoints are checked before anything is written,
    so a missing ``_spec.json`` or checkpoint leaves ``out_dir`` untouched. Each figure is
    written once per entry of ``formats`` (``png``, ``svg``, ``pdf``).
    ``ws`` is an optional :class:`densitune.search.evaluate.Workspace` (cached models and data).
    """
    check_metric(metric)
    formats = check_formats(formats)
    out = Path(out_dir)
    if out.resolve().is_relative_to(Path(results_dir).resolve()):
        # read_results rejects every non-Parquet file under the results directory
        raise ConfigError(f"plot directory {out} is inside the results directory {results_dir}; choose another")
    df = search_frame(filter_results(read_results(results_dir), where))
    df = select_rows(df, score=score, density=density, dims=dims)
    experiment, df = _experiment_frame(df, experiment, metric)
    best = best_scores(results_dir, df, metric, ws) if scores else None
    results_at = location(results_dir)
    if isinstance(results_at, Path):  # figures in the run (RUN/plots): no write through a planted link
        refuse_links_below(results_at.parent, out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = eps_figure(df, metric, experiment)
    if fig is None:
        log.warning("experiment %s has no trials to draw against ε: no %s_vs_eps plot", experiment, metric)
    else:
        paths += _save(fig, out / f"{metric}_vs_eps", formats)
    tune = tune_figure(tune_frame(read_results(results_dir, stage="tune").to_pylist()))
    if tune is not None:  # the run holds a densitune tune
        paths += _save(tune, out / "tune_objective_vs_D", formats)
    if best is not None:
        for ood in best.ood_sets:
            paths += _save(hist_figure(best, ood), out / f"hist_{_safe(ood)}", formats)
        paths += _save(roc_figure(best), out / "roc_best", formats)
    return paths
