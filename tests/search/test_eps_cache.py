"""The ε cache: one input-gradient sign per (models, density, score, split), any number of ε values.

The cached path (:meth:`Workspace.gradient_signs`, one forward pass per further ε) must give exactly the
numbers of the reference path (``ip_cache=False``: forward, backward, forward for every ε), and compute
each split's gradient once for k ε values; a trial scores each split once, whatever the number of test
OOD sets and attacks.
"""

from __future__ import annotations

import math

import pytest
import torch

import densitune.search.ood.perturb as perturb_mod
from densitune.search.evaluate import Workspace
from densitune.search.models import discover, select
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.ood.perturb import apply_sign, gradient_sign, perturb
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.search.workspace import IP_CACHE_ENV

EPS = (0.002, 0.01, 0.02)
TEST_OOD = ("digits-rot90", "noise-uniform")
BATCH = 64
FIGURES = ("auroc", "auprc", "fpr95", "n_id", "n_ood", "id_accuracy")


def spec() -> SearchSpec:
    return SearchSpec(experiment="c", val_ood="digits-blend", test_ood=TEST_OOD, attacks=("fgsm",), attack_eps=0.05,
                      eps_grid=EPS, eval_limit=100, batch_size=BATCH, densities=("gmm_sum", "kde"))


@pytest.fixture(scope="module")
def group(trained_models):
    (g,) = select(discover(trained_models), (8,))  # cnn D=8, seeds 0 and 1
    return g


def figures(rows: list[dict]) -> list[tuple]:
    return [(r["seed"], r["ood_dataset"], r["split"], *(r[k] for k in FIGURES)) for r in rows]


class GradientCalls:
    """Counts the batches whose input gradient is computed (the maths layer's one gradient function)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches = 0
        real = perturb_mod._gradient

        def counted(x, score_fn):
            self.batches += 1
            return real(x, score_fn)

        monkeypatch.setattr(perturb_mod, "_gradient", counted)


def test_apply_sign_is_perturb_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4, dtype=torch.float64)
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    score_fn = lambda v: torch.tanh(v.flatten(1) @ w) + (v.flatten(1) ** 3).sum(1)  # noqa: E731
    sign = gradient_sign(x, score_fn)
    assert sign.dtype == torch.int8 and set(sign.unique().tolist()) <= {-1, 0, 1}
    for eps in (0.0, 1e-3, 0.02, 0.5):
        assert torch.equal(apply_sign(x, sign, eps), perturb(x, score_fn, eps))
    assert apply_sign(x, sign, 0.0) is x


@pytest.mark.parametrize(("score", "density"), [("density", "gmm_sum"), ("diff", "kde"), ("ensemble_entropy", "")])
def test_cached_path_gives_the_reference_numbers(group, score, density, monkeypatch):
    """Every row of k ε trials is identical with and without the cache; the gradient is computed once."""
    sp = spec()
    calls = GradientCalls(monkeypatch)
    ref_rows, ref_batches = [], []
    for eps in EPS:
        before = calls.batches
        ref_rows += run_trial(Workspace(ip_cache=False), sp, group, TrialParams(group.key, score, density, eps=eps), "r")[1]
        ref_batches.append(calls.batches - before)
    assert len(set(ref_batches)) == 1  # the reference pays the whole gradient for every ε

    cached = Workspace(ip_cache=True)
    before = calls.batches
    rows = []
    for eps in EPS:
        rows += run_trial(cached, sp, group, TrialParams(group.key, score, density, eps=eps), "c")[1]
    assert figures(rows) == figures(ref_rows)

    # Each split's gradient once for all k ε values: as many batches as one reference trial.
    assert calls.batches - before == ref_batches[0]
    # ... and that is every split scored once per trial: ID val, the validation OOD set, ID test (once, not
    # once per test set), each test set, each attack (single-model scores), per seed or once for an ensemble.
    per_member: dict[object, int] = {}
    for r in rows[: len(rows) // len(EPS)]:
        n = math.ceil(r["n_ood"] / BATCH) + (math.ceil(r["n_id"] / BATCH) if r["split"] == "val" else 0)
        per_member[r["seed"]] = per_member.get(r["seed"], 0) + n
    test_id = sum(math.ceil(r["n_id"] / BATCH) for r in rows[: len(rows) // len(EPS)]
                  if r["split"] == "test" and r["ood_dataset"] == TEST_OOD[0])
    assert ref_batches[0] == sum(per_member.values()) + test_id
    members = 1 if score.startswith("ensemble") else 2
    splits = 2 + 1 + len(TEST_OOD) + (0 if score.startswith("ensemble") else 1)
    assert cached.counts["ipsign"] == members * splits


def test_signs_are_keyed_by_density_and_shared_on_disk(group, tmp_path, monkeypatch):
    """Another density (or density parameter) gets its own signs; a second process's workspace reads them."""
    sp = spec()
    ws = Workspace(cache_dir=tmp_path / "cache")
    assert ws.ip_cache
    a = run_trial(ws, sp, group, TrialParams(group.key, "density", "gmm_sum", eps=0.01), "a")[1]
    b = run_trial(ws, sp, group, TrialParams(group.key, "density", "kde", eps=0.01), "b")[1]
    run_trial(ws, sp, group, TrialParams(group.key, "density", DensitySpec("kde", {"bandwidth": 0.5}), eps=0.01), "b2")
    per_config = 2 * (3 + len(TEST_OOD) + 1)  # 2 seeds x (ID val, val OOD, ID test, test sets, attack)
    assert ws.counts["ipsign"] == 3 * per_config
    events = [k for k, _ in ws.disk.events() if k == "ipsign"]
    assert len(events) == 3 * per_config

    calls = GradientCalls(monkeypatch)
    fresh = Workspace(cache_dir=tmp_path / "cache")  # a new process: nothing in memory
    a2 = run_trial(fresh, sp, group, TrialParams(group.key, "density", "gmm_sum", eps=0.02), "a2")[1]
    b2 = run_trial(fresh, sp, group, TrialParams(group.key, "density", "kde", eps=0.01), "b2")[1]
    assert calls.batches == 0 and fresh.counts["ipsign"] == 0
    assert figures(b2) == figures(b)
    ref = run_trial(Workspace(ip_cache=False), sp, group, TrialParams(group.key, "density", "gmm_sum", eps=0.02), "r")[1]
    assert figures(a2) == figures(ref) and figures(a2) != figures(a)


