"""The ``densitune`` commands: each parses, makes one service or API call (:mod:`densitune.app`,
:mod:`densitune.api`, the readers of the results) and prints. No command calls another.

A run that stopped (Ctrl-C, a failed trial) comes back from its service as an outcome; it is printed
here as one line on stderr (``densitune: interrupted: ...`` or ``densitune: error: ...``) naming what
finished and the command that continues it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from densitune.app import studies
from densitune.app.demo import run_demo
from densitune.app.doctor import doctor
from densitune.app.maintenance import clean, compact
from densitune.app.search import search
from densitune.app.train import train
from densitune.app.tune import tune
from densitune.cli.parser import (
    demo_options,
    doctor_options,
    search_options,
    study_options,
    train_options,
    tune_options,
)
from densitune.errors import ConfigError, DensituneError, ResultsError
from densitune.results.experiments import ExperimentChoice, choose_experiment
from densitune.results.sql import referenced_columns
from densitune.run.console import Interrupted, close_progress
from densitune.run.runstore import ObjectPath, location
from densitune.search.report.markdown import arrow_markdown

if TYPE_CHECKING:
    from densitune.app.session import Outcome
    from densitune.run.runstore import RunPath


def one_line(message: str, limit: int = 280) -> str:
    """An error message as one line of at most ``limit`` characters (its start and its end kept)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else f"{text[: limit - 61]} … {text[-58:]}"


def error_line(e: DensituneError | Interrupted) -> str:
    """How a stopped run or bad input reads on stderr."""
    if isinstance(e, Interrupted):
        return f"densitune: interrupted: {e}"
    problems = getattr(e, "problems", None) or [str(e)]  # densitune doctor: one line per problem
    return "\n".join(f"densitune: error: {one_line(str(p))}" for p in problems)


def _finish(outcome: Outcome) -> int:
    """The exit status of ``outcome``; the one line of a run that stopped goes to stderr."""
    if outcome.error is not None:
        close_progress()
        print(error_line(outcome.error), file=sys.stderr)
    return outcome.status


def _say(args: argparse.Namespace, text: str) -> None:
    """A line on stdout (not with -q)."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _experiment(args: argparse.Namespace, results: RunPath, *wheres: str | None) -> ExperimentChoice:
    """The search experiment a reader keeps (the newest unless told otherwise); the choice is said on stderr."""
    choice = choose_experiment(results, experiment=args.experiment, all_experiments=args.all_experiments, wheres=wheres)
    if choice.note:
        print(choice.note, file=sys.stderr, flush=True)
    return choice


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:

    outcome = train(train_options(args, argv))
    if outcome.error is None:
        _say(args, outcome.summary)
    return _finish(outcome)


def cmd_tune(args: argparse.Namespace, argv: list[str]) -> int:

    outcome = tune(tune_options(args, argv))
    if outcome.error is None or outcome.trials:
        if outcome.final is not None and outcome.final.best:
            print(outcome.final.best)
        _say(args, outcome.summary)
    return _finish(outcome)


def cmd_search(args: argparse.Namespace, argv: list[str]) -> int:

    outcome = search(search_options(args, argv))
    if outcome.error is None:
        if outcome.top:
            print(outcome.top + "\n")
        print(outcome.best)
        _say(args, outcome.summary)
    return _finish(outcome)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    """Studies (densitune.app.studies): train the missing networks, search each part, write the report with the note's figures."""

    if args.plan:  # reads the run's model store, writes nothing
        print(studies.plan_studies(study_options(args, argv)))
        return 0
    outcome = studies.run_studies(study_options(args, argv))
    for report in outcome.reports:
        print(report.text)
        _say(args, f"\nstudy {report.label}: report in {report.paths[0]} (and {report.paths[1].name})")
    return _finish(outcome)


def cmd_demo(args: argparse.Namespace, argv: list[str]) -> int:
    """train -> search -> report on the embedded digits default, under ``args.out``."""

    outcome = run_demo(demo_options(args, argv))
    if outcome.error is None and outcome.search is not None:
        if outcome.search.top:
            print(outcome.search.top + "\n")
        print(outcome.search.best)
        _say(args, outcome.search.summary)
        _say(args, f"demo finished in {outcome.total_seconds:.0f} s (training {outcome.train_seconds:.0f} s, "
                   f"search {outcome.search_seconds:.0f} s, report {outcome.report_seconds:.0f} s)")
    return _finish(outcome)


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from densitune.results.store import results_dir_of
    from densitune.search.report.tables import read_search_rows, report

    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.view == "tune":  # its own rows (stage tune), not the search's
        from densitune.search.report.tables import render
        from densitune.search.report.tune_view import tune_tables

        print(render(tune_tables(results_dir_of(args.results)), args.format))
        return 0
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    table = read_search_rows(results_dir_of(args.results), args.where, by)
    view = args.view or ("all" if args.full or args.top is not None else "summary")
    print(report(table, args.metric, top=args.top, view=view, fmt=args.format, by=by))
    return 0


