"""From a case on its own grid to arrays on the network's canonical grid, and back to world mm.

The canonical grid is RAS-aligned (+i = right, +j = anterior, +k = superior) at ``config.data.spacing``;
its affine ``diag(spacing) + origin`` is kept with every preprocessed case so predictions in grid voxels
map back to the original image's world coordinates exactly (resampling is world-exact: the value at a
grid voxel is the source image interpolated at that voxel's world position).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cowjax import anatomy
from cowjax.data import io
from cowjax.errors import CowjaxError

# Intensity normalisation: these percentiles of the image map to 0 and 1 (vessels are the brightest
# few percent of an MRA, so the upper one sits in the vessel range); values are clipped to [0, CLIP].
_LOW_PCT, _HIGH_PCT, _CLIP = 1.0, 99.9, 3.0


def voxel_to_world(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """[..., 3] voxel coordinates -> [..., 3] world mm (NaN stays NaN)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """[..., 3] world mm -> [..., 3] voxel coordinates of the grid with this affine."""
    points = np.asarray(points, dtype=np.float64)
    inv = np.linalg.inv(affine)
    return points @ inv[:3, :3].T + inv[:3, 3]


def canonical_grid(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS-aligned grid at ``spacing`` (mm) covering every voxel centre of the image.

    Returns (grid_affine [4, 4] = diag(spacing) + origin, grid_shape (X, Y, Z)).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = voxel_to_world(corners, affine)
    lo, hi = world.min(0), world.max(0)
    grid_shape = tuple(int(n) for n in np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1)
    grid_affine = np.diag(np.append(spacing, 1.0))
    grid_affine[:3, 3] = lo
    return grid_affine, grid_shape


def finest_canonical_grid(affine: np.ndarray, shape) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``canonical_grid`` isotropic at the image's finest voxel size: where figures draw it."""
    spacing = float(np.min(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    return canonical_grid(affine, shape, (spacing,) * 3)


def resample(data: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape,
             order: int) -> np.ndarray:
    """Sample ``data`` (on ``affine``) at every voxel of the target grid; 0 outside the image.

    order 1: trilinear (images), order 0: nearest (labels, dtype kept). The target voxel -> source
    voxel map is affine, so scipy's ``affine_transform`` (map_coordinates with the coordinates
    generated on the fly, no [3, X, Y, Z] array) does it in one call.
    """
    src_from_grid = np.linalg.inv(affine) @ grid_affine
    out = ndimage.affine_transform(data, src_from_grid[:3, :3], offset=src_from_grid[:3, 3],
                                   output_shape=tuple(grid_shape), order=order, mode="constant",
                                   cval=0.0, prefilter=False)
    return out.astype(data.dtype, copy=False)


def normalise_intensity(image: np.ndarray) -> np.ndarray:
    """Robust [0, 1]-ish intensities: the 1st / 99.9th percentiles map to 0 / 1, clipped to [0, 3].

    Computed on the image's own grid before resampling (so padding does not shift the percentiles),
    identically at training and inference. Returns float32 of the same shape.
    """
    image = np.asarray(image, dtype=np.float32)
    # A strided subsample keeps the percentiles cheap on large volumes without changing them much.
    step = max(1, round((image.size / 4e6) ** (1 / 3)))
    lo, hi = np.percentile(image[::step, ::step, ::step], [_LOW_PCT, _HIGH_PCT])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, _CLIP).astype(np.float32)


def _tubularity(image: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Frangi-like bright-tube response in [0, 1] from the Hessian eigenvalues sorted by magnitude
    (l1, l2, l3), zero unless l2 and l3 are negative. A tube has two strong negative curvatures; a
    plate (fat, skin) has one and a blob three, so both are suppressed."""
    h = np.empty(image.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            h[..., i, j] = h[..., j, i] = ndimage.gaussian_filter(image, sigma_vox, order=order,
                                                                 mode="nearest")
    eig = np.linalg.eigvalsh(h)
    l1, l2, l3 = np.moveaxis(np.take_along_axis(eig, np.argsort(np.abs(eig), -1), -1), -1, 0)
    # Frangi's ratios make it insensitive to brightness: plate-vs-line |l2|/|l3|, blob-vs-line
    # |l1|/sqrt|l2 l3|, and a structure term against noise.
    plate = np.abs(l2) / np.maximum(np.abs(l3), 1e-12)
    blob = np.abs(l1) / np.sqrt(np.maximum(np.abs(l2 * l3), 1e-24))
    strength = np.sqrt(l1 ** 2 + l2 ** 2 + l3 ** 2)
    c = 0.5 * np.percentile(strength, 99.9) + 1e-12
    out = ((1 - np.exp(-2 * plate ** 2)) * np.exp(-2 * blob ** 2) * (1 - np.exp(-0.5 * (strength / c) ** 2)))
    out = np.where((l2 < 0) & (l3 < 0), out, 0.0)
    # Filter edge effects at the border of the field of view are not vessels.
    edge = np.ceil(2 * np.asarray(sigma_vox) * np.ones(3)).astype(int)
    inner = np.zeros_like(out)
    inner[edge[0]:-edge[0], edge[1]:-edge[1], edge[2]:-edge[2]] = 1
    return out * inner


def estimate_fov_centre(image: np.ndarray, affine: np.ndarray, radius_mm: float = 40.0) -> np.ndarray:
    """A landmark-free estimate of the Circle of Willis centre: [3] world RAS mm.

    Vessel-like voxels are the 2 % most tubular (``_tubularity`` at a ~1.2 mm scale, so bright
    plates and large bright blobs do not count). The centre is the densest cluster of them: the mode
    of their ``radius_mm``-smoothed count, refined by mean-shift steps, so isolated tubes elsewhere
    do not pull it. Works on every k-th voxel, a subsample of at most 2.5 mm voxels: plenty for a
    first guess (the predictor's ``locate`` searches from it), and cheap (well under a second).
    """
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    stride = np.maximum(1, np.floor(2.5 / zooms)).astype(int)
    small = np.asarray(image, dtype=np.float32)[::stride[0], ::stride[1], ::stride[2]]
    vox = zooms * stride
    tube = _tubularity(small, 1.2 / vox).ravel()
    k = max(10, tube.size // 50)
    idx = np.argpartition(tube, -k)[-k:]
    idx = idx[tube[idx] > 0]
    if idx.size == 0:  # nothing tubular: the middle of the field of view
        return voxel_to_world((np.array(image.shape) - 1) / 2, affine)
    count = np.zeros(tube.size, np.float32)
    count[idx] = 1.0
    density = ndimage.gaussian_filter(count.reshape(small.shape), radius_mm / vox)
    points = voxel_to_world(np.stack(np.unravel_index(idx, small.shape), -1) * stride, affine)
    centre = voxel_to_world(np.array(np.unravel_index(np.argmax(density), small.shape)) * stride,
                            affine)
    for _ in range(10):
        w = np.exp(-0.5 * np.sum((points - centre) ** 2, -1) / radius_mm ** 2)
        centre = (w[:, None] * points).sum(0) / w.sum()
    return centre


def crop(image: np.ndarray, centre_vox, crop_shape) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``crop_shape`` voxels centred at ``centre_vox`` (rounded), zero outside the image.

    Returns (crop [*crop_shape] same dtype, offset [3] int: crop voxel + offset = image voxel).
    """
    crop_shape = np.asarray(crop_shape, dtype=int)
    offset = np.round(np.asarray(centre_vox, dtype=np.float64) - (crop_shape - 1) / 2).astype(int)
    out = np.zeros(tuple(crop_shape), dtype=image.dtype)
    src_lo = np.clip(offset, 0, image.shape)
    src_hi = np.clip(offset + crop_shape, 0, image.shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - offset
        dst_hi = dst_lo + (src_hi - src_lo)
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = \
            image[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out, offset


def grow_labels(labels: np.ndarray, affine: np.ndarray, radius_mm: float) -> np.ndarray:
    """Labels [X, Y, Z] with every background voxel within ``radius_mm`` of a labelled one given
    that voxel's class (the nearest, by the Euclidean distance transform in mm); 0: unchanged.

    The training target of a network whose grid is coarse next to the arteries
    (``config.data.segment_growth_mm``): nearest-neighbour resampling of the labels to a 2 mm grid
    keeps a handful of voxels of a 1 mm-radius segment, or none; grown by a grid voxel first, each
    segment is a tube the coarse network can learn ("which segment runs here"), and the lumen is
    taken from the image at inference (``inference/segment.py``).
    """
    if radius_mm <= 0 or not labels.any():
        return labels
    zooms = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    distance, nearest = ndimage.distance_transform_edt(labels == 0, sampling=zooms,
                                                       return_indices=True)
    grown = labels[tuple(nearest)]
    return np.where(distance <= radius_mm, grown, 0).astype(labels.dtype)


def _attribute_arrays(attributes: dict | None):
    """On-disk attributes -> (segment_attr [20], segment_mask [20], landmark_attr [19], landmark_mask [19])."""
    seg, seg_mask = np.zeros(anatomy.NUM_SEGMENTS, np.float32), np.zeros(anatomy.NUM_SEGMENTS, np.float32)
    lm, lm_mask = np.zeros(anatomy.NUM_LANDMARKS, np.float32), np.zeros(anatomy.NUM_LANDMARKS, np.float32)
    for name, value in (attributes or {}).get("segments", {}).items():
        seg[anatomy.SEGMENT_INDEX[name]], seg_mask[anatomy.SEGMENT_INDEX[name]] = value, 1.0
    for name, value in (attributes or {}).get("landmarks", {}).items():
        lm[anatomy.LANDMARK_INDEX[name]], lm_mask[anatomy.LANDMARK_INDEX[name]] = value, 1.0
    return seg, seg_mask, lm, lm_mask


def network_grid(affine: np.ndarray, shape, spacing, to_template: np.ndarray | None = None
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid the network sees: RAS-aligned in the image's world (``to_template`` None), or
    RAS-aligned in template space (``to_template``: the [4, 4] image world -> template world map of
    a rigid registration, the paper's preprocessing). Either way its affine maps to the image's own
    world coordinates, so everything downstream (landmarks, predictions) stays in the original
    image's world frame."""
    if to_template is None:
        return canonical_grid(affine, shape, spacing)
    to_t = np.asarray(to_template, np.float64)
    grid_t, grid_shape = canonical_grid(to_t @ affine, shape, spacing)
    return np.linalg.inv(to_t) @ grid_t, grid_shape


def preprocess_image(image: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape,
                     fov: bool = True) -> dict:
    """An image on its own grid -> the network's input on ``(grid_affine, grid_shape)``
    (``network_grid``), the same at training and inference.

    Keys: ``image [X, Y, Z] float32`` (normalised on the image's own grid, then resampled),
    ``affine [4, 4]`` (= grid_affine, grid voxel -> world RAS), ``fov_centre [3]`` (grid voxel
    coords of ``estimate_fov_centre``; NaN with ``fov=False``, which skips it).
    """
    resampled = resample(normalise_intensity(image), affine, grid_affine, grid_shape, order=1)
    centre = (world_to_voxel(estimate_fov_centre(image, affine), grid_affine) if fov
              else np.full(3, np.nan))
    return {"image": resampled.astype(np.float32), "affine": grid_affine, "fov_centre": centre}


def preprocess_case(case: io.Case, config, fov: bool = True, to_template=None) -> dict:
    """A training or evaluation case -> arrays on the network grid at ``config.data.spacing``.

    With ``config.data.registration`` other than "none", the caller injects the registration:
    ``to_template`` (``(image [X, Y, Z], affine [4, 4]) -> [4, 4]`` case world -> template world,
    e.g. ``registration.intensity.template_registration(config.data)``) makes the grid RAS-aligned
    in template space (``network_grid``); the data package itself runs none.

    Keys: those of ``preprocess_image`` (``fov`` passed on), and ``landmarks [19, 3]`` (grid voxel coords, NaN
    unknown), ``segments [X, Y, Z] uint8`` or None (given, else derived from a vessel mask and the
    landmarks), ``segment_attr/segment_attr_mask [20]``, ``landmark_attr/landmark_attr_mask [19]``
    float32 (given, else derived from the segments).
    """
    from cowjax.data import labels  # scipy.sparse graph search, only for unlabelled cases

    kind = config.data.get("registration", "none")
    if (kind == "none") != (to_template is None):
        raise CowjaxError(f"config.data.registration is {kind!r} but preprocess_case was given "
                          f"{'a' if to_template is not None else 'no'} to_template function")
    matrix = None if to_template is None else to_template(case.image, case.affine)
    grid_affine, grid_shape = network_grid(case.affine, case.image.shape, config.data.spacing, matrix)
    out = preprocess_image(case.image, case.affine, grid_affine, grid_shape, fov)
    # Labels are derived and measured on the case's own (finer) grid, then resampled.
    classes = case.segments
    if classes is None and case.vessels is not None:
        classes = labels.derive_segments(np.asarray(case.vessels) > 0, case.affine, case.landmarks)
    seg_attr, seg_mask, lm_attr, lm_mask = _attribute_arrays(case.attributes)
    segments = None
    if classes is not None:
        grown = grow_labels(np.asarray(classes, np.uint8), case.affine,
                            float(config.data.get("segment_growth_mm", 0.0)))
        segments = resample(grown, case.affine, grid_affine, grid_shape, order=0)
        if seg_mask.sum() < anatomy.NUM_SEGMENTS:
            d_seg, d_seg_mask, d_lm, d_lm_mask = labels.derive_attributes(classes, case.affine,
                                                                           case.landmarks)
            # Keep what the case states; fill only what it leaves out.
            seg_attr = np.where(seg_mask > 0, seg_attr, d_seg)
            lm_attr = np.where(lm_mask > 0, lm_attr, d_lm)
            seg_mask, lm_mask = np.maximum(seg_mask, d_seg_mask), np.maximum(lm_mask, d_lm_mask)
    return {
        **out,
        "landmarks": world_to_voxel(case.landmarks, grid_affine),
        "segments": segments,
        "segment_attr": seg_attr.astype(np.float32),
        "segment_attr_mask": seg_mask.astype(np.float32),
        "landmark_attr": lm_attr.astype(np.float32),
        "landmark_attr_mask": lm_mask.astype(np.float32),
    }
