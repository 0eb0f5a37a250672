"""One search trial as a pure function: params in, objective and Parquet rows out.

No Ray here; :mod:`densitune.search.tune` wraps it. A trial covers every seed of its
model group: the objective is the mean validation metric over seeds (with several validation OOD
sets, each set's mean combined by ``spec.val_agg``), and each seed gets its own rows (one per
validation OOD set, one per test OOD set and attack).
Ensemble scores use all seeds at once and write rows with an empty ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from datetime import UTC, datetime
from typing import Any

from torch import Tensor

from densitune.ood_groups import set_labels
from densitune.results.rows import provenance, result_row
from densitune.search.evaluate import (
    Workspace,
    aggregate_objective,
    claim_gradient_signs,
    claim_splits,
    selection_metrics,
    selection_sets,
    test_metrics,
)
from densitune.search.models import ModelGroup
from densitune.search.ood.scores import ORIENTED, score_class
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec


def density_columns(params: TrialParams) -> dict[str, Any]:
    """The density's row columns before fitting (:meth:`Density.describe`): name and every parameter."""
    if not params.density.name:
        return {"density": "", "density_params": "{}"}
    columns = params.density.build().describe()
    del columns["density_fit"]  # per seed: filled in by the evaluation of each fitted density
    return columns


def run_trial(
    ws: Workspace,
    spec: SearchSpec,
    group: ModelGroup,
    params: TrialParams,
    trial_id: str,
    search_params: dict[str, Any] | None = None,
    sample_scores: dict[int | None, dict[str, tuple[Tensor, Tensor]]] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """Evaluate ``params`` on ``group``; returns (objective, rows).

    ``search_params`` (the sampler's view of the trial) is stored with the rows so that
    an interrupted search can be resumed from the Parquet files alone. ``sample_scores``, when
    given, receives per seed (None: an ensemble) and test set the (N_id,), (N_ood,) test scores.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    ensemble = score_class(params.score).ensemble
    trial_columns = dict(
        experiment=spec.experiment, trial_id=trial_id, stage="search", protocol=spec.protocol_label, network=group,
        started_at=started, **density_columns(params), score=params.score, eps=params.eps, search_seed=spec.seed,
        ensemble=ensemble,
        search_params=json.dumps(search_params if search_params is not None else {"point": params.label}, sort_keys=True),
    )
    members: list[tuple[int | None, list[str]]]
    if ensemble:
        members = [(None, list(group.checkpoints))]
    else:
        members = [(seed, [ckpt]) for seed, ckpt in zip(group.seeds, group.checkpoints)]
    for _, ckpts in members:  # concurrent first trials share the work: decoding image files, and (ε > 0) the signs
        claim_splits(ws, spec, ckpts, params)
        claim_gradient_signs(ws, spec, ckpts, params)
    labels = set_labels(group.dataset, [*(spec.val_ood or ()), *spec.test_ood])  # kind and short name per set
    val_sets = selection_sets(spec)
    per_set_val: list[list[float]] = [[] for _ in val_sets]  # sets x members
    rows: list[dict[str, Any]] = []
    for seed, ckpts in members:
        vals = [selection_metrics(ws, spec, ckpts, params, val_ood) for val_ood in val_sets]
        for figures, val in zip(per_set_val, vals):
            figures.append(val.pop("objective"))
        kept: dict[str, tuple[Tensor, Tensor]] | None = {} if sample_scores is not None else None
        tests = test_metrics(ws, spec, ckpts, params, kept)
        if sample_scores is not None and kept is not None:
            sample_scores[seed] = kept
        for ood, split, m in [*((v.pop("ood_dataset"), "val", v) for v in vals), *((o, "test", t) for o, t in tests.items())]:
            where = provenance(ws.device, data_checksums=m.pop("data_checksums"))
            kind, name = (None, None) if ood is None else labels.get(ood, ("attack", ood))  # adv-/proxy-: attacks
            rows.append(result_row(**trial_columns, provenance=where, seed=seed, checkpoints=ckpts, ood_dataset=ood,
                                   ood_kind=kind, ood_name=name, split=split, **m))
    duration = time.perf_counter() - t0
    objective = aggregate_objective(spec, per_set_val)
    for r in rows:
        r["duration_s"] = duration
        r["objective"] = objective
    if spec.orient == "validation" and params.score in ORIENTED and negation_ranks_better(spec, rows):
        # a separately named trial of the negated score (its own rows, never seen by the sampler)
        variant = dataclasses.replace(params, score=ORIENTED[params.score])
        rows += run_trial(ws, spec, group, variant, f"{trial_id}-{variant.score}", search_params={"variant_of": trial_id})[1]
    return objective, rows


def negation_ranks_better(spec: SearchSpec, rows: list[dict[str, Any]]) -> bool:
    """Whether the negated score ranks better on validation than the score of ``rows`` (a trial's rows).

    Reads the validation rows only (the test sets never decide): negating a score turns each validation set's
    AUROC into 1 − AUROC (exactly: every ID/OOD pair reverses, a tie counts ½ either way); the sets' means over
    seeds are combined as the objective is (``spec.val_agg``)."""
    per_set: dict[str, list[float]] = {}
    for r in rows:
        if r["split"] == "val" and r.get("auroc") is not None:
            per_set.setdefault(str(r["ood_dataset"]), []).append(float(r["auroc"]))
    if not per_set:
        return False
    means = [math.fsum(v) / len(v) for v in per_set.values()]
    if spec.val_agg == "min":
        return min(1.0 - m for m in means) > min(means)
    return math.fsum(means) / len(means) < 0.5
