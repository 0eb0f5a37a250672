"""The results store: one Parquet schema, atomic writes, checked reads.

Layout (hive-partitioned by experiment)::

    RESULTS/experiment=<name>/<stage>-<name>.parquet

where <name> is the training config key and epoch (``train-cnn-D8-ce-s0-e0001``), the
grid point's hash (``search-p-<sha1>``) or the TPE trial id; the experiment's search spec
is stored beside its rows as ``_spec.json``.

Every training epoch and every search trial writes its own small file, so a crash
can lose at most the file being written, and never leaves a partial one: files are
written under a hidden temporary name (``.tmp-*``, ignored by readers) and renamed
into place. The schema below is the only declaration of the columns; every write is
checked against it.

Score convention: every score is "higher = more in-distribution"; AUROC / AUPRC take
in-distribution as the positive class; ``fpr95`` is the fraction of OOD inputs
accepted at the threshold that keeps 95% of in-distribution inputs.
"""

from __future__ import annotations

import functools
import os
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from densitune.errors import ResultsError

SCHEMA_VERSION = 3

#: The one declaration of the result columns. Rows of stage "train" (one per epoch)
#: leave the OOD columns null; rows of stage "search" (one per trial x model seed x
#: OOD set x split) leave the epoch columns null.
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("experiment", pa.string()),
        ("trial_id", pa.string()),
        ("stage", pa.string()),  # "train" | "search"
        ("protocol", pa.string()),  # how hyperparameters were selected, e.g. "val-ood:digits-blend"
        ("backbone", pa.string()),
        ("id_dataset", pa.string()),
        ("ood_dataset", pa.string()),
        ("split", pa.string()),  # "val" (selection) | "test" (reported only)
        ("loss", pa.string()),
        ("lam", pa.float64()),
        ("D", pa.int32()),
        ("spectral", pa.bool_()),
        ("density", pa.string()),  # gmm_sum | gmm_max | kde | "" for scores without density
        ("density_params", pa.string()),  # JSON: every parameter of the density's factory
        ("density_fit", pa.string()),  # JSON: fitted values (KDE bandwidth_, GMM max_jitter_) of this seed's density
        ("score", pa.string()),  # density | diff | msp | ...
        ("eps", pa.float64()),  # 0 = no input perturbation
        ("seed", pa.int32()),  # training seed of the model
        ("data_seed", pa.int32()),
        ("search_seed", pa.int32()),
        ("epoch", pa.int32()),
        ("train_loss", pa.float64()),
        ("objective", pa.float64()),  # the value the sampler saw for this trial (validation only)
        ("search_params", pa.string()),  # JSON: the sampler's parameters of the trial (for resume)
        ("auroc", pa.float64()),
        ("auprc", pa.float64()),
        ("fpr95", pa.float64()),
        ("n_id", pa.int32()),
        ("n_ood", pa.int32()),
        ("id_accuracy", pa.float64()),
        ("checkpoint", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("duration_s", pa.float64()),
        ("code_version", pa.string()),
    ]
)

