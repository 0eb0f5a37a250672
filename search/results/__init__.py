"""Results: the versioned Parquet store (:mod:`.store`) and the tables built from it (:mod:`.report`).

No Ray, no training loop, no CLI.
"""
