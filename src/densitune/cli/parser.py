"""The ``densitune`` command line: the parser, and the helpers that turn parsed arguments into typed options.

Nothing here imports torch or Ray: ``densitune --help`` and a bad flag stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from densitune import __version__
from densitune.app.demo import DemoOptions
from densitune.app.doctor import DoctorOptions
from densitune.app.search import SearchOptions
from densitune.app.studies import StudyOptions
from densitune.app.train import TrainGrid, TrainOptions
from densitune.app.tune import TuneOptions
from densitune.run.console import resume_command
from densitune.run.resource_flags import check_resource_flags
from densitune.search.spec import default_text, spec_keys
from densitune.search.spec_file import load_spec_file

if TYPE_CHECKING:
    from densitune.app.demo import DemoOptions
    from densitune.app.search import SearchOptions
    from densitune.app.studies import StudyOptions
    from densitune.app.train import TrainOptions

#: Fixed names offered as ``choices`` (tests check them against the report module and attack registry,
#: which are not imported here: ``densitune --help`` stays fast).
FORMATS = ("markdown", "csv", "latex", "json")
METRICS = ("auroc", "auprc", "fpr95")
VIEWS = ("summary", "all", "methods", "configs", "tune")
ATTACK_NAMES = ("fgsm", "bim", "pgd")
PLOT_FORMATS = ("png", "svg", "pdf")

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
    p.add_argument("--no-doctor", action="store_true",
                   help="with --address: skip the check of every node before the run (densitune doctor)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and results only (no header, progress bar or summary)")
    p.add_argument("--verbose", action="store_true", help="also per-epoch / per-trial lines and Ray Tune's own output on the console")
    p.add_argument("--reproducible", action="store_true",
                   help="pin every process of the run to portable kernels, so that another CPU type gives the same bits "
                        "(README \"Same numbers\"; its cost: bench/RESULTS.md)")
    _add_storage_timeout(p)


def _add_storage_timeout(p: argparse.ArgumentParser) -> None:
    """``--storage-timeout``: every command that may touch a bucket takes it (README "The run folder")."""
    p.add_argument("--storage-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds each object-store request may take to connect and to answer before it is retried "
                        "(4 attempts); also DENSITUNE_STORAGE_TIMEOUT (default: 30)")


def _add_experiment_choice(p: argparse.ArgumentParser) -> None:
    """--experiment / --all-experiments of the readers that pick one configuration (best, export, plot, compare)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--experiment", default=None,
                   help="search experiment to read (default: the newest, said on stderr; a --where naming experiment chooses too)")
    g.add_argument("--all-experiments", action="store_true", help="rank across every search experiment of the run")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="default", help="name of the training experiment (default: %(default)s)")
    p.add_argument("--dataset", default="digits", help="in-distribution data set (default: %(default)s)")
    p.add_argument("--download", action="store_true", help="download torchvision data sets if missing (needs internet)")
    p.add_argument("--backbone", nargs="+", default=["cnn"], help="backbones to train (grid; names: `densitune list`)")
    p.add_argument("-D", "--dim", nargs="+", type=int, default=[16], help="feature dimensions D (grid)")
    p.add_argument("--loss", nargs="+", default=["ce"], help="losses to train with (grid; names: `densitune list`)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (grid)")
    _add_network_settings(p, "center-loss weight λ", "training epochs per network")


def _add_network_settings(p: argparse.ArgumentParser, lam_help: str, epochs_help: str) -> None:
    """The training settings every network of a train grid or a tune shares."""
    p.add_argument("--lam", type=float, default=0.1, help=lam_help)
    p.add_argument("--epochs", type=int, default=15, help=epochs_help)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--no-spectral", action="store_true", help="train without soft spectral normalisation")
    p.add_argument("--sn-coeff", type=float, default=3.0, help="soft spectral normalisation coefficient")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of this size (default: the whole training split)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the training step; auto: only on CUDA for backbones measured to gain (default: %(default)s)")


