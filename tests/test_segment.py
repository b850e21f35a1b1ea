"""cowjax.inference.segment: the lumen from the image at its own resolution, the class from the
network's probabilities."""

import numpy as np
import pytest
from scipy import ndimage

from cowjax import anatomy
from cowjax.inference import segment


def _tubes(spacing=(0.5, 0.5, 0.8), seed=0):
    """Two straight tubes along x on a textured background: a bright ICA-sized one (radius 2 mm) and
    a faint thin one (radius 0.8 mm, a third of the brightness, as a distal vessel). Blurred, noisy.
    Returns (image, affine, true lumen mask)."""
    rng = np.random.default_rng(seed)
    shape = (80, 60, 30)
    affine = np.diag([*spacing, 1.0])
    world = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                                 indexing="ij"), -1)
    image = 0.3 + 0.05 * ndimage.gaussian_filter(rng.normal(size=shape), 3)
    lumen = np.zeros(shape, bool)
    for (y, z), radius, brightness in (((10.0, 12.0), 2.0, 1.0), ((20.0, 12.0), 0.8, 0.35)):
        inside = np.hypot(world[..., 1] - y, world[..., 2] - z) <= radius
        image = image + brightness * inside
        lumen |= inside
    image = ndimage.gaussian_filter(image, 0.3 / np.asarray(spacing))
    image = image + rng.normal(0, 0.02, shape)
    return image.astype(np.float32), affine, lumen


def _dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_vessel_mask_finds_bright_and_faint_lumens():
    image, affine, lumen = _tubes()
    mask = segment.vessel_mask(image, affine)
    assert _dice(mask, lumen) > 0.85
    # The faint thin tube is found too, not only the bright one.
    world_y = np.arange(image.shape[1]) * affine[1, 1]
    thin = lumen & (np.abs(world_y - 20.0) < 2)[None, :, None]
    assert _dice(mask & (np.abs(world_y - 20.0) < 2)[None, :, None], thin) > 0.7


def test_label_lumen_takes_the_class_where_segments_outweigh_background():
    mask = np.zeros((20, 10, 10), bool)
    mask[2:18, 4:6, 4:6] = True
    # The network's grid: 2x coarser, shifted by half a fine voxel's worth of world.
    grid_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    prob = np.zeros((10, 5, 5, anatomy.NUM_CLASSES), np.float32)
    prob[..., 0] = 1.0
    prob[:5, ..., 0], prob[:5, ..., 5] = 0.3, 0.7          # x < ~9 mm: segment class 5
    prob[5:8, ..., 0], prob[5:8, ..., 9] = 0.6, 0.4        # background still wins here
    labels = segment.label_lumen(mask, np.eye(4), prob, grid_affine)
    assert labels.dtype == np.uint8 and labels.shape == mask.shape
    assert np.all(labels[~mask] == 0)
    assert np.all(labels[2:8, 4:6, 4:6] == 5)
    assert np.all(labels[11:16, 4:6, 4:6] == 0)
    # Voxels beyond the network's grid are background.
    shifted = grid_affine.copy()
    shifted[0, 3] = -40.0
    assert segment.label_lumen(mask, np.eye(4), prob, shifted).sum() == 0


def test_lumen_labelled_by_the_landmarks_matches_a_synthetic_case():
    """The written labelling on a whole synthetic angiogram (tissue, veins, other arteries): the
    image's lumen labelled by the case's landmarks agrees with its segment labels, and every other
    vessel stays background."""
    from cowjax.data import synthetic
    from cowjax import metrics
    case = synthetic.generate_case(3, 0, spacing=(0.8, 0.8, 0.8))
    mask = segment.vessel_mask(case.image, case.affine)
    labels = segment.label_by_landmarks(mask, case.affine, case.landmarks)
    assert labels.shape == case.image.shape and labels.dtype == np.uint8
    dice = metrics.dice(labels, case.segments, anatomy.NUM_CLASSES)
    assert np.nanmean(dice) > 0.6
    assert labels.astype(bool).sum() < 0.5 * mask.sum()      # most bright voxels are not the circle


def test_segments_called_absent_are_not_written():
    """The written labelling agrees with the reported presence: a variable segment at most 0.5
    present loses its voxels, one without evidence (NaN) and the segments that always exist keep
    theirs whatever their probability."""
    index = {n: 1 + i for i, n in enumerate(anatomy.SEGMENTS)}
    labels = np.array([0, index["PCoA_R"], index["ACoA"], index["BA"], index["P1_L"],
                       index["A1_R"]], np.uint8)
    prob = np.full(anatomy.NUM_SEGMENTS, 0.9)
    for name, p in (("PCoA_R", 0.2), ("ACoA", 0.5), ("BA", 0.1), ("P1_L", np.nan)):
        prob[index[name] - 1] = p
    out = segment.drop_absent(labels, prob)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 0, index["BA"], index["P1_L"], index["A1_R"]])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 0.6, 0.8)])
def test_presence_read_off_the_image_finds_the_absent_segments(spacing):
    """Two synthetic subjects with absent segments (case 0: A1_L and PCoA_L; case 2: PCoA_L) at two
    resolutions, by their true landmarks: the absent ones show no lumen between their ends, every
    present one a radius above the hypoplastic line. (Not every case is read right: a hypoplastic
    thread beside the basilar tip can read as present, BENCHMARKS.md 2026-12-02.)"""
    from cowjax.data import synthetic
    for index in (0, 2):
        case = synthetic.generate_case(7, index, spacing=spacing)
        truth = np.array([case.attributes["segments"][n] for n in anatomy.SEGMENTS])
        assert not truth[anatomy.VARIABLE_SEGMENT_MASK].all()
        radii = segment.presence_radii(case.image, case.affine, case.landmarks)
        assert np.all(np.isnan(radii[~anatomy.VARIABLE_SEGMENT_MASK]))
        variable = np.flatnonzero(anatomy.VARIABLE_SEGMENT_MASK)
        np.testing.assert_array_equal(segment.presence_probability(radii[variable]) > 0.5,
                                      truth[variable])
        assert np.all(radii[variable][truth[variable]] < 3.0)   # a radius, not a whole vessel tree


def test_presence_without_evidence_is_left_unknown():
    """An end landmark off every vessel (or unknown): no evidence, NaN, so the network decides."""
    image, affine, _ = _tubes()
    landmarks = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    assert np.all(np.isnan(segment.presence_radii(image, affine, landmarks)))
    landmarks = np.tile(np.array([[20.0, 40.0, 3.0]]), (anatomy.NUM_LANDMARKS, 1))  # tissue only
    assert np.all(np.isnan(segment.presence_radii(image, affine, landmarks)))
    np.testing.assert_allclose(segment.presence_probability(np.array([0.3, 0.5, 0.8, np.nan])),
                               [0.119, 0.5, 0.953, np.nan], atol=1e-3)
