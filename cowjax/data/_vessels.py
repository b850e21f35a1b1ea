"""Tubes for the synthetic generator: smooth tortuous centerlines and their rendering on a voxel grid.

A tube is a dense polyline with a radius and a TOF signal at every point. Rendering is analytic:
each voxel's distance to the centerline, relative to the local radius, gives a soft partial-volume
edge. Long tubes are cut into short chunks, each rendered only inside its own bounding box, so the
cost scales with the vessel volume rather than the image volume.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import interpolate, special

STEP_MM = 0.6        # centerline sampling
_CHUNK = 10          # points per rendered chunk


@dataclasses.dataclass
class Tube:
    """A vessel (or an aneurysm) to render.

    points: [K, 3] world mm; radius, signal: [K] (mm, TOF brightness of the lumen).
    label: semantic class written to the segment map (0: a vessel that is not a cow19 segment);
    -1 marks a lumen that enters the vessel mask but never changes the segment labels (aneurysms).
    """
    points: np.ndarray
    radius: np.ndarray
    signal: np.ndarray
    label: int


def curve(control: np.ndarray, rng: np.random.Generator, wiggle: float,
          step: float = STEP_MM) -> np.ndarray:
    """A smooth curve through ``control`` [n, 3] (mm) with a random low-frequency wiggle.

    The wiggle is perpendicular to the chord and vanishes at both ends, so the curve still starts
    and ends exactly on the first and last control points (the landmarks). ``wiggle`` is the
    amplitude relative to the chord length. Returns [K, 3] points about ``step`` mm apart.
    """
    control = np.asarray(control, dtype=np.float64)
    seg = np.linalg.norm(np.diff(control, axis=0), axis=1)
    u = np.concatenate([[0.0], np.cumsum(seg)])
    length = float(u[-1])
    k = min(3, len(control) - 1)
    spline = interpolate.make_interp_spline(u, control, k=k, bc_type="natural" if k == 3 else None)
    # Oversample, then resample at equal arc length.
    fine = spline(np.linspace(0.0, length, max(8, int(length / step) * 4)))
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
    n = max(2, int(np.ceil(arc[-1] / step)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, fine[:, a]) for a in range(3)], axis=1)

    chord = control[-1] - control[0]
    chord = chord / max(np.linalg.norm(chord), 1e-9)
    t = s / max(s[-1], 1e-9)
    offset = np.zeros_like(pts)
    for harmonic in (1, 2, 3):
        direction = rng.normal(size=3)
        direction -= direction.dot(chord) * chord
        direction /= max(np.linalg.norm(direction), 1e-9)
        amp = wiggle * length * rng.uniform(0.3, 1.0) / harmonic
        offset += (amp * np.sin(np.pi * t) * np.sin(harmonic * np.pi * t + rng.uniform(0, np.pi)))[:, None] * direction
    return pts + offset


def arc_length(points: np.ndarray) -> np.ndarray:
    """[K, 3] -> [K] cumulative length along the polyline (mm)."""
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def _chunks(tube: Tube):
    n = len(tube.points)
    if n == 1:
        yield tube.points[[0, 0]], tube.radius[[0, 0]], tube.signal[[0, 0]]
        return
    for start in range(0, n - 1, _CHUNK - 1):
        sl = slice(start, min(start + _CHUNK, n))
        yield tube.points[sl], tube.radius[sl], tube.signal[sl]


def render(tubes: list[Tube], affine: np.ndarray, shape: tuple[int, int, int], edge_mm: float):
    """Render tubes on the grid ``affine`` [4, 4] (voxel -> world mm), ``shape`` (X, Y, Z).

    Returns (lumen [X,Y,Z] float32: brightest partial-volume-weighted signal, occupancy [X,Y,Z]
    float32 in [0, 1], vessels [X,Y,Z] bool, segments [X,Y,Z] uint8). A voxel belongs to a vessel
    when its centre lies within max(radius, half the largest voxel side) of the centerline, so thin
    vessels still own the voxels they cross; where tubes meet, the one whose surface is farthest
    outside the voxel (smallest distance - radius) labels it, and every labelled tube keeps at
    least the voxels on the middle of its centerline.
    """
    lumen = np.zeros(shape, np.float32)
    occupancy = np.zeros(shape, np.float32)
    best = np.full(shape, np.inf, np.float32)
    segments = np.zeros(shape, np.uint8)
    vessels = np.zeros(shape, bool)
    inv = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    half_voxel = 0.5 * float(spacing.max())
    corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    for tube in tubes:
        for pts, rad, sig in _chunks(tube):
            pad = float(rad.max()) + 3.0 * edge_mm + half_voxel
            lo, hi = pts.min(0) - pad, pts.max(0) + pad
            box = lo + corners * (hi - lo)
            ijk = box @ inv[:3, :3].T + inv[:3, 3]
            i0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
            i1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, shape)
            if np.any(i1 <= i0):
                continue
            grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(i0, i1)], indexing="ij"),
                            axis=-1).reshape(-1, 3)
            x = grid @ affine[:3, :3].T + affine[:3, 3]                       # [M, 3]
            a, ab = pts[:-1], np.diff(pts, axis=0)                            # [S, 3]
            ax = x[:, None, :] - a[None]                                      # [M, S, 3]
            t = np.clip(np.einsum("msc,sc->ms", ax, ab) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
            d2 = ((ax - t[..., None] * ab) ** 2).sum(-1)                      # [M, S]
            s = d2.argmin(1)
            rows = np.arange(len(x))
            d, ts = np.sqrt(d2[rows, s]), t[rows, s]
            r = rad[s] + ts * (rad[s + 1] - rad[s])
            g = sig[s] + ts * (sig[s + 1] - sig[s])
            occ = 0.5 * special.erfc((d - r) / (np.sqrt(2.0) * edge_mm))
            sub = tuple(slice(a, b) for a, b in zip(i0, i1))
            sub_shape = tuple(i1 - i0)
            occ = occ.reshape(sub_shape).astype(np.float32)
            lumen[sub] = np.maximum(lumen[sub], occ * g.reshape(sub_shape))
            occupancy[sub] = np.maximum(occupancy[sub], occ)
            inside = (d < np.maximum(r, half_voxel)).reshape(sub_shape)
            vessels[sub] |= inside
            if tube.label >= 0:
                score = (d - r).reshape(sub_shape).astype(np.float32)
                win = inside & (score < best[sub])
                best[sub] = np.where(win, score, best[sub])
                segments[sub] = np.where(win, np.uint8(tube.label), segments[sub])
    counts = np.bincount(segments.ravel(), minlength=256)
    for tube in tubes:
        if tube.label > 0 and counts[tube.label] == 0:
            # On a coarse grid a short thin segment (ACoA, C7) can lose every voxel to its wider
            # neighbours; it keeps the voxels nearest to the middle third of its centerline.
            n = len(tube.points)
            mid = tube.points[n // 3: max(n // 3 + 1, 2 * n // 3)]
            ijk = np.round(mid @ inv[:3, :3].T + inv[:3, 3]).astype(int)
            ijk = ijk[np.all((ijk >= 0) & (ijk < shape), axis=1)]
            segments[tuple(ijk.T)] = tube.label
            vessels[tuple(ijk.T)] = True
    return lumen, occupancy, vessels, segments