def cmd_best(args: argparse.Namespace, argv: list[str]) -> int:

    from densitune.results.store import results_dir_of
    from densitune.search.report.tables import best, best_config, read_search_rows

    results = results_dir_of(args.results)
    table = read_search_rows(results, _experiment(args, results, args.where).where(args.where))
    if args.json:
        cfg = best_config(table, args.metric)
        cfg["density_params"] = json.loads(cfg["density_params"] or "{}")  # a nested object, not an escaped string
        print(json.dumps(cfg, indent=1))
    else:
        print(best(table, args.metric, args.format))
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from densitune.results.store import read_results, results_dir_of
    from densitune.search.report.paired import compare_tables
    from densitune.search.report.tables import render

    if args.n_boot < 1:
        raise ConfigError(f"--n-boot must be >= 1, got {args.n_boot}")
    results_dir = results_dir_of(args.results)
    choice = _experiment(args, results_dir, args.a, args.b)
    table = read_results(results_dir)
    a, b = choice.where(args.a), choice.where(args.b)
    print(render(compare_tables(table, results_dir, a, b, args.metric, n_boot=args.n_boot), args.format))
    return 0


def cmd_query(args: argparse.Namespace, argv: list[str]) -> int:
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

        print(arrow_markdown(args.sql, result))
    else:
        from densitune.search.report.tables import Table, render

        print(render([Table(args.sql, result.to_pandas())], args.format))
    return 0


def cmd_plot(args: argparse.Namespace, argv: list[str]) -> int:
    from densitune.results.store import results_dir_of
    from densitune.search.report.plots import plot_results

    results = results_dir_of(args.results)
    out = args.out or _plot_dir(results)
    experiment = _experiment(args, results, args.where).experiment
    for path in plot_results(str(results), out, experiment=experiment, metric=args.metric, scores=not args.no_scores,
                             where=args.where, score=args.score, density=args.density, dims=args.dims, formats=args.formats):
        print(path)
    return 0


def _plot_dir(results: RunPath) -> str:
    """Where figures go by default: ``RUN/plots`` beside ``RUN/results`` (for a run in a bucket, a local
    folder named after the run: figures are for reading on this machine)."""

    run = results.parent if results.name == "results" else results
    if isinstance(run, ObjectPath):
        return os.path.abspath(f"{run.name}-plots")
    return str(run / "plots" if results.name == "results" else results.parent / f"{results.name}-plots")


def cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from densitune.api import export_detector, read_manifest
    from densitune.results.store import results_dir_of

    results = results_dir_of(args.results)
    where = _experiment(args, results, args.where).where(args.where)
    out = export_detector(str(results), args.out, where=where, metric=args.metric)
    m = read_manifest(out)
    what = f"{m['score']}" + (f" / {m['density']}" if m["density"] else "") + f", eps={m['eps']:g}"
    print(f"exported {what} ({len(m['members'])} detector(s), trial {m['source']['trial_id']}) to {out}\n"
          f"load it with: densitune.load_detector({str(out)!r})")
    return 0


def cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
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


def cmd_list_models(args: argparse.Namespace, argv: list[str]) -> int:
    import pandas as pd

    from densitune.search.models import list_models
    from densitune.search.report.tables import Table, render

    run = location(args.results)
    has_models = (run / "models").is_dir()
    records = list_models(run / "models" if has_models else run, run / "results" if has_models else None)
    frame = pd.DataFrame.from_records(records)
    shown = frame.astype(object).apply(lambda col: [  # accuracies to 4 decimals; no figure: "—"
        "—" if v is None or v != v else f"{v:.4f}" if col.name.endswith("accuracy") else f"{v:g}" if isinstance(v, float)
        else str(v) for v in col])
    print(render([Table(f"trained networks in {run}", frame, display=shown)], args.format))
    return 0


def cmd_compact(args: argparse.Namespace, argv: list[str]) -> int:
    """Compact every experiment whose writer lock is free; one whose lock is held is skipped (and said so)."""

    for line in compact(args.results):
        print(line)
    return 0


def cmd_doctor(args: argparse.Namespace, argv: list[str]) -> int:
    """The table of every node on stdout; one line per problem on stderr (exit 2)."""

    outcome = doctor(doctor_options(args, argv))
    if not args.quiet:
        print(outcome.table, flush=True)
    if outcome.error is not None:
        print(error_line(outcome.error), file=sys.stderr)
    return outcome.status


def cmd_clean(args: argparse.Namespace, argv: list[str]) -> int:

    print(clean(args.run))
    return 0


#: The commands by name (a tuple: nothing here changes at run time).
COMMANDS: tuple[tuple[str, Callable[[argparse.Namespace, list[str]], int]], ...] = (
    ("train", cmd_train), ("tune", cmd_tune), ("search", cmd_search), ("report", cmd_report), ("best", cmd_best), ("list", cmd_list),
    ("plot", cmd_plot), ("query", cmd_query), ("compare", cmd_compare), ("demo", cmd_demo), ("export", cmd_export),
    ("compact", cmd_compact), ("list-models", cmd_list_models), ("clean", cmd_clean), ("run", cmd_run),
    ("doctor", cmd_doctor),
)


def command(name: str) -> Callable[[argparse.Namespace, list[str]], int]:
    return next(f for n, f in COMMANDS if n == name)