COLUMNS = tuple(SCHEMA.names)
REQUIRED = ("experiment", "trial_id", "stage", "code_version", "started_at")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``densitune <version>[+g<sha>[.dirty]]``: which code produced a row."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("densitune")
    except PackageNotFoundError:  # running from a source tree that is not installed
        v = "0+unknown"
    repo = Path(__file__).resolve().parent  # git finds the checkout from any folder in it
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=10", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"densitune {v}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"densitune {v}"


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) -> a table with exactly :data:`SCHEMA`; unknown keys and missing required ones raise."""
    rows = list(rows)
    for r in rows:
        extra = set(r) - set(COLUMNS)
        if extra:
            raise ValueError(f"result row has columns outside the schema: {sorted(extra)}")
        missing = [c for c in REQUIRED if r.get(c) is None]
        if missing:
            raise ValueError(f"result row lacks required columns: {missing}")
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    cols["schema_version"] = [SCHEMA_VERSION] * len(rows)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def write_rows(results_dir: str | Path, rows: Iterable[Mapping[str, Any]], *, name: str | None = None) -> Path:
    """Atomically write ``rows`` (all of one experiment and stage) as one Parquet file.

    ``name`` makes the file name deterministic (``<stage>-<name>.parquet``), so that a
    trial or epoch that is run again after a crash replaces its file instead of adding
    a duplicate. Returns the file's path; the file appears complete or not at all.
    """
    table = to_table(rows)
    if table.num_rows == 0:
        raise ValueError("no rows to write")
    exps = set(table.column("experiment").to_pylist())
    stages = set(table.column("stage").to_pylist())
    trials = set(table.column("trial_id").to_pylist())
    if len(exps) != 1 or len(stages) != 1:
        raise ValueError("write_rows takes rows of one experiment and one stage")
    (exp,), (stage,) = exps, stages
    if name is None:
        trial = _safe(next(iter(trials))) if len(trials) == 1 else "many"
        name = f"{trial}-{uuid.uuid4().hex[:12]}"
    part = experiment_dir(results_dir, exp)
    part.mkdir(parents=True, exist_ok=True)
    final = part / f"{stage}-{_safe(name)}.parquet"
    tmp = part / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as fh:  # on disk before it gets its real name
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


SPEC_FILE = "_spec.json"


def experiment_dir(results_dir: str | Path, experiment: str) -> Path:
    """The hive partition folder of one experiment."""
    return Path(results_dir) / f"experiment={_safe(experiment)}"


def has_results(results_dir: str | Path, experiment: str) -> bool:
    """True when ``experiment`` already has result rows (a stored spec alone does not count)."""
    folder = experiment_dir(results_dir, experiment)
    return folder.is_dir() and any(folder.glob("*.parquet"))


def write_spec(results_dir: str | Path, experiment: str, spec: Mapping[str, Any]) -> Path:
    """Store the search spec beside its rows (``_spec.json``; readers skip ``_`` files)."""
    import json

    d = experiment_dir(results_dir, experiment)
    d.mkdir(parents=True, exist_ok=True)
    path = d / SPEC_FILE
    tmp = d / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{SPEC_FILE}"
    tmp.write_text(json.dumps(dict(spec), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_spec(results_dir: str | Path, experiment: str) -> dict[str, Any] | None:
    """The stored search spec of ``experiment``, or None if it has none."""
    import json

    path = experiment_dir(results_dir, experiment) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        spec: dict[str, Any] = json.loads(path.read_text())
        return spec
    except json.JSONDecodeError as e:
        raise ResultsError(f"corrupt search spec {path}: {e}") from None


def result_files(results_dir: str | Path, experiment: str | None = None) -> list[Path]:
    """The result files of a results directory or of one experiment in it (hidden ``.``/``_`` files excluded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"results directory not found: {root}")
    if experiment is not None:
        root = experiment_dir(root, experiment)
        if not root.is_dir():
            raise ResultsError(f"no experiment {experiment!r} in {results_dir}")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
    )
    return files


def _check_file(f: Path) -> None:
    """Raise :class:`ResultsError` naming ``f`` unless it is an intact densitune Parquet file."""
    if f.suffix != ".parquet":
        raise ResultsError(f"foreign file in results directory: {f}")
    try:
        schema = pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ResultsError(f"corrupt Parquet file {f}: {str(e).splitlines()[0]}") from None
    if schema.equals(SCHEMA):
        return
    if "schema_version" in schema.names:
        col = pq.read_table(f, columns=["schema_version"]).column(0)
        version = col[0].as_py() if len(col) else None
        if version is not None and version != SCHEMA_VERSION:
            raise ResultsError(f"{f} has results schema v{version}; this densitune reads v{SCHEMA_VERSION}")
    raise ResultsError(f"foreign Parquet file {f}: its columns are not densitune's schema v{SCHEMA_VERSION}")


def read_results(results_dir: str | Path, *, experiment: str | None = None, stage: str | None = None) -> pa.Table:
    """Read every result file under ``results_dir`` (or one experiment's) as one :data:`SCHEMA` table.

    Every file's footer is checked first: a file that is not Parquet, is corrupt, or has
    a foreign schema raises :class:`ResultsError` naming it (nothing is skipped
    silently). The checked files are then read as one ``pyarrow.dataset``.
    """
    files = result_files(results_dir, experiment)
    if not files:
        raise ResultsError(f"no result files in {results_dir}")
    for f in files:
        _check_file(f)
    dataset = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet")
    try:
        table = dataset.to_table(filter=(ds.field("stage") == stage) if stage is not None else None)
    except (pa.ArrowException, OSError):
        for f in files:  # find the file with the damaged data pages, to name it
            try:
                pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                raise ResultsError(f"corrupt Parquet file {f}: {str(e).splitlines()[0]}") from None
        raise
    if experiment is not None:
        table = table.filter(ds.field("experiment") == experiment)
    return table


def filter_results(table: pa.Table, where: str | None) -> pa.Table:
    """Rows of ``table`` matching one SQL expression, e.g. ``density = 'kde' AND D >= 16`` (see :mod:`.sql`)."""
    from densitune.search.results.sql import filter_table

    return filter_table(table, where)


def query(table: pa.Table, sql: str, *, allow_files: bool = False) -> pa.Table:
    """One read-only SELECT over ``table`` (as the view ``results``); see :mod:`.sql`."""
    from densitune.search.results.sql import run_query

    return run_query(table, sql, allow_files=allow_files)
