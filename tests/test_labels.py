"""cowjax.data.labels: labels derived from a vessel mask match the truth."""

import numpy as np
import pytest

from cowjax import anatomy
from conftest import tube_phantom
from cowjax.data import labels


def _dice(a, b):
    return 2 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1)


@pytest.mark.parametrize("absent", [(), ("PCoA_R", "A1_L", "P1_R")])
def test_derived_segments_match_the_phantom(absent):
    _, affine, landmarks, vessels, truth = tube_phantom(0.8, absent=absent, seed=len(absent))
    derived = labels.derive_segments(vessels > 0, affine, landmarks)
    assert derived.dtype == np.uint8 and derived.shape == truth.shape
    # Memory layout must not matter (nibabel hands out Fortran-ordered arrays).
    np.testing.assert_array_equal(
        labels.derive_segments(np.asfortranarray(vessels > 0), affine, landmarks), derived)
    assert np.all(derived[vessels == 0] == 0)
    dice = [_dice(truth == c, derived == c) for c in range(1, anatomy.NUM_CLASSES)
            if np.any(truth == c) and anatomy.SEGMENTS[c - 1] != "ACoA"]  # ACoA: a few voxels
    assert np.mean(dice) > 0.85, dice
    for name in absent:
        assert not np.any(derived == 1 + anatomy.SEGMENT_INDEX[name]), name
    present, known, lm_attr, lm_known = labels.derive_attributes(derived, affine, landmarks)
    expected = np.array([n not in absent for n in anatomy.SEGMENTS])
    assert known.all() and lm_known.all()
    np.testing.assert_array_equal(present > 0, expected)
    np.testing.assert_array_equal(lm_attr > 0, anatomy.landmark_attributes(expected))


def test_a_mask_without_vessels_labels_nothing():
    """An image with no vessel at all (a blank or a failed threshold) labels no voxel."""
    _, affine, landmarks, vessels, _ = tube_phantom(0.8)
    derived = labels.derive_segments(np.zeros(vessels.shape, bool), affine, landmarks)
    assert derived.shape == vessels.shape and not derived.any()


def test_unknown_landmark_makes_its_attributes_unknown():
    _, affine, landmarks, vessels, truth = tube_phantom(1.0)
    landmarks[anatomy.LANDMARK_INDEX["P1_P2_R"]] = np.nan
    _, known, _, lm_known = labels.derive_attributes(truth, affine, landmarks)
    assert known[anatomy.SEGMENT_INDEX["PCoA_R"]] == 0 and known[anatomy.SEGMENT_INDEX["P1_R"]] == 0
    assert lm_known[anatomy.LANDMARK_INDEX["BA_top"]] == 0
    assert lm_known[anatomy.LANDMARK_INDEX["M1_M2_R"]] == 1
    derived = labels.derive_segments(vessels > 0, affine, landmarks)
    assert not np.any(derived == 1 + anatomy.SEGMENT_INDEX["P2_R"])  # needs the unknown end


def test_derived_labels_match_the_synthetic_generator():
    """The generator's own labels are the ground truth; measured mean Dice ~0.86 at 1 mm.

    Presence is read exactly for normal, fetal and absent segments. A hypoplastic one (drawn, radius
    0.25-0.45 mm) is not checked: at 1 mm a thread that thin fills whole voxels of the binary mask,
    so its measured radius is too large (seen: 0.41 mm read as 1.1 mm)."""
    from cowjax.data import synthetic

    case, info = synthetic.generate_case(7, 1, spacing=(1.0, 1.0, 1.0), return_info=True)
    derived = labels.derive_segments(case.vessels > 0, case.affine, case.landmarks)
    dice = [_dice(case.segments == c, derived == c) for c in range(1, anatomy.NUM_CLASSES)
            if np.any(case.segments == c)]
    assert np.mean(dice) > 0.75, dice
    present, known, lm_attr, _ = labels.derive_attributes(derived, case.affine, case.landmarks)
    assert known.all()
    thin = np.array([info["variants"].get(n) == "hypoplastic" for n in anatomy.SEGMENTS])
    assert 0 < thin.sum() < len(anatomy.VARIABLE_SEGMENTS)  # both kinds are exercised
    truth = np.array([case.attributes["segments"][n] for n in anatomy.SEGMENTS])
    np.testing.assert_array_equal((present > 0)[~thin], truth[~thin])
    clear = ~np.any(anatomy.LANDMARK_DEPENDS & thin[None, :], axis=1)
    np.testing.assert_array_equal(
        (lm_attr > 0)[clear], np.array([case.attributes["landmarks"][n]
                                        for n in anatomy.LANDMARKS])[clear])
