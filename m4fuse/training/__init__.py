"""Local training (no Flower): the trainer, the per-site steps, the pooled and local baselines, DP-SGD."""
