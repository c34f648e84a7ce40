"""Training: the Horovod trainer, checkpoints and the run directory."""
