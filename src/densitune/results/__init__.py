"""The shared Parquet store of every trial's rows (training and search write it; reports read it)."""
