"""``densitune compare``: A vs B on the same networks, a paired AUROC difference per test OOD set.

A and B are each chosen by a ``--where`` filter on the results rows (the best trial among the matching ones
by validation metric, as ``densitune best --where``). Their per-sample test scores (kept by a search run with
``--keep-scores all``, :mod:`densitune.results.sample_scores`) are paired by seed and sample; with
one seed the interval is DeLong's, with several a paired bootstrap over test samples and seeds
(:mod:`densitune.search.ood.compare`). An interval that contains 0 is marked: the difference is not
established.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from densitune.errors import ConfigError, ResultsError
from densitune.results.sample_scores import read_sample_scores
from densitune.results.sql import echo
from densitune.results.store import filter_results
from densitune.run.runstore import RunPath
from densitune.search.ood.compare import PairedDiff, delong, paired_bootstrap
from densitune.search.report.tables import (
    CONFIG_COLUMNS,
    Table,
    _group_title,
    _method_title,
    search_frame,
    trial_objectives,
)

__all__ = ["Side", "compare_tables", "pick", "paired_diffs"]


class Side:
    """One side of a comparison: its best trial under a filter, its rows and its per-sample scores."""

    def __init__(self, label: str, where: str, table: pa.Table, results_dir: str | RunPath, metric: str) -> None:
        df = search_frame(table)
        self.label, self.where = label, where
        chosen = filter_results(table, where)
        if not any(stage == "search" for stage in chosen.column("stage").to_pylist()):
            raise ConfigError(f"{label}: no search rows match {echo(where)}")
        sel = search_frame(chosen)
        self.trial = trial_objectives(sel, metric).iloc[0]
        self.rows = df[(df["trial_id"] == self.trial["trial_id"]) & (df["experiment"] == self.trial["experiment"])]
        samples = read_sample_scores(results_dir, str(self.trial["experiment"]), [str(self.trial["trial_id"])]).to_pandas()
        if samples.empty:
            raise ResultsError(f"{label}: trial {self.trial['trial_id']} kept no per-sample scores: search with "
                               "--keep-scores all to compare configurations")
        self.samples = samples

    @property
    def title(self) -> str:
        cfg = {c: self.trial[c] for c in CONFIG_COLUMNS}
        return (f"{self.label} = {_group_title(cfg)} {_method_title(cfg)} eps={self.trial['eps']:.4g} "
                f"(trial {self.trial['trial_id']}, validation {self.trial['val']:.4f})")

    def seeds(self) -> list[int | None]:
        return sorted({None if pd.isna(s) else int(s) for s in self.samples["seed"]}, key=lambda s: -1 if s is None else s)

    def checkpoints(self, seed: int | None) -> tuple[str, ...]:
        test = self.rows[self.rows["split"] == "test"]
        test = test[test["seed"].isna()] if seed is None else test[test["seed"] == seed]
        return tuple(test.iloc[0]["checkpoints"]) if len(test) else ()

    def arrays(self, seed: int | None, ood: str) -> tuple[np.ndarray, np.ndarray] | None:
        s = self.samples
        s = s[(s["seed"].isna() if seed is None else s["seed"] == seed) & (s["ood_dataset"] == ood)]
        if s.empty:
            return None
        s = s.sort_values("index")
        return s[s["side"] == "id"]["score"].to_numpy(), s[s["side"] == "ood"]["score"].to_numpy()


def paired_diffs(a: Side, b: Side, *, n_boot: int = 2000, seed: int = 0) -> dict[str, PairedDiff]:
    """Per test OOD set both sides scored: AUROC(A) − AUROC(B) with its 95 % interval.

    Pairs by seed (an ensemble, seed null, only with an ensemble) and by sample; the networks of every
    paired seed must be the same.
    """
    seeds = [s for s in a.seeds() if s in b.seeds()]
    if not seeds:
        raise ConfigError(f"A and B share no network seed (A: {a.seeds()}, B: {b.seeds()}; an ensemble pairs only "
                          "with an ensemble): a paired comparison needs the same networks")
    for s in seeds:
        if a.checkpoints(s) != b.checkpoints(s):
            raise ConfigError(f"A and B were computed on different networks (seed {s}): a paired comparison needs "
                              "the same ones; narrow --a / --b to one model group")
    sets = sorted(set(a.samples["ood_dataset"]) & set(b.samples["ood_dataset"]))
    out = {}
    for ood in sets:
        pa_, pb = [a.arrays(s, ood) for s in seeds], [b.arrays(s, ood) for s in seeds]
        if any(x is None for x in (*pa_, *pb)):
            continue
        ai, ao = np.stack([x[0] for x in pa_ if x]), np.stack([x[1] for x in pa_ if x])
        bi, bo = np.stack([x[0] for x in pb if x]), np.stack([x[1] for x in pb if x])
        out[ood] = (delong(ai[0], ao[0], bi[0], bo[0]) if len(seeds) == 1
                    else paired_bootstrap(ai, ao, bi, bo, n_boot=n_boot, seed=seed))
    if not out:
        raise ConfigError("A and B have no test OOD set in common")
    return out


def pick(table: pa.Table, results_dir: str | RunPath, where_a: str, where_b: str, metric: str = "auroc") -> tuple[Side, Side]:
    """The two sides: the best trial (by validation ``metric``) under each filter."""
    return Side("A", where_a, table, results_dir, metric), Side("B", where_b, table, results_dir, metric)


def compare_tables(
    table: pa.Table, results_dir: str | RunPath, where_a: str, where_b: str, metric: str = "auroc", n_boot: int = 2000
) -> list[Table]:
    """One table: per test OOD set, AUROC of A and B, their difference and its 95 % interval (marked when it contains 0)."""
    a, b = pick(table, results_dir, where_a, where_b, metric)
    diffs = paired_diffs(a, b, n_boot=n_boot)
    rows: list[dict[str, Any]] = []
    for ood, d in diffs.items():
        rows.append({"ood_dataset": ood, "auroc_a": d.auroc_a, "auroc_b": d.auroc_b, "diff": d.diff,
                     "ci_low": d.low, "ci_high": d.high, "method": d.method, "seeds": d.n_seeds,
                     "contains_0": "yes (not established)" if d.contains_zero else "no"})
    title = (f"paired test AUROC difference A − B, {int(100 * next(iter(diffs.values())).level)} % interval "
             f"(DeLong for one seed, else paired bootstrap over test samples and seeds); {a.title}; {b.title}")
    return [Table(title, pd.DataFrame(rows))]
