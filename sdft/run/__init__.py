"""A training run: the loop and the SDFT step (``trainer``), the SFT baseline (``sft``), checkpoints,
the run folder and its lock, metrics, loggers and export."""
