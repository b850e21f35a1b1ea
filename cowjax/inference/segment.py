"""Segment labels on the image's own grid, from the lumen the image shows.

The network works on a grid far coarser than the arteries it labels (2 mm in the demo, its
segmentation head at 4 mm; radii 0.6-2.2 mm), so the lumen is taken from the image at its own
resolution (``vessel_mask``: a local half-maximum threshold, since a blurred tube's edge is where
its profile falls to half its peak above the surrounding tissue), and each lumen voxel is given a
segment in one of two ways:
- ``label_by_landmarks`` (what ``--save_segmentation`` writes): the segments run between the
  predicted landmarks, so a lumen voxel on the shortest in-lumen path between a segment's two end
  landmarks belongs to it (``data.labels.derive_segments``, the rule that also labels real vessel
  masks for training); every other vessel (ophthalmic, SCA, distal branches, veins) stays 0, and
  so does a variable segment that presence calls absent (``drop_absent``);
- ``label_lumen``: the class the network's segmentation head finds most probable there, where it
  finds the 20 segments together more probable than background (the head's own labelling, which
  the evaluation reports beside the other).
Measured on 4 cases of the independent held-out generator (2026-12-01, demo first network): mean
Dice over the 20 segments 0.72 by the landmarks, 0.38 by the segmentation head (BENCHMARKS.md).

Whether a variable segment exists is read off the image the same way (``presence_radii``): its
lumen between the predicted end landmarks, and the radius its summed brightness implies, against
the 0.5 mm line between present and hypoplastic. On every generator and resolution we measured it
beat the network's segment branch, which misses absent P1 and A1 on cases unlike its training
(BENCHMARKS.md, 2026-12-02).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage, special

from cowjax import anatomy
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
# The lumen read for segment presence (``presence_radii``): a quarter of the way to the local peak,
# so a thin vessel beside a large one stays in (chosen on our own generator's cases, 2026-12-02,
# BENCHMARKS.md).
QUARTER_MAXIMUM = 0.25
# How far from a segment's labelled voxels its blurred brightness is summed, and the logistic's
# width in ``presence_probability`` (mm).
PRESENCE_REACH_MM = 1.5
PRESENCE_SCALE_MM = 0.1
# The lumen is divided among the segments with one tolerance for all (``labels.derive_segments``'s
# ``radius_mm``): with each segment's typical radius the A1 and A2 took the ends of the ACoA, whose
# radius then read 0.4-0.48 mm (BENCHMARKS.md, 2026-12-02).
PRESENCE_LABEL_RADIUS_MM = 1.0


class Contrast(NamedTuple):
    """An image's vessel contrast at its own resolution (``contrast``): every map [X, Y, Z] in
    normalised intensity (1 = the 99.9th percentile). zooms: [3] voxel size (mm)."""
    image: np.ndarray    # normalised
    smooth: np.ndarray   # slightly smoothed (sigma 0.3 mm)
    peak: np.ndarray     # the brightest smoothed voxel within PEAK_WINDOW_MM
    tissue: np.ndarray   # the local tissue level (median over TISSUE_WINDOW_MM)
    zooms: np.ndarray


def contrast(image: np.ndarray, affine: np.ndarray) -> Contrast:
    """The maps ``vessel_mask`` and ``presence_radii`` read: [X, Y, Z] image, [4, 4] affine."""
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
    return Contrast(image, smooth, peak, tissue, zooms)


def vessel_mask(image: np.ndarray, affine: np.ndarray, fraction: float = HALF_MAXIMUM,
                maps: Contrast | None = None) -> np.ndarray:
    """Bright tubes at the image's own resolution: [X, Y, Z] image, [4, 4] affine -> bool mask.

    Each voxel is compared with its neighbourhood, so a distal vessel fainter than the ICA (inflow
    fades along the tree) keeps its own edge: brighter than ``fraction`` of the way from the tissue
    to the local peak. ``maps``: ``contrast(image, affine)`` when already computed.
    """
    c = maps if maps is not None else contrast(image, affine)
    return ((c.smooth > c.tissue + fraction * (c.peak - c.tissue))
            & (c.peak - c.tissue > MIN_CONTRAST))


def presence_radii(image: np.ndarray, affine: np.ndarray, landmarks: np.ndarray,
                   maps: Contrast | None = None) -> np.ndarray:
    """The mean radius (mm) of each variable segment as the image shows it between its two end
    landmarks ([19, 3] world RAS mm, predicted): [20], NaN for the segments that always exist and
    where an end landmark is not on a vessel (no evidence either way).

    A thin vessel beside a large one stays below half the local peak, so the lumen here is the
    ``QUARTER_MAXIMUM`` mask, labelled by the landmarks (``labels.derive_segments`` with one
    tolerance for every segment: an absent segment has no in-lumen path between its ends and gets
    no voxels). Its radius does not come from counting voxels (at 1 mm the thinnest lumen kept is
    one voxel, radius 0.56 mm, whatever the vessel): blur and partial volume spread a vessel's
    brightness but keep its sum over the cross-section, so the contrast above the tissue summed
    within ``PRESENCE_REACH_MM`` of the segment's voxels is pi r^2 x length x the lumen's full
    brightness. That brightness is the brightest contrast within ``PRESENCE_REACH_MM`` + 1 mm of
    the two end landmarks (the larger vessels the segment joins: inflow fades along the tree, so a
    global one would shrink distal segments).
    """
    landmarks = np.asarray(landmarks, np.float64)
    c = maps if maps is not None else contrast(image, affine)
    affine = np.asarray(affine, np.float64)
    segments = labels.derive_segments(vessel_mask(image, affine, QUARTER_MAXIMUM, c), affine,
                                      landmarks, radius_mm=PRESENCE_LABEL_RADIUS_MM)
    radii = np.full(anatomy.NUM_SEGMENTS, np.nan)
    if not segments.any():
        return radii
    # Each voxel near the labelled lumen counts for the segment of its nearest labelled voxel:
    # only the labelled voxels' bounding box, grown by the reach, can hold one.
    pad = np.ceil(PRESENCE_REACH_MM / c.zooms).astype(int) + 1
    labelled = np.argwhere(segments)
    box = tuple(slice(max(lo - p, 0), hi + p + 1)
                for lo, hi, p in zip(labelled.min(axis=0), labelled.max(axis=0), pad))
    local = segments[box]
    dist, nearest = ndimage.distance_transform_edt(local == 0, sampling=c.zooms,
                                                   return_indices=True)
    owner = np.where(dist <= PRESENCE_REACH_MM, local[tuple(nearest)], 0)
    mass = ndimage.sum_labels(c.image[box] - c.tissue[box], owner,
                              np.arange(1, anatomy.NUM_CLASSES))
    mass *= float(np.prod(c.zooms))
    for s, name in enumerate(anatomy.SEGMENTS):
        if name not in anatomy.VARIABLE_SEGMENTS:
            continue
        ends = landmarks[[anatomy.LANDMARK_INDEX[n] for n in anatomy.SEGMENT_ENDS[name]]]
        brightness = [_brightest_near(c, affine, p, PRESENCE_REACH_MM + 1.0) for p in ends]
        if min(brightness) <= MIN_CONTRAST:   # an end off every vessel, or off the image
            continue
        length = max(float(np.linalg.norm(ends[0] - ends[1])), 1e-3)
        radii[s] = np.sqrt(max(mass[s], 0.0) / (np.pi * np.mean(brightness) * length))
    return radii


def presence_probability(radii: np.ndarray) -> np.ndarray:
    """P(segment present) from ``presence_radii``: a logistic in the radius, 0.5 at
    ``anatomy.HYPOPLASTIC_RADIUS`` (the line between present and hypoplastic), NaN kept."""
    return special.expit((np.asarray(radii) - anatomy.HYPOPLASTIC_RADIUS) / PRESENCE_SCALE_MM)


def _brightest_near(c: Contrast, affine: np.ndarray, point: np.ndarray,
                    radius_mm: float) -> float:
    """The largest smoothed contrast above the tissue within ``radius_mm`` (a box) of a world
    ``point``; -inf when the box misses the image or the point is unknown."""
    if not np.all(np.isfinite(point)):
        return -np.inf
    centre = np.round(preprocess.world_to_voxel(point[None], affine)[0]).astype(int)
    half = np.ceil(radius_mm / c.zooms).astype(int)
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, c.smooth.shape)
    if np.any(hi <= lo):
        return -np.inf
    near = tuple(slice(a, b) for a, b in zip(lo, hi))
    return float((c.smooth[near] - c.tissue[near]).max())


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


def drop_absent(labels: np.ndarray, present_prob: np.ndarray) -> np.ndarray:
    """``labels`` (0..20) without the variable segments that ``present_prob`` ([20]) calls absent
    (at most 0.5; NaN, no evidence, keeps them), so the written labelling and the reported
    presence agree: a hypoplastic thread read absent is not written as that segment (cow19 labels
    it background too). The segments that always exist are kept whatever their probability."""
    absent = 1 + np.flatnonzero(anatomy.VARIABLE_SEGMENT_MASK & (np.asarray(present_prob) <= 0.5))
    return np.where(np.isin(labels, absent), 0, labels).astype(labels.dtype)


def label_by_landmarks(mask: np.ndarray, affine: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Labels 0..20 for the lumen voxels of ``mask`` [X, Y, Z] (image grid, ``affine``) that lie on
    a segment's in-lumen path between its two end landmarks ([19, 3] world RAS mm, predicted);
    a segment whose path detours round the circle is absent (``labels.derive_segments``)."""
    return labels.derive_segments(mask, affine, np.asarray(landmarks, np.float64))
