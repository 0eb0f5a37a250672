"""The results store: one Parquet schema, atomic writes, checked reads.

Layout (hive-partitioned by experiment)::

    RESULTS/experiment=<name>/<stage>-<name>.parquet

where <name> is the training config key and epoch (``train-cnn-D8-ce-s0-e0001``), the
grid point's hash (``search-p-<sha1>``) or the TPE trial id; the experiment's search spec
is stored beside its rows as ``_spec.json``.

Every training epoch and every search trial writes its own small file, so a crash
can lose at most the file being written (a running search merges its finished trials'
files as it goes, :class:`RollingCompaction`), and never leaves a partial one: files are
written under a hidden temporary name (``.tmp-*``, ignored by readers) and renamed
into place. The schema below is the only declaration of the columns; every write is
checked against it.

Score convention: every score is "higher = more in-distribution"; AUROC / AUPRC take
in-distribution as the positive class; ``fpr95`` is the fraction of OOD inputs
accepted at the threshold that keeps 95% of in-distribution inputs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from densitune.checks import error_summary
from densitune.errors import ResultsError
from densitune.ood_groups import is_attack, set_labels
from densitune.results.sql import _arrow, filter_table, run_query
from densitune.run.files import DocumentError, fsync_dir, read_document
from densitune.run.runstore import RunPath, arrow_file, arrow_files, files_under, glob, location, publish

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
#: Older schema versions :func:`read_results` still reads (converted to :data:`SCHEMA`: :func:`upgrade_v3`,
#: :func:`upgrade_v4`, :func:`upgrade_v5`, :func:`upgrade_v6`).
READABLE_VERSIONS = (3, 4, 5, 6, 7)

#: The one declaration of the result columns. Rows of stage "train" (one per epoch)
#: leave the OOD columns null; rows of stage "search" (one per trial x model seed x
#: OOD set x split) leave the epoch columns null.
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("experiment", pa.string()),
        ("trial_id", pa.string()),
        ("stage", pa.string()),  # "train" | "search" | "tune" (densitune tune: rung evaluations and outer trials)
        ("protocol", pa.string()),  # how hyperparameters were selected, e.g. "val-ood:digits-blend"
        ("backbone", pa.string()),
        ("id_dataset", pa.string()),
        ("ood_dataset", pa.string()),
        ("split", pa.string()),  # "val" (selection) | "test" (reported only)
        ("loss", pa.string()),
        ("center_loss", pa.float64()),  # λ of the (contrastive) center loss; null: none (loss "ce")
        ("D", pa.int32()),
        ("spectral", pa.bool_()),
        ("density", pa.string()),  # gmm_sum | gmm_max | kde | "" for scores without density
        ("density_params", pa.string()),  # JSON: every parameter of the density's factory
        ("density_fit", pa.string()),  # JSON: fitted values (KDE bandwidth_, GMM max_jitter_) of this seed's density
        ("score", pa.string()),  # density | diff | msp | ...
        ("eps", pa.float64()),  # 0 = no input perturbation
        ("seed", pa.int32()),  # training seed of the model; null for an ensemble row
        ("ensemble", pa.bool_()),  # the score combines every seed of the model group (checkpoints lists them)
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
        ("checkpoints", pa.list_(pa.string())),  # the model(s) scored; a final training epoch: its model
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("duration_s", pa.float64()),
        ("code_version", pa.string()),
        # provenance (schema v4): where and how the numbers were computed
        ("node", pa.string()),  # Ray node id ("ray:<id>") or host name
        ("device", pa.string()),  # "cpu" or "cuda:0 <GPU name>"
        ("dtype", pa.string()),  # torch default dtype of the computation
        ("autocast", pa.bool_()),  # mixed precision (training on CUDA with amp)
        ("compile", pa.bool_()),  # torch.compile
        ("torch_version", pa.string()),
        ("densitune_version", pa.string()),
        ("data_checksums", pa.string()),  # JSON {"<data set>/<split>": sha256 prefix} of every split used
        # what decides bit-identity (schema v5; README "Same numbers"): the kernels torch dispatched to
        ("cpu", pa.string()),  # the CPU model (/proc/cpuinfo)
        ("cpu_capability", pa.string()),  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512...
        ("onednn_isa", pa.string()),  # the ISA oneDNN may use: ONEDNN_MAX_CPU_ISA, or ALL (the CPU's best)
        ("cuda", pa.string()),  # CUDA and cuDNN versions on a GPU ("12.8 cudnn 91002"), null on the CPU
        ("deterministic", pa.bool_()),  # torch.use_deterministic_algorithms (and cuDNN deterministic on a GPU)
        ("reproducible", pa.bool_()),  # computed under --reproducible (kernels pinned to the portable baseline)
        # the OOD set as a person names it (schema v6; densitune.ood_groups.set_labels); ood_dataset keeps the full text
        ("ood_kind", pa.string()),  # near | far | unknown (a set no table or name places) | attack; null: no OOD side
        ("ood_name", pa.string()),  # short name: NAME of near:NAME=folder:PATH, a folder's own name, a registered name
        # densitune tune (schema v7): "rung" (one validation evaluation of a network at a rung), "stopped" (an
        # outer trial the scheduler stopped early) or "finished" (one trained to the last epoch); null elsewhere
        ("tune_status", pa.string()),
        ("gpu_seconds", pa.float64()),  # tune: GPUs of the trial x its running time (0 on CPUs); null elsewhere
    ]
)

COLUMNS = tuple(SCHEMA.names)
REQUIRED = ("experiment", "trial_id", "stage", "code_version", "started_at", "node", "device", "dtype",
            "torch_version", "densitune_version", "data_checksums")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``densitune <version>[+g<sha>[.dirty]]``: which code produced a row."""
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


