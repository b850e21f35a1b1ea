"""Data: case files (io), synthetic cases, preprocessing, targets, augmentation, the grain pipeline."""
