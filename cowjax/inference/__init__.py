"""Checkpoints -> predictions, metrics, reports and figures (decode, predict, evaluate)."""
