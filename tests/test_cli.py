"""The command line: bad input gets one clear line, a non-zero exit, and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from search.cli import main


def densitune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


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


def test_help_lists_commands():
    p = densitune("--help")
    assert p.returncode == 0
    for cmd in ("train", "search", "report", "best", "demo", "list"):
        assert cmd in p.stdout


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "densities: gmm_max, gmm_sum, kde" in out and "backbones: cnn" in out and "digits" in out
