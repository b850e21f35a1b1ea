"""Per-example crops and augmentation on the host (numpy), deterministic from a numpy Generator.

An example is cut from a preprocessed case (canonical grid, see ``preprocess.preprocess_case``) around
its landmark-free FOV centre, moved by a random translation (the paper's augmentation), optionally
rotated / scaled (one resampling call), intensity-jittered, noised and left-right flipped with the
mirrored channels swapped. The keys are those of a training batch (ARCHITECTURE.md) without the batch
axis.
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


def crop_example(pre: dict, center_vox, crop_shape) -> tuple[dict, np.ndarray]:
    """An un-augmented example centred at ``center_vox`` (grid voxels): (example, offset [3] int).

    crop voxel + offset = grid voxel.
    """
    image, offset = preprocess.crop(pre["image"], center_vox, crop_shape)
    has_segments = pre["segments"] is not None
    segments = (preprocess.crop(pre["segments"], center_vox, crop_shape)[0] if has_segments
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


def crop_center(pre: dict) -> np.ndarray:
    """Where training and validation crops are centred (grid voxel coords [3]): the centroid of the
    known landmarks, as the predictor centres its windows on the centroid of the predicted ones;
    the landmark-free FOV estimate for a case without landmarks."""
    known = np.all(np.isfinite(pre["landmarks"]), axis=-1)
    return pre["landmarks"][known].mean(axis=0) if known.any() else np.asarray(pre["fov_center"])


def augment_example(pre: dict, rng: np.random.Generator, crop_shape, spacing, aug,
                    center=None) -> dict:
    """A random training example from a preprocessed case.

    pre: ``preprocess_case`` output; rng: this example's Generator (seeded from (seed, epoch,
    index) by the pipeline); spacing: grid mm; aug: ``config.data.augment``; center: where the
    crop is centred before the random translation (grid voxels [3]; default ``crop_center``).
    """
    spacing = np.asarray(spacing, np.float64)
    crop_shape = np.asarray(crop_shape)
    center = crop_center(pre) if center is None else np.asarray(center, np.float64)
    center = center + rng.uniform(-1, 1, 3) * aug.translate_mm / spacing
    angles = np.deg2rad(aug.rotate_deg) * rng.uniform(-1, 1, 3)
    scale = 1.0 + aug.scale * rng.uniform(-1, 1)
    if aug.rotate_deg or aug.scale:
        # crop voxel c -> grid voxel g = center + m (c - mid), rotation/scale taken in mm.
        m = np.diag(1 / spacing) @ (_rotation(angles) * scale) @ np.diag(spacing)
        mid = (crop_shape - 1) / 2
        offset = center - m @ mid
        image = ndimage.affine_transform(pre["image"], m, offset=offset, output_shape=tuple(crop_shape),
                                         order=1, mode="constant", cval=0.0, prefilter=False)
        has_segments = pre["segments"] is not None
        segments = (ndimage.affine_transform(pre["segments"], m, offset=offset,
                                             output_shape=tuple(crop_shape), order=0,
                                             mode="constant", cval=0) if has_segments
                    else np.zeros(tuple(crop_shape), np.uint8))
        landmarks = (pre["landmarks"] - offset) @ np.linalg.inv(m).T
        example = _finish(image, landmarks, segments, has_segments, pre, crop_shape)
    else:
        example, _ = crop_example(pre, center, crop_shape)
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
