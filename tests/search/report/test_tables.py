"""Tables and "best": chosen on validation rows only, seeds as mean ± std, ip side by side."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from densitune.results.rows import provenance
from densitune.results.store import read_results, write_rows
from densitune.search.report.tables import best, best_config, report

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_trial(root, trial, *, eps, val, test, seeds=(0,), D=8, density="gmm_sum", fpr=None):
    rows = []
    for s in seeds:
        common = dict(experiment="e", trial_id=trial, stage="search", protocol="val-ood:v", backbone="cnn",
                      id_dataset="digits", loss="ce", D=D, spectral=True, density=density, score="density",
                      eps=eps, seed=s, started_at=T0, id_accuracy=0.9 + s / 100, **provenance("cpu"))
        rows.append({**common, "ood_dataset": "v", "split": "val", "auroc": val + s / 100, "auprc": val,
                     "fpr95": 1 - val if fpr is None else fpr})
        rows.append({**common, "ood_dataset": "t", "split": "test", "auroc": test + s / 100, "auprc": test, "fpr95": 1 - test})
    write_rows(root, rows, name=trial)


@pytest.fixture
def results(tmp_path):
    write_trial(tmp_path, "plain", eps=0.0, val=0.80, test=0.70)
    write_trial(tmp_path, "ip-good-val", eps=0.01, val=0.90, test=0.60)  # best on validation
    write_trial(tmp_path, "ip-good-test", eps=0.05, val=0.85, test=0.99)  # best on test: must not win
    write_trial(tmp_path, "other-D", eps=0.0, val=0.50, test=0.95, D=4, seeds=(0, 1))
    return read_results(tmp_path)


def test_best_selects_on_validation_not_test(results):
    cfg = best_config(results)
    assert cfg["trial_id"] == "ip-good-val" and cfg["eps"] == 0.01 and cfg["D"] == 8
    text = best(results)
    assert "eps=0.01" in text and "| t | 0.6000 | 0.6000 | 0.4000 |" in text


def test_best_lower_is_better_for_fpr(tmp_path):
    write_trial(tmp_path, "high-auroc", eps=0.0, val=0.90, test=0.9, fpr=0.30)
    write_trial(tmp_path, "low-fpr", eps=0.0, val=0.80, test=0.8, fpr=0.05)
    write_trial(tmp_path, "worst", eps=0.0, val=0.70, test=0.7, fpr=0.60)
    table = read_results(tmp_path)
    assert best_config(table, "auroc")["trial_id"] == "high-auroc"
    assert best_config(table, "fpr95")["trial_id"] == "low-fpr"  # ascending: lower FPR wins


def test_report_ranks_and_pairs_ip(results):
    text = report(results)
    first, second = text.index("cnn D=8"), text.index("cnn D=4")
    assert first < second  # D=8 validates better
    # D=8 table: no-ip columns from the ε=0 trial, ip columns from the validation-chosen ε=0.01 trial
    assert "| t | test | 0.7000 | 0.7000 | 0.6000 | 0.6000 |" in text
    assert "ip ε = 0.01 (chosen on validation)" in text
    # two seeds -> mean ± std (0.95 and 0.96)
    assert "| t | test | 0.9550 ± 0.0071 |" in text


def test_unknown_metric(results):
    from densitune.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown metric"):
        report(results, "accuracy")


def test_every_reader_takes_the_run_folder(tmp_path, capsys):
    """`report RUN`, `best RUN`, `query RUN`, `plot RUN` read RUN/results; the results folder alone still works."""
    from densitune.cli import main

    run = tmp_path / "run"
    write_trial(run / "results", "plain", eps=0.0, val=0.80, test=0.70)
    write_trial(run / "results", "ip", eps=0.01, val=0.90, test=0.60)
    outputs = {}
    for target in (run, run / "results"):
        for cmd in (["report"], ["best", "--json"], ["query", "SELECT count(*) AS n FROM results"]):
            assert main([cmd[0], str(target), *cmd[1:]]) == 0
            outputs.setdefault(cmd[0], []).append(capsys.readouterr().out)
    assert all(a == b for a, b in outputs.values())
    assert "| 4 |" in outputs["query"][0]  # 2 trials x (val + test)
    assert main(["plot", str(run), "--no-scores"]) == 0
    pngs = capsys.readouterr().out.split()
    assert pngs and all(p.startswith(str(run / "plots")) and p.endswith(".png") for p in pngs)


def test_eps_wording_follows_what_validation_chose(tmp_path):
    """"chosen on validation" names an ip ε only when validation chose it over ε = 0 (issue 26, item 5)."""
    write_trial(tmp_path, "plain", eps=0.0, val=0.90, test=0.70)
    write_trial(tmp_path, "ip", eps=0.01, val=0.80, test=0.95)  # worse on validation: not chosen
    write_trial(tmp_path, "plain-D4", eps=0.0, val=0.50, test=0.50, D=4)  # no ip searched for D=4
    write_trial(tmp_path, "ip-D16", eps=0.02, val=0.70, test=0.70, D=16)
    write_trial(tmp_path, "plain-D16", eps=0.0, val=0.60, test=0.80, D=16)
    text = report(read_results(tmp_path), view="configs")
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert [re.search(r"(ip )?ε = [0-9.]+ \([^)]*\)", t)[0] for t in titles] == [
        "ε = 0 (chosen on validation; best ip ε = 0.01)", "ip ε = 0.02 (chosen on validation)", "ε = 0 (no ip searched)"]
