"""The bench harness (bench/_harness.py) and the glance generator (bench/glance.py): records round-trip through
JSONL with their gate evaluated, and known records give the exact "at a glance" table, idempotently. No Ray, no
subprocess, no torch."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("_harness"), importlib.import_module("glance")
    finally:
        sys.path.remove(str(BENCH))


MACHINE = {"host": "h", "cpu": "c", "cores": 2, "memory_gb": 1.0, "python": "3.11", "torch": None, "ray": None,
           "densitune": None, "gpu": None, "load_average": [0.0, 0.0, 0.0]}


def rec(harness, name, value, day, mode="full", imported=None, note=None):
    return harness.make_record(name, value, script="s", run=f"s-{day}", mode=mode, command="python bench/s.py",
                               machine_info=MACHINE, when=datetime(2026, 12, day, 12, tzinfo=UTC), imported=imported,
                               note=note)


def test_a_record_round_trips_through_jsonl_with_its_gate_evaluated(bench_modules, tmp_path):
    harness, _ = bench_modules
    records = [rec(harness, "ray_overhead.per_trial_s", 0.065, 1),  # <= 0.2: met
               rec(harness, "ray_overhead.per_trial_s", 0.25, 2),  # not met
               rec(harness, "eps.aurocs_identical", False, 2),  # == True: not met
               rec(harness, "eps.bound", 1.98, 2),  # information: no gate
               rec(harness, "peers.kde_max_diff", float("nan"), 2)]  # a NaN never meets a gate
    path = tmp_path / "r" / "records.jsonl"
    harness.append_records(path, records[:2])
    harness.append_records(path, records[2:])
    back = harness.read_records(path)
    assert [r["passed"] for r in back] == [True, False, False, None, False]
    assert back[0] == json.loads(json.dumps(records[0]))
    assert back[0]["gate"] == {"op": "<=", "threshold": 0.2, "kind": "target"}
    assert (back[0]["name"], back[0]["value"], back[0]["unit"], back[0]["command"], back[0]["time"]) == (
        "ray_overhead.per_trial_s", 0.065, "s", "python bench/s.py", "2026-12-01T12:00:00+00:00")
    assert back[3]["gate"] is None and back[0]["machine"] == MACHINE
    with pytest.raises(KeyError, match="no figure 'nope'"):
        harness.make_record("nope", 1.0, script="s", run="r", machine_info=MACHINE)


@pytest.mark.process  # the machine description asks nvidia-smi / git in a subprocess
def test_bench_record_writes_its_mode_file_and_knows_pass_and_fail(bench_modules, tmp_path):
    harness, _ = bench_modules
    bench = harness.Bench("ray_overhead", quick=True, records=tmp_path / "q.jsonl", argv=["--quick"])
    bench.record("ray_overhead.per_trial_s", 0.1)
    assert bench.passed()
    bench.record("tpe.median_gap", 0.01)
    assert not bench.passed()
    back = harness.read_records(tmp_path / "q.jsonl")
    assert [(r["mode"], r["passed"], r["command"]) for r in back] == [
        ("quick", True, "python bench/ray_overhead.py --quick"), ("quick", False, "python bench/ray_overhead.py --quick")]
    assert "1/2 gates met (not met: tpe.median_gap)" in bench.summary()
    assert harness.Bench("x", diagnostic=True).path == harness.QUICK_RECORDS
    assert harness.Bench("x").path == harness.RECORDS


EXPECTED = """\
| item | gate or target | latest figures | verdict | run |
|---|---|---|---|---|
| readers at 10,000 trials (`results_scale.py`) | hard: <= 3 s and <= 500 MB each, as a search leaves the store \
(without `densitune compact`); faster after `compact` than one file per trial | no record yet | not measured | - |
| ε cache (`eps_amortisation.py`) | hard: cached search >= 2× end to end, identical AUROCs | \
uncached / cached (medians) 1.95×; AUROCs identical yes; bound (trial actors' CPU ratio) 1.98× (k = 8) | \
**not met**: uncached / cached (medians) | 2026-12-02, 2026-12-03 (imported) |
| KDE (`peers.py`) | hard: equal to exact scipy to 1e-6; target >= 40× scikit-learn | \
max \\|diff\\| to exact 5.7e-13 nats | met | 2026-12-01 |
| float32 scoring (`peers.py`, tests) | hard: AUROC change < 1e-3 | no record yet | not measured | - |
| GMM throughput / GEMM at D = 2048 (`peers.py`) | >= 70 % | no record yet | not measured | - |
| ip scoring (`peers.py`) | <= 3.5× our forward; faster than MahalanobisODIN | no record yet | not measured | - |
| GPU training (`gpu_check.py`) | ResNet-18 >= 30,000 img/s, ResNet-50 >= 12,000, bf16 never slower | \
no record yet | not measured | - |
| Ray overhead (`ray_overhead.py`) | <= 0.2 s per trial | per trial (slope) 0.065 s | met | 2026-12-03 |
| scoring memory (`scoring_memory.py`) | grows with the batch, not the data set | no record yet | not measured | - |
| TPE vs grid (`tpe_vs_grid.py`) | median gap to the grid's best validation AUROC <= 0.005 with a third of its \
trials | no record yet | not measured | - |
| `--reproducible` (`reproducible_cost.py`) | information: its cost on the CPU | no record yet | not measured | - |
| `tune` vs a 24-network grid (`tune_vs_grid.py`) | hard: median gap to the grid's best validation objective <= 0.005, \
with <= 40 % of its epochs | no record yet | not measured | - |"""


def test_glance_turns_known_records_into_the_exact_table_and_is_idempotent(bench_modules):
    harness, glance = bench_modules
    records = [
        rec(harness, "ray_overhead.per_trial_s", 0.3, 1),  # superseded by the later run
        rec(harness, "ray_overhead.per_trial_s", 0.065, 3),
        rec(harness, "ray_overhead.per_trial_s", 9.0, 4, mode="quick"),  # quick runs never reach the table
        rec(harness, "eps.ratio", 1.95, 2, imported="earlier run", note="k = 8"),
        rec(harness, "eps.aurocs_identical", True, 3),
        rec(harness, "eps.bound", 1.98, 3),
        rec(harness, "eps.median_cached_s", 7.8, 3),  # not a glance figure
        rec(harness, "peers.kde_max_diff", 5.7e-13, 1),
    ]
    assert glance.glance_table(records) == EXPECTED
    text = "# R\n\nbefore\n<!-- glance:start -->\nold table\n<!-- glance:end -->\nafter\n"
    once = glance.rewrite(text, glance.glance_table(records))
    assert once == f"# R\n\nbefore\n{glance.START}\n{EXPECTED}\n{glance.END}\nafter\n"
    assert glance.rewrite(once, glance.glance_table(records)) == once
    with pytest.raises(ValueError, match="glance:end"):
        glance.rewrite("no markers\n", EXPECTED)


def test_the_committed_glance_table_is_up_to_date(bench_modules):
    _, glance = bench_modules
    assert glance.main(["--check"]) == 0