def rung_point(text: str) -> tuple[str, float]:
    """``DENSITY:EPS`` (e.g. ``gmm_sum:0.005``) of ``--rung-grid``."""
    name, sep, eps = text.partition(":")
    try:
        return name, float(eps) if sep else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not DENSITY:EPS (e.g. gmm_sum:0.005)") from None


def _add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="default", help="the experiment whose networks the tune trains and reuses (train's default too; the final search: NAME-final)")
    p.add_argument("--dataset", default="digits", help="in-distribution data set")
    p.add_argument("--backbone", nargs="+", default=["cnn"], help="backbone choices (names: `densitune list`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-D", "--dim", nargs="+", type=int, default=None, help="feature dimension choices D (default: --D-range 2 64)")
    g.add_argument("--D-range", dest="d_range", nargs=2, type=int, metavar=("LO", "HI"), default=None,
                   help="feature dimension D: an integer in [LO, HI] on a log scale (default: 2 64)")
    p.add_argument("--loss", nargs="+", default=["ce"], help="loss choices (names: `densitune list`)")
    p.add_argument("--lam-range", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                   help="center-loss weight λ in [LO, HI] on a log scale, for the center-loss variants only (default: --lam)")
    _add_network_settings(p, "center-loss weight λ when no --lam-range is given",
                          "training epochs of a network that is not stopped early")
    p.add_argument("--num-networks", type=int, default=8, help="outer trials: networks drawn by TPE")
    p.add_argument("--rung-grid", nargs="+", type=rung_point, default=None, metavar="DENSITY:EPS",
                   help="the inner points scored on validation at each rung (default: gmm_sum:0)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop the outer search (resumable, exit 2) after this many seconds (default: none)")
    p.add_argument("--keep", type=int, default=1, help="the top networks given the full search (0: none)")
    p.add_argument("--final-seeds", type=int, default=1, help="train the winning network config on this many seeds")
    p.add_argument("--val-ood", nargs="+", default=None, help="validation OOD sets (default: per ID data set)")
    p.add_argument("--test-ood", nargs="+", default=None, help="test OOD sets of the final search (default: per ID data set)")
    p.add_argument("--val-agg", default="mean", choices=("mean", "min"), help="several validation OOD sets: their mean or worst")
    p.add_argument("--metric", default="auroc", choices=METRICS, help="validation metric")
    p.add_argument("--eval-limit", type=int, default=None, help="cap each evaluation set at this many inputs (default: none)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default: 0)")
    p.add_argument("--density", nargs="+", default=None, help="the final search's densities (default: gmm_sum)")
    p.add_argument("--score", nargs="+", default=None, help="the final search's scores (default: density)")
    p.add_argument("--eps-grid", nargs="+", type=float, default=None, help="the final search's ε grid (default: search's)")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    # Flags default to None so that a --spec file can supply the value; flags given win.
    p.add_argument("--spec", default=None, help="YAML search spec (keys as in README; flags given here override it) (default: none)")

    for key in spec_keys():  # one flag per spec key that has one (declared on SearchSpec's fields)
        if key.flags and key.flags[-1] not in p._option_string_actions:  # --data-root is common to train
            default = default_text(key.name)
            text = key.help if "default" in key.help else f"{key.help} (default: {default or 'none'})"
            p.add_argument(*key.flags, dest=key.name, default=None, help=text, nargs=key.nargs, type=key.type,
                           metavar=key.metavar, choices=key.choices)
    p.add_argument("--kde-bandwidth", nargs="+", default=None,
                   help="KDE bandwidths to search: numbers and/or rules scott, silverman (default: scott)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: as many as the cluster fits)")


