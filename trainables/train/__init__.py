"""Training: the config, the checkpoint format, the Ray-free loop and its Ray Tune trainable."""
