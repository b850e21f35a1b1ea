"""Window arithmetic on the network grid: where windows go, cutting them out, blending them back.

The network sees fixed-size windows (``config.data.crop_shape``) of a volume of any size. Window
starts are multiples of the heatmap stride, so every window's heatmap voxels fall on one common
heatmap grid; outputs are blended with Gaussian weights, highest at each window's centre (as
nnU-Net's sliding windows), so each region is read mostly from the window that saw it centred.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

# Gaussian blending: sigma as a fraction of the window.
BLEND_SIGMA = 1 / 8


def axis_starts(centre: float, size: int, window: int, step: int,
                align: int) -> tuple[list[int], int]:
    """Window starts along one axis, all multiples of ``align`` (the heatmap stride).

    The window centred on ``centre`` and, where the volume is larger than a window, the two shifted
    by ``step`` either way; each kept inside the volume (a volume smaller than the window gets one
    window holding all of it). Returns (sorted starts, index of the central window).
    """
    lo, hi = min(0, size - window), max(0, size - window)
    central = int(np.clip(np.round(centre - (window - 1) / 2), lo, hi))
    shifts = (-step, 0, step) if step and size > window else (0,)
    starts = sorted({align * (int(np.clip(central + k, lo, hi)) // align) for k in shifts})
    return starts, starts.index(align * (central // align))


def centred_starts(centres, window, align: int = 1) -> np.ndarray:
    """Starts [..., 3] int (multiples of ``align``) of the windows centred at ``centres`` [..., 3]
    (grid voxels; rounded, then down to the alignment)."""
    starts = np.round(np.asarray(centres, np.float64) - (np.asarray(window) - 1) / 2).astype(int)
    return align * (starts // align)


def sliding_windows(centre, shape, window, step, align) -> tuple[np.ndarray, int]:
    """The windows around ``centre`` [3] (grid voxels) in a volume of ``shape``: every combination
    of ``axis_starts`` (``window``, ``step`` [3]). Returns (starts [N, 3] int, index of the
    central window)."""
    per_axis = [axis_starts(c, n, w, s, align) for c, n, w, s in zip(centre, shape, window, step)]
    starts = np.array(list(itertools.product(*(s for s, _ in per_axis))))
    central = np.ravel_multi_index([i for _, i in per_axis], [len(s) for s, _ in per_axis])
    return starts, int(central)


def lattice_centres(shape, window) -> np.ndarray:
    """Window centres [N, 3] (grid voxels) on a half-window lattice covering a volume of ``shape``
    (one centre along an axis the window already covers)."""
    axes = [[(n - 1) / 2] if n <= k else
            np.linspace((k - 1) / 2, n - 1 - (k - 1) / 2, int(np.ceil((n - k) / (k / 2))) + 1)
            for n, k in zip(shape, window)]
    return np.array(list(itertools.product(*axes)), np.float64)


def blend_weights(shape) -> np.ndarray:
    """Separable Gaussian [X, Y, Z] peaking at the window centre, floored so edges still count."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (BLEND_SIGMA * n)) ** 2) for n in shape]
    w = functools.reduce(np.multiply.outer, axes)
    return np.maximum(w, 1e-3).astype(np.float32)


class Blend:
    """Running Gaussian-weighted average of window outputs [x, y, z, C] over a region (x, y, z)."""

    def __init__(self, region, window, channels: int):
        self.weight = blend_weights(window)
        self.total = np.zeros(tuple(region) + (channels,), np.float32)
        self.norm = np.zeros(tuple(region), np.float32)

    def add(self, output: np.ndarray, start) -> None:
        """Add one window's output [*window, C] whose first voxel is region voxel ``start`` [3]."""
        sl = tuple(slice(s, s + n) for s, n in zip(start, self.weight.shape))
        self.total[sl] += output * self.weight[..., None]
        self.norm[sl] += self.weight

    def result(self) -> np.ndarray:
        # The windows tile the region (a full product of starts), so norm > 0 wherever it matters.
        return self.total / np.maximum(self.norm, 1e-12)[..., None]


def cut_windows(volume: np.ndarray, starts: np.ndarray, window) -> np.ndarray:
    """Windows of ``volume`` [X, Y, Z] at ``starts`` [N, 3] (zero outside) -> [N, *window, 1]."""
    window = tuple(int(w) for w in window)
    lo = np.maximum(0, -starts.min(axis=0))
    hi = np.maximum(0, starts.max(axis=0) + window - np.array(volume.shape))
    padded = np.pad(volume, list(zip(lo, hi)))
    out = np.zeros((len(starts), *window, 1), np.float32)
    for i, st in enumerate(starts + lo):
        out[i, ..., 0] = padded[tuple(slice(a, a + w) for a, w in zip(st, window))]
    return out