def write_rows(results_dir: str | RunPath, rows: Iterable[Mapping[str, Any]], *, name: str | None = None) -> RunPath:
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
    return publish(part / file_name(stage, name), lambda f: pq.write_table(table, f))


def file_name(stage: str, name: str) -> str:
    """The file :func:`write_rows` writes the rows of ``stage`` under ``name`` to, in their experiment's folder."""
    return f"{stage}-{_safe(name)}.parquet"


SPEC_FILE = "_spec.json"


def experiment_dir(results_dir: str | RunPath, experiment: str) -> RunPath:
    """The hive partition folder of one experiment."""
    return location(results_dir) / f"experiment={_safe(experiment)}"


def has_results(results_dir: str | RunPath, experiment: str) -> bool:
    """True when ``experiment`` already has result rows (a stored spec alone does not count)."""
    folder = experiment_dir(results_dir, experiment)
    # Hidden temporary files (``.tmp-*``, left by a write that was killed) are not results.
    return folder.is_dir() and any(not f.name.startswith((".", "_")) for f in folder.glob("*.parquet"))


def remove_stale_temp_files(results_dir: str | RunPath, experiment: str) -> list[RunPath]:
    """Delete the ``.tmp-*`` files a killed write left in one experiment's folder; returns them.

    Only the holder of the experiment's writer lock may call this (:mod:`densitune.run.runlock`):
    another live writer's temporary file is never stale. Readers just skip such files.
    """
    folder = experiment_dir(results_dir, experiment)
    stale = glob(folder, ".tmp-*") if folder.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def write_spec(results_dir: str | RunPath, experiment: str, spec: Mapping[str, Any]) -> RunPath:
    """Store the search spec beside its rows (``_spec.json``; readers skip ``_`` files)."""
    d = experiment_dir(results_dir, experiment)
    d.mkdir(parents=True, exist_ok=True)
    path = d / SPEC_FILE
    return publish(path, json.dumps(dict(spec), indent=1, sort_keys=True))


