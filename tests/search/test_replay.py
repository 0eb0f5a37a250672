"""Typed values across layers: a trial replayed from its rows (search/replay.py), split keys whose cache strings
are those of the plain tuples they replaced."""

from __future__ import annotations

import pytest
import torch

from densitune.errors import ConfigError, ResultsError
from densitune.results.store import read_results, write_rows, write_spec
from densitune.search.evaluate import AttackKey, Workspace, _Evaluator
from densitune.search.models import discover, select
from densitune.search.ood.attacks import AttackConfig
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.replay import replay_trial
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.trainables.data import SplitKey

SPEC = SearchSpec(experiment="r", val_ood="digits-blend", test_ood=("noise-uniform",), eps_grid=(0.0,), eval_limit=60)


@pytest.fixture(scope="module")
def results(trained_models, tmp_path_factory):
    """One gmm_sum trial (kde bandwidth 0.5: parameters that differ from the defaults) on cnn D=8, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("replay-results")
    write_spec(root, SPEC.experiment, SPEC.to_dict())
    (group,) = select(discover(trained_models), (8,))
    params = TrialParams(group.key, "density", DensitySpec("kde", {"bandwidth": 0.5}), 0.0)
    write_rows(root, run_trial(Workspace(), SPEC, group, params, "t1")[1], name="t1")
    return root, group, params


def test_rows_from_pyarrow_and_pandas_replay_the_same_trial(results):
    root, group, params = results
    table = read_results(root, experiment="r")
    a = replay_trial(root, table.to_pylist())
    b = replay_trial(root, table.to_pandas().to_dict("records"), need_spec=True)
    assert a == b and a.spec == SPEC and a.trial_id == "t1"
    assert a.members == ((0, (group.checkpoints[0],)), (1, (group.checkpoints[1],)))
    assert (a.params.score, a.params.density.name, a.params.eps) == ("density", "kde", 0.0)
    assert a.params.density == DensitySpec("kde", {"bandwidth": 0.5, "max_train": None, "random_state": 0,
                                                   "chunk_size": None})  # the row records every parameter
    assert a.at_eps(0.01).params.eps == 0.01 and a.at_eps(0.01).members == a.members


def test_replayed_density_is_the_one_the_search_fitted(results):
    root, group, params = results
    trial = replay_trial(root, read_results(root, experiment="r").to_pylist())
    ckpt = group.checkpoints[1]
    replayed = trial.fitted_density(Workspace(), ckpt)
    searched = _Evaluator(Workspace(), SPEC, [ckpt], trial.params).score.density  # type: ignore[attr-defined]
    assert replayed.get_params() == searched.get_params()
    assert torch.equal(replayed.train_, searched.train_) and replayed.bandwidth_ == searched.bandwidth_ == 0.5


def test_replay_needs_one_trial_and_says_when_the_spec_is_missing(results, tmp_path):
    root, _, _ = results
    rows = read_results(root, experiment="r").to_pylist()
    with pytest.raises(ConfigError, match="one trial"):
        replay_trial(root, [*rows, {**rows[0], "trial_id": "other"}])
    with pytest.raises(ResultsError, match="no _spec.json"):
        replay_trial(tmp_path, rows, need_spec=True)
    assert replay_trial(tmp_path, rows).spec is None and replay_trial(tmp_path, rows).batch_size == 256


def test_cache_keys_are_the_strings_of_the_old_tuples(trained_models, tmp_path):
    key = SplitKey("digits", "train", [1, 8, 8], None, 0, None)  # type: ignore[arg-type]  # a shape from JSON
    assert key.shape == (1, 8, 8) and key.token() == repr(("digits", "train", (1, 8, 8), None, 0, None))
    cfg = AttackConfig(eps=0.1, steps=2)
    assert AttackKey("fgsm", cfg, key).token() == repr(("adv", "fgsm", cfg, "digits", "train", (1, 8, 8), None, 0, None))
    ws = Workspace(cache_dir=tmp_path / "cache")
    ckpt = str(next(trained_models.rglob("model.pt")).parent)
    small = SplitKey("digits", "val", (1, 8, 8), None, 0, 20)
    ws.features(ckpt, small, small.load())
    ((kind, disk_key),) = ws.disk.events()  # type: ignore[union-attr]
    assert kind == "extract" and disk_key.endswith("|('digits', 'val', (1, 8, 8), None, 0, 20)")


def test_density_spec_is_one_value_with_json_only_at_the_boundaries():
    import pickle

    a = DensitySpec("kde", {"max_train": None, "bandwidth": 0.5})
    assert list(a.params) == ["bandwidth", "max_train"] and a.params_json() == '{"bandwidth": 0.5, "max_train": null}'
    same = pickle.loads(pickle.dumps(a))  # noqa: S301 - our own bytes: trial parameters travel to Ray workers pickled
    assert DensitySpec.from_json(a.to_json()) == a == same == DensitySpec.from_columns(
        "kde", '{"max_train": null, "bandwidth": 0.5}')
    assert len({a, DensitySpec("kde", {"bandwidth": 0.5, "max_train": None})}) == 1 and a != DensitySpec("kde")
    assert DensitySpec.from_columns(None, None) == DensitySpec() and TrialParams("g", "msp").density == DensitySpec()
    assert TrialParams("g", "density", "kde", eps=0.01).label == "g|density|kde|eps=0.01"
    assert TrialParams("g", "density", a).label == "g|density|kde,bandwidth=0.5,max_train=None|eps=0"
    assert a.build().get_params()["bandwidth"] == 0.5
    for bad in ('{"name": "kde"}', "[1]", "not json"):
        with pytest.raises(ConfigError):
            DensitySpec.from_json(bad)
    with pytest.raises(ConfigError, match="not JSON values"):
        DensitySpec("kde", {"bandwidth": object()})
