"""Training: the config, the one training loop for both transfer modes, cached backbone features."""