def read_spec(results_dir: str | RunPath, experiment: str) -> dict[str, Any] | None:
    """The stored search spec of ``experiment``, or None if it has none."""

    path = experiment_dir(results_dir, experiment) / SPEC_FILE
    try:
        spec = read_document(path)
    except FileNotFoundError:
        return None
    except DocumentError as e:
        raise ResultsError(f"corrupt search spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise ResultsError(f"corrupt search spec {path}: not a mapping of keys to values")
    return spec


def results_dir_of(run_or_results: str | RunPath) -> RunPath:
    """The results folder named by a run folder (``RUN`` -> ``RUN/results``) or by itself.

    Every reading command takes either; a path that is neither is returned unchanged (the
    reader then says it is not found).
    """
    path = location(run_or_results)
    return path / "results" if (path / "results").is_dir() else path


def result_files(results_dir: str | RunPath, experiment: str | None = None) -> list[RunPath]:
    """The result files of a results directory or of one experiment in it (hidden ``.``/``_`` files excluded)."""
    root = location(results_dir)
    if not root.is_dir():
        raise ResultsError(f"results directory not found: {root}")
    if experiment is not None:
        root = experiment_dir(root, experiment)
        if not root.is_dir():
            raise ResultsError(f"no experiment {experiment!r} in {results_dir}")
    listing = files_under(root)
    files = [p for p in listing if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)]  # type: ignore[arg-type]
    replaced: set[RunPath] = set()
    for manifest in (p for p in listing if p.name.startswith(MANIFEST_PREFIX) and p.suffix == ".json"):
        replaced |= _verified_replacements(manifest) or set()
    return [f for f in files if f not in replaced]


# ---------------------------------------------------------------------------------------------- compaction

#: A compaction's manifest, beside the files it merges: ``_compact-<id>.json``.
MANIFEST_PREFIX = "_compact-"


#: A manifest is a few names and counts; one larger than this is not densitune's.
_MANIFEST_MAX_BYTES = 16 << 20
#: What a name in a manifest may be: a plain result-file name in the manifest's own folder.
_MANIFEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,250}\.parquet")


class _Unverified(Exception):
    """A compaction manifest that does not verify against the files it names."""


def _manifest_entries(manifest: RunPath) -> tuple[RunPath, dict[RunPath, int | None]]:
    """(merged file, {replaced file: its recorded rows or None}) of a manifest: plain names in its own folder only.

    A run folder is untrusted input: a name with a ``/``, ``..``, an absolute path or any character outside
    :data:`_MANIFEST_NAME` makes the manifest unverifiable (:class:`_Unverified`), so it can never name a path
    outside its folder.
    """

    try:
        info = read_document(manifest, max_bytes=_MANIFEST_MAX_BYTES)
    except (OSError, DocumentError) as e:
        raise _Unverified(str(e) if isinstance(e, DocumentError) else f"unreadable: {error_summary(e)}") from None
    if not isinstance(info, dict) or not isinstance(info.get("merged"), str) or not isinstance(info.get("replaces"), list):
        raise _Unverified("not a manifest ({merged, replaces})")
    entries: dict[str, int | None] = {}
    for item in info["replaces"]:  # version 1: names; version 2: {"name", "rows"}
        name, rows = (item, None) if isinstance(item, str) else (
            (item.get("name"), item.get("rows")) if isinstance(item, dict) else (None, None))
        if not isinstance(name, str) or not (rows is None or (type(rows) is int and rows >= 0)):
            raise _Unverified("an entry is not a file name with its row count")
        entries[name] = rows
    for name in [info["merged"], *entries]:
        if not _MANIFEST_NAME.fullmatch(name) or ".." in name:
            raise _Unverified(f"{name[:80]!r} is not a result file of its folder")
    if info["merged"] in entries or not info["merged"].startswith("compact-"):
        raise _Unverified("its merged file is not a compaction's")
    folder = manifest.parent
    return folder / info["merged"], {folder / n: r for n, r in entries.items()}


def _row_keys(table: pa.Table) -> list[str]:

    return [json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist()]


