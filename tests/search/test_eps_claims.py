"""Concurrent trials share the gradient-sign work: each computes the splits nobody else holds.

:func:`densitune.search.evaluate.claim_gradient_signs` runs at the start of every trial (ip cache on, ε > 0,
a disk cache shared by the processes). A split whose sign entry another process holds is skipped, not waited
for; the scoring afterwards waits for it and reads it. These tests hold a split's lock themselves (a separate
open file description: ``flock`` then conflicts even inside one process), and run two real processes at once,
checking that every split's signs are computed exactly once and the rows equal the reference path's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import claim_while_held

from densitune.search.cache import DiskCache
from densitune.search.evaluate import Workspace, _Evaluator, _trial_splits, claim_gradient_signs
from densitune.search.models import discover, select
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial

TEST_OOD = ("digits-rot90", "noise-uniform")
FIGURES = ("seed", "ood_dataset", "split", "auroc", "auprc", "fpr95", "n_id", "n_ood", "id_accuracy")


def spec() -> SearchSpec:
    return SearchSpec(experiment="c", val_ood="digits-blend", test_ood=TEST_OOD, attacks=(), eps_grid=(0.01, 0.02),
                      eval_limit=200, batch_size=64, densities=("gmm_sum",))


@pytest.fixture(scope="module")
def group(trained_models):
    (g,) = select(discover(trained_models), (8,))  # cnn D=8, seeds 0 and 1
    return g


def figures(rows: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in FIGURES) for r in rows]


def test_a_held_split_is_skipped_not_waited_for(group, tmp_path):
    """With one split's entry held by someone else, the claim pass computes every other split and returns;
    once released, the trial computes the held one and its rows are the reference path's."""
    sp, params = spec(), TrialParams(group.key, "density", "gmm_sum", eps=0.01)
    ws = Workspace(cache_dir=tmp_path / "cache", ip_cache=True)
    ckpt = [group.checkpoints[0]]
    ev = _Evaluator(ws, sp, ckpt, params)
    splits = _trial_splits(ev, sp)
    assert [(s.key.name, s.key.split) for s in splits] == [
        ("digits", "val"), ("digits-blend", "val"), ("digits", "test"), ("digits-rot90", "test"), ("noise-uniform", "test")]
    _, held_key = ev._sign_keys(splits[2][0])  # ID test: the split the other process is computing
    assert isinstance(ws.disk, DiskCache)
    lock_path = ws.disk._path("ipsign", held_key).with_suffix(".lock")
    waited, computed = claim_while_held(lock_path, lambda: claim_gradient_signs(ws, sp, ckpt, params))
    assert not waited and computed == [len(splits) - 1]
    assert held_key not in [key for kind, key in ws.disk.events() if kind == "ipsign"]
    # a second claim pass finds the other splits in memory and now takes the released one
    assert claim_gradient_signs(ws, sp, ckpt, params) == 1
    assert ws.counts["ipsign"] == len(splits)

    solo = TrialParams(group.key, "density", "gmm_sum", eps=0.01)
    both = run_trial(ws, sp, group, solo, "t")[1]  # seed 1's splits are claimed now, seed 0's are all there
    ref = run_trial(Workspace(ip_cache=False), sp, group, solo, "r")[1]
    assert figures(both) == figures(ref)
    events = [key for kind, key in ws.disk.events() if kind == "ipsign"]
    assert len(events) == len(set(events)) == 2 * len(splits)  # each split of each seed once


def test_claims_are_off_for_the_reference_path_and_eps_zero(group, tmp_path):
    sp = spec()
    ckpt = [group.checkpoints[0]]
    ws = Workspace(cache_dir=tmp_path / "c1", ip_cache=False)
    assert claim_gradient_signs(ws, sp, ckpt, TrialParams(group.key, "density", "gmm_sum", eps=0.01)) == 0
    ws = Workspace(cache_dir=tmp_path / "c2", ip_cache=True)
    assert claim_gradient_signs(ws, sp, ckpt, TrialParams(group.key, "density", "gmm_sum", eps=0.0)) == 0
    assert ws.counts["ipsign"] == 0 and not (tmp_path / "c1" / "ipsign").exists()


_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # this file's folder, and tests/ (conftest)
    from test_eps_claims import spec
    from densitune.search.evaluate import Workspace
    from densitune.search.models import discover, select
    from densitune.search.space import TrialParams
    from densitune.search.trial import run_trial

    models, cache, eps, go, out = sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6])
    (group,) = select(discover(Path(models)), (8,))
    ws = Workspace(cache_dir=cache, ip_cache=True)
    ws.model(group.checkpoints[0]), ws.model(group.checkpoints[1])  # imports and models before the start line
    (Path(str(out) + ".ready")).touch()
    while not go.exists():
        time.sleep(0.01)
    rows = run_trial(ws, spec(), group, TrialParams(group.key, "density", "gmm_sum", eps=eps), "w")[1]
    keep = ("seed", "ood_dataset", "split", "auroc", "auprc", "fpr95", "n_id", "n_ood", "id_accuracy")
    out.write_text(json.dumps({"rows": [[r[k] for k in keep] for r in rows], "ipsign": ws.counts["ipsign"]}))
""")


@pytest.mark.process
def test_two_concurrent_processes_compute_each_split_once(group, trained_models, tmp_path):
    """Two real processes start trials of two ε values at the same moment on one cache: every split's signs
    are computed once in all (the events log has no key twice), and each process's rows are the reference's."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs, outs = [], []
    for eps in (0.01, 0.02):
        out = tmp_path / f"out-{eps}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(Path(__file__).parent), str(trained_models),
                                       str(cache), str(eps), str(go), str(out)]))
    deadline = time.monotonic() + 300
    while not all(Path(f"{o}.ready").exists() for o in outs):
        assert all(p.poll() is None for p in procs), "a worker died before the start line"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]

    results = [json.loads(o.read_text()) for o in outs]
    events = Counter(key for kind, key in DiskCache(cache).events() if kind == "ipsign")
    n_splits = 2 * (3 + len(TEST_OOD))  # 2 seeds x (ID val, val OOD, ID test, each test OOD set)
    assert len(events) == n_splits and set(events.values()) == {1}
    assert sum(r["ipsign"] for r in results) == n_splits  # what the two processes computed, together
    for eps, r in zip((0.01, 0.02), results):
        ref = run_trial(Workspace(ip_cache=False), spec(), group, TrialParams(group.key, "density", "gmm_sum", eps=eps),
                        "r")[1]
        assert [tuple(x) for x in r["rows"]] == figures(ref)
