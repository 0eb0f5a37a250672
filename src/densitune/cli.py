"""The ``densitune`` command: train, search, report, best, demo, list.

Bad input (unknown names, ε < 0, D <= 0, missing data or results) is checked before
Ray starts and before anything is written, and ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from densitune.errors import DensituneError

log = logging.getLogger("densitune")

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="densitune-runs", help="run directory: models/, results/, tune/ under it (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="directory holding torchvision data sets / image folders")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start Ray locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial asks Ray for (default: %(default)s)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs each trial asks Ray for: 0, a fraction in (0, 1] (trials share a GPU) or a whole number; "
                        "required with --address; default: 1 if this machine has a GPU, else 0")
    p.add_argument("--max-gpu-hours", type=float, default=None,
                   help="stop the run (resumable) once its trials have used about this many GPU-hours (default: no limit)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run of the same experiment")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and results only (no progress lines)")
    p.add_argument("--verbose", action="store_true", help="also Ray Tune's own status tables")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="default", help="name of the training experiment (default: %(default)s)")
    p.add_argument("--dataset", default="digits", help="in-distribution data set (default: %(default)s)")
    p.add_argument("--download", action="store_true", help="download torchvision data sets if missing (needs internet)")
    p.add_argument("--backbone", nargs="+", default=["cnn"], help="backbones to train (grid)")
    p.add_argument("-D", "--dim", nargs="+", type=int, default=[16], help="feature dimensions D (grid)")
    p.add_argument("--loss", nargs="+", default=["ce"], help="losses: ce, center, contrastive (grid)")
    p.add_argument("--lam", type=float, default=0.1, help="center-loss weight λ")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (grid)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-spectral", action="store_true", help="train without soft spectral normalisation")
    p.add_argument("--sn-coeff", type=float, default=3.0)
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this size")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    # Flags default to None so that a --spec file can supply the value; flags given win.
    p.add_argument("--spec", default=None, help="YAML search spec (keys as in README; flags given here override it)")
    from densitune.search.spec import spec_keys

    for key in spec_keys():  # one flag per spec key that has one (declared on SearchSpec's fields)
        if key.flags and key.flags[-1] not in p._option_string_actions:  # --data-root is common to train
            p.add_argument(*key.flags, dest=key.name, default=None, help=key.help, nargs=key.nargs, type=key.type,
                           metavar=key.metavar)
    p.add_argument("--kde-bandwidth", nargs="+", default=None,
                   help="KDE bandwidths to search: numbers and/or rules (scott, silverman); default scott")
    p.add_argument("--max-concurrent", type=int, default=None)


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
    for key in ("val_ood",):
        if values.get(key):
            values[key] = _abs_dataset(values[key])
    if values.get("test_ood"):
        values["test_ood"] = [_abs_dataset(n) for n in values["test_ood"]]
    return values


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are the same one line as every other bad input."""

    def error(self, message: str):
        self.exit(2, f"densitune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="densitune",
        description="Hyperparameter search for feature-density OOD detection (DDU / KDE + input perturbation).",
    )
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
        p.add_argument("--metric", default="auroc", help="validation metric to rank by (default: %(default)s)")
        p.add_argument("--where", default=None, help="SQL filter on the rows, e.g. \"density = 'kde' AND D >= 16\"")
        p.add_argument("--format", default="markdown", help="markdown, csv, latex or json (default: %(default)s)")
        if name == "report":
            p.add_argument("--top", type=int, default=None, help="show the best N configurations")
            p.add_argument("--view", default="all", help="all, methods (the note's method comparison) or configs (ip side by side)")
            p.add_argument("--by", default=None, help="comma-separated columns: the best trial per value, e.g. backbone,D")
        else:
            p.add_argument("--json", action="store_true", help="print the best config as one JSON object")

    p = sub.add_parser("query", help="run SQL over the results (DuckDB; the table is called `results`)")
    p.add_argument("results", metavar="RUN", help="the run folder or its results/ folder")
    p.add_argument("sql", help='e.g. "SELECT density, max(auroc) FROM results WHERE split = \'val\' GROUP BY density"')
    p.add_argument("--format", default="markdown", help="markdown, csv, latex or json (default: %(default)s)")

    p = sub.add_parser("demo", help="train -> search -> report on the embedded offline default (digits)")
    p.add_argument("--out", default="densitune-demo", help="output directory (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("plot", help="figures: metric vs ε, score histograms and ROC curves of the best configuration")
    p.add_argument("results", metavar="RUN", help="the run folder or its results/ folder")
    p.add_argument("--out", default=None, help="output directory, not inside the results folder (default: RUN/plots)")
    p.add_argument("--experiment", default=None, help="default: the experiment of the best validation trial")
    p.add_argument("--metric", default="auroc", help="validation metric to rank by and plot")
    p.add_argument("--no-scores", action="store_true", help="only the ε plot (needs no checkpoints or stored spec)")

    sub.add_parser("list", help="list registered backbones, losses, data sets, densities and scores")

    p = sub.add_parser("compact", help="merge each finished experiment's small result files into one (readers unchanged)")
    p.add_argument("results", metavar="RUN", help="the run folder (or its results/ folder)")

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
    return None if path is None else str(Path(path).expanduser().resolve())


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


def cmd_train(args: argparse.Namespace) -> int:
    from densitune.ray_runtime import check_trial_resources, init_ray
    from densitune.search.prepare import check_data
    from densitune.search.results.store import remove_stale_temp_files
    from densitune.trainables.train.tune import TrainRun, run_training

    check_trial_resources(args.address, args.cpus_per_trial, args.gpus_per_trial, args.num_cpus, args.max_gpu_hours)
    args.data_root, args.dataset = _abs(args.data_root), _abs_dataset(args.dataset)
    from densitune.trainables.train.loop import check_training_folder

    configs = _train_configs(args)  # validates names, D, ε...
    check_training_folder(configs[0])  # a folder: data set needs train/ and test/ subfolders
    check_data(args.dataset, args.data_root, args.download)
    out = Path(_abs(args.out))
    run = TrainRun(
        experiment=args.experiment, models_dir=str(out / "models"), results_dir=str(out / "results"),
        storage_path=str(out / "tune"), cpus_per_trial=args.cpus_per_trial, resume=args.resume,
    )
    _hold_writer_lock(out, "train", args.experiment)
    remove_stale_temp_files(run.results_dir, args.experiment)  # only the lock holder may
    log.info("training %d model(s) into %s", len(configs), Path(run.models_dir) / args.experiment)
    init_ray(args.address, args.num_cpus)
    run_training(configs, run, gpus_per_trial=args.gpus_per_trial, max_gpu_hours=args.max_gpu_hours,
                 verbose=1 if args.verbose else 0)
    print(f"trained models: {Path(run.models_dir) / args.experiment}")
    return 0


def _number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def cmd_search(args: argparse.Namespace) -> int:
    from collections import Counter

    from densitune.errors import ConfigError
    from densitune.ray_runtime import check_trial_resources, init_ray
    from densitune.search.cache import DiskCache
    from densitune.search.prepare import prepare_search
    from densitune.search.results.report import best, report
    from densitune.search.results.store import read_results, remove_stale_temp_files, write_spec
    from densitune.search.tune import SearchRun, run_search, trial_budget

    check_trial_resources(args.address, args.cpus_per_trial, args.gpus_per_trial, args.num_cpus, args.max_gpu_hours)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    out = Path(_abs(args.out))
    values = _search_values(args)
    values.setdefault("models", str(out / "models"))
    spec, groups = prepare_search(values)
    cache_dir = str(out / "cache")
    run = SearchRun(results_dir=str(out / "results"), storage_path=str(out / "tune"), cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, cache_dir=cache_dir)
    _hold_writer_lock(out, "search", spec.experiment)
    remove_stale_temp_files(run.results_dir, spec.experiment)  # only the lock holder may
    _check_experiment(run.results_dir, spec, args.resume)
    log.info("search %s: %d trial(s), selecting on %s", spec.experiment, trial_budget(spec, groups), spec.protocol_label)
    write_spec(run.results_dir, spec.experiment, spec.to_dict())
    init_ray(args.address, args.num_cpus)
    run_search(spec, groups, run, resume=args.resume, verbose=1 if args.verbose else 0, max_gpu_hours=args.max_gpu_hours)
    events = Counter(kind for kind, _ in DiskCache(cache_dir).events())
    log.info("cache %s: %d feature extraction(s), %d density fit(s), %d attacked set(s) computed in all; "
             "every other use was a cache hit", run.cache_dir, events["extract"], events["fit"], events["attack"])
    table = read_results(run.results_dir, experiment=spec.experiment)
    print(report(table, spec.metric, top=5))
    print()
    print(best(table, spec.metric))
    return 0


def _check_experiment(results_dir: str, spec, resume: bool) -> None:
    """A new search must not mix into an old experiment; a resumed one must have the same spec."""
    from densitune.errors import ConfigError
    from densitune.search.results.store import has_results, read_spec

    if not resume:
        if has_results(results_dir, spec.experiment):
            raise ConfigError(f"experiment {spec.experiment!r} already has results in {results_dir}; "
                              "pass --resume to continue it, or choose another --experiment")
        return
    stored, current = read_spec(results_dir, spec.experiment), spec.to_dict()
    if stored is not None and stored != current:
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise ConfigError(f"--resume with a different search spec than the interrupted run (keys: {', '.join(diff)})")


def cmd_report(args: argparse.Namespace) -> int:
    from densitune.errors import ConfigError
    from densitune.search.results.report import report
    from densitune.search.results.store import filter_results, read_results, results_dir_of

    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    table = filter_results(read_results(results_dir_of(args.results)), args.where)
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    print(report(table, args.metric, top=args.top, view=args.view, fmt=args.format, by=by))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from densitune.search.results.report import best, best_config
    from densitune.search.results.store import filter_results, read_results, results_dir_of

    table = filter_results(read_results(results_dir_of(args.results)), args.where)
    print(json.dumps(best_config(table, args.metric), indent=1) if args.json else best(table, args.metric, args.format))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from densitune.search.results.report import Table, render
    from densitune.search.results.store import query, read_results, results_dir_of

    result = query(read_results(results_dir_of(args.results)), args.sql)
    print(render([Table(args.sql, result.to_pandas())], args.format))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from densitune.search.plots import plot_results
    from densitune.search.results.store import results_dir_of

    results = results_dir_of(args.results)
    out = args.out or str(results.parent / "plots" if results.name == "results" else results.parent / f"{results.name}-plots")
    for path in plot_results(str(results), out, experiment=args.experiment, metric=args.metric, scores=not args.no_scores):
        print(path)
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
    from densitune.runlock import LockedError, writer_lock
    from densitune.search.results.store import compact_experiment, results_dir_of

    results = results_dir_of(args.results)
    run = results.parent if results.name == "results" else results
    folders = sorted(results.glob("experiment=*")) if results.is_dir() else []
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

    from densitune.search.models import list_models
    from densitune.search.results.report import Table, render

    run = Path(args.results)
    records = list_models(run / "models" if (run / "models").is_dir() else run)
    print(render([Table(f"trained networks in {run}", pd.DataFrame.from_records(records))], args.format))
    return 0


#: The demo: the same commands a user would type, on the embedded digits default.
DEMO_TRAIN = ["--experiment", "demo", "--dataset", "digits", "--backbone", "cnn", "-D", "8", "32",
              "--loss", "ce", "contrastive", "--seeds", "0", "1", "--epochs", "15"]
DEMO_SEARCH = ["--experiment", "demo-search", "--sampler", "grid", "--resume",
               "--score", "density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy",
               "--density", "gmm_sum", "gmm_max", "kde", "--eps-grid", "0", "0.005", "0.01", "0.02", "0.05",
               "--attacks", "fgsm", "bim", "pgd", "--attack-eps", "0.1"]


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> search -> report on the embedded digits default, under ``args.out``."""
    common = ["--out", args.out] + (["--num-cpus", str(args.num_cpus)] if args.num_cpus else []) + (["-q"] if args.quiet else [])
    t0 = time.perf_counter()
    parser = build_parser()
    for command, extra in (("train", DEMO_TRAIN), ("search", DEMO_SEARCH)):
        argv = [command, *common, *extra]
        print(f"\n=== densitune {' '.join(argv)}", flush=True)
        rc = COMMANDS[command](parser.parse_args(argv))
        if rc:
            return rc
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; results: {Path(args.out) / 'results'} "
          f"(densitune report {args.out})")
    return 0


COMMANDS = {"compact": cmd_compact, "list-models": cmd_list_models, "train": cmd_train, "search": cmd_search, "report": cmd_report, "best": cmd_best, "list": cmd_list, "plot": cmd_plot, "query": cmd_query, "demo": cmd_demo}


#: Context managers a command holds until :func:`main` returns (the writer locks).
_HELD = contextlib.ExitStack()


def _hold_writer_lock(out: Path, command: str, experiment: str) -> None:
    """Take the run's writer lock for ``experiment`` (one writer per experiment; see densitune.runlock)."""
    from densitune.runlock import writer_lock

    _HELD.enter_context(writer_lock(out, command, experiment))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    try:
        with _HELD:
            return COMMANDS[args.command](args)
    except DensituneError as e:
        print(f"densitune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densitune: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