def _replaced_by(manifest: RunPath) -> set[RunPath]:
    """The files a finished compaction replaced: none while its merged file is not in place (a compaction
    under way, or killed before it published: the originals stand).

    Raises:
        _Unverified: the manifest names paths outside its folder, or the merged file does not hold the rows of
            every replaced file still present (with the recorded row counts): a manifest like that is ignored,
            and no file it names is hidden or deleted.
    """

    merged, replaces = _manifest_entries(manifest)
    if not merged.is_file():
        return set()
    parts: dict[RunPath, pa.Table] = {}
    for f in replaces:
        try:
            parts[f] = _read_file(f, list(COLUMNS), None)[1]
        except ResultsError as e:
            if f.is_file():
                raise _Unverified(str(e)) from None
            # gone: deleted by the compaction this manifest belongs to, or never there
    present = list(parts)
    if present:
        try:
            merged_rows = Counter(_row_keys(_read_file(merged, list(COLUMNS), None)[1]))
        except ResultsError as e:
            raise _Unverified(str(e)) from None
        for f, t in parts.items():
            if replaces[f] is not None and replaces[f] != t.num_rows:
                raise _Unverified(f"{f.name} has {t.num_rows} rows, the manifest says {replaces[f]}")
        if Counter(k for t in parts.values() for k in _row_keys(t)) - merged_rows:
            raise _Unverified(f"{merged.name} does not hold the rows of the files it would replace")
    return set(replaces)


def _verified_replacements(manifest: RunPath) -> set[RunPath] | None:
    """:func:`_replaced_by`, or None (with one warning line) for a manifest that does not verify."""
    try:
        return _replaced_by(manifest)
    except _Unverified as e:
        log.warning("ignoring compaction manifest %s: %s; every file it names is read as it is", manifest, e)
        return None


def _failpoint(name: str) -> None:
    """Fault injection for the compaction tests: ``DENSITUNE_FAILPOINT=<name>`` kills this process there."""
    if os.environ.get("DENSITUNE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def compact_experiment(results_dir: str | RunPath, experiment: str, *, names: Iterable[str] | None = None) -> tuple[int, int]:
    """Merge one experiment's per-trial/per-epoch files into one file; returns (files merged, rows).

    Crash-safe at every step, for every reader: (1) the manifest ``_compact-<id>.json`` names
    the merged file and the files it replaces; while the merged file does not exist readers
    ignore the manifest; (2) the merged file is published atomically (temp + fsync + rename),
    from then on readers skip the replaced files; (3) the replaced files are deleted; (4) the
    manifest is removed. A reader therefore never sees a row twice or misses one.

    Without ``names`` every file of the experiment is merged, and the caller must hold the experiment's
    writer lock with no trial writing (``densitune compact``). ``names`` (file names in the experiment's
    folder) merges only those, e.g. the files of the trials a running search has seen finish
    (:class:`RollingCompaction`): files being written, and temporary files, are left alone; a name with no
    file is skipped. Only one compaction of an experiment may run at a time (its writer lock's holder).
    """
    folder = experiment_dir(results_dir, experiment)
    _finish_interrupted(folder)
    if names is None:
        remove_stale_temp_files(results_dir, experiment)
        files = result_files(results_dir, experiment)
    else:
        wanted = set(names)
        files = [f for f in result_files(results_dir, experiment) if f.name in wanted]
    if len(files) < 2:
        return 0, 0
    table = _read_current(files, list(COLUMNS), None)
    if table is None:  # a bucket, or not all files of the current schema: checked one by one
        for f in files:
            _check_file(f)
        paths, fs = arrow_files(files)
        table = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs).to_table()
    ident = uuid.uuid4().hex[:12]
    merged = folder / f"compact-{ident}.parquet"
    manifest = folder / f"{MANIFEST_PREFIX}{ident}.json"
    counts = _row_counts(files)
    publish(manifest, json.dumps({"merged": merged.name, "rows": table.num_rows,
                                  "replaces": [{"name": f.name, "rows": counts[f]} for f in files]}))
    _failpoint("compact:manifest")

    def write(f: Any) -> None:
        pq.write_table(table, f)
        _failpoint("compact:merged-written")

    publish(merged, write)
    _failpoint("compact:merged-published")
    for i, f in enumerate(files):
        f.unlink(missing_ok=True)
        if i == 0:
            _failpoint("compact:deleting")
    if isinstance(folder, Path):
        fsync_dir(folder)
    manifest.unlink()
    return len(files), table.num_rows


