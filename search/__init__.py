"""Search side of densitune: densities, scores, the Ray Tune / Optuna search, results and the CLI."""
