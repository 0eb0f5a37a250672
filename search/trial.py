"""One search trial as a pure function: params in, objective and Parquet rows out.

No Ray here; :mod:`search.tune_search` wraps it. A trial covers every seed of its
model group: the objective is the mean validation metric over seeds, and each seed
gets its own rows (one for the validation OOD set, one per test OOD set).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

from search.evaluate import TrialParams, Workspace, selection_metrics, test_metrics
from search.models import ModelGroup
from search.results import code_version
from search.spec import SearchSpec


def run_trial(
    ws: Workspace, spec: SearchSpec, group: ModelGroup, params: TrialParams, trial_id: str
) -> tuple[float, list[dict[str, Any]]]:
    """Evaluate ``params`` on every seed of ``group``; returns (objective, rows)."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    per_seed_val = []
    rows: list[dict[str, Any]] = []
    density_params = spec.density_params.get(params.density, {})
    base = {
        "experiment": spec.experiment,
        "trial_id": trial_id,
        "stage": "search",
        "protocol": spec.protocol,
        "backbone": group.backbone,
        "id_dataset": group.dataset,
        "loss": group.loss,
        "lam": group.lam if group.loss != "ce" else None,
        "D": group.D,
        "spectral": group.spectral,
        "density": params.density,
        "density_params": json.dumps(density_params, sort_keys=True),
        "score": params.score,
        "eps": params.eps,
        "data_seed": group.data_seed,
        "search_seed": spec.seed,
        "started_at": started,
        "code_version": code_version(),
    }
    for seed, ckpt in zip(group.seeds, group.checkpoints):
        val = selection_metrics(ws, spec, ckpt, params)
        per_seed_val.append(val[spec.metric])
        tests = test_metrics(ws, spec, ckpt, params)
        for ood, split, m in [(spec.val_ood, "val", val), *((o, "test", t) for o, t in tests.items())]:
            rows.append({**base, "seed": seed, "checkpoint": ckpt, "ood_dataset": ood, "split": split, **m})
    duration = time.perf_counter() - t0
    for r in rows:
        r["duration_s"] = duration
    objective = math.fsum(per_seed_val) / len(per_seed_val)
    return objective, rows
