"""Per-sample test scores of search trials, for paired comparisons (``densitune compare``).

A search run with ``--keep-scores all`` writes, beside its results, one small Parquet file per trial:
``RUN/scores/experiment=<name>/<file>.parquet`` (``<file>`` is the trial's results file name, so a grid
point run again after a crash replaces its file). Not part of the results' schema: the rows stay the
record, these are the samples behind their test figures. Columns:

=============  =========  ==========================================================
trial_id       string     the trial (as in the results rows)
seed           int64      the network's seed; null for an ensemble score
ood_dataset    string     the test OOD set (or attack ``adv-<name>``) of the pair
side           string     ``id`` (the ID test split) or ``ood``
index          int32      the sample's position in its (seeded, limited) split
score          double     higher = more in-distribution
=============  =========  ==========================================================

The ID test scores are stored with each OOD set they were compared with (they are the same samples).
Written through the run store (:func:`densitune.run.runstore.publish`, local or a bucket); read with pyarrow only (no pickle).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from densitune.errors import ResultsError
from densitune.run.runstore import RunPath, arrow_file, glob, location, publish

SCORES_DIR = "scores"

SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("seed", pa.int64()),
    ("ood_dataset", pa.string()),
    ("side", pa.string()),
    ("index", pa.int32()),
    ("score", pa.float64()),
])

#: per seed (None: ensemble), per test set: ((N_id,), (N_ood,)) scores as numpy arrays or tensors
SampleScores = Mapping[int | None, Mapping[str, tuple[object, object]]]


def scores_dir(results_dir: str | RunPath) -> RunPath:
    """``RUN/scores`` of a run whose results folder is ``RUN/results`` (or of ``RUN`` itself)."""
    p = location(results_dir)
    return (p.parent if p.name == "results" else p) / SCORES_DIR


def sample_table(trial_id: str, scores: SampleScores) -> pa.Table:
    """The rows of one trial's per-sample scores (see the module docstring for the columns)."""
    cols: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
    for seed, sets in scores.items():
        for ood, (s_id, s_ood) in sets.items():
            for side, s in (("id", s_id), ("ood", s_ood)):
                arr = np.asarray(s, dtype=np.float64).reshape(-1)
                n = len(arr)
                cols["trial_id"].append(np.full(n, trial_id, dtype=object))
                cols["seed"].append(np.full(n, -1 if seed is None else seed, dtype=np.int64))
                cols["ood_dataset"].append(np.full(n, ood, dtype=object))
                cols["side"].append(np.full(n, side, dtype=object))
                cols["index"].append(np.arange(n, dtype=np.int32))
                cols["score"].append(arr)
    data = {k: np.concatenate(v) if v else np.array([], dtype=object) for k, v in cols.items()}
    seed = pa.array(data["seed"].astype(np.int64), mask=data["seed"] == -1) if len(data["seed"]) else pa.array([], pa.int64())
    arrays = [pa.array(data["trial_id"], pa.string()), seed, pa.array(data["ood_dataset"], pa.string()),
              pa.array(data["side"], pa.string()), pa.array(data["index"], pa.int32()), pa.array(data["score"], pa.float64())]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_sample_scores(results_dir: str | RunPath, experiment: str, name: str, trial_id: str, scores: SampleScores) -> RunPath:
    """Write one trial's per-sample test scores to ``RUN/scores/experiment=<experiment>/<name>.parquet`` (atomic)."""
    folder = scores_dir(results_dir) / f"experiment={experiment}"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(sample_table(trial_id, scores), buf)
    return publish(folder / f"{name}.parquet", buf.getvalue())


def read_sample_scores(results_dir: str | RunPath, experiment: str, trial_ids: Iterable[str]) -> pa.Table:
    """The per-sample scores of ``trial_ids`` of ``experiment`` (an empty table when none were kept)."""
    wanted = set(trial_ids)
    folder = scores_dir(results_dir) / f"experiment={experiment}"
    tables = []
    for f in [p for p in glob(folder, "*.parquet") if not p.name.startswith(".")] if folder.is_dir() else []:
        try:
            path, fs = arrow_file(f)
            t = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            raise ResultsError(f"unreadable per-sample scores file {f}: {e}") from None
        if t.schema != SCHEMA:
            raise ResultsError(f"{f} is not a densitune per-sample scores file (unexpected columns)")
        mask = np.isin(np.asarray(t.column("trial_id").to_pylist(), dtype=object), list(wanted))
        if mask.any():
            tables.append(t.filter(pa.array(mask)))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
