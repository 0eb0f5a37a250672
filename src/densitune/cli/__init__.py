"""The ``densitune`` command: train, search, report, best, demo, list.

Bad input (unknown names, ε < 0, D <= 0, missing data or results) is checked before
Ray starts and before anything is written, and ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from densitune.errors import DensituneError
from densitune.run.console import Interrupted, close_progress, log_to_file, resume_command, setup_logging

if TYPE_CHECKING:
    from densitune.run.runstore import RunPath, RunStore

#: Fixed names offered as ``choices`` (tests check them against the report module and attack registry,
#: which are not imported here: ``densitune --help`` stays fast).
FORMATS = ("markdown", "csv", "latex", "json")
METRICS = ("auroc", "auprc", "fpr95")
VIEWS = ("summary", "all", "methods", "configs")
ATTACK_NAMES = ("fgsm", "bim", "pgd")
PLOT_FORMATS = ("png", "svg", "pdf")

log = logging.getLogger("densitune")

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="densitune-runs", help="run directory: models/, results/, tune/ under it (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="directory holding torchvision data sets / image folders (default: none; the embedded digits need none)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start Ray locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial asks Ray for (default: %(default)s)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs each trial asks Ray for: 0, a fraction in (0, 1] (trials share a GPU) or a whole number; "
                        "required with --address; default: 1 if this machine has a GPU, else 0")
    p.add_argument("--max-gpu-hours", type=float, default=None,
                   help="stop the run (resumable) once its trials have used about this many GPU-hours (default: no limit)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run of the same experiment")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and results only (no header, progress bar or summary)")
    p.add_argument("--verbose", action="store_true", help="also per-epoch / per-trial lines and Ray Tune's own output on the console")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="default", help="name of the training experiment (default: %(default)s)")
    p.add_argument("--dataset", default="digits", help="in-distribution data set (default: %(default)s)")
    p.add_argument("--download", action="store_true", help="download torchvision data sets if missing (needs internet)")
    p.add_argument("--backbone", nargs="+", default=["cnn"], help="backbones to train (grid; names: `densitune list`)")
    p.add_argument("-D", "--dim", nargs="+", type=int, default=[16], help="feature dimensions D (grid)")
    p.add_argument("--loss", nargs="+", default=["ce"], help="losses to train with (grid; names: `densitune list`)")
    p.add_argument("--lam", type=float, default=0.1, help="center-loss weight λ")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (grid)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs per network")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--no-spectral", action="store_true", help="train without soft spectral normalisation")
    p.add_argument("--sn-coeff", type=float, default=3.0, help="soft spectral normalisation coefficient")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this size (default: the whole training split)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the training step; auto: only on CUDA for backbones measured to gain (default: %(default)s)")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    # Flags default to None so that a --spec file can supply the value; flags given win.
    p.add_argument("--spec", default=None, help="YAML search spec (keys as in README; flags given here override it) (default: none)")
    from densitune.search.spec import default_text, spec_keys

    for key in spec_keys():  # one flag per spec key that has one (declared on SearchSpec's fields)
        if key.flags and key.flags[-1] not in p._option_string_actions:  # --data-root is common to train
            default = default_text(key.name)
            text = key.help if "default" in key.help else f"{key.help} (default: {default or 'none'})"
            p.add_argument(*key.flags, dest=key.name, default=None, help=text, nargs=key.nargs, type=key.type,
                           metavar=key.metavar, choices=key.choices)
    p.add_argument("--kde-bandwidth", nargs="+", default=None,
                   help="KDE bandwidths to search: numbers and/or rules scott, silverman (default: scott)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: as many as the cluster fits)")


def _search_values(args: argparse.Namespace) -> dict:
    """Spec values from the --spec file, overridden by the flags that were given."""
    from densitune.search.spec import spec_keys
    from densitune.search.spec_file import load_spec_file

    values = load_spec_file(args.spec) if args.spec else {}
    for spec_key in spec_keys():
        v = getattr(args, spec_key.name, None)
        if v is not None:
            values[spec_key.name] = v
    if args.kde_bandwidth:  # merged into the file's density_params, not replacing them
        params = {k: dict(v) for k, v in values.get("density_params", {}).items()} if isinstance(values.get("density_params"), dict) else {}
        params.setdefault("kde", {})["bandwidth"] = [_number_or_name(b) for b in args.kde_bandwidth]
        values["density_params"] = params
    for key in ("models", "data_root"):
        if values.get(key):
            values[key] = _abs(values[key])
    for key in ("val_ood", "test_ood"):  # a YAML val_ood may be one name
        if isinstance(values.get(key), str):
            values[key] = _abs_dataset(values[key])
        elif values.get(key):
            values[key] = [_abs_dataset(n) for n in values[key]]
    return values


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless it says its default already (or has none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are the same one line as every other bad input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"densitune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="densitune",
        description="Hyperparameter search for feature-density OOD detection (DDU / KDE + input perturbation).",
    )
    from densitune import __version__

    parser.add_argument("--version", action="version", version=f"densitune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train backbones (grid of backbone x D x loss x seed) as Ray Tune trials")
    _add_common(p)
    _add_train_args(p)

    p = sub.add_parser("search", help="search ε, D, density and score with Optuna through Ray Tune")
    _add_common(p)
    _add_search_args(p)

    for name, text in (("report", "ranked tables from a results directory"), ("best", "the best configuration")):
        p = sub.add_parser(name, help=text)
        p.add_argument("results", metavar="RUN", help="the run folder (e.g. densitune-demo) or its results/ folder")
        p.add_argument("--metric", default="auroc", choices=tuple(METRICS), help="validation metric to rank by (default: %(default)s)")
        p.add_argument("--where", default=None, help="SQL filter on the rows, e.g. \"density = 'kde' AND D >= 16\" (default: all rows)")
        p.add_argument("--format", default="markdown", choices=FORMATS, help="output format (default: %(default)s)")
        if name == "report":
            p.add_argument("--top", type=int, default=None, help="show the best N configurations; implies --full (default: all)")
            p.add_argument("--full", action="store_true",
                           help="every table (--view all) instead of the one-screen summary of methods x OOD sets")
            p.add_argument("--view", default=None, choices=VIEWS,
                           help="summary (methods x OOD sets, AUROC and FPR95), methods (the note's method comparison per "
                                "model group), configs (ip side by side) or all (default: summary; all with --full or --top)")
            p.add_argument("--by", default=None, help="comma-separated columns: the best trial per value, e.g. backbone,D (default: none)")
        else:
            p.add_argument("--json", action="store_true", help="print the best config as one JSON object")

    p = sub.add_parser("compare", help="A vs B on the same networks: paired test AUROC difference with a 95 %% interval")
    p.add_argument("results", metavar="RUN", help="the run folder (searched with --keep-scores all) or its results/ folder")
    p.add_argument("--a", required=True, metavar="WHERE", help="SQL filter choosing A (its best trial on validation), e.g. \"score = 'density' AND eps > 0\" (no default: required)")
    p.add_argument("--b", required=True, metavar="WHERE", help="SQL filter choosing B, e.g. \"score = 'rmd'\" (no default: required)")
    p.add_argument("--metric", default="auroc", choices=tuple(METRICS), help="validation metric that picks each side's best trial (default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (several seeds) (default: %(default)s)")
    p.add_argument("--format", default="markdown", choices=FORMATS, help="output format (default: %(default)s)")

    p = sub.add_parser("query", help="run SQL over the results (DuckDB; the table is called `results`)")
    p.add_argument("results", metavar="RUN", help="the run folder or its results/ folder")
    p.add_argument("sql", help='e.g. "SELECT density, max(auroc) FROM results WHERE split = \'val\' GROUP BY density"')
    p.add_argument("--allow-files", action="store_true", help="let the SELECT read other files (read_csv...); off by default")
    p.add_argument("--format", default="markdown", choices=FORMATS, help="output format (default: %(default)s)")

    p = sub.add_parser("demo", help="train -> search -> report on the embedded offline default (digits)")
    p.add_argument("--out", default="densitune-demo", help="output directory (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo (unfinished networks from their last epoch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no header, progress bar or summary lines; warnings and results only")
    p.add_argument("--verbose", action="store_true", help="also per-epoch / per-trial lines and Ray Tune's own output")

    p = sub.add_parser("plot", help="figures: metric vs ε, score histograms and ROC curves of the best configuration")
    p.add_argument("results", metavar="RUN", help="the run folder or its results/ folder")
    p.add_argument("--out", default=None, help="output directory, not inside the results folder (default: RUN/plots)")
    p.add_argument("--experiment", default=None, help="experiment to plot (default: that of the best validation trial)")
    p.add_argument("--metric", default="auroc", choices=tuple(METRICS), help="validation metric to rank by and plot (default: %(default)s)")
    p.add_argument("--no-scores", action="store_true", help="only the ε plot (needs no checkpoints or stored spec)")
    p.add_argument("--where", default=None, help="SQL filter on the rows: what is drawn, e.g. \"score = 'density' AND D = 8\" "
                                                 "(default: all rows)")
    p.add_argument("--score", nargs="+", default=None, help="only these scores (default: all; the ε plot draws density if present)")
    p.add_argument("--density", nargs="+", default=None, help="only these densities (default: all)")
    p.add_argument("-D", "--dim", dest="dims", nargs="+", type=int, default=None, help="only networks with these D (default: all)")
    p.add_argument("--format", dest="formats", nargs="+", default=["png"], choices=PLOT_FORMATS,
                   help="figure formats, several allowed (default: png)")

    p = sub.add_parser("export", help="write a search configuration as a self-contained detector (densitune.load_detector)")
    p.add_argument("results", metavar="RUN", help="the run folder (e.g. densitune-demo) or its results/ folder")
    p.add_argument("out", help="new folder for the detector")
    p.add_argument("--where", default=None, help="SQL filter on the rows; the best trial among them is exported (default: all rows)")
    p.add_argument("--metric", default="auroc", choices=tuple(METRICS), help="validation metric to pick the best trial by")

    p = sub.add_parser("clean", help="stop the Ray processes a crashed driver of RUN left, remove RUN's Tune folders and cache locks")
    p.add_argument("run", help="run directory (the --out of train / search)")

    sub.add_parser("list", help="list registered backbones, losses, data sets, densities and scores")

    p = sub.add_parser("compact", help="merge each finished experiment's small result files into one (readers unchanged)")
    p.add_argument("results", metavar="RUN", help="the run folder (or its results/ folder)")

    p = sub.add_parser("run", help="run studies of the research note (experiments/*.yaml): train what is missing, search, report")
    p.add_argument("spec", nargs="+", help="study spec files, e.g. experiments/method_comparison.yaml")
    _add_common(p)
    p.add_argument("--smoke", action="store_true",
                   help="the same studies scaled to the embedded digits on CPU (cnn, D/64, 2 epochs, a tiny grid)")
    p.add_argument("--plan", action="store_true", help="print the networks, trials and estimated GPU-hours; run nothing")
    p.add_argument("--max-concurrent", type=int, default=None, help="search trials running at once (default: as many as fit)")

    p = sub.add_parser("list-models", help="the trained networks of a run (key = readable name + config hash)")
    p.add_argument("results", metavar="RUN", help="the run folder (its models/ folder is listed)")
    p.add_argument("--format", default="markdown", choices=("markdown", "csv", "latex", "json"),
                   help="output format (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------- commands


@overload
def _abs(path: str) -> str: ...
@overload
def _abs(path: None) -> None: ...
def _abs(path: str | None) -> str | None:
    """An absolute path: Ray Tune runs each trial in its own working folder, so relative paths break there."""
    if path is None or "://" in path:  # a bucket (s3://...) is already absolute; file:// is resolved by the run store
        return path
    return str(Path(path).expanduser().resolve())


def _abs_dataset(name: str | None) -> str | None:
    """``folder:PATH`` with PATH made absolute (other names unchanged)."""
    if name and name.startswith("folder:"):
        return "folder:" + _abs(name[len("folder:"):])
    return name


def _train_configs(args: argparse.Namespace):
    from densitune.trainables.train.config import TrainConfig
    from densitune.trainables.train.tune import expand_grid

    base = TrainConfig(
        backbone=args.backbone[0], feature_dim=args.dim[0], loss=args.loss[0], lam=args.lam, seed=args.seeds[0],
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, spectral=not args.no_spectral,
        sn_coeff=args.sn_coeff, dataset=args.dataset, data_root=args.data_root, train_limit=args.train_limit,
        experiment=args.experiment,
    )
    return expand_grid(base, {"backbone": args.backbone, "feature_dim": args.dim, "loss": args.loss, "seed": args.seeds})


def _start_ray(args: argparse.Namespace, store: RunStore) -> None:
    """Stop what a crashed earlier driver of this run left running, start Ray, and record its session
    (in the run folder, or for a run in a bucket in this machine's own folder for it: ``store.local()``)."""
    from densitune.run.cleanup import clean_run, record_session
    from densitune.run.ray_runtime import init_ray

    done = clean_run(store.local(), prune=False)
    if done.ignored:
        log.warning("ignoring %s (it proves no process of a crashed driver); no process signalled", done.ignored)
    init_ray(args.address, args.num_cpus, verbose=args.verbose, quiet=args.quiet)
    if args.address is None:  # a Ray this process started (never a cluster's)
        record_session(store.local())


def _run_store(args: argparse.Namespace) -> RunStore:
    """The run named by ``--out``, checked writable before anything is written (a dangling link is refused)."""
    from densitune.run.runstore import RunStore
    from densitune.run.storage import check_writable

    check_writable(args.out)
    return RunStore(args.out)


def cmd_train(args: argparse.Namespace) -> int:
    from densitune.run.resource_flags import check_resource_flags

    check_resource_flags(args)  # before torch and Ray are imported
    store = _run_store(args)
    from densitune.results.store import remove_stale_temp_files
    from densitune.search.prepare import check_data
    from densitune.trainables.train.tune import TrainRun, run_training

    args.data_root, args.dataset = _abs(args.data_root), _abs_dataset(args.dataset)
    from densitune.trainables.train.loop import check_training_folder

    configs = getattr(args, "configs", None) or _train_configs(args)  # validates names, D, ε... (`run` passes its own)
    check_training_folder(configs[0])  # a folder: data set needs train/ and test/ subfolders
    check_data(args.dataset, args.data_root, args.download)
    run = TrainRun(
        experiment=args.experiment, models_dir=str(store.models), results_dir=str(store.results),
        storage_path=store.tune, cpus_per_trial=args.cpus_per_trial, resume=args.resume,
        log_file=str(store.log_file), compile=args.compile,
    )
    _hold_writer_lock(store, "train", args.experiment)
    remove_stale_temp_files(run.results_dir, args.experiment)  # only the lock holder may
    log_to_file(run.log_file)
    models_dir = store.models / args.experiment
    _header(args, f"train {len(configs)} model(s) ({_grid_text(args)}; {args.epochs} epochs) on {args.dataset}",
            {"models": models_dir, "rows": store.results, "log": run.log_file})
    _start_ray(args, store)
    try:
        run_training(configs, run, gpus_per_trial=args.gpus_per_trial, max_gpu_hours=args.max_gpu_hours,
                     verbose=1 if args.verbose else 0, progress=not args.quiet)
    except KeyboardInterrupt:
        _stop_ray()  # no trial writes after the account below is taken
        raise Interrupted(f"{_train_status(run, configs)}; continue with: {_resume(args)}") from None
    except DensituneError as e:  # a failed trial, a fatal error, the GPU-hour budget
        raise type(e)(f"{e}; {_train_status(run, configs)}; after fixing it, continue with: {_resume(args)}") from None
    _say(args, f"trained {len(configs)} model(s): {models_dir}")
    return 0


def _grid_text(args: argparse.Namespace) -> str:
    parts = [("backbone", args.backbone), ("D", args.dim), ("loss", args.loss), ("seed", args.seeds)]
    return " x ".join(f"{name} {','.join(map(str, v))}" for name, v in parts)


def _train_status(run, configs) -> str:
    """What an interrupted or failed training finished, and what not (from the model store and saved state)."""
    from densitune.errors import CheckpointError
    from densitune.trainables.train.checkpoint import read_config
    from densitune.trainables.train.tune import is_trained

    done = [c for c in configs if is_trained(run, c)]
    left = []
    for c in configs:
        if c in done:
            continue
        try:
            epoch = read_config(run.state_dir(c)).get("epoch", 0) if run.state_dir(c).is_dir() else 0
        except CheckpointError:
            epoch = 0
        left.append(f"{c.key} ({epoch}/{c.epochs} epochs saved)")
    return f"{len(done)} of {len(configs)} model(s) trained; not finished: {', '.join(left) or 'none'}"


def _resume(args: argparse.Namespace) -> str:
    return resume_command(getattr(args, "resume_argv", None) or sys.argv[1:])


def _say(args: argparse.Namespace, text: str) -> None:
    """A line on stdout (not with -q)."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _header(args: argparse.Namespace, what: str, where: dict[str, Any]) -> None:
    """What will run and where its results go: the one header of a command."""
    if getattr(args, "quiet", False):
        return
    print(f"densitune {what}", flush=True)
    print("  " + "; ".join(f"{k}: {v}" for k, v in where.items()), flush=True)


def _number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def cmd_search(args: argparse.Namespace) -> int:
    from densitune.run.resource_flags import check_resource_flags

    # Flags and the spec file first, before torch and Ray are imported: a bad (or huge) spec fails fast and small.
    check_resource_flags(args)
    values = _search_values(args)
    store = _run_store(args)
    from collections import Counter

    from densitune.results.store import read_results, remove_stale_temp_files, write_spec
    from densitune.search.cache import DiskCache
    from densitune.search.prepare import prepare_search
    from densitune.search.report.tables import best, report
    from densitune.search.tune import SearchRun, completed_trials, run_search, trial_budget

    values.setdefault("models", str(store.models))
    spec, groups = prepare_search(values)
    cache_dir = str(store.cache)
    run = SearchRun(results_dir=str(store.results), storage_path=store.tune, cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, cache_dir=cache_dir,
                    log_file=str(store.log_file))
    _hold_writer_lock(store, "search", spec.experiment)
    remove_stale_temp_files(run.results_dir, spec.experiment)  # only the lock holder may
    _check_experiment(run.results_dir, spec, args.resume)
    log_to_file(run.log_file)
    total = trial_budget(spec, groups)
    _header(args, f"search {spec.experiment}: {total} trial(s) ({spec.sampler}) over {len(groups)} model group(s), "
                  f"selecting on {spec.protocol_label}",
            {"rows": run.results_dir, "log": run.log_file})
    write_spec(run.results_dir, spec.experiment, spec.to_dict())
    _start_ray(args, store)
    try:
        run_search(spec, groups, run, resume=args.resume, verbose=1 if args.verbose else 0,
                   max_gpu_hours=args.max_gpu_hours, progress=not args.quiet)
    except KeyboardInterrupt:
        _stop_ray()  # no trial writes after the account below is taken
        raise Interrupted(f"{_search_status(run, spec, total)}; continue with: {_resume(args)}") from None
    except DensituneError as e:  # failed trials, a fatal error, the GPU-hour budget
        raise type(e)(f"{e}; {_search_status(run, spec, total)}; after fixing it, continue with: {_resume(args)}") from None
    done = len(completed_trials(run.results_dir, spec.experiment))
    if done < total:  # nothing failed, yet trials are missing: never report a partial search as finished
        raise DensituneError(f"{_search_status(run, spec, total)}; continue with: {_resume(args)}")
    events = Counter(kind for kind, _ in DiskCache(cache_dir).events())
    log.info("cache %s: %d feature extraction(s), %d density fit(s), %d attacked set(s) computed in all; "
             "every other use was a cache hit", run.cache_dir, events["extract"], events["fit"], events["attack"])
    t_report = time.perf_counter()
    table = read_results(run.results_dir, experiment=spec.experiment)
    if args.verbose:
        print(report(table, spec.metric, top=5))
        print()
    print(best(table, spec.metric))
    STAGE_SECONDS["report"] = time.perf_counter() - t_report
    _say(args, f"\nsearch finished: {done} trial(s) in {store.results}; log: {run.log_file}\n"
               f"tables:  densitune report {store}  (every table: --full)\n"
               f"figures: densitune plot {store}")
    return 0


def _stop_ray() -> None:
    """Shut Ray down (its workers with it), so that what the results hold stops changing."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _search_status(run, spec, total: int) -> str:
    from densitune.search.tune import completed_trials

    done = len(completed_trials(run.results_dir, spec.experiment))
    return f"{done} of {total} search trial(s) finished and recorded in {run.results_dir}, {total - done} not run"


def _check_experiment(results_dir: str, spec, resume: bool) -> None:
    """A new search must not mix into an old experiment; a resumed one must have the same spec."""
    from densitune.errors import ConfigError
    from densitune.results.store import has_results, read_spec

    if not resume:
        if has_results(results_dir, spec.experiment):
            raise ConfigError(f"experiment {spec.experiment!r} already has results in {results_dir}; "
                              "pass --resume to continue it, or choose another --experiment")
        return
    stored, current = read_spec(results_dir, spec.experiment), spec.to_dict()
    if stored is not None:  # a spec stored by an older version: its keys' defaults and forms as today
        with contextlib.suppress(DensituneError, TypeError):
            stored = type(spec).from_dict(stored).to_dict()
    if stored is not None and stored != current:
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise ConfigError(f"--resume with a different search spec than the interrupted run (keys: {', '.join(diff)})")


def cmd_report(args: argparse.Namespace) -> int:
    from densitune.errors import ConfigError
    from densitune.results.store import results_dir_of
    from densitune.search.report.tables import read_search_rows, report

    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    table = read_search_rows(results_dir_of(args.results), args.where, by)
    view = args.view or ("all" if args.full or args.top is not None else "summary")
    print(report(table, args.metric, top=args.top, view=view, fmt=args.format, by=by))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from densitune.results.store import results_dir_of
    from densitune.search.report.tables import best, best_config, read_search_rows

    table = read_search_rows(results_dir_of(args.results), args.where)
    if args.json:
        cfg = best_config(table, args.metric)
        cfg["density_params"] = json.loads(cfg["density_params"] or "{}")  # a nested object, not an escaped string
        print(json.dumps(cfg, indent=1))
    else:
        print(best(table, args.metric, args.format))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from densitune.errors import ConfigError
    from densitune.results.store import read_results, results_dir_of
    from densitune.search.report.paired import compare_tables
    from densitune.search.report.tables import render

    if args.n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1, got {args.n_boot}")
    results_dir = results_dir_of(args.results)
    table = read_results(results_dir)
    print(render(compare_tables(table, results_dir, args.a, args.b, args.metric, n_boot=args.n_boot), args.format))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from densitune.errors import ResultsError
    from densitune.results.sql import referenced_columns
    from densitune.results.store import COLUMNS, query, read_results, results_dir_of

    results = results_dir_of(args.results)
    named = referenced_columns(args.sql, COLUMNS)  # read only the columns the SELECT names
    if named is not None and not named:  # count(*): the rows, not their values (one small column carries them)
        named = {"schema_version"}
    try:
        result = query(read_results(results, columns=named), args.sql, allow_files=args.allow_files)
    except ResultsError:
        if named is None:
            raise
        # a column reference the syntax tree does not show as one (e.g. JOIN ... USING): run it on every column
        result = query(read_results(results), args.sql, allow_files=args.allow_files)
    if args.format == "markdown":  # without pandas (half a second of a query's start)
        from densitune.search.report.markdown import arrow_markdown

        print(arrow_markdown(args.sql, result))
    else:
        from densitune.search.report.tables import Table, render

        print(render([Table(args.sql, result.to_pandas())], args.format))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from densitune.results.store import results_dir_of
    from densitune.search.report.plots import plot_results

    results = results_dir_of(args.results)
    out = args.out or _plot_dir(results)
    for path in plot_results(str(results), out, experiment=args.experiment, metric=args.metric, scores=not args.no_scores,
                             where=args.where, score=args.score, density=args.density, dims=args.dims, formats=args.formats):
        print(path)
    return 0


def _plot_dir(results: RunPath) -> str:
    """Where figures go by default: ``RUN/plots`` beside ``RUN/results`` (for a run in a bucket, a local
    folder named after the run: figures are for reading on this machine)."""
    from densitune.run.runstore import ObjectPath

    run = results.parent if results.name == "results" else results
    if isinstance(run, ObjectPath):
        return os.path.abspath(f"{run.name}-plots")
    return str(run / "plots" if results.name == "results" else results.parent / f"{results.name}-plots")


def cmd_export(args: argparse.Namespace) -> int:
    from densitune.api import export_detector, read_manifest
    from densitune.results.store import results_dir_of

    out = export_detector(str(results_dir_of(args.results)), args.out, where=args.where, metric=args.metric)
    m = read_manifest(out)
    what = f"{m['score']}" + (f" / {m['density']}" if m["density"] else "") + f", eps={m['eps']:g}"
    print(f"exported {what} ({len(m['members'])} detector(s), trial {m['source']['trial_id']}) to {out}\n"
          f"load it with: densitune.load_detector({str(out)!r})")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from densitune.errors import ConfigError
    from densitune.run.cleanup import clean_run
    from densitune.run.runstore import RunStore, is_remote

    run = RunStore(args.run).local() if is_remote(args.run) else Path(_abs(args.run))
    if not run.is_dir():
        raise ConfigError(f"run directory not found: {run}")
    done = clean_run(run)
    if done.ignored:
        raise ConfigError(f"ignored {done.ignored}; no process signalled, nothing removed")
    if done.driver_alive:
        raise ConfigError(f"{run} is in use by a running densitune; nothing cleaned")
    print(f"stopped {len(done.stopped)} orphaned Ray process(es); removed {len(done.removed)} Tune folder(s) and lock file(s)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from densitune.search.ood.densities import DENSITIES
    from densitune.search.ood.scores import SCORES
    from densitune.trainables.data import dataset_names
    from densitune.trainables.nets.backbones import BACKBONES
    from densitune.trainables.nets.losses import LOSSES

    for title, names in (
        ("backbones", BACKBONES.names()), ("losses", LOSSES.names()), ("datasets", dataset_names()),
        ("densities", DENSITIES.names()), ("scores", SCORES.names()),
    ):
        print(f"{title}: {', '.join(names)}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact every experiment whose writer lock is free; one whose lock is held is skipped (and said so)."""
    from densitune.errors import ResultsError
    from densitune.results.store import compact_experiment, results_dir_of
    from densitune.run.runlock import LockedError, writer_lock

    results = results_dir_of(args.results)
    run = results.parent if results.name == "results" else results
    from densitune.run.runstore import glob

    folders = glob(results, "experiment=*") if results.is_dir() else []
    if not folders:
        raise ResultsError(f"no experiments to compact in {results}")
    for folder in folders:
        experiment = folder.name.split("=", 1)[1]
        try:
            with writer_lock(run, "compact", experiment):
                n, rows = compact_experiment(results, experiment)
        except LockedError as e:
            print(f"{experiment}: skipped, {e}")
            continue
        print(f"{experiment}: {n} files merged into one ({rows} rows)" if n else f"{experiment}: nothing to merge")
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from densitune.run.runstore import location
    from densitune.search.models import list_models
    from densitune.search.report.tables import Table, render

    run = location(args.results)
    records = list_models(run / "models" if (run / "models").is_dir() else run)
    print(render([Table(f"trained networks in {run}", pd.DataFrame.from_records(records))], args.format))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Studies (densitune.app.studies): train the missing networks, search each part, write the report with the note's figures."""
    from densitune.run.resource_flags import check_resource_flags

    check_resource_flags(args)
    from densitune.app import studies as st
    from densitune.trainables.train.tune import TrainRun, is_trained

    studies = [st.load_study(path, smoke_run=args.smoke) for path in args.spec]  # every spec checked before anything runs
    from densitune.errors import ConfigError
    from densitune.run.runstore import is_remote

    if is_remote(args.out):  # each part's search reads a folder of links to its networks
        raise ConfigError(f"densitune run needs a local or shared folder for --out, not {args.out}; "
                          "run train and search on the bucket instead")
    data_root = None if args.smoke else _abs(args.data_root)
    out = Path(_abs(args.out))
    train_run = TrainRun(experiment=st.TRAIN_EXPERIMENT, models_dir=str(out / "models"), results_dir=str(out / "results"),
                         storage_path=str(out / "tune"))
    if args.plan:  # reads the run's model store, writes nothing
        trained = {c.key for s in studies for c in st.all_train_configs(s, data_root) if is_trained(train_run, c)}
        lines = [st.plan(s, trained) for s in studies]
        networks = len({c.key for s in studies for c in st.all_train_configs(s)})
        print(st.plan_text(lines, st.borrowed_throughputs(studies), networks))
        return 0
    from densitune.run.storage import check_writable

    check_writable(os.path.abspath(os.path.expanduser(args.out)))
    for s in studies:
        st.check_study_data(s, data_root)
    common = ["--out", str(out), "--cpus-per-trial", str(args.cpus_per_trial)]
    for flag, value in (("--address", args.address), ("--num-cpus", args.num_cpus), ("--gpus-per-trial", args.gpus_per_trial),
                        ("--max-gpu-hours", args.max_gpu_hours), ("--data-root", data_root)):
        common += [flag, str(value)] if value is not None else []
    common += (["-q"] if args.quiet else []) + (["--verbose"] if args.verbose else [])
    parser = build_parser()
    needed = {c.key: c for s in studies for c in st.all_train_configs(s, data_root)}  # networks shared by studies: once
    todo = [c for c in needed.values() if not is_trained(train_run, c)]
    for dataset in dict.fromkeys(c.dataset for c in todo):  # `densitune train` of the missing networks, per data set
        configs = [c for c in todo if c.dataset == dataset]
        sub = parser.parse_args(["train", *common, "--experiment", st.TRAIN_EXPERIMENT, "--dataset", dataset, "--resume"])
        sub.configs, sub.resume_argv = configs, args.resume_argv
        sub.backbone, sub.dim = sorted({c.backbone for c in configs}), sorted({c.feature_dim for c in configs})
        sub.loss, sub.seeds = sorted({c.loss for c in configs}), sorted({c.seed for c in configs})
        sub.epochs = max(c.epochs for c in configs)
        if cmd_train(sub):
            return 2
    for s in studies:
        for part in s.parts:  # `densitune search --spec`, on a folder holding exactly this part's networks
            view = st.link_models(out, s, part, out / "models")
            spec_file = st.write_search_spec(out, s, part, st.search_values(s, part, data_root=data_root, models=str(view)))
            extra = ["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent else []
            sub = parser.parse_args(["search", *common, *extra, "--spec", str(spec_file), "--resume"])
            sub.resume_argv = args.resume_argv
            if cmd_search(sub):
                return 2
        text, paths = st.write_report(s, out)
        print(text)
        _say(args, f"\nstudy {s.label}: report in {paths[0]} (and {paths[1].name})")
    return 0


#: The demo: the same commands a user would type, on the embedded digits default.
DEMO_TRAIN = ["--experiment", "demo", "--dataset", "digits", "--backbone", "cnn", "-D", "8", "32",
              "--loss", "ce", "contrastive", "--seeds", "0", "1", "--epochs", "15"]
DEMO_SEARCH = ["--experiment", "demo-search", "--sampler", "grid", "--resume",
               "--score", "density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy",
               "energy", "rmd", "knn", "vim",  # the field's simple baselines, in the method table beside DDU
               "--density", "gmm_sum", "gmm_max", "kde", "--eps-grid", "0", "0.005", "0.01", "0.05",
               "--val-ood", "digits-blend", "noise-blobs", "--val-agg", "min",  # one near, one far; the worst decides
               "--keep-scores", "all",  # per-sample test scores: `densitune compare` works on the demo
               "--attacks", "fgsm", "bim", "pgd", "--attack-eps", "0.1"]


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> search -> report on the embedded digits default, under ``args.out``."""
    from densitune.run.resource_flags import check_positive

    check_positive("--num-cpus", args.num_cpus, whole=True)
    common = (["--out", args.out] + (["--num-cpus", str(args.num_cpus)] if args.num_cpus else [])
              + (["-q"] if args.quiet else []) + (["--verbose"] if args.verbose else []))
    t0 = time.perf_counter()
    parser = build_parser()
    seconds: dict[str, float] = {}
    for command, extra in (("train", DEMO_TRAIN + (["--resume"] if args.resume else [])), ("search", DEMO_SEARCH)):
        argv = [command, *common, *extra]
        if args.verbose:
            print(f"\n=== densitune {' '.join(argv)}", flush=True)
        sub = parser.parse_args(argv)
        sub.resume_argv = getattr(args, "resume_argv", None) or sys.argv[1:]  # continue the demo, not its steps
        t_command = time.perf_counter()
        rc = COMMANDS[command](sub)
        seconds[command] = time.perf_counter() - t_command
        if rc:
            return rc
    report_s = STAGE_SECONDS.get("report", 0.0)  # the search command's reading of the results and its summary
    _say(args, f"demo finished in {time.perf_counter() - t0:.0f} s (training {seconds['train']:.0f} s, "
               f"search {seconds['search'] - report_s:.0f} s, report {report_s:.0f} s)")
    return 0


#: Wall seconds of the stages a command timed (the demo's summary splits its time with them).
STAGE_SECONDS: dict[str, float] = {}


COMMANDS = {"train": cmd_train, "search": cmd_search, "report": cmd_report, "best": cmd_best, "list": cmd_list, "plot": cmd_plot,
            "query": cmd_query, "compare": cmd_compare, "demo": cmd_demo, "export": cmd_export, "compact": cmd_compact,
            "list-models": cmd_list_models, "clean": cmd_clean, "run": cmd_run}


#: Context managers a command holds until :func:`main` returns (the writer locks).
_HELD = contextlib.ExitStack()


def _hold_writer_lock(store: RunStore, command: str, experiment: str) -> None:
    """Take the run's writer lock for ``experiment`` (one writer per experiment; see densitune.run.runlock)."""
    from densitune.run.runlock import writer_lock

    _HELD.enter_context(writer_lock(store.root, command, experiment))


def _one_line(message: str, limit: int = 280) -> str:
    """An error message as one line of at most ``limit`` characters (its start and its end kept)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else f"{text[: limit - 61]} … {text[-58:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.resume_argv = argv
    setup_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        with _HELD:
            return COMMANDS[args.command](args)
    except DensituneError as e:
        close_progress()
        print(f"densitune: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Interrupted as e:
        close_progress()
        print(f"densitune: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        close_progress()
        how = f"; continue with: {resume_command(argv)}" if args.command in ("train", "search", "demo", "run") else ""
        print(f"densitune: interrupted{how}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
