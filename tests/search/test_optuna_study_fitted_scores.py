"""The Optuna mirror of a grid search that holds fitted-score baselines (knn, rmd, vim record their own model as
the trial's density) next to densities: every trial is added, and a resume re-adds them to a fresh study."""

from __future__ import annotations

from densitune.search.models import ModelGroup
from densitune.search.optuna_study import StudyMirror
from densitune.search.space import grid_points
from densitune.search.spec import SearchSpec


def test_grid_trials_of_baselines_and_densities_share_one_study(tmp_path) -> None:
    group = ModelGroup("cnn-D8-ce", "cnn", 8, "ce", 0.0, False, "digits", 0, (0,), ("ckpt",))
    spec = SearchSpec(experiment="b", val_ood="digits-blend", test_ood=("noise-uniform",), eps_grid=(0.0, 0.01),
                      scores=("density", "knn", "rmd", "vim", "energy"), densities=("gmm_sum", "kde"))
    points = {p.label: p for p in grid_points(spec, [group])}
    assert {p.density.name for p in points.values()} == {"gmm_sum", "kde", "knn", "rmd", "vim", ""}
    mirror = StudyMirror(tmp_path / "journal.log", spec, [group], points)
    done = {f"t{i}": ({"point": label}, 0.5 + i / 100) for i, label in enumerate(sorted(points))}
    mirror.sync(done)
    trials = mirror.study.get_trials()
    assert len(trials) == len(points) == 12
    assert {t.params.get("density") for t in trials} == {"gmm_sum", "kde", "knn", "rmd", "vim", None}
    again = StudyMirror(tmp_path / "journal.log", spec, [group], points)  # a resume: nothing added twice
    again.sync(done)
    assert len(again.study.get_trials()) == 12