#: A running search merges its finished trials' files each time this many have finished (:class:`RollingCompaction`).
COMPACT_EVERY = 256


class RollingCompaction:
    """Compaction as a search (or training) runs: every ``every`` finished trials' files are merged into one.

    Each trial still publishes its own file (a crash loses at most the trial being written), and the
    search's driver, the one writer of the experiment, merges them in groups (:func:`compact_experiment`
    with ``names``), so a search of N trials leaves about N / ``every`` merged files plus fewer than
    ``every`` trial files, and readers open hundreds of files, not tens of thousands. The files of running
    trials are never touched. ``every`` <= 0: off (every trial keeps its own file). Training hands over a
    finished network's epoch files (``stage="train"``).
    """

    def __init__(self, results_dir: str | RunPath, experiment: str, every: int = COMPACT_EVERY,
                 stage: str = "search") -> None:
        self.results_dir, self.experiment, self.every, self.stage = results_dir, experiment, every, stage
        self.pending: list[str] = []  # file names of finished trials not merged yet
        self.merged = 0  # trial files merged so far

    def finished(self, name: str) -> None:
        """The trial that wrote ``write_rows(..., name=name)`` has finished: its file no longer changes.
        Merges the pending files when there are ``every`` of them (raises what :func:`compact_experiment`
        raises; the files stand then, and readers see every row once)."""
        if self.every <= 0:
            return
        self.pending.append(file_name(self.stage, name))
        if len(self.pending) >= self.every:
            names, self.pending = self.pending, []
            self.merged += compact_experiment(self.results_dir, self.experiment, names=names)[0]


def _finish_interrupted(folder: RunPath) -> None:
    """Complete what a killed compaction left: delete the files a published merge replaced, and drop
    manifests whose merge never got published (their originals stand). A manifest that does not verify is
    left as it is, with one warning: nothing it names is deleted."""
    for manifest in glob(folder, f"{MANIFEST_PREFIX}*.json"):
        replaced = _verified_replacements(manifest)
        if replaced is None:
            continue
        for f in replaced:
            f.unlink(missing_ok=True)
        manifest.unlink()


def _row_counts(files: list[RunPath]) -> dict[RunPath, int]:
    """Each file's row count, from its Parquet footer."""
    out = {}
    for f in files:
        path, fs = arrow_file(f)
        out[f] = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return out


def _check_file(f: RunPath) -> int:
    """The schema version of ``f``; :class:`ResultsError` naming ``f`` unless it is an intact densitune Parquet file."""
    if f.suffix != ".parquet":
        raise ResultsError(f"foreign file in results directory: {f}")
    try:
        path, fs = arrow_file(f)
        schema = pq.ParquetFile(path, filesystem=fs).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ResultsError(f"corrupt Parquet file {f}: {error_summary(e)}") from None
    if "schema_version" in schema.names:
        col = pq.read_table(path, columns=["schema_version"], filesystem=fs).column(0)
        versions = set(col.to_pylist())
        if versions - set(READABLE_VERSIONS):
            readable = ", ".join(f"v{v}" for v in READABLE_VERSIONS)
            found = ", ".join(f"v{v}" for v in sorted(versions - set(READABLE_VERSIONS), key=str))
            raise ResultsError(f"{f} has results schema {found}; this densitune reads {readable}")
        if schema.equals(SCHEMA):
            return SCHEMA_VERSION
        if schema.equals(SCHEMA_V6) and versions <= {6}:
            return 6
        if schema.equals(SCHEMA_V5) and versions <= {5}:
            return 5
        if schema.equals(SCHEMA_V4) and versions <= {4}:
            return 4
        if schema.equals(SCHEMA_V3) and versions <= {3}:
            return 3
    raise ResultsError(f"foreign Parquet file {f}: its columns are not densitune's schema v{SCHEMA_VERSION}")


