"""The training batch, specified once: the pipeline builds examples to it, the bench and the tests
make random batches from it.

A batch is a dict of arrays (``spec``); ``B`` = ``config.batch_size``, ``X, Y, Z`` =
``config.data.crop_shape``:
  ``image [B,X,Y,Z,1] float32``, ``landmarks [B,19,3] float32`` (crop voxel coords, 0 where unknown),
  ``landmark_mask [B,19]`` (known and inside the crop), ``segments [B,X,Y,Z] int32`` (classes 0..20),
  ``segments_mask [B]`` (the case has labels), ``landmark_attr [B,19]``, ``landmark_attr_mask
  [B,19]``, ``segment_attr [B,20]``, ``segment_attr_mask [B,20]``, all float32 but ``segments``.
"""

from __future__ import annotations

import numpy as np

from cowjax import anatomy


def spec(config, batch_size: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of a batch (``batch_size`` None: ``config.batch_size``; 0: one example
    without the batch axis)."""
    b = config.batch_size if batch_size is None else batch_size
    lead = (b,) if b else ()
    crop = tuple(int(n) for n in config.data.crop_shape)
    n, s = anatomy.NUM_LANDMARKS, anatomy.NUM_SEGMENTS
    f32 = np.dtype(np.float32)
    return {
        "image": (lead + crop + (1,), f32),
        "landmarks": (lead + (n, 3), f32),
        "landmark_mask": (lead + (n,), f32),
        "segments": (lead + crop, np.dtype(np.int32)),
        "segments_mask": (lead, f32),
        "landmark_attr": (lead + (n,), f32),
        "landmark_attr_mask": (lead + (n,), f32),
        "segment_attr": (lead + (s,), f32),
        "segment_attr_mask": (lead + (s,), f32),
    }


def check(example: dict, config, batch_size: int | None = None) -> None:
    """Raise ValueError naming the first key whose array does not match ``spec``."""
    for key, (shape, dtype) in spec(config, batch_size).items():
        value = np.asarray(example[key]) if key in example else None
        if value is None or value.shape != shape or value.dtype != dtype:
            got = "missing" if value is None else f"{value.shape} {value.dtype}"
            raise ValueError(f"batch key {key!r}: expected {shape} {dtype}, got {got}")


def random_batch(config, seed: int = 0, index: int = 0, batch_size: int | None = None) -> dict:
    """A deterministic, well-formed batch for (seed, index): a bright Gaussian blob (sigma 1 voxel)
    at each landmark in noise, one random class on the blobs' cores, random attributes, about 10% of
    the landmarks masked out. A network can learn it, so a loss that falls on it means something."""
    r = np.random.default_rng([seed, index])
    (b, *crop, _), _ = spec(config, batch_size)["image"]
    n = anatomy.NUM_LANDMARKS
    landmarks = (r.uniform(0.2, 0.8, (b, n, 3)) * np.array(crop)).astype(np.float32)
    axes = [np.arange(k, dtype=np.float32) for k in crop]
    image = np.zeros((b, *crop), np.float32)
    for i in range(b):
        for point in landmarks[i]:  # separable: one outer product per landmark
            g = [np.exp(-0.5 * (a - c) ** 2) for a, c in zip(axes, point)]
            np.maximum(image[i], np.einsum("x,y,z->xyz", *g), out=image[i])
    classes = r.integers(1, anatomy.NUM_CLASSES, (b, 1, 1, 1))
    return {
        "image": (image + 0.1 * r.standard_normal(image.shape, np.float32))[..., None],
        "landmarks": landmarks,
        "landmark_mask": (r.uniform(size=(b, n)) > 0.1).astype(np.float32),
        "segments": ((image > 0.5) * classes).astype(np.int32),
        "segments_mask": np.ones(b, np.float32),
        "landmark_attr": r.integers(0, 2, (b, n)).astype(np.float32),
        "landmark_attr_mask": np.ones((b, n), np.float32),
        "segment_attr": r.integers(0, 2, (b, anatomy.NUM_SEGMENTS)).astype(np.float32),
        "segment_attr_mask": np.ones((b, anatomy.NUM_SEGMENTS), np.float32),
    }