def search_values(args: argparse.Namespace) -> dict[str, Any]:
    """Spec values from the --spec file, overridden by the flags that were given."""

    values = load_spec_file(args.spec) if args.spec else {}
    for spec_key in spec_keys():
        v = getattr(args, spec_key.name, None)
        if v is not None:
            values[spec_key.name] = v
    if args.kde_bandwidth:  # merged into the file's density_params, not replacing them
        params = {k: dict(v) for k, v in values.get("density_params", {}).items()} if isinstance(values.get("density_params"), dict) else {}
        params.setdefault("kde", {})["bandwidth"] = [number_or_name(b) for b in args.kde_bandwidth]
        values["density_params"] = params
    for key in ("models", "data_root"):
        if values.get(key):
            values[key] = abs_path(values[key])
    for key in ("val_ood", "test_ood"):  # a YAML val_ood may be one name
        if isinstance(values.get(key), str):
            values[key] = abs_dataset(values[key])
        elif values.get(key):
            values[key] = [abs_dataset(n) for n in values[key]]
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

    parser.add_argument("--version", action="version", version=f"densitune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train backbones (grid of backbone x D x loss x seed) as Ray Tune trials")
    _add_common(p)
    _add_train_args(p)

    p = sub.add_parser("tune", help="search D, loss and λ by training networks on demand (TPE + ASHA), then search the best")
    _add_common(p)
    _add_tune_args(p)

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
                                "model group), configs (ip side by side), tune (densitune tune's networks: D, loss, λ, rung objectives, "
                                "where each was stopped) or all (default: summary; all with --full or --top)")
            p.add_argument("--by", default=None, help="comma-separated columns: the best trial per value, e.g. backbone,D (default: none)")
        else:
            p.add_argument("--json", action="store_true", help="print the best config as one JSON object")
            _add_experiment_choice(p)

    p = sub.add_parser("compare", help="A vs B on the same networks: paired test AUROC difference with a 95 %% interval")
    p.add_argument("results", metavar="RUN", help="the run folder (searched with --keep-scores all) or its results/ folder")
    p.add_argument("--a", required=True, metavar="WHERE", help="SQL filter choosing A (its best trial on validation), e.g. \"score = 'density' AND eps > 0\" (no default: required)")
    p.add_argument("--b", required=True, metavar="WHERE", help="SQL filter choosing B, e.g. \"score = 'rmd'\" (no default: required)")
    p.add_argument("--metric", default="auroc", choices=tuple(METRICS), help="validation metric that picks each side's best trial (default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (several seeds) (default: %(default)s)")
    p.add_argument("--format", default="markdown", choices=FORMATS, help="output format (default: %(default)s)")
    _add_experiment_choice(p)

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
    _add_experiment_choice(p)
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
    _add_experiment_choice(p)

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

    p = sub.add_parser("doctor", help="check every node of a cluster: versions, CUDA, --out writable, --data-root readable, disk")
    p.add_argument("--address", default="auto", help="the Ray cluster (default: %(default)s)")
    p.add_argument("--out", default=None, help="a run (folder or s3://bucket/prefix) every node must write (default: not checked)")
    p.add_argument("--data-root", default=None, help="a folder every node must read (default: not checked)")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="least free disk on a node's temp folder (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="problems only (no table)")
    p.add_argument("--verbose", action="store_true", help="also Ray's own log lines on the console")

    p = sub.add_parser("list-models", help="the trained networks of a run (key = readable name + config hash)")
    p.add_argument("results", metavar="RUN", help="the run folder (its models/ folder is listed)")
    p.add_argument("--format", default="markdown", choices=("markdown", "csv", "latex", "json"),
                   help="output format (default: %(default)s)")
    for name, p in sub.choices.items():
        if name != "list" and "--storage-timeout" not in p._option_string_actions:
            _add_storage_timeout(p)
    return parser


# ---------------------------------------------------------------------------- arguments -> typed options


@overload
def abs_path(path: str) -> str: ...
@overload
def abs_path(path: None) -> None: ...
def abs_path(path: str | None) -> str | None:
    """An absolute path: Ray Tune runs each trial in its own working folder, so relative paths break there."""
    if path is None or "://" in path:  # a bucket (s3://...) is already absolute; file:// is resolved by the run store
        return path
    return str(Path(path).expanduser().resolve())