def read_results(
    results_dir: str | RunPath,
    *,
    experiment: str | None = None,
    stage: str | None = None,
    columns: Iterable[str] | None = None,
) -> pa.Table:
    """Read every result file under ``results_dir`` (or one experiment's) as one :data:`SCHEMA` table.

    Every file's footer is checked: a file that is not Parquet, is corrupt, or has a foreign
    schema raises :class:`ResultsError` naming it (nothing is skipped silently). Each file is
    opened once (its footer parsed once, files read in parallel threads), and only ``columns``
    (default: all, in :data:`SCHEMA` order) and the rows of ``stage`` are kept: thousands of
    per-trial files read at the cost of the columns a command needs, not of the whole table.
    """
    files = result_files(results_dir, experiment)
    if not files:
        raise ResultsError(f"no result files in {results_dir}")
    wanted = set(COLUMNS if columns is None else columns)
    unknown = wanted - set(COLUMNS)
    if unknown:
        raise ResultsError(f"no such result column(s): {', '.join(sorted(unknown))}")
    if experiment is not None:
        wanted.add("experiment")
    keep = [c for c in COLUMNS if c in wanted]
    read = [c for c in COLUMNS if c in wanted or c == "schema_version" or (c == "stage" and stage is not None)]
    table = _read_current(files, read, stage)
    if table is None:
        table = _read_each(files, read, stage)
    table = table.select(keep)
    return table.filter(ds.field("experiment") == experiment) if experiment is not None else table


def _read_each(files: list[RunPath], columns: list[str], stage: str | None) -> pa.Table:
    """``columns`` of the rows of ``stage`` in ``files``, file by file: each footer checked (a bad file raises
    :class:`ResultsError` naming it), older schema versions upgraded; rows of current files first."""
    current: list[pa.Table] = []
    old: list[pa.Table] = []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        # In batches, each merged into one chunk: 10,000 one-file tables would hold ~4x their data in small
        # buffers, and pandas operations on a column of 10,000 chunks are slow.
        for start in range(0, len(files), _READ_BATCH):
            parts = list(pool.map(lambda f: _read_file(f, columns, stage), files[start:start + _READ_BATCH]))
            batch = [t for v, t in parts if v == SCHEMA_VERSION]
            current += [pa.concat_tables(batch).combine_chunks()] if batch else []
            old += [t for v, t in parts if v != SCHEMA_VERSION]
    # rows of current files first, then those of older-version files (the order of the whole-table read)
    return pa.concat_tables(current + old).combine_chunks()


#: Files read per batch by :func:`read_results`.
_READ_BATCH = 500


def _read_current(files: list[RunPath], columns: list[str], stage: str | None) -> pa.Table | None:
    """``columns`` (with ``schema_version``) of the rows of ``stage`` in local ``files``, read by DuckDB's
    multi-file Parquet reader (projection and the stage filter pushed into the scan); None unless every file
    is an intact file of the current schema as far as the read goes, and then :func:`read_results` reads
    file by file, which upgrades older versions and names a bad file.

    Checked: the first file's whole schema (:func:`_check_file`; DuckDB binds the columns from it); in
    every other file, each column read, present with a castable type (else DuckDB raises), and every row's
    ``schema_version`` :data:`SCHEMA_VERSION`. A file that differs only in columns a command does not read
    is read by that command (a command that reads them names it). Checking every footer against the
    schema as well would cost another pass over the footers, about 40 % more at 10,000 files.
    Rows come in the files' order, then the order within each file.
    """
    if not all(isinstance(f, Path) for f in files) or any(f.suffix != ".parquet" for f in files):
        return None  # a bucket (read through pyarrow.fs) or a foreign file: the file-by-file path
    import duckdb

    try:
        if _check_file(files[0]) != SCHEMA_VERSION:
            return None
    except ResultsError:
        return None
    select = ", ".join(f'"{c}"' for c in columns)
    sql = f"SELECT {select} FROM read_parquet($files, hive_partitioning = false, union_by_name = false)"
    if stage is not None:
        sql += " WHERE stage = $stage"
    sql += " ORDER BY file_index, file_row_number"
    def scan(group: list[str]) -> pa.Table | None:
        # One thread per connection, a connection per group of files, groups in parallel: on small files
        # DuckDB's own threads wait on each other; unordered scans and one sort keep memory low.
        con = duckdb.connect(config={"autoload_known_extensions": False, "autoinstall_known_extensions": False,
                                     "preserve_insertion_order": False, "threads": 1})
        try:
            con.execute("SET enable_progress_bar = false")  # a reading command shows no progress display
            return _arrow(con.sql(sql, params={"files": group, **({"stage": stage} if stage is not None else {})}))
        except duckdb.Error:  # a corrupt file, a column missing or of another type: the file-by-file read names it
            return None
        finally:
            con.close()

    groups = [[str(f) for f in files[i:i + _SCAN_GROUP]] for i in range(0, len(files), _SCAN_GROUP)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(groups), os.cpu_count() or 1))) as pool:
        parts = list(pool.map(scan, groups))
    if any(t is None for t in parts):
        return None
    table = pa.concat_tables([t for t in parts if t is not None]).combine_chunks()
    versions = pa.compute.unique(table.column("schema_version")).to_pylist() if table.num_rows else []
    if versions and versions != [SCHEMA_VERSION]:
        return None
    return table.cast(pa.schema([SCHEMA.field(c) for c in columns]))


