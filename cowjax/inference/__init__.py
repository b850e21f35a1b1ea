"""Checkpoints -> predictions, metrics, reports and figures (predict, evaluate)."""
