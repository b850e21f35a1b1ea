"""Landmark-based registration: closed-form least-squares rigid and similarity transforms.

Two landmark sets of the same anatomy (``[N, 3]`` world RAS mm, a NaN row where a landmark is
unknown) determine the transform that maps the moving subject onto the fixed one. Only landmarks
known on both sides are used, optionally weighted (e.g. by the detector's confidence). The fit is
Umeyama's (1991) weighted Kabsch solution with the reflection fix, so the result is always a proper
rotation (det +1), never a mirror.

All transforms are ``[4, 4]`` homogeneous matrices mapping moving world -> fixed world.
"""

from __future__ import annotations

import numpy as np

from cowjax.errors import CowjaxError

KINDS = ("rigid", "similarity")
MIN_POINTS = 3
# Second singular value of the centred points relative to the first below this: collinear.
_COLLINEAR_TOL = 1e-6


def common_mask(fixed: np.ndarray, moving: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: landmarks known (finite) on both sides and with a positive, finite weight."""
    fixed, moving = _points(fixed, "fixed"), _points(moving, "moving")
    if fixed.shape != moving.shape:
        raise CowjaxError(f"landmark sets differ in shape: fixed {fixed.shape}, moving {moving.shape}")
    mask = np.isfinite(fixed).all(axis=1) & np.isfinite(moving).all(axis=1)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(fixed),):
            raise CowjaxError(f"weights have shape {weights.shape}, expected ({len(fixed)},)")
        mask &= np.isfinite(weights) & (weights > 0)
    return mask


def fit_transform(fixed: np.ndarray, moving: np.ndarray, kind: str = "rigid",
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares transform mapping ``moving`` onto ``fixed``.

    fixed, moving: [N, 3] world mm; rows with a NaN on either side are dropped.
    kind: "rigid" (rotation + translation) or "similarity" (plus one isotropic scale).
    weights: [N] >= 0 or None; a zero or NaN weight drops the landmark.
    Returns: [4, 4] float64, moving world -> fixed world, minimising sum_i w_i |T(m_i) - f_i|^2.
    Raises CowjaxError for fewer than 3 common landmarks or collinear ones.
    """
    if kind not in KINDS:
        raise CowjaxError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    mask = common_mask(fixed, moving, weights)
    n = int(mask.sum())
    if n < MIN_POINTS:
        raise CowjaxError(f"{kind} registration needs at least {MIN_POINTS} landmarks known in "
                          f"both images, got {n}")
    f, m = np.asarray(fixed, np.float64)[mask], np.asarray(moving, np.float64)[mask]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)[mask]
    w = w / w.sum()
    mu_f, mu_m = w @ f, w @ m
    fc, mc = f - mu_f, m - mu_m
    for name, pts in (("fixed", fc), ("moving", mc)):
        s = np.linalg.svd(np.sqrt(w)[:, None] * pts, compute_uv=False)
        if s[0] == 0 or s[1] < _COLLINEAR_TOL * s[0]:
            raise CowjaxError(f"the {n} landmarks common to both images are collinear in the "
                              f"{name} image: the rotation about their line is undetermined")
    cov = (w[:, None] * fc).T @ mc                   # [3, 3] cross-covariance, fixed x moving
    u, s, vt = np.linalg.svd(cov)
    # Reflection fix: flip the weakest axis if the best orthogonal matrix is a mirror.
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0
    rotation = (u * d) @ vt
    scale = 1.0
    if kind == "similarity":
        scale = float((s * d).sum() / (w @ (mc ** 2).sum(axis=1)))
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = mu_f - scale * rotation @ mu_m
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[..., 3] points -> [..., 3] through a [4, 4] transform (NaN rows stay NaN)."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def residuals(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[N] distance |T(moving_i) - fixed_i| in mm; NaN where either side is unknown."""
    return np.linalg.norm(apply_transform(matrix, moving) - np.asarray(fixed, np.float64), axis=-1)


def leave_one_out_tre(fixed: np.ndarray, moving: np.ndarray, kind: str = "rigid",
                      weights: np.ndarray | None = None) -> np.ndarray:
    """[N] target registration error by leave-one-out over the landmarks.

    For each common landmark i, the transform is fitted to the others and TRE_i is the distance
    between its mapped moving position and its fixed position: an honest estimate of the error at
    a point the fit has not seen. NaN where the landmark is not common or the remaining landmarks
    are too few or collinear.
    """
    mask = common_mask(fixed, moving, weights)
    tre = np.full(len(mask), np.nan)
    base = np.ones(len(mask)) if weights is None else np.asarray(weights, np.float64)
    for i in np.flatnonzero(mask):
        w = np.where(np.arange(len(mask)) == i, 0.0, base)
        try:
            matrix = fit_transform(fixed, moving, kind, w)
        except CowjaxError:
            continue
        tre[i] = residuals(fixed[i:i + 1], moving[i:i + 1], matrix)[0]
    return tre


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Rotation angle in degrees of the linear part of a rigid [4, 4] (or [3, 3]) transform."""
    r = np.asarray(matrix)[:3, :3]
    r = r / np.cbrt(np.linalg.det(r))                 # drop a similarity's scale
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def _points(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise CowjaxError(f"{name} landmarks must have shape [N, 3], got {x.shape}")
    return x