#: Files per DuckDB scan in :func:`_read_current` (bounds the memory of one scan's file readers).
_SCAN_GROUP = 1000


@functools.lru_cache(maxsize=1)
def _schema_footer() -> bytes:
    """The ``ARROW:schema`` footer entry this pyarrow writes for :data:`SCHEMA`: a file carrying the same
    bytes has exactly the current schema (anything else takes :func:`_check_file`'s full check)."""
    buf = pa.BufferOutputStream()
    pq.write_table(SCHEMA.empty_table(), buf)
    entry: bytes = (pq.read_metadata(pa.BufferReader(buf.getvalue())).metadata or {})[b"ARROW:schema"]
    return entry


def _read_file(f: RunPath, columns: list[str], stage: str | None) -> tuple[int, pa.Table]:
    """(schema version, ``columns`` of the rows of ``stage``) of one checked result file, as :data:`SCHEMA` types."""
    if f.suffix != ".parquet":
        raise ResultsError(f"foreign file in results directory: {f}")
    try:
        path, fs = arrow_file(f)
        pf = pq.ParquetFile(path, filesystem=fs, pre_buffer=False)  # small files: one read per column chunk is cheaper
        version = SCHEMA_VERSION if (pf.metadata.metadata or {}).get(b"ARROW:schema") == _schema_footer() else _check_file(f)
        if version == SCHEMA_VERSION:
            table = pf.read(columns=columns)
            if set(table.column("schema_version").to_pylist()) - {SCHEMA_VERSION}:
                version = _check_file(f)  # raises: another version's rows under the current columns
        else:
            upgrade = {6: upgrade_v6, 5: upgrade_v5, 4: upgrade_v4}.get(version, upgrade_v3)
            table = upgrade(pf.read()).select(columns)
    except (pa.ArrowException, OSError) as e:
        raise ResultsError(f"corrupt Parquet file {f}: {error_summary(e)}") from None
    if stage is not None:
        table = table.filter(ds.field("stage") == stage)
    return version, table


#: Schema v3 (densitune 0.1.0 up to the provenance columns): ``lam`` where v4 has ``center_loss``, no
#: ``ensemble`` flag (an ensemble row had no seed), ``checkpoint`` as one comma-joined string, no provenance.
SCHEMA_V3 = pa.schema(
    [("lam", pa.float64()) if f.name == "center_loss" else ("checkpoint", pa.string()) if f.name == "checkpoints"
     else (f.name, f.type) for f in SCHEMA if f.name not in ("ensemble", *SCHEMA.names[SCHEMA.names.index("node"):])]
)


