"""Training side of densitune: data sets (data), networks and losses (nets), the training loop and its Ray Tune trainable (train)."""
