"""Files: checkpoints, a run's assembled model, pre-trained starts, atomic writes."""