#: The columns schema v5 added (null in rows of older files).
V5_COLUMNS = ("cpu", "cpu_capability", "onednn_isa", "cuda", "deterministic", "reproducible")
#: The columns schema v6 added (derived from ``id_dataset`` / ``ood_dataset`` in rows of older files).
V6_COLUMNS = ("ood_kind", "ood_name")
#: The columns schema v7 added (densitune tune; null in rows of older files).
V7_COLUMNS = ("tune_status", "gpu_seconds")
#: Schema v6 (the OOD set's kind and short name, before the tune columns).
SCHEMA_V6 = pa.schema([f for f in SCHEMA if f.name not in V7_COLUMNS])
#: Schema v5 (the kernel columns, before the OOD set's kind and short name).
SCHEMA_V5 = pa.schema([f for f in SCHEMA_V6 if f.name not in V6_COLUMNS])
#: Schema v4 (the provenance columns, before the v5 kernel columns).
SCHEMA_V4 = pa.schema([f for f in SCHEMA_V5 if f.name not in V5_COLUMNS])


def upgrade_v6(table: pa.Table) -> pa.Table:
    """A schema v6 table as :data:`SCHEMA`: the v7 tune columns null (no older run had a tune stage);
    ``schema_version`` stays 6."""
    for name in V7_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def upgrade_v5(table: pa.Table) -> pa.Table:
    """A schema v5 table as :data:`SCHEMA`: each row's OOD set kind and short name as a v6 search would have
    recorded them (:func:`densitune.ood_groups.set_labels` over the sets of its in-distribution data set; an
    attack row's kind "attack"); ``schema_version`` stays 5 (what wrote the row)."""
    ids, oods = table.column("id_dataset").to_pylist(), table.column("ood_dataset").to_pylist()
    labels: dict[tuple[str | None, str], tuple[str, str]] = {}
    for id_dataset in dict.fromkeys(ids):
        sets = [o for i, o in zip(ids, oods, strict=True) if i == id_dataset and o is not None]
        for o, kind_name in set_labels(id_dataset or "", [o for o in sets if not is_attack(o)]).items():
            labels[(id_dataset, o)] = kind_name
        labels.update({(id_dataset, o): ("attack", o) for o in sets if is_attack(o)})
    picked = [None if o is None else labels[(i, o)] for i, o in zip(ids, oods, strict=True)]
    for n, name in enumerate(V6_COLUMNS):
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.array([None if p is None else p[n] for p in picked], pa.string()))
    return upgrade_v6(table.select(SCHEMA_V6.names).cast(SCHEMA_V6))


def upgrade_v4(table: pa.Table) -> pa.Table:
    """A schema v4 table as :data:`SCHEMA`: the v5 kernel columns null, the v6 ones as :func:`upgrade_v5`;
    ``schema_version`` stays 4."""
    for name in V5_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return upgrade_v5(table.select(SCHEMA_V5.names).cast(SCHEMA_V5))


def upgrade_v3(table: pa.Table) -> pa.Table:
    """A schema v3 table as :data:`SCHEMA` (v4): ``lam`` -> ``center_loss`` (already null for "ce"),
    ``ensemble`` = a search row without a seed, ``checkpoint`` split into ``checkpoints``; the provenance
    columns v3 did not record are null; ``schema_version`` stays 3 (what wrote the row)."""
    rows = table.to_pylist()
    for r in rows:
        r["center_loss"] = r.pop("lam")
        r["ensemble"] = r["stage"] == "search" and r["seed"] is None
        ckpt = r.pop("checkpoint")
        r["checkpoints"] = ckpt.split(",") if ckpt else None
    return upgrade_v4(pa.Table.from_pylist(rows, schema=SCHEMA_V4))


def filter_results(table: pa.Table, where: str | None) -> pa.Table:
    """Rows of ``table`` matching one SQL expression, e.g. ``density = 'kde' AND D >= 16`` (see :mod:`.sql`)."""
    return filter_table(table, where)


def query(table: pa.Table, sql: str, *, allow_files: bool = False) -> pa.Table:
    """One read-only SELECT over ``table`` (as the view ``results``); see :mod:`.sql`."""
    return run_query(table, sql, allow_files=allow_files)