def test_environment_switches_the_cache_off(monkeypatch):
    monkeypatch.setenv(IP_CACHE_ENV, "0")
    assert not Workspace().ip_cache
    monkeypatch.setenv(IP_CACHE_ENV, "1")
    assert Workspace().ip_cache
    monkeypatch.delenv(IP_CACHE_ENV)
    assert Workspace().ip_cache and not Workspace(ip_cache=False).ip_cache


@pytest.mark.ray
def test_search_hands_the_drivers_choice_to_every_trial(ray_session, group, tmp_path, monkeypatch):
    """``DENSITUNE_IP_CACHE`` is read on the driver (``SearchRun.ip_cache``) and travels with the run to the Ray
    workers, which started long before with their own environment (as on the other nodes of a cluster): with it
    off no trial computes a gradient sign, with it on each split's sign is computed once; the rows are the same."""
    from densitune.results.store import read_results
    from densitune.search.cache import DiskCache
    from densitune.search.tune import SearchRun, run_search

    sp = SearchSpec(experiment="h", val_ood="digits-blend", test_ood=("noise-uniform",), eps_grid=(0.01, 0.02),
                    eval_limit=60, batch_size=BATCH)
    got = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(IP_CACHE_ENV, switch)
        run = SearchRun(results_dir=str(tmp_path / switch / "results"), storage_path=str(tmp_path / switch / "tune"),
                        cache_dir=str(tmp_path / switch / "cache"), max_concurrent=1)
        assert run.ip_cache is (switch == "1")
        grid = run_search(sp, [group], run, verbose=0, progress=False)
        assert [r.error for r in grid] == [None, None]
        signs = sum(kind == "ipsign" for kind, _ in DiskCache(run.cache_dir).events())
        rows = sorted(read_results(run.results_dir).to_pylist(), key=lambda r: (r["eps"], r["seed"], r["split"]))
        got[switch] = (signs, figures(rows))
    # off: none; on: ID val, val OOD, ID test, test OOD of each of the 2 seeds' models, once for both ε values
    assert got["0"][0] == 0 and got["1"][0] == 2 * 4
    assert got["0"][1] == got["1"][1] and len(got["1"][1]) == 2 * 2 * 2
