"""Training: the one loop, optimizers, parallelism, checkpoints, metrics sinks."""