def abs_dataset(name: str | None) -> str | None:
    """``folder:PATH`` (also inside ``near:NAME=folder:PATH`` / ``far:...``) with PATH made absolute (other names unchanged)."""
    if name and name.startswith(("near:", "far:")) and "=folder:" in name:
        head, _, folder = name.partition("=")
        return f"{head}={abs_dataset(folder)}"
    if name and name.startswith("folder:"):
        return "folder:" + abs_path(name[len("folder:"):])
    return name


def number_or_name(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _run_options(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The :class:`densitune.app.session.RunOptions` fields of ``args``; ``argv``: the command line (for the resume hint)."""
    return {"out": args.out, "address": args.address, "num_cpus": args.num_cpus, "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial, "max_gpu_hours": args.max_gpu_hours, "resume": args.resume,
            "quiet": args.quiet, "verbose": args.verbose, "resume_hint": resume_command(argv),
            "reproducible": args.reproducible, "doctor": not args.no_doctor}


def train_options(args: argparse.Namespace, argv: list[str]) -> TrainOptions:

    grid = _network_grid(args, dims=tuple(args.dim), seeds=tuple(args.seeds))
    return TrainOptions(**_run_options(args, argv), networks=grid, download=args.download, compile=args.compile)


def _network_grid(args: argparse.Namespace, **axes: Any) -> TrainGrid:
    """The :class:`TrainGrid` of the flags (``axes``: the grid's axes a command sets its own way)."""
    return TrainGrid(experiment=args.experiment, dataset=abs_dataset(args.dataset) or args.dataset,
                     data_root=abs_path(args.data_root), backbones=tuple(args.backbone), losses=tuple(args.loss),
                     lam=args.lam, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                     spectral=not args.no_spectral, sn_coeff=args.sn_coeff, train_limit=args.train_limit, **axes)


def tune_options(args: argparse.Namespace, argv: list[str]) -> TuneOptions:

    final: dict[str, Any] = {k: tuple(v) for k, v in (("densities", args.density), ("scores", args.score), ("eps_grid", args.eps_grid)) if v}
    sets: dict[str, Any] = {k: tuple(abs_dataset(n) or n for n in v) for k, v in (("val_ood", args.val_ood), ("test_ood", args.test_ood)) if v}
    d_range = (args.d_range[0], args.d_range[1]) if args.d_range else (None if args.dim else (2, 64))
    lam_range = (args.lam_range[0], args.lam_range[1]) if args.lam_range else None
    return TuneOptions(**_run_options(args, argv), **sets, networks=_network_grid(args, dims=tuple(args.dim or ())),
                       d_range=d_range, lam_range=lam_range, compile=args.compile, num_networks=args.num_networks,
                       rung_grid=tuple(args.rung_grid or [("gmm_sum", 0.0)]), time_budget=args.time_budget,
                       keep=args.keep, final_seeds=args.final_seeds, val_agg=args.val_agg, metric=args.metric,
                       eval_limit=args.eval_limit, seed=args.seed, search_values=final)


def search_options(args: argparse.Namespace, argv: list[str]) -> SearchOptions:

    check_resource_flags(args)  # before the spec file is read
    return SearchOptions(**_run_options(args, argv), values=search_values(args), max_concurrent=args.max_concurrent)


def study_options(args: argparse.Namespace, argv: list[str]) -> StudyOptions:

    return StudyOptions(**_run_options(args, argv), specs=tuple(args.spec), smoke=args.smoke,
                        data_root=abs_path(args.data_root), max_concurrent=args.max_concurrent)


def doctor_options(args: argparse.Namespace, argv: list[str]) -> DoctorOptions:

    out = args.out if args.out is None or "://" in args.out else abs_path(args.out)
    return DoctorOptions(address=args.address, out=out, data_root=abs_path(args.data_root),
                         min_free_gb=args.min_free_gb, quiet=args.quiet, verbose=args.verbose)


def demo_options(args: argparse.Namespace, argv: list[str]) -> DemoOptions:

    return DemoOptions(out=args.out, num_cpus=args.num_cpus, resume=args.resume, quiet=args.quiet, verbose=args.verbose,
                       resume_hint=resume_command(argv))
