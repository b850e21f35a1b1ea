"""Evaluation metrics as pure numpy functions. Unknown ground truth is NaN and never counts."""

from __future__ import annotations

import numpy as np

SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)


def landmark_errors(pred, true):
    """Euclidean distances [..., L] between pred and true [..., L, 3] (mm); NaN where true is NaN."""
    return np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(true, np.float64), axis=-1)


def mre(errors, axis=None):
    """Mean radial error over the known errors (NaN ignored); NaN if none is known."""
    errors = np.asarray(errors, np.float64)
    count = np.isfinite(errors).sum(axis=axis)
    total = np.where(np.isfinite(errors), errors, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def sdr(errors, radius_mm):
    """Success detection rate: fraction of known errors <= radius_mm (NaN if none is known)."""
    errors = np.asarray(errors, np.float64)
    known = errors[np.isfinite(errors)]
    return float(np.mean(known <= radius_mm)) if known.size else float("nan")


def dice(pred_labels, true_labels, num_classes):
    """Dice per foreground class [num_classes - 1] between two label volumes.

    A class absent from both volumes has no overlap to measure: NaN (left out of means).
    """
    pred = np.asarray(pred_labels).ravel()
    true = np.asarray(true_labels).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"dice: label volumes differ in size ({pred.size} vs {true.size})")
    # Joint histogram of (pred, true) pairs: one pass instead of one per class.
    joint = np.bincount(pred.astype(np.int64) * num_classes + true.astype(np.int64),
                        minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    inter = np.diag(joint)[1:].astype(np.float64)
    sizes = joint.sum(axis=1)[1:] + joint.sum(axis=0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2.0 * inter / sizes, np.nan)


def accuracy(pred, true, mask=None):
    """Fraction of entries where bool arrays pred == true, counting only mask (default: all).

    NaN if nothing counts.
    """
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    mask = np.ones(true.shape, bool) if mask is None else np.asarray(mask, bool)
    return float(np.mean(pred[mask] == true[mask])) if mask.any() else float("nan")
