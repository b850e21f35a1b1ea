"""Labels derived from a vessel mask and the landmarks (host numpy + scipy).

Real data usually has a binary vessel mask but no segment labels: ``derive_segments`` divides the mask by the landmarks as
the paper does (each segment is the part of the mask on the shortest in-vessel path between its two
end landmarks), and ``derive_attributes`` reads segment presence and the landmark rule off labels.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse, spatial
from scipy.sparse import csgraph

from cowjax import anatomy


def _mask_graph(vessels: np.ndarray, affine: np.ndarray):
    """26-connected graph of the mask voxels, edges weighted by their world length (mm).

    Returns (sparse [n, n] graph, flat voxel indices [n], world positions [n, 3]).
    """
    padded = np.pad(vessels.astype(bool), 1)
    flat = np.flatnonzero(padded)
    node_of = np.full(padded.size, -1, dtype=np.int64)
    node_of[flat] = np.arange(flat.size)
    # Flat (C-order) index steps of the three axes, whatever the array's memory layout.
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    rows, cols, weights = [], [], []
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
    for off in offsets[len(offsets) // 2 + 1:]:  # one of each +- pair; the graph is undirected
        nbr = node_of[flat + off @ strides]
        ok = nbr >= 0
        rows.append(np.flatnonzero(ok))
        cols.append(nbr[ok])
        weights.append(np.full(ok.sum(), np.linalg.norm(affine[:3, :3] @ off)))
    graph = sparse.coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(flat.size, flat.size)).tocsr()
    ijk = np.stack(np.unravel_index(flat, padded.shape), -1) - 1
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    unpadded = np.ravel_multi_index(ijk.T, vessels.shape)
    return graph, unpadded, world


def _landmark_geodesics(vessels, affine, landmarks, snap_mm):
    """Geodesic distances inside the mask from each landmark: ([19, n] mm, inf where unreachable or
    the landmark is unknown / farther than ``snap_mm`` from the mask), flat indices [n], world [n, 3]."""
    graph, flat, world = _mask_graph(vessels, affine)
    dist = np.full((anatomy.NUM_LANDMARKS, flat.size), np.inf)
    known = np.all(np.isfinite(landmarks), axis=1)
    if flat.size == 0 or not known.any():
        return dist, flat, world
    gap, node = spatial.cKDTree(world).query(landmarks[known])
    usable = np.flatnonzero(known)[gap <= snap_mm]
    if usable.size:
        dist[usable] = csgraph.dijkstra(graph, directed=False, indices=node[gap <= snap_mm])
    return dist, flat, world


def derive_segments(vessels: np.ndarray, affine: np.ndarray, landmarks: np.ndarray,
                    snap_mm: float = 3.0, max_detour: float = 2.0,
                    radius_mm: float | None = None) -> np.ndarray:
    """Divide a binary vessel mask into the 20 segments by the landmarks.

    vessels: [X, Y, Z] bool; affine: its voxel -> world; landmarks: [19, 3] world RAS (NaN unknown).
    A voxel belongs to segment (a, b) when it lies (within about the vessel's diameter) on the
    shortest in-mask path from a to b: excess d_a(v) + d_b(v) - d_a(b) small, with d geodesic. A
    path longer than ``max_detour`` x the straight distance (+5 mm) goes round the circle, i.e. the
    segment is absent. The basilar artery (its lower end has no landmark) is the mask below BA_top
    geodesically closest to it, up to the template BA length. Everything else is background.
    The excess allowed is 2.5 x the segment's radius + a voxel, with ``anatomy.RADII`` (None) or
    one ``radius_mm`` for every segment (a wide segment then no longer takes the ends of a narrow
    one that joins it). Returns [X, Y, Z] uint8 classes 0..20.
    """
    landmarks = np.asarray(landmarks, np.float64)
    dist, flat, world = _landmark_geodesics(vessels, affine, landmarks, snap_mm)
    out = np.zeros(vessels.shape, np.uint8)
    if flat.size == 0:  # no vessel at all
        return out
    voxel_mm = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    # score[s, v] <= 1 means "on segment s"; the lowest score wins.
    score = np.full((anatomy.NUM_SEGMENTS, flat.size), np.inf)
    for s, name in enumerate(anatomy.SEGMENTS):
        a, b = anatomy.SEGMENT_ENDS[name]
        if a == anatomy.VBJ:
            continue
        ia, ib = anatomy.LANDMARK_INDEX[a], anatomy.LANDMARK_INDEX[b]
        d_ab = np.min(dist[ia] + dist[ib])  # the path length a -> b (0 excess on the path)
        straight = np.linalg.norm(landmarks[ia] - landmarks[ib])
        if not np.isfinite(d_ab) or d_ab > max_detour * straight + 5.0:
            continue
        tol = 2.5 * (anatomy.RADII[name] if radius_mm is None else radius_mm) + voxel_mm
        score[s] = (dist[ia] + dist[ib] - d_ab) / tol
    top = anatomy.LANDMARK_INDEX["BA_top"]
    ba_len = np.linalg.norm(anatomy.TEMPLATE[anatomy.VBJ] - anatomy.TEMPLATE["BA_top"])
    if np.isfinite(landmarks[top]).all():
        near_top = ((np.argmin(dist, axis=0) == top) & (dist[top] <= ba_len)
                    & (world[:, 2] <= landmarks[top, 2]))
        score[anatomy.SEGMENT_INDEX["BA"], near_top] = 0.5
    best = np.argmin(score, axis=0)
    labels = np.where(np.min(score, axis=0) <= 1.0, best + 1, 0).astype(np.uint8)
    out.flat[flat] = labels
    return out


def derive_attributes(segments: np.ndarray, affine: np.ndarray, landmarks: np.ndarray):
    """Segment presence and landmark bifurcation attributes from labels and landmarks.

    A variable segment is present when its labelled voxels amount to a vessel of mean radius
    sqrt(volume / (pi * length)) >= anatomy.HYPOPLASTIC_RADIUS between its end landmarks (known only
    where both ends are); the others are always present. Landmarks follow anatomy.landmark_attributes
    and are known where every variable segment they depend on is.
    Returns (segment_attr [20], segment_attr_mask [20], landmark_attr [19], landmark_attr_mask [19]),
    float32.
    """
    landmarks = np.asarray(landmarks, np.float64)
    counts = np.bincount(np.asarray(segments).ravel(), minlength=anatomy.NUM_CLASSES)[1:]
    voxel_volume = abs(np.linalg.det(affine[:3, :3]))
    present = np.ones(anatomy.NUM_SEGMENTS, bool)
    known = np.ones(anatomy.NUM_SEGMENTS, bool)
    for s, name in enumerate(anatomy.SEGMENTS):
        if name not in anatomy.VARIABLE_SEGMENTS:
            continue
        a, b = (landmarks[anatomy.LANDMARK_INDEX[n]] for n in anatomy.SEGMENT_ENDS[name])
        length = np.linalg.norm(a - b)
        known[s] = np.isfinite(length)
        if known[s]:
            radius = np.sqrt(counts[s] * voxel_volume / (np.pi * max(length, 1e-3)))
            present[s] = radius >= anatomy.HYPOPLASTIC_RADIUS
    lm_attr = anatomy.landmark_attributes(present)
    lm_known = ~np.any(anatomy.LANDMARK_DEPENDS & ~known[None, :], axis=1)
    return (present.astype(np.float32), known.astype(np.float32), lm_attr.astype(np.float32),
            lm_known.astype(np.float32))
