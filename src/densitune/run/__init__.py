"""Running a study on a run folder: the run store, locks, Ray's runtime, failures, console."""
