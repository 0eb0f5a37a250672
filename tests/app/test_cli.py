"""The command line: bad input gets one clear line, a non-zero exit, and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from densitune.cli import main


def densitune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


BAD = {
    "unknown backbone": (["train", "--backbone", "resnet9"], "unknown backbone 'resnet9'; known: cnn"),
    "unknown dataset": (["train", "--dataset", "imagenet21k"], "unknown dataset 'imagenet21k'"),
    "D <= 0": (["train", "-D", "0"], "D must be > 0"),
    "missing data root": (["train", "--dataset", "cifar10", "--data-root", "/nonexistent/data"], "/nonexistent/data"),
    "unknown density": (["search", "--density", "gmm_prod"], "unknown density 'gmm_prod'; known: gmm_max, gmm_sum, kde"),
    "eps < 0": (["search", "--eps-grid", "0", "-0.01"], "eps must be a finite number >= 0, got -0.01"),
    "search D <= 0": (["search", "-D", "-4"], "D must be > 0"),
    "missing models": (["search"], "models directory not found"),
}


@pytest.mark.process
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nonzero_nothing_written(case, tmp_path):
    argv, message = BAD[case]
    out = tmp_path / "run"
    p = densitune(*argv, "--out", str(out), "-q", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("densitune: error: "), p.stderr
    assert message in lines[0]
    assert not out.exists()  # nothing written


def test_missing_results_directory(tmp_path, capsys):
    for cmd in ("report", "best"):
        assert main([cmd, str(tmp_path / "absent")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"densitune: error: results directory not found: {tmp_path / 'absent'}"]


@pytest.mark.process
def test_help_lists_commands():
    p = densitune("--help")
    assert p.returncode == 0
    for cmd in ("train", "search", "report", "best", "demo", "list"):
        assert cmd in p.stdout


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "densities: gmm_max, gmm_sum, kde" in out and "backbones: cnn" in out and "digits" in out


@pytest.mark.process
def test_relative_out_train_then_resumable_search(tmp_path):
    """The README's way of running: relative paths, from the user's folder (Ray trials run elsewhere)."""
    t = densitune("train", "--out", "run", "-D", "4", "--epochs", "1", "-q", cwd=tmp_path)
    assert t.returncode == 0, t.stderr[-2000:]
    assert len(list((tmp_path / "run" / "models" / "default").glob("cnn-D4-ce-s0-*/model.pt"))) == 1
    # --resume on an experiment that has nothing yet is a plain start (the demo relies on it)
    s = densitune("search", "--out", "run", "--eps-grid", "0", "0.01", "--test-ood", "noise-uniform",
                  "--eval-limit", "50", "--resume", "-q", cwd=tmp_path)
    assert s.returncode == 0, s.stderr[-2000:]
    assert "best configuration by validation auroc" in s.stdout
    assert len(list((tmp_path / "run" / "results" / "experiment=search").glob("search-*.parquet"))) == 2
    # a --where that leaves no validation rows cannot select: one line, exit 2
    b = densitune("best", "run/results", "--where", "split = 'test'", cwd=tmp_path)
    assert b.returncode == 2 and b.stderr.strip().splitlines() == [
        "densitune: error: no validation rows among the selected results: selection needs them "
        "(filter trials with --where, but keep split = 'val' rows)"]


MORE_BAD = {
    "bad kde bandwidth": (["search", "--density", "kde", "--kde-bandwidth", "wide"], "bandwidth must be a finite number > 0 or one of 'scott', 'silverman', got 'wide'"),
    "usage error": (["search", "--eps-grid", "abc"], "argument --eps-grid: invalid float value: 'abc'"),
    "bad experiment name": (["train", "--experiment", "my run"], "experiment name 'my run'"),
    "negative top": (["report", "results", "--top", "0"], "--top must be >= 1"),
}


@pytest.mark.process
@pytest.mark.parametrize("case", sorted(MORE_BAD))
def test_more_bad_input(case, tmp_path):
    argv, message = MORE_BAD[case]
    (tmp_path / "results").mkdir()
    extra = [] if argv[0] == "report" else ["--out", str(tmp_path / "run")]
    p = densitune(*argv, *extra, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "run").exists()
