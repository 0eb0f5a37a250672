"""``densitune report RUN --view tune``: one row per outer trial of a tune, its rung objectives, stopped or finished."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from densitune.cli import main
from densitune.results.rows import provenance
from densitune.results.store import read_results, write_rows
from densitune.search.report.plots import tune_figure
from densitune.search.report.tune_view import tune_frame


def _row(trial: str, status: str, epoch: int, objective: float, **kw) -> dict:
    return dict(experiment="default", trial_id=trial, stage="tune", started_at=datetime(2026, 1, 1, tzinfo=UTC),
                backbone="cnn", split="val" if status == "rung" else None, tune_status=status, epoch=epoch,
                objective=objective, gpu_seconds=None if status == "rung" else 12.5, **provenance("cpu"), **kw)


def test_tune_view_lists_each_network_with_its_rungs_best_finished_first(tmp_path, capsys):
    results = tmp_path / "results"
    nets = {"a": dict(D=5, loss="ce", center_loss=None), "b": dict(D=12, loss="contrastive", center_loss=0.3),
            "c": dict(D=40, loss="ce", center_loss=None)}
    rungs = {"a": {1: 0.70}, "b": {1: 0.80, 3: 0.90}, "c": {1: 0.75, 3: 0.85}}
    for trial, by in rungs.items():
        for epoch, value in by.items():
            write_rows(results, [_row(trial, "rung", epoch, value, **nets[trial], ood_dataset="digits-blend")],
                       name=f"{trial}-e{epoch}")
        status, last = ("stopped", 1) if trial == "a" else ("finished", 3)
        params = json.dumps({"network": f"net-{trial}", "reused": trial == "c"})
        write_rows(results, [_row(trial, status, last, by[last], **nets[trial], search_params=params)], name=f"{trial}-trial")
    assert main(["report", str(tmp_path), "--view", "tune", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(r["network"], r["D"], r["loss"], r["λ"], r["status"], r["epochs"], r["reused"], r["objective"], r["e1"], r["e3"])
            for r in got] == [("net-b", 12, "contrastive", 0.3, "finished", 3, False, 0.90, 0.80, 0.90),
                              ("net-c", 40, "ce", None, "finished", 3, True, 0.85, 0.75, 0.85),
                              ("net-a", 5, "ce", None, "stopped", 1, False, 0.70, 0.70, None)]
    assert all(r["gpu_s"] == 12.5 for r in got)
    assert main(["report", str(tmp_path), "--view", "tune"]) == 0
    assert "3 network(s), 1 stopped early by the scheduler" in capsys.readouterr().out
    # the figure `densitune plot` draws from the same rows: objective against D, hollow where stopped
    fig = tune_figure(tune_frame(read_results(results, stage="tune").to_pylist()))
    (ax,) = fig.axes
    points = {c.get_label(): [tuple(map(float, xy)) for xy in c.get_offsets()] for c in ax.collections}
    assert points == {"ce (finished)": [(40.0, 0.85)], "ce (stopped)": [(5.0, 0.70)], "contrastive (finished)": [(12.0, 0.90)]}
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts] == ["e1"]
    assert tune_figure(tune_frame([])) is None


def test_tune_view_of_a_run_without_a_tune_is_one_line_exit_2(tmp_path, capsys):
    write_rows(tmp_path / "results", [dict(_row("s", "rung", 1, 0.5), stage="search", tune_status=None)], name="s")
    assert main(["report", str(tmp_path), "--view", "tune"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"densitune: error: no densitune tune rows in {tmp_path / 'results'}"]
