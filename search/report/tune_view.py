"""``densitune report RUN --view tune``: the outer trials of ``densitune tune``, from their ``tune`` rows.

One row per outer trial (network): D, loss, λ, backbone, how far it trained (``stopped`` by the scheduler or
``finished``), its validation objective at each rung it reached, and its GPU-seconds; best finished first.
Validation figures only: a tune never scores test data.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pandas as pd

from densitune.errors import ResultsError
from densitune.results.store import read_results
from densitune.search.report.tables import Table

if TYPE_CHECKING:
    from densitune.run.runstore import RunPath


def tune_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The outer trials of ``rows`` (stage ``tune``) with their rung objectives (``e<epoch>`` columns)."""
    rungs: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["tune_status"] == "rung":  # a rung's objective: the same value in each of its rows
            rungs.setdefault((r["experiment"], r["trial_id"]), {})[int(r["epoch"])] = float(r["objective"])
    epochs = sorted({e for by in rungs.values() for e in by})
    out = []
    for r in rows:
        if r["tune_status"] not in ("stopped", "finished"):
            continue
        params = json.loads(r["search_params"] or "{}")
        reached = rungs.get((r["experiment"], r["trial_id"]), {})
        out.append({"experiment": r["experiment"], "network": params.get("network", ""), "backbone": r["backbone"],
                    "D": r["D"], "loss": r["loss"], "λ": r["center_loss"], "status": r["tune_status"],
                    "epochs": r["epoch"], "reused": bool(params.get("reused")), "objective": r["objective"],
                    **{f"e{e}": reached.get(e) for e in epochs}, "gpu_s": r["gpu_seconds"]})
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    frame["_rank"] = frame["status"] != "finished"
    return frame.sort_values(["experiment", "_rank", "objective"], ascending=[True, True, False]).drop(columns="_rank")


def tune_tables(results_dir: str | RunPath) -> list[Table]:
    """The tune view's one block; :class:`ResultsError` when the run holds no tune rows."""
    rows = read_results(results_dir, stage="tune").to_pylist()
    frame = tune_frame(rows)
    if frame.empty:
        raise ResultsError(f"no densitune tune rows in {results_dir}")
    stopped = int((frame["status"] == "stopped").sum())
    title = (f"tune: {len(frame)} network(s), {stopped} stopped early by the scheduler; validation objective "
             "at each rung (e<epoch>) and at the last epoch reached")
    return [Table(title, frame.reset_index(drop=True))]
