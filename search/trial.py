"""One search trial as a pure function: params in, objective and Parquet rows out.

No Ray here; :mod:`densitune.search.tune` wraps it. A trial covers every seed of its
model group: the objective is the mean validation metric over seeds, and each seed
gets its own rows (one for the validation OOD set, one per test OOD set and attack).
Ensemble scores use all seeds at once and write rows with an empty ``seed``.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any

from densitune.search.evaluate import Workspace, selection_metrics, test_metrics
from densitune.search.models import ModelGroup
from densitune.search.ood.scores import score_class
from densitune.search.results.store import code_version
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec


def full_density_params(params: TrialParams) -> str:
    """Every parameter the density's factory takes, defaults included (what the row records)."""
    if not params.density:
        return "{}"
    from densitune.search.ood.densities import create_density

    return json.dumps(create_density(params.density, **params.params).get_params(), sort_keys=True)


def run_trial(
    ws: Workspace,
    spec: SearchSpec,
    group: ModelGroup,
    params: TrialParams,
    trial_id: str,
    search_params: dict[str, Any] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Evaluate ``params`` on ``group``; returns (objective, rows).

    ``search_params`` (the sampler's view of the trial) is stored with the rows so that
    an interrupted search can be resumed from the Parquet files alone.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    base = {
        "experiment": spec.experiment,
        "trial_id": trial_id,
        "stage": "search",
        "protocol": spec.protocol_label,
        "backbone": group.backbone,
        "id_dataset": group.dataset,
        "loss": group.loss,
        "lam": group.lam if group.loss != "ce" else None,
        "D": group.D,
        "spectral": group.spectral,
        "density": params.density,
        # every parameter of the density (defaults included): which variant made the row
        "density_params": full_density_params(params),
        "score": params.score,
        "eps": params.eps,
        "data_seed": group.data_seed,
        "search_seed": spec.seed,
        "started_at": started,
        "code_version": code_version(),
        "search_params": json.dumps(search_params if search_params is not None else {"point": params.label}, sort_keys=True),
    }
    members: list[tuple[int | None, list[str]]]
    if score_class(params.score).ensemble:
        members = [(None, list(group.checkpoints))]
    else:
        members = [(seed, [ckpt]) for seed, ckpt in zip(group.seeds, group.checkpoints)]
    per_member_val: list[float] = []
    rows: list[dict[str, Any]] = []
    for seed, ckpts in members:
        val = selection_metrics(ws, spec, ckpts, params)
        per_member_val.append(val.pop("objective"))
        tests = test_metrics(ws, spec, ckpts, params)
        for ood, split, m in [(val.pop("ood_dataset"), "val", val), *((o, "test", t) for o, t in tests.items())]:
            rows.append({**base, "seed": seed, "checkpoint": ",".join(ckpts), "ood_dataset": ood, "split": split, **m})
    duration = time.perf_counter() - t0
    objective = math.fsum(per_member_val) / len(per_member_val)
    for r in rows:
        r["duration_s"] = duration
        r["objective"] = objective
    return objective, rows
