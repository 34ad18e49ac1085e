"""Scoring: BraTS metrics, lesion-wise scores, statistics, the cross-site matrix, diagnostics."""
