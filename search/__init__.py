"""Search side of densitune: OOD maths (ood), results store and reports (results), the spec, space, trial evaluation and the Ray Tune / Optuna adapter (tune)."""
