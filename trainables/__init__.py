"""Training side of densitune: data sets, backbones, losses and the Ray Tune training trainable."""
