"""The TOF-MRA image of a synthetic subject: pose, voxel grid, appearance, storage orientation.

A subject (sampled by ``subject``, its arteries built by ``vessels``) is rotated and shifted into
world RAS mm and covered by a (sometimes oblique) grid; tissue, veins and arteries are painted on
it, then come the acquisition (blur, slab profile, bias field, Rician noise, arbitrary scale) and a
random storage orientation (the affine is the truth).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from cowjax.data.synthetic import vessels


def rotation(angles_deg) -> np.ndarray:
    """[3] angles about x, y, z (degrees) -> [3, 3] rotation."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid(rng: np.random.Generator, world_points: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """A (sometimes oblique) voxel grid covering ``world_points`` [N, 3] with a random margin."""
    rot = rotation(rng.uniform(-12, 12, 3)) if rng.uniform() < 0.3 else np.eye(3)
    q = world_points @ rot                                          # grid-frame coordinates
    # Mostly a tight slab around the circle, sometimes a much wider field of view.
    lo_mm, hi_mm = ([8, 8, 6], [25, 25, 18]) if rng.uniform() < 0.8 else ([15, 15, 10], [40, 40, 30])
    margin_lo, margin_hi = rng.uniform(lo_mm, hi_mm), rng.uniform(lo_mm, hi_mm)
    lo, hi = q.min(0) - margin_lo, q.max(0) + margin_hi
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1)
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = rot @ lo
    return affine, shape


class Canvas:
    """Paints shapes given in the subject frame onto the voxel grid, each inside its bounding box."""

    def __init__(self, affine: np.ndarray, shape: tuple, rot: np.ndarray, shift: np.ndarray):
        # subject = m @ ijk + c
        self.m = rot.T @ affine[:3, :3]
        self.c = rot.T @ (affine[:3, 3] - shift)
        self.minv = np.linalg.inv(self.m)
        self.shape = shape

    def coords(self, sub: tuple[slice, ...]) -> list[np.ndarray]:
        """Subject-frame x, y, z (float32) of the voxels in ``sub``."""
        idx = [np.arange(s.start, s.stop, dtype=np.float32) for s in sub]
        out = []
        for a in range(3):
            acc = np.float32(self.c[a])
            for b in range(3):
                shp = [1, 1, 1]
                shp[b] = -1
                acc = acc + (np.float32(self.m[a, b]) * idx[b]).reshape(shp)
            out.append(acc)
        return out

    def box(self, lo, hi) -> tuple[slice, ...] | None:
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
        ijk = (corners - self.c) @ self.minv.T
        i0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
        i1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, self.shape)
        return None if np.any(i1 <= i0) else tuple(slice(a, b) for a, b in zip(i0, i1))

    def ellipsoid(self, centre, axes, edge_mm: float = 0.8, full: bool = False):
        """(sub, soft mask in [0, 1]) of an axis-aligned ellipsoid, or None when out of view."""
        centre, axes = np.asarray(centre, float), np.asarray(axes, float)
        sub = (tuple(slice(0, n) for n in self.shape) if full
               else self.box(centre - axes - 3 * edge_mm, centre + axes + 3 * edge_mm))
        if sub is None:
            return None
        x = self.coords(sub)
        rr = np.sqrt(sum(((x[a] - np.float32(centre[a])) / np.float32(axes[a])) ** 2 for a in range(3)))
        return sub, special.expit((1.0 - rr) * np.float32(axes.min() / edge_mm))


def _noise(rng: np.random.Generator, shape: tuple, cell_vox) -> np.ndarray:
    """Smooth random field, about unit variance, correlated over ``cell_vox`` voxels per axis."""
    coarse = np.maximum(2, np.ceil(np.array(shape) / np.asarray(cell_vox)).astype(int) + 1)
    field = rng.normal(size=tuple(coarse)).astype(np.float32)
    # Separable linear interpolation as three small matrix products (much faster than ndimage.zoom).
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        pos = np.linspace(0, c - 1, n)
        left = np.minimum(np.floor(pos).astype(int), c - 2)
        w = (pos - left).astype(np.float32)
        interp = np.zeros((n, c), np.float32)
        interp[np.arange(n), left] = 1 - w
        interp[np.arange(n), left + 1] = w
        field = np.moveaxis(np.tensordot(interp, field, axes=([1], [axis])), 0, axis)
    return field / max(float(field.std()), 1e-6)


def _paint(img, canvas, centre, axes, value, edge_mm=0.8, full=False, multiply=False):
    hit = canvas.ellipsoid(centre, axes, edge_mm, full)
    if hit is None:
        return
    sub, m = hit
    v = value[sub] if isinstance(value, np.ndarray) else np.float32(value)
    img[sub] = img[sub] * (1 + (v - 1) * m) if multiply else img[sub] * (1 - m) + v * m


def background(rng: np.random.Generator, canvas: Canvas, spacing, lm: dict[str, np.ndarray]) -> np.ndarray:
    """Noise-free tissue: textured brain, dark CSF cisterns, skull, bright scalp fat and marrow."""
    shape = canvas.shape
    spacing = np.asarray(spacing)
    img = np.full(shape, rng.uniform(0.0, 0.02), np.float32)
    wm = rng.uniform(0.08, 0.22)
    gm = wm * rng.uniform(0.7, 1.25)
    folds = special.expit(3.0 * _noise(rng, shape, rng.uniform(3, 7) / spacing))
    tissue = (wm + (gm - wm) * folds) * (1 + rng.uniform(0.03, 0.12) * _noise(rng, shape, 1.5 / spacing))
    tissue *= 1 + rng.uniform(0.05, 0.2) * _noise(rng, shape, 20.0 / spacing)
    csf, fat = rng.uniform(0.01, 0.07), rng.uniform(0.25, 0.6)

    centre = np.array([0.0, -12.0, 15.0]) + rng.normal(0, 3, 3)
    axes = np.array([66.0, 86.0, 62.0]) * rng.uniform(0.92, 1.08)
    skull, scalp = rng.uniform(5, 9), rng.uniform(3, 7)
    _paint(img, canvas, centre, axes + skull + scalp, fat, 1.0, full=True)
    _paint(img, canvas, centre, axes + skull, rng.uniform(0.005, 0.05), 1.0, full=True)
    _paint(img, canvas, centre, axes, tissue, 1.5, full=True)

    def maybe(p):
        return rng.uniform() < p

    _paint(img, canvas, (0, -22, -22) + rng.normal(0, 2, 3), (13, 13, 20), rng.uniform(0.8, 1.25), 2.0,
           multiply=True)                                                          # brainstem tone
    for side in (1, -1):                                                           # cisterns, fissures
        _paint(img, canvas, (side * 30, 14, 4) + rng.normal(0, 2, 3), (14, 4, 7) * rng.uniform(0.6, 1.3, 3),
               csf, 1.5)
        _paint(img, canvas, (side * 12, -5, 22) + rng.normal(0, 2, 3), (6, 22, 8) * rng.uniform(0.5, 1.3, 3),
               csf, 1.5)
    ba = lm["BA_top"]
    _paint(img, canvas, ba + (0, 8, -3) + rng.normal(0, 1.5, 3), (15, 12, 6) * rng.uniform(0.6, 1.2, 3), csf, 2.0)
    _paint(img, canvas, ba + (0, -4, -18), (9, 5, 15) * rng.uniform(0.6, 1.2, 3), csf, 1.5)
    _paint(img, canvas, (0, 30, 25), (rng.uniform(0.8, 2.0), 35, 30), csf, 0.8)
    _paint(img, canvas, (0, -6, 6), (2, 10, 7) * rng.uniform(0.6, 1.3, 3), csf, 1.0)
    if maybe(0.9):                                                                 # sphenoid sinus (air)
        _paint(img, canvas, (0, 20, -25) + rng.normal(0, 2, 3), (12, 10, 9) * rng.uniform(0.7, 1.2, 3),
               rng.uniform(0.0, 0.02), 1.5)
    if maybe(0.85):                                                                # clivus marrow fat
        _paint(img, canvas, (0, 3, -32) + rng.normal(0, 2, 3), (7, 5, 13) * rng.uniform(0.7, 1.2, 3),
               rng.uniform(0.2, 0.5), 1.5)
    for side in (1, -1):
        if maybe(0.9):                                                             # orbital fat
            _paint(img, canvas, (side * 30, 58, -15) + rng.normal(0, 3, 3), (12, 16, 10), rng.uniform(0.25, 0.6))
        if maybe(0.6):                                                             # cavernous sinus
            _paint(img, canvas, lm[f"ICA_prox_{'R' if side > 0 else 'L'}"] + (0, -3, -6), (5, 8, 5),
                   rng.uniform(0.15, 0.5), 1.5)
        if maybe(0.4):                                                             # petrous apex marrow
            _paint(img, canvas, (side * 25, -10, -30) + rng.normal(0, 3, 3), (8, 6, 5), rng.uniform(0.2, 0.5))
    # A few bright blobs anywhere away from the landmarks (subacute blood, fat, flow artefacts).
    pts = np.stack(list(lm.values()))
    for _ in range(rng.integers(0, 4)):
        c = pts.mean(0) + rng.uniform(-45, 45, 3) * (1, 0.8, 0.6)
        if np.min(np.linalg.norm(pts - c, axis=1)) > 10:
            _paint(img, canvas, c, rng.uniform(2, 7, 3), rng.uniform(0.2, 0.6), 1.0)
    return img


def veins(rng: np.random.Generator, to_world) -> list[vessels.Tube]:
    """Dural sinuses and deep veins: tubes that TOF shows with variable (often partial) brightness."""
    level = rng.uniform(0.05, 0.5)
    paths = [([(0, -28, 26), (0, -45, 18), (0, -62, 8)], (2.5, 3.5)),                      # straight sinus
             ([(0, 55, 45), (0, 20, 70), (0, -30, 72), (0, -70, 35), (0, -72, 5)], (3.5, 5)),  # sagittal
             ([(0, -28, 12), (0, -29, 20), (0, -28, 26)], (1.5, 2.5))]                       # Galen
    for sx in (1, -1):
        paths.append(([(sx * 3, -70, 5), (sx * 30, -72, -2), (sx * 45, -55, -12), (sx * 44, -40, -28),
                       (sx * 40, -32, -45)], (3, 4.5)))                                     # transverse/sigmoid
        paths.append(([(sx * 12, 8, -6), (sx * 15, -4, -2), (sx * 12, -18, 6), (sx * 3, -28, 12)],
                      (0.7, 1.3)))                                                          # basal vein
    tubes = []
    for control, (r_lo, r_hi) in paths:
        if rng.uniform() < 0.2:
            continue
        pts = vessels.curve(np.asarray(control, float) + rng.normal(0, 2, (len(control), 3)), rng, 0.02)
        r = np.full(len(pts), rng.uniform(r_lo, r_hi))
        tubes.append(vessels.Tube(to_world(pts), r, np.full(len(pts), level * rng.uniform(0.6, 1.3)), -1))
    return tubes


def arterial_signal(rng: np.random.Generator, v: dict, saturation_mm: float) -> np.ndarray:
    """TOF brightness: inflow signal fading with path length (saturation), dimmer in slow small
    vessels, with a gentle random modulation along the vessel (flow inhomogeneity)."""
    fresh = np.exp(-v["arc"] / saturation_mm)
    wobble = 1.0 + 0.08 * np.sin(v["arc"] / rng.uniform(3.0, 12.0) + rng.uniform(0, 2 * np.pi))
    return v["gain"] * fresh * wobble * (0.6 + 0.4 * np.clip(v["radius"] / 1.2, 0.0, 1.0))


def acquire(rng: np.random.Generator, img: np.ndarray, affine: np.ndarray, spacing) -> np.ndarray:
    """Blur (PSF), slab profile, bias field, Rician noise, arbitrary scale and offset."""
    spacing = np.asarray(spacing, float)
    sharp = rng.uniform() < 0.75                                    # else a blurrier, low-res look
    psf_mm = rng.uniform([0.15, 0.15, 0.2], [0.55, 0.55, 0.7] if sharp else [0.9, 0.9, 1.2])
    img = ndimage.gaussian_filter(img, psf_mm / spacing, truncate=3.0)
    shape = img.shape
    # Normalised coordinates in [-1, 1] per axis, broadcastable.
    u = [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == b else 1 for b in range(3)])
         for a, n in enumerate(shape)]
    log_bias = sum(np.float32(rng.normal(0, 0.12)) * u[a] for a in range(3))
    log_bias = log_bias + sum(np.float32(rng.normal(0, 0.08)) * u[a] * u[b] for a in range(3) for b in range(a, 3))
    img = img * np.exp(log_bias * np.float32(rng.uniform(0.5, 2.5)))
    if rng.uniform() < 0.5:
        # Multi-slab TOF: signal dips at the slab boundaries along the world z axis.
        z = sum(np.float32(affine[2, a]) * np.arange(n, dtype=np.float32).reshape(
            [-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(shape))
        phase = (z - np.float32(rng.uniform(0, 40))) / np.float32(rng.uniform(18, 35))
        dip = np.cos(np.float32(np.pi) * phase) ** 2
        dip = (dip * dip) ** 2                                      # cos^8 (integer powers are slow)
        img = img * (1 - np.float32(rng.uniform(0.05, 0.25)) * dip)
    img = np.maximum(img, 0) ** np.float32(rng.uniform(0.8, 1.25))
    sigma = np.float32(rng.uniform(0.008, 0.045))
    noise = rng.standard_normal((2,) + shape, dtype=np.float32) * sigma
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    integer = rng.uniform() < 0.5                                   # integer scanner output
    scale = np.exp(rng.uniform(np.log(300.0 if integer else 0.5), np.log(4000.0)))
    img = img * np.float32(scale) + np.float32(rng.uniform(-0.02, 0.1) * scale)
    if integer:
        img = np.clip(np.round(img), -32768, 32767)
    return img.astype(np.float32)


def orientation_codes(rng: np.random.Generator) -> tuple[str, str, str]:
    u = rng.uniform()
    if u < 0.3:
        return ("R", "A", "S")
    if u < 0.6:
        return ("L", "P", "S")
    pairs = [("R", "L"), ("A", "P"), ("S", "I")]
    return tuple(pairs[a][rng.integers(2)] for a in rng.permutation(3))


def reorient(arrays: list[np.ndarray], affine: np.ndarray, codes) -> tuple[list[np.ndarray], np.ndarray]:
    """Permute/flip voxel arrays to axis codes (e.g. ("L","P","S")), adjusting the affine [4, 4].

    Exact (no resampling): every voxel keeps its world position.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(tuple(codes)))
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, arrays[0].shape)
    return [np.ascontiguousarray(nib.orientations.apply_orientation(a, transform)) for a in arrays], new_affine

