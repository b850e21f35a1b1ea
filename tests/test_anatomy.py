"""cowjax.anatomy: counts, the left-right mirror, and the landmark attribute rule of cow19.md."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cowjax import anatomy

# cow19.md, "Variation": the landmarks each variable segment's absence clears (right side; left mirrors).
_CLEARS = {
    "ACoA": {"A1_A2_R", "A1_A2_L"},
    "PCoA_R": {"ICA_PCoA_R", "P1_P2_R"},
    "P1_R": {"BA_top", "P1_P2_R"},
    "A1_R": {"ICA_term_R", "A1_A2_R"},
}
_CLEARS.update({k.replace("_R", "_L"): {n.replace("_R", "_L") for n in v}
                for k, v in list(_CLEARS.items()) if k.endswith("_R")})


def test_counts_and_unique_names():
    assert anatomy.NUM_LANDMARKS == len(anatomy.LANDMARKS) == 19
    assert anatomy.NUM_SEGMENTS == len(anatomy.SEGMENTS) == 20
    assert anatomy.NUM_CLASSES == 21
    assert len(set(anatomy.LANDMARKS)) == 19 and len(set(anatomy.SEGMENTS)) == 20
    assert anatomy.TEMPLATE_LANDMARKS.shape == (19, 3)
    assert set(anatomy.SEGMENT_ENDS) == set(anatomy.SEGMENTS)


def test_segment_graph_touches_every_landmark():
    ends = {e for pair in anatomy.SEGMENT_ENDS.values() for e in pair}
    assert ends == set(anatomy.LANDMARKS) | {anatomy.VBJ}


@pytest.mark.parametrize("mirror,names", [(anatomy.MIRROR_LANDMARKS, anatomy.LANDMARKS),
                                          (anatomy.MIRROR_SEGMENTS, anatomy.SEGMENTS)])
def test_mirror_is_an_involution_swapping_sides(mirror, names):
    np.testing.assert_array_equal(mirror[mirror], np.arange(len(names)))
    for k, name in enumerate(names):
        other = names[mirror[k]]
        if name.endswith("_R"):
            assert other == name[:-2] + "_L"
        elif name.endswith("_L"):
            assert other == name[:-2] + "_R"
        else:
            assert other == name


def test_mirror_classes_keep_background_and_match_segments():
    c = anatomy.MIRROR_CLASSES
    assert c[0] == 0
    np.testing.assert_array_equal(c[c], np.arange(anatomy.NUM_CLASSES))
    np.testing.assert_array_equal(c[1:] - 1, anatomy.MIRROR_SEGMENTS)


def test_template_is_left_right_symmetric():
    t = anatomy.TEMPLATE_LANDMARKS
    np.testing.assert_allclose(t[anatomy.MIRROR_LANDMARKS], t * np.array([-1.0, 1.0, 1.0]))


def test_right_side_then_left_side_in_the_same_order():
    right = [n[:-2] for n in anatomy.LANDMARKS[1:10]]
    left = [n[:-2] for n in anatomy.LANDMARKS[10:]]
    assert right == left and all(n.endswith("_R") for n in anatomy.LANDMARKS[1:10])


@pytest.mark.parametrize("segment", anatomy.SEGMENTS)
def test_dropping_one_segment_clears_exactly_the_listed_landmarks(segment):
    present = np.ones(anatomy.NUM_SEGMENTS, bool)
    present[anatomy.SEGMENT_INDEX[segment]] = False
    attr = anatomy.landmark_attributes(present)
    assert attr.dtype == bool and attr.shape == (19,)
    cleared = {n for n, a in zip(anatomy.LANDMARKS, attr) if not a}
    # Only the variable segments take part in the rule (cow19.md).
    assert cleared == _CLEARS.get(segment, set())
    assert set(anatomy.VARIABLE_SEGMENTS) == set(_CLEARS)


def test_all_present_means_all_bifurcations():
    assert anatomy.landmark_attributes(np.ones(20, bool)).all()


def test_soft_rule_equals_hard_rule_on_binary_inputs():
    rng = np.random.default_rng(0)
    hard = rng.uniform(size=(64, 20)) < 0.6                         # batched [B, 20]
    expected = anatomy.landmark_attributes(hard)
    soft = anatomy.landmark_attributes(hard.astype(np.float32))
    np.testing.assert_array_equal(soft, expected.astype(np.float32))
    soft_jax = anatomy.landmark_attributes(jnp.asarray(hard, jnp.float32))
    np.testing.assert_array_equal(np.asarray(soft_jax), expected.astype(np.float32))


def test_soft_rule_is_the_product_of_presence_probabilities():
    p = np.full(20, 0.9)
    p[anatomy.SEGMENT_INDEX["PCoA_R"]] = 0.5
    p[anatomy.SEGMENT_INDEX["P1_R"]] = 0.4
    soft = anatomy.landmark_attributes(p)
    assert soft[anatomy.LANDMARK_INDEX["P1_P2_R"]] == pytest.approx(0.5 * 0.4)
    assert soft[anatomy.LANDMARK_INDEX["BA_top"]] == pytest.approx(0.4 * 0.9)   # P1_R and P1_L
    assert soft[anatomy.LANDMARK_INDEX["M1_M2_R"]] == pytest.approx(1.0)


def test_mirroring_segments_mirrors_the_attributes():
    for bits in itertools.islice(itertools.product([False, True], repeat=7), 0, 128, 5):
        present = np.ones(20, bool)
        for name, b in zip(anatomy.VARIABLE_SEGMENTS, bits):
            present[anatomy.SEGMENT_INDEX[name]] = b
        attr = anatomy.landmark_attributes(present)
        mirrored = anatomy.landmark_attributes(present[anatomy.MIRROR_SEGMENTS])
        np.testing.assert_array_equal(mirrored, attr[anatomy.MIRROR_LANDMARKS])
