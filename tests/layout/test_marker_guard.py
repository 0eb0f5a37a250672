"""The marker guard of tests/conftest.py, in a pytest of its own: a test that starts a process or Ray without its
marker fails and is told which marker to add, even when it swallows the guard's error; a marked one passes; the
recording mode fails nothing and lists what each test started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # the inner pytest runs in a subprocess

CASES = '''
import subprocess, sys
import pytest

def test_unmarked_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

@pytest.mark.process
def test_marked_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_swallowed():
    try:
        subprocess.run(["true"])
    except Exception:
        pass

def test_unmarked_ray():
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # the guard stops it before anything starts

def test_nothing_started():
    assert sum(range(4)) == 6
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    process: starts a process\n    ray: starts Ray\n")
    pytester.makepyfile(test_cases=CASES)
    return pytester


def test_unmarked_tests_fail_naming_their_marker(suite):
    r = suite.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=2, failed=3)
    out = r.stdout.str()
    for name, marker in [("test_unmarked_process", "process"), ("test_swallowed", "process"), ("test_unmarked_ray", "ray")]:
        assert f"test_cases.py::{name} starts" in out and f"add @pytest.mark.{marker}" in out, name


def test_recording_fails_nothing_and_lists_what_each_test_started(suite, tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    monkeypatch.setenv("DENSITUNE_TEST_GUARD", f"record:{record}")
    r = suite.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-k", "not ray")
    r.assert_outcomes(passed=4, deselected=1)
    assert json.loads(record.read_text()) == {"test_cases.py::test_marked_process": ["process"],
                                              "test_cases.py::test_swallowed": ["process"],
                                              "test_cases.py::test_unmarked_process": ["process"]}
