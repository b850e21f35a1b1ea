"""Per-example crops and augmentation on the host (numpy), deterministic from a numpy Generator.

An example is cut from a preprocessed case (canonical grid, see ``preprocess.preprocess_case``)
around ``crop_centre``, moved by a random translation (the paper's augmentation), optionally rotated,
scaled and elastically deformed (one resampling call), cut to a smaller field of view,
intensity-jittered, noised and left-right flipped with the mirrored channels swapped. The keys are
those of a training batch (ARCHITECTURE.md) without the batch axis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cowjax import anatomy
from cowjax.data import preprocess


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix from small angles about x, y, z."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _finish(image, landmarks, segments, has_segments, pre, crop_shape) -> dict:
    """Assemble an example; landmark_mask = known and inside the crop, unknown coords set to 0."""
    crop_shape = np.asarray(crop_shape)
    known = np.all(np.isfinite(landmarks), axis=1)
    inside = known & np.all((landmarks >= 0) & (landmarks <= crop_shape - 1), axis=1)
    return {
        "image": image.astype(np.float32)[..., None],
        "landmarks": np.where(known[:, None], landmarks, 0.0).astype(np.float32),
        "landmark_mask": inside.astype(np.float32),
        "segments": segments.astype(np.int32),
        "segments_mask": np.float32(has_segments),
        "landmark_attr": pre["landmark_attr"].astype(np.float32),
        "landmark_attr_mask": pre["landmark_attr_mask"].astype(np.float32),
        "segment_attr": pre["segment_attr"].astype(np.float32),
        "segment_attr_mask": pre["segment_attr_mask"].astype(np.float32),
    }


def crop_example(pre: dict, centre_vox, crop_shape) -> tuple[dict, np.ndarray]:
    """An un-augmented example centred at ``centre_vox`` (grid voxels): (example, offset [3] int).

    crop voxel + offset = grid voxel.
    """
    image, offset = preprocess.crop(pre["image"], centre_vox, crop_shape)
    has_segments = pre["segments"] is not None
    segments = (preprocess.crop(pre["segments"], centre_vox, crop_shape)[0] if has_segments
                else np.zeros(tuple(crop_shape), np.uint8))
    return _finish(image, pre["landmarks"] - offset, segments, has_segments, pre,
                   crop_shape), offset


def flip_example(example: dict) -> dict:
    """Left-right flip: reverse the crop's x axis and swap the mirrored landmark/segment channels.

    An involution: flipping twice gives the example back.
    """
    x_len = example["image"].shape[0]
    mirror_lm, mirror_seg = anatomy.MIRROR_LANDMARKS, anatomy.MIRROR_SEGMENTS
    landmarks = example["landmarks"][mirror_lm].copy()
    # Every row is mirrored, masked ones too, so the flip stays an involution.
    landmarks[:, 0] = (x_len - 1) - landmarks[:, 0]
    return {
        **example,
        "image": example["image"][::-1].copy(),
        "segments": anatomy.MIRROR_CLASSES[example["segments"][::-1]].astype(np.int32),
        "landmarks": landmarks.astype(np.float32),
        "landmark_mask": example["landmark_mask"][mirror_lm],
        "landmark_attr": example["landmark_attr"][mirror_lm],
        "landmark_attr_mask": example["landmark_attr_mask"][mirror_lm],
        "segment_attr": example["segment_attr"][mirror_seg],
        "segment_attr_mask": example["segment_attr_mask"][mirror_seg],
    }


def crop_centre(pre: dict) -> np.ndarray:
    """Where training and validation crops are centred (grid voxel coords [3]): the centroid of the
    known landmarks, as the predictor centres its windows on the centroid of the predicted ones;
    the landmark-free FOV estimate for a case without landmarks."""
    known = np.all(np.isfinite(pre["landmarks"]), axis=-1)
    return pre["landmarks"][known].mean(axis=0) if known.any() else np.asarray(pre["fov_centre"])


class _ElasticField:
    """A smooth random displacement of crop voxels, in grid voxels.

    Independent normal displacements (``sd_mm`` per axis) at control points ``node_mm`` apart,
    interpolated by cubic splines; landmarks further apart than the node spacing move nearly
    independently, which the generator's one template cannot teach.
    """

    def __init__(self, rng: np.random.Generator, crop_shape: np.ndarray, spacing: np.ndarray,
                 sd_mm: float, node_mm: float):
        nodes = np.maximum(2, np.ceil((crop_shape - 1) * spacing / node_mm).astype(int) + 1)
        self.coarse = rng.normal(0.0, sd_mm, (3, *nodes)) / spacing[:, None, None, None]
        self.crop_shape = tuple(crop_shape)
        self.to_nodes = (nodes - 1) / np.maximum(crop_shape - 1, 1)
        self._coeffs = [ndimage.spline_filter(c, order=3, mode="mirror") for c in self.coarse]

    def at(self, points: np.ndarray) -> np.ndarray:
        """Displacement at crop voxel coords [N, 3] -> [N, 3]."""
        q = (points * self.to_nodes).T
        return np.stack([ndimage.map_coordinates(c, q, order=3, mode="mirror", prefilter=False)
                         for c in self._coeffs], -1)

    def dense(self) -> np.ndarray:
        """Displacement at every crop voxel [X, Y, Z, 3]: the same spline, which is a tensor
        product of 1-D ones, so three small matrices replace a 64-tap stencil per voxel."""
        weights = []
        for n, k, f in zip(self.crop_shape, self.coarse.shape[1:], self.to_nodes):
            x = [np.arange(n) * f]
            weights.append(np.stack([ndimage.map_coordinates(e, x, order=3, mode="mirror")
                                     for e in np.eye(k)], -1))       # [n, k]
        return np.einsum("ai,bj,ck,dijk->abcd", *weights, self.coarse, optimize=True)


def _warp(pre: dict, m: np.ndarray, offset: np.ndarray, crop_shape: np.ndarray, field) -> dict:
    """Resample ``pre`` at grid voxel g(c) = m c + offset (+ field(c)) for every crop voxel c."""
    has_segments = pre["segments"] is not None
    m_inv = np.linalg.inv(m)
    landmarks = (pre["landmarks"] - offset) @ m_inv.T
    if field is None:
        def resample(volume, order):
            return ndimage.affine_transform(volume, m, offset=offset, output_shape=tuple(crop_shape),
                                            order=order, mode="constant", cval=0, prefilter=False)
    else:
        crop = np.stack(np.meshgrid(*[np.arange(n) for n in crop_shape], indexing="ij"), -1)
        grid = np.moveaxis(crop @ m.T + offset + field.dense(), -1, 0)

        def resample(volume, order):
            return ndimage.map_coordinates(volume, grid, order=order, mode="constant", cval=0,
                                           prefilter=False)

        # Landmarks: solve m c + offset + field(c) = p by fixed-point iteration, which converges
        # while the field does not fold space (gradient below 1: at sd 2 mm, nodes 24 mm, < 0.8).
        known = np.all(np.isfinite(landmarks), axis=1)
        c, target = landmarks[known], pre["landmarks"][known] - offset
        for _ in range(50):
            c, previous = (target - field.at(c)) @ m_inv.T, c
            if np.abs(c - previous).max(initial=0.0) < 1e-2:
                break
        landmarks[known] = c
    image = resample(pre["image"], 1)
    segments = (resample(pre["segments"], 0) if has_segments
                else np.zeros(tuple(crop_shape), np.uint8))
    return _finish(image, landmarks, segments, has_segments, pre, crop_shape)


# The landmarks a field-of-view cut is centred on (a scan cropped to the circle centres on these).
CIRCLE_LANDMARKS = np.array([anatomy.LANDMARK_INDEX[n] for n in (
    "BA_top", "ICA_term_R", "ICA_term_L", "A1_A2_R", "A1_A2_L", "P1_P2_R", "P1_P2_L")])
# How far the cut box's centre strays from the circle's (mm, per axis).
FOV_CUT_SHIFT_MM = 8.0


def cut_fov(example: dict, rng: np.random.Generator, spacing: np.ndarray, sides_mm) -> dict:
    """The example with its image zero outside a random box: each side drawn from ``sides_mm``
    (lo, hi), centred within ``FOV_CUT_SHIFT_MM`` of the circle's known junctions (the crop's
    middle if none is known). Zero is what the predictor's windows hold beyond a scan's edge; the
    box is normalised again on its own (``preprocess.normalise_intensity``), as a cropped scan
    is; the targets stay, so the network learns where landmarks cut off by the edge lie."""
    shape = np.array(example["image"].shape[:3])
    circle = example["landmark_mask"][CIRCLE_LANDMARKS] > 0
    centre = (example["landmarks"][CIRCLE_LANDMARKS][circle].mean(axis=0) if circle.any()
              else (shape - 1) / 2)
    centre = centre + rng.uniform(-1, 1, 3) * FOV_CUT_SHIFT_MM / spacing
    half = rng.uniform(*sides_mm, size=3) / spacing / 2
    lo = np.clip(np.round(centre - half).astype(int), 0, shape)
    hi = np.clip(np.round(centre + half).astype(int) + 1, 0, shape)
    image = np.zeros_like(example["image"])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    image[box] = preprocess.normalise_intensity(example["image"][box])
    return {**example, "image": image}


def augment_example(pre: dict, rng: np.random.Generator, crop_shape, spacing, aug,
                    centre=None) -> dict:
    """A random training example from a preprocessed case.

    pre: ``preprocess_case`` output; rng: this example's Generator (seeded from (seed, epoch,
    index) by the pipeline); spacing: grid mm; aug: ``config.data.augment``; centre: where the
    crop is centred before the random translation (grid voxels [3]; default ``crop_centre``).
    """
    spacing = np.asarray(spacing, np.float64)
    crop_shape = np.asarray(crop_shape)
    centre = crop_centre(pre) if centre is None else np.asarray(centre, np.float64)
    centre = centre + rng.uniform(-1, 1, 3) * aug.translate_mm / spacing
    angles = np.deg2rad(aug.rotate_deg) * rng.uniform(-1, 1, 3)
    scale = 1.0 + aug.scale * rng.uniform(-1, 1)
    if aug.rotate_deg or aug.scale or aug.elastic_mm:
        # crop voxel c -> grid voxel g = centre + m (c - mid) (+ the elastic field), in mm.
        m = np.diag(1 / spacing) @ (_rotation(angles) * scale) @ np.diag(spacing)
        offset = centre - m @ ((crop_shape - 1) / 2)
        field = (_ElasticField(rng, crop_shape, spacing, aug.elastic_mm, aug.elastic_spacing_mm)
                 if aug.elastic_mm else None)
        example = _warp(pre, m, offset, crop_shape, field)
    else:
        example, _ = crop_example(pre, centre, crop_shape)
    share = aug.get("fov_cut", 0.0)
    if share and rng.uniform() < share:   # no draw when off: earlier runs' examples stay the same
        example = cut_fov(example, rng, spacing, aug.fov_cut_mm)
    if aug.intensity:
        gamma = np.exp(rng.normal(0.0, aug.intensity))
        contrast = np.exp(rng.normal(0.0, aug.intensity / 2))
        example["image"] = (contrast * np.maximum(example["image"], 0) ** gamma).astype(np.float32)
    if aug.noise:
        example["image"] = (example["image"]
                            + rng.normal(0.0, aug.noise, example["image"].shape)).astype(np.float32)
    if aug.flip and rng.uniform() < 0.5:
        example = flip_example(example)
    return example
