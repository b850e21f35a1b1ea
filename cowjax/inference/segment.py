"""Segment labels on the image's own grid, from the lumen the image shows.

The network works on a grid far coarser than the arteries it labels (2 mm in the demo, its
segmentation head at 4 mm; radii 0.6-2.2 mm), so the lumen is taken from the image at its own
resolution (``vessel_mask``: a local half-maximum threshold, since a blurred tube's edge is where
its profile falls to half its peak above the surrounding tissue), and each lumen voxel is given a
segment in one of two ways:
- ``label_by_landmarks`` (what ``--save_segmentation`` writes): the segments run between the
  predicted landmarks, so a lumen voxel on the shortest in-lumen path between a segment's two end
  landmarks belongs to it (``data.labels.derive_segments``, the rule that also labels real vessel
  masks for training); every other vessel (ophthalmic, SCA, distal branches, veins) stays 0;
- ``label_lumen``: the class the network's segmentation head finds most probable there, where it
  finds the 20 segments together more probable than background (the head's own labelling, which
  the evaluation reports beside the other).
Measured on 4 cases of the independent held-out generator (2026-12-01, demo first network): mean
Dice over the 20 segments 0.72 by the landmarks, 0.38 by the segmentation head (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cowjax.data import labels, preprocess

# A tube's lumen: brighter than halfway from the local tissue level to the local peak.
HALF_MAXIMUM = 0.5
# Local peak: the brightest voxel within this many mm (wider than the widest artery, the ICA).
PEAK_WINDOW_MM = 5.0
# Tissue level: the median over this many mm, computed on a 2 mm subsample.
TISSUE_WINDOW_MM = 12.0
# A local peak must stand this far above the tissue (normalised intensity, 1 = the 99.9th
# percentile of the image) to be a vessel at all: noise and texture stay out.
MIN_CONTRAST = 0.25


def vessel_mask(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Bright tubes at the image's own resolution: [X, Y, Z] image, [4, 4] affine -> bool mask.

    Each voxel is compared with its neighbourhood, so a distal vessel fainter than the ICA (inflow
    fades along the tree) keeps its own half-maximum edge.
    """
    zooms = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    image = preprocess.normalise_intensity(image)
    smooth = ndimage.gaussian_filter(image, 0.3 / zooms)
    peak = ndimage.maximum_filter(smooth, size=tuple(_odd(PEAK_WINDOW_MM / zooms)))
    step = np.maximum(1, np.round(2.0 / zooms).astype(int))
    coarse = smooth[::step[0], ::step[1], ::step[2]]
    coarse = ndimage.median_filter(coarse, size=tuple(_odd(TISSUE_WINDOW_MM / (zooms * step))))
    # Back to every voxel: voxel i of the image is coarse voxel i / step.
    grid = np.meshgrid(*[np.arange(n) / s for n, s in zip(image.shape, step)], indexing="ij",
                       sparse=True)
    tissue = ndimage.map_coordinates(coarse, np.broadcast_arrays(*grid), order=1, mode="nearest")
    return (smooth > tissue + HALF_MAXIMUM * (peak - tissue)) & (peak - tissue > MIN_CONTRAST)


def _odd(n) -> np.ndarray:
    return np.maximum(3, np.round(n).astype(int) // 2 * 2 + 1)


def label_lumen(mask: np.ndarray, affine: np.ndarray, probabilities: np.ndarray,
                grid_affine: np.ndarray) -> np.ndarray:
    """Labels 0..20 for the lumen voxels of ``mask`` (image grid, ``affine``) from the network's
    class probabilities [X', Y', Z', 21] on its grid (``grid_affine``), 0 outside it.

    Each lumen voxel takes the most probable segment at its position when the segments together
    outweigh background there. Returns [X, Y, Z] uint8 on the image grid.
    """
    points = np.argwhere(mask)
    labels = np.zeros(mask.shape, np.uint8)
    if not len(points):
        return labels
    at = preprocess.world_to_voxel(preprocess.voxel_to_world(points, affine), grid_affine).T
    # Outside the network's grid: background probability 1.
    prob = np.stack([ndimage.map_coordinates(probabilities[..., c], at, order=1, mode="constant",
                                             cval=float(c == 0), prefilter=False)
                     for c in range(probabilities.shape[-1])], axis=-1)
    segment = 1 + np.argmax(prob[:, 1:], axis=-1)
    is_segment = prob[:, 1:].sum(axis=-1) > prob[:, 0]
    labels[tuple(points.T)] = np.where(is_segment, segment, 0)
    return labels


def label_by_landmarks(mask: np.ndarray, affine: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Labels 0..20 for the lumen voxels of ``mask`` [X, Y, Z] (image grid, ``affine``) that lie on
    a segment's in-lumen path between its two end landmarks ([19, 3] world RAS mm, predicted);
    a segment whose path detours round the circle is absent (``labels.derive_segments``)."""
    return labels.derive_segments(mask, affine, np.asarray(landmarks, np.float64))
