"""Data: case files (io), synthetic cases, preprocessing, labels derived from vessel masks, augmentation, the grain pipeline."""
