"""The ``densitune`` command: train, search, report, best, demo, list.

Bad input (unknown names, ε < 0, D <= 0, missing data or results) is checked before
Ray starts and before anything is written, and ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from densitune.errors import DensituneError

log = logging.getLogger("densitune")

#: Per in-distribution data set: (validation OOD set used for selection, test OOD sets).
DEFAULT_OOD = {
    "digits": ("digits-blend", ("digits-rot90", "digits-hflip", "photo-patches", "noise-uniform")),
    "cifar10": ("folder:tiny-imagenet-val", ("svhn", "cifar100", "mnist")),
    "mnist": ("folder:ood-val", ("fashionmnist", "cifar10", "svhn")),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="densitune-runs", help="run directory: models/, results/, tune/ under it (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="directory holding torchvision data sets / image folders")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start Ray locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
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
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial (default: 1 if the cluster has GPUs)")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    # Flags default to None so that a --spec file can supply the value; flags given win.
    p.add_argument("--spec", default=None, help="YAML search spec (keys as in README; flags given here override it)")
    p.add_argument("--experiment", default=None, help="name of the search experiment (default: search)")
    p.add_argument("--models", default=None, help="directory of trained models (default: OUT/models)")
    p.add_argument("--protocol", default=None, help="selection protocol: val-ood (default), adv-proxy or id-only")
    p.add_argument("--val-ood", default=None, help="OOD set used for selection (default: per ID data set)")
    p.add_argument("--test-ood", nargs="+", default=None, help="OOD sets reported, never used to select")
    p.add_argument("--proxy-eps", type=float, default=None, help="adv-proxy: FGSM budget on ID validation inputs")
    p.add_argument("--density", nargs="+", default=None, help="densities: gmm_sum gmm_max kde (default gmm_sum)")
    p.add_argument("--score", nargs="+", default=None, help="scores (default density); see `densitune list`")
    p.add_argument("--eps-grid", nargs="+", type=float, default=None, help="ε values of the grid sampler")
    p.add_argument("--eps-range", nargs=2, type=float, default=None, metavar=("LO", "HI"), help="TPE: ε in {0} ∪ log-uniform[LO, HI]")
    p.add_argument("-D", "--dim", nargs="+", type=int, default=None, help="only models with these D")
    p.add_argument("--backbone", nargs="+", default=None, help="only models with these backbones")
    p.add_argument("--loss", nargs="+", default=None, help="only models trained with these losses")
    p.add_argument("--kde-bandwidth", nargs="+", default=None,
                   help="KDE bandwidths to search: numbers and/or rules (scott, silverman); default scott")
    p.add_argument("--attacks", nargs="*", default=None, help="adversarial detection: fgsm bim pgd (rows adv-<name>)")
    p.add_argument("--attack-eps", type=float, default=None, help="L∞ attack budget in [0,1] pixel units (default 8/255)")
    p.add_argument("--attack-steps", type=int, default=None, help="BIM/PGD iterations (default 10)")
    p.add_argument("--sampler", default=None, help="grid or tpe (default: grid)")
    p.add_argument("--num-samples", type=int, default=None, help="TPE trial budget (default 20)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default 0)")
    p.add_argument("--metric", default=None, help="validation metric to select on: auroc (default), auprc, fpr95")
    p.add_argument("--eval-limit", type=int, default=None, help="cap each evaluation set at this many inputs")
    p.add_argument("--max-concurrent", type=int, default=None)


#: search flag -> SearchSpec key (tuples for list-valued keys)
_FLAG_KEYS = {
    "experiment": "experiment", "protocol": "protocol", "val_ood": "val_ood", "test_ood": "test_ood",
    "proxy_eps": "proxy_eps", "density": "densities", "score": "scores", "eps_grid": "eps_grid", "eps_range": "eps_range",
    "dim": "dims", "backbone": "backbones", "loss": "losses", "attacks": "attacks", "attack_eps": "attack_eps",
    "attack_steps": "attack_steps", "sampler": "sampler", "num_samples": "num_samples", "seed": "seed",
    "metric": "metric", "eval_limit": "eval_limit", "data_root": "data_root",
}


def _search_values(args: argparse.Namespace) -> dict:
    """Spec values from the --spec file, overridden by the flags that were given."""
    from densitune.search.spec_file import load_spec_file

    values = load_spec_file(args.spec) if args.spec else {}
    for flag, key in _FLAG_KEYS.items():
        v = getattr(args, flag)
        if v is not None:
            values[key] = v
    if args.kde_bandwidth:  # merged into the file's density_params, not replacing them
        params = {k: dict(v) for k, v in values.get("density_params", {}).items()} if isinstance(values.get("density_params"), dict) else {}
        params.setdefault("kde", {})["bandwidth"] = [_number_or_name(b) for b in args.kde_bandwidth]
        values["density_params"] = params
    if args.models is not None:
        values["models"] = args.models
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
        p.add_argument("results", help="results directory (e.g. densitune-demo/results)")
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
    p.add_argument("results", help="results directory")
    p.add_argument("sql", help='e.g. "SELECT density, max(auroc) FROM results WHERE split = \'val\' GROUP BY density"')
    p.add_argument("--allow-files", action="store_true", help="let the SELECT read other files (read_csv...); off by default")
    p.add_argument("--format", default="markdown", help="markdown, csv, latex or json (default: %(default)s)")

    p = sub.add_parser("demo", help="train -> search -> report on the embedded offline default (digits)")
    p.add_argument("--out", default="densitune-demo", help="output directory (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("plot", help="figures: metric vs ε, score histograms and ROC curves of the best configuration")
    p.add_argument("results", help="results directory")
    p.add_argument("--out", default="densitune-plots", help="output directory, not inside the results directory (default: %(default)s)")
    p.add_argument("--experiment", default=None, help="default: the experiment of the best validation trial")
    p.add_argument("--metric", default="auroc", help="validation metric to rank by and plot")
    p.add_argument("--no-scores", action="store_true", help="only the ε plot (needs no checkpoints or stored spec)")

    p = sub.add_parser("clean", help="stop the Ray processes a crashed driver of RUN left, remove RUN's Tune folders and cache locks")
    p.add_argument("run", help="run directory (the --out of train / search)")

    sub.add_parser("list", help="list registered backbones, losses, data sets, densities and scores")
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


def _start_ray(args: argparse.Namespace, out: Path) -> None:
    """Stop what a crashed earlier driver of this run left running, start Ray, and record its session in ``out``."""
    from densitune.cleanup import clean_run, record_session
    from densitune.ray_runtime import init_ray

    clean_run(out, prune=False)
    init_ray(args.address, args.num_cpus, quiet=args.quiet)
    if args.address is None:  # a Ray this process started (never a cluster's)
        record_session(out)


def _check_data(name: str, root: str | None, download: bool = False) -> None:
    """Fail early (before Ray, before writing) if a data set is unknown or absent."""
    from densitune.trainables.data import dataset_info, load_split

    dataset_info(name, root=root)
    load_split(name, "test", root=root, download=download, limit=1)


def cmd_train(args: argparse.Namespace) -> int:
    from densitune.resource_flags import check_resource_flags

    check_resource_flags(args)  # before torch and Ray are imported
    from densitune.storage import check_writable

    check_writable(os.path.abspath(os.path.expanduser(args.out)))  # not resolved: a dangling link is refused
    from densitune.trainables.train.tune import TrainRun, run_training

    args.data_root, args.dataset = _abs(args.data_root), _abs_dataset(args.dataset)
    from densitune.trainables.train.loop import check_training_folder

    configs = _train_configs(args)  # validates names, D, ε...
    check_training_folder(configs[0])  # a folder: data set needs train/ and test/ subfolders
    _check_data(args.dataset, args.data_root, args.download)
    out = Path(_abs(args.out))
    run = TrainRun(
        experiment=args.experiment, models_dir=str(out / "models"), results_dir=str(out / "results"),
        storage_path=str(out / "tune"), cpus_per_trial=args.cpus_per_trial, resume=args.resume,
    )
    log.info("training %d model(s) into %s", len(configs), Path(run.models_dir) / args.experiment)
    _start_ray(args, out)
    run_training(configs, run, gpus_per_trial=args.gpus_per_trial, verbose=1 if args.verbose else 0)
    print(f"trained models: {Path(run.models_dir) / args.experiment}")
    return 0


def _search_spec(values: dict, id_dataset: str):
    from densitune.search.spec import SearchSpec

    kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "models"}
    kw.setdefault("experiment", "search")
    val_default, test_default = DEFAULT_OOD.get(id_dataset, (None, ()))
    if kw.get("protocol", "val-ood") == "val-ood":
        kw.setdefault("val_ood", val_default)
    else:
        kw.setdefault("val_ood", None)
    kw.setdefault("test_ood", test_default)
    if (kw["val_ood"] is None and kw.get("protocol", "val-ood") == "val-ood") or not kw["test_ood"]:
        raise DensituneError(f"no default OOD sets for {id_dataset!r}: pass --val-ood and --test-ood")
    return SearchSpec(**kw)


def _number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def cmd_search(args: argparse.Namespace) -> int:
    from densitune.resource_flags import check_resource_flags

    # Flags and the spec file first, before torch and Ray are imported: a bad (or huge) spec fails fast and small.
    check_resource_flags(args)
    values = _search_values(args)
    from densitune.storage import check_writable

    check_writable(os.path.abspath(os.path.expanduser(args.out)))  # not resolved: a dangling link is refused
    from collections import Counter

    from densitune.errors import ConfigError
    from densitune.search import models
    from densitune.search.cache import DiskCache
    from densitune.search.results.report import best, report
    from densitune.search.results.store import read_results, write_spec
    from densitune.search.spec import DEFAULT_EPS_GRID, DEFAULT_EPS_RANGE, check_density_params, check_space
    from densitune.search.tune import SearchRun, run_search, trial_budget
    from densitune.trainables.train.checkpoint import read_config

    # The space first: a bad name or value fails before any file is read.
    check_space(tuple(values.get("densities", ("gmm_sum",))), tuple(values.get("scores", ("density",))),
                tuple(values.get("eps_grid", DEFAULT_EPS_GRID)), tuple(values.get("eps_range", DEFAULT_EPS_RANGE)),
                tuple(values.get("dims", ())))
    check_density_params(values.get("density_params", {}))
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    out = Path(_abs(args.out))
    models_dir = Path(values["models"]) if values.get("models") else out / "models"
    groups = models.discover(models_dir)
    ids = {g.dataset for g in groups}
    if len(ids) != 1:
        raise ConfigError(f"models under {models_dir} were trained on several data sets {sorted(ids)}; pass --models for one")
    id_dataset = ids.pop()
    spec = _search_spec(values, id_dataset)
    groups = models.select(groups, spec.dims, spec.backbones, spec.losses)
    if id_dataset in (spec.val_ood, *spec.test_ood):
        raise ConfigError(f"the in-distribution data set {id_dataset!r} cannot also be an OOD set")
    models.check_checkpoints(groups)  # a corrupt model.pt fails here, before Ray starts
    id_root = spec.data_root or read_config(groups[0].checkpoints[0])["config"].get("data_root")
    for name, root in ((id_dataset, id_root), *((n, spec.data_root) for n in (spec.val_ood, *spec.test_ood) if n)):
        _check_data(name, root)
    cache_dir = str(out / "cache")
    run = SearchRun(results_dir=str(out / "results"), storage_path=str(out / "tune"), cpus_per_trial=args.cpus_per_trial,
                    max_concurrent=args.max_concurrent, cache_dir=cache_dir)
    _check_experiment(run.results_dir, spec, args.resume)
    log.info("search %s: %d trial(s), selecting on %s", spec.experiment, trial_budget(spec, groups), spec.protocol_label)
    write_spec(run.results_dir, spec.experiment, spec.to_dict())
    _start_ray(args, out)
    grid = run_search(spec, groups, run, resume=args.resume, verbose=1 if args.verbose else 0)
    errors = [r.error for r in grid or [] if r.error is not None]
    from densitune.storage import storage_failure

    failure = storage_failure(errors)
    if failure is not None:  # the first failed write stopped the run: say where and why
        raise failure
    if errors:
        raise DensituneError(f"{len(errors)} search trial(s) failed; first: {str(errors[0]).strip().splitlines()[-1]}")
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
    from densitune.search.results.store import filter_results, read_results

    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    table = filter_results(read_results(args.results), args.where)
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    print(report(table, args.metric, top=args.top, view=args.view, fmt=args.format, by=by))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from densitune.search.results.report import best, best_config
    from densitune.search.results.store import filter_results, read_results

    table = filter_results(read_results(args.results), args.where)
    print(json.dumps(best_config(table, args.metric), indent=1) if args.json else best(table, args.metric, args.format))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from densitune.search.results.report import Table, render
    from densitune.search.results.store import query, read_results

    result = query(read_results(args.results), args.sql, allow_files=args.allow_files)
    print(render([Table(args.sql, result.to_pandas())], args.format))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from densitune.search.plots import plot_results

    for path in plot_results(args.results, args.out, experiment=args.experiment, metric=args.metric, scores=not args.no_scores):
        print(path)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from densitune.cleanup import clean_run
    from densitune.errors import ConfigError

    run = Path(_abs(args.run))
    if not run.is_dir():
        raise ConfigError(f"run directory not found: {run}")
    done = clean_run(run)
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


#: The demo: the same commands a user would type, on the embedded digits default.
DEMO_TRAIN = ["--experiment", "demo", "--dataset", "digits", "--backbone", "cnn", "-D", "8", "32",
              "--loss", "ce", "contrastive", "--seeds", "0", "1", "--epochs", "15"]
DEMO_SEARCH = ["--experiment", "demo-search", "--sampler", "grid", "--resume",
               "--score", "density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy",
               "--density", "gmm_sum", "gmm_max", "kde", "--eps-grid", "0", "0.005", "0.01", "0.02", "0.05",
               "--attacks", "fgsm", "bim", "pgd", "--attack-eps", "0.1"]


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> search -> report on the embedded digits default, under ``args.out``."""
    from densitune.resource_flags import check_positive

    check_positive("--num-cpus", args.num_cpus, whole=True)
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
          f"(densitune report {Path(args.out) / 'results'})")
    return 0


COMMANDS = {"train": cmd_train, "search": cmd_search, "report": cmd_report, "best": cmd_best, "list": cmd_list, "plot": cmd_plot, "query": cmd_query, "demo": cmd_demo, "clean": cmd_clean}


def _one_line(message: str, limit: int = 280) -> str:
    """An error message as one line of at most ``limit`` characters (its start and its end kept)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else f"{text[: limit - 61]} … {text[-58:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except DensituneError as e:
        print(f"densitune: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densitune: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
