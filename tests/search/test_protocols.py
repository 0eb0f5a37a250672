"""Selection protocols: held-out OOD set, adversarial proxy, ID-only likelihood; recorded in every row."""

from __future__ import annotations

import pytest
import torch

from densitune.errors import ConfigError
from densitune.search.evaluate import Workspace, selection_metrics
from densitune.search.models import discover, select
from densitune.search.ood.densities import create_density
from densitune.search.space import TrialParams, grid_points
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.trainables.data import load_split
from densitune.trainables.train.checkpoint import load_model


@pytest.fixture(scope="module")
def group(trained_models):
    (g,) = select(discover(trained_models), (4,))
    return g


def test_adv_proxy_uses_attacked_validation_inputs(group):
    spec = SearchSpec(experiment="a", val_ood=None, test_ood=("noise-uniform",), protocol="adv-proxy",
                      proxy_eps=0.1, eps_grid=(0.0, 0.01), eval_limit=80)
    ws = Workspace()
    obj, rows = run_trial(ws, spec, group, TrialParams(group.key, "density", "gmm_sum", eps=0.01), "t")
    val = [r for r in rows if r["split"] == "val"]
    assert [r["ood_dataset"] for r in val] == ["proxy-fgsm"]
    assert {r["protocol"] for r in rows} == {"adv-proxy:fgsm@0.1"}
    assert obj == val[0]["auroc"] and 0.5 < obj <= 1.0
    # only validation data (and its attacked copy) reaches the objective
    fresh = Workspace()
    selection_metrics(fresh, spec, [group.checkpoints[0]], TrialParams(group.key, "density", "gmm_sum", eps=0.01))
    assert {(k.name, k.split) for k in fresh.loaded_data()} == {("digits", "train"), ("digits", "val")}


def test_id_only_objective_is_held_out_log_likelihood(group):
    spec = SearchSpec(experiment="i", val_ood=None, test_ood=("noise-uniform",), protocol="id-only",
                      eps_grid=(0.0,), densities=("kde",), density_params={"kde": {"bandwidth": [0.5, 2.0]}})
    points = grid_points(spec, [group])
    assert len(points) == 2
    m = selection_metrics(Workspace(), spec, [group.checkpoints[0]], points[0])
    # independent computation: fit on train features, mean log q of validation features
    model = load_model(group.checkpoints[0]).model
    with torch.no_grad():
        tr = load_split("digits", "train").tensors
        va = load_split("digits", "val").tensors
        d = create_density("kde", bandwidth=0.5).fit(model.features(tr[0]), tr[1])
        want = d.score_samples(model.features(va[0])).mean().item()
    assert m["objective"] == pytest.approx(want, rel=1e-9) and m["ood_dataset"] is None


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(protocol="id-only", eps_grid=(0.0, 0.01)), "cannot select eps"),
        (dict(protocol="id-only", scores=("msp",)), "scores must be \\[density\\]"),
        (dict(protocol="adv-proxy", scores=("ensemble_msp",)), "cannot select ensemble"),
        (dict(protocol="val-ood", val_ood=None), "needs a validation OOD set"),
        (dict(protocol="oracle"), "unknown protocol"),
    ],
)
def test_protocol_checks(kw, message):
    base = dict(experiment="x", val_ood="digits-blend", test_ood=("noise-uniform",), eps_grid=(0.0,))
    with pytest.raises(ConfigError, match=message):
        SearchSpec(**{**base, **kw})


def test_id_only_needs_one_network(trained_models):
    groups = discover(trained_models)
    spec = SearchSpec(experiment="i", val_ood=None, test_ood=("noise-uniform",), protocol="id-only", eps_grid=(0.0,))
    with pytest.raises(ConfigError, match="one model group"):
        grid_points(spec, groups)
