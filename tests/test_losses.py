"""Losses against values computed by hand, with numpy or by quadrature on tiny arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from cowjax import anatomy, heatmaps, losses
from configs import test as test_config


def test_heatmap_l2_hand_value_and_mask():
    # One case, two channels on a 2x1x1 grid. Channel 0: fg voxel 0 (target 1), bg voxel 1.
    target = np.zeros((1, 2, 1, 1, 2), np.float32)
    target[0, 0, 0, 0, 0] = 1.0
    target[0, :, 0, 0, 1] = [0.0, 1.0]
    pred = np.zeros_like(target)
    pred[0, :, 0, 0, 0] = [0.5, 0.2]       # fg err 0.25, bg err 0.04 -> 0.5*(0.25+0.04)
    pred[0, :, 0, 0, 1] = [3.0, 3.0]       # large error, but masked out below
    got = losses.heatmap_l2(pred, target, np.array([[1.0, 0.0]]))
    np.testing.assert_allclose(got, 0.5 * (0.25 + 0.04), rtol=1e-6)
    both = losses.heatmap_l2(pred, target, np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(both, 0.5 * (0.5 * (0.25 + 0.04) + 0.5 * (4.0 + 9.0)), rtol=1e-6)


def test_heatmap_l2_weights_foreground_by_ratio():
    # 1 fg voxel among 8: an error on it costs as much as the same error on all 7 bg voxels.
    target = np.zeros((1, 8, 1, 1, 1), np.float32)
    target[0, 0] = 1.0
    err_fg = target.copy()
    err_fg[0, 0] = 0.0
    err_bg = target.copy()
    err_bg[0, 1:] = 1.0
    mask = np.ones((1, 1))
    np.testing.assert_allclose(losses.heatmap_l2(err_fg, target, mask),
                               losses.heatmap_l2(err_bg, target, mask), rtol=1e-6)


@pytest.mark.parametrize("sigma", [1.5, 3.0])
def test_heatmap_l2_prefers_a_flat_map_to_a_misplaced_peak(sigma):
    # The plateau its docstring describes. In the continuum the foreground (t > 0.01) is the ball
    # u = r / sigma < U, U^2 = 2 ln 100, so the zero map scores 0.5 * mean(t^2) there (the
    # background's t is below 0.01), the same at any sigma; a constant c scores
    # 0.5 * (mean((c - t)^2) + c^2), least at half the foreground's mean of t.
    u_max = np.sqrt(2 * np.log(1 / losses.FOREGROUND_THRESHOLD))
    ball = u_max ** 3 / 3
    mean_t = integrate.quad(lambda u: np.exp(-u ** 2 / 2) * u ** 2, 0, u_max)[0] / ball
    mean_t2 = integrate.quad(lambda u: np.exp(-u ** 2) * u ** 2, 0, u_max)[0] / ball
    shape, mask = (48, 48, 48), np.ones((1, 1))
    target = heatmaps.gaussian(np.array([[[12.0, 24.0, 24.0]]]), shape, sigma)
    misplaced = heatmaps.gaussian(np.array([[[36.0, 24.0, 24.0]]]), shape, sigma)
    zero = losses.heatmap_l2(jnp.zeros_like(target), target, mask)
    flat = losses.heatmap_l2(jnp.full_like(target, mean_t / 2), target, mask)
    np.testing.assert_allclose(zero, 0.5 * mean_t2, rtol=0.03)
    np.testing.assert_allclose(flat, 0.5 * (mean_t2 - mean_t ** 2 / 2), rtol=0.03)
    assert flat < losses.heatmap_l2(misplaced, target, mask) < 1.1 * zero


def test_heatmap_softmax_ce_hand_value():
    logits = np.zeros((1, 2, 2, 1, 1), np.float32)
    logits[0, 0, 0, 0, 0] = np.log(3.0)    # softmax over 4 voxels: [3,1,1,1]/6
    target = np.zeros_like(logits)
    target[0, 0, 0, 0, 0] = 2.0            # normalised to 1 on that voxel
    got = losses.heatmap_softmax_ce(logits, target, np.ones((1, 1)))
    np.testing.assert_allclose(got, -np.log(0.5), rtol=1e-6)
    assert float(losses.heatmap_softmax_ce(logits, target, np.zeros((1, 1)))) == 0.0


def test_dice_hand_value_and_case_mask():
    # Two voxels, two classes; a perfect prediction for the first case, masked garbage second.
    big = 50.0
    logits = np.zeros((2, 2, 1, 1, 2), np.float32)
    labels = np.zeros((2, 2, 1, 1), np.int32)
    labels[0, :, 0, 0] = [0, 1]
    logits[0, 0, 0, 0] = [big, -big]
    logits[0, 1, 0, 0] = [-big, big]
    logits[1] = [0.0, 0.0]                 # would cost a lot if counted
    got = losses.dice_loss(logits, labels, np.array([1.0, 0.0]))
    np.testing.assert_allclose(got, 0.0, atol=1e-5)
    # Uniform prediction on one case: per class dice = 2*0.5 / (1 + 1) = 0.5.
    half = np.zeros((1, 2, 1, 1, 2), np.float32)
    got = losses.dice_loss(half, labels[:1], np.ones(1))
    np.testing.assert_allclose(got, 0.5, rtol=1e-5)
    assert float(losses.dice_loss(half, labels[:1], np.zeros(1))) == 0.0


def test_dice_weights_rare_classes_more():
    # Class 1 has 1 voxel, class 0 has 3: weights 1/1 and 1/3, normalised -> 0.75 and 0.25.
    labels = np.array([0, 0, 0, 1], np.int32).reshape(1, 4, 1, 1)
    logits = np.full((1, 4, 1, 1, 2), -50.0, np.float32)
    logits[..., 0] = 50.0                  # predicts background everywhere
    d0 = 2 * 3 / (4 + 3)                   # background dice
    np.testing.assert_allclose(losses.dice_loss(logits, labels, np.ones(1)),
                               1.0 - (0.25 * d0 + 0.75 * 0.0), rtol=1e-4)


def test_dice_at_half_resolution_uses_block_class_fractions():
    # A 2x2x2 block holding 2 voxels of class 1 and 6 of background: soft target (0.75, 0.25).
    labels = np.zeros((1, 2, 2, 2), np.int32)
    labels[0, 0, 0, :] = 1
    logits = np.zeros((1, 1, 1, 1, 2), np.float32)       # uniform prediction (0.5, 0.5)
    t, p = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    dice = 2 * t * p / (t + p)
    w = (1 / t) / np.sum(1 / t)
    np.testing.assert_allclose(losses.dice_loss(logits, labels, np.ones(1)),
                               1.0 - np.sum(w * dice), rtol=1e-5)


def test_attribute_bce_hand_value():
    logits = np.array([[0.0, 2.0, 9.0]], np.float32)
    labels = np.array([[1.0, 0.0, 1.0]], np.float32)
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    want = (np.log(2.0) + np.log1p(np.exp(2.0))) / 2
    np.testing.assert_allclose(losses.attribute_bce(logits, labels, mask), want, rtol=1e-6)


def test_consistency_targets_follow_the_cow19_rule_and_stop_gradient():
    seg_logits = np.full((1, anatomy.NUM_SEGMENTS), 20.0, np.float32)
    seg_logits[0, anatomy.SEGMENT_INDEX["PCoA_R"]] = -20.0     # PCoA_R absent
    lm_logits = np.zeros((1, anatomy.NUM_LANDMARKS), np.float32)
    implied = anatomy.landmark_attributes(seg_logits[0] > 0)
    var = anatomy.VARIABLE_LANDMARK_MASK
    want = np.mean([np.log(2.0)] * var.sum())    # zero logits: BCE log 2 whatever the target
    np.testing.assert_allclose(losses.consistency_loss(lm_logits, seg_logits), want, rtol=1e-5)
    # Gradient pushes ICA_PCoA_R down (implied 0) and the other variable landmarks up; none flows
    # into the segment logits.
    g_lm, g_seg = jax.grad(losses.consistency_loss, argnums=(0, 1))(jnp.asarray(lm_logits),
                                                                     jnp.asarray(seg_logits))
    assert not implied[anatomy.LANDMARK_INDEX["ICA_PCoA_R"]]
    assert g_lm[0, anatomy.LANDMARK_INDEX["ICA_PCoA_R"]] > 0
    assert g_lm[0, anatomy.LANDMARK_INDEX["ICA_term_R"]] < 0
    assert np.all(np.asarray(g_lm)[0, ~var] == 0)
    assert np.all(np.asarray(g_seg) == 0)


def _outputs_and_batch(config, rng):
    b, (x, y, z) = 2, config.data.crop_shape
    s = config.model.heatmap_stride
    k = jax.random.split(rng, 4)
    outputs = {
        "heatmaps": jax.random.normal(k[0], (b, x // s, y // s, z // s, anatomy.NUM_LANDMARKS)),
        "segmentation": jax.random.normal(k[1], (b, x, y, z, anatomy.NUM_CLASSES)),
        "landmark_attr": jax.random.normal(k[2], (b, anatomy.NUM_LANDMARKS)),
        "segment_attr": jax.random.normal(k[3], (b, anatomy.NUM_SEGMENTS)),
    }
    r = np.random.default_rng(0)
    batch = {
        "landmarks": (r.uniform(0, 1, (b, anatomy.NUM_LANDMARKS, 3)) * np.array([x, y, z])
                      ).astype(np.float32),
        "landmark_mask": np.ones((b, anatomy.NUM_LANDMARKS), np.float32),
        "segments": r.integers(0, anatomy.NUM_CLASSES, (b, x, y, z)).astype(np.int32),
        "segments_mask": np.ones(b, np.float32),
        "landmark_attr": r.integers(0, 2, (b, anatomy.NUM_LANDMARKS)).astype(np.float32),
        "landmark_attr_mask": np.ones((b, anatomy.NUM_LANDMARKS), np.float32),
        "segment_attr": r.integers(0, 2, (b, anatomy.NUM_SEGMENTS)).astype(np.float32),
        "segment_attr_mask": np.ones((b, anatomy.NUM_SEGMENTS), np.float32),
    }
    return outputs, batch


@pytest.mark.parametrize("heatmap,stride", [("l2", 1), ("softmax_ce", 2)])
def test_total_loss_is_the_weighted_sum_and_skips_zero_weights(heatmap, stride):
    config = test_config.get_config()
    config.loss.heatmap = heatmap
    config.model.heatmap_stride = stride
    config.loss.w_segment_attr = 0.0
    config.loss.w_consistency = 2.0
    outputs, batch = _outputs_and_batch(config, jax.random.key(0))
    loss, terms = losses.total_loss(outputs, batch, config)
    assert set(terms) == {"heatmap", "segmentation", "landmark_attr", "consistency"}
    want = terms["heatmap"] + terms["segmentation"] + terms["landmark_attr"] + 2 * terms["consistency"]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert all(np.isfinite(v) for v in terms.values())


def test_segmentation_ce_weights_the_few_vessel_voxels_as_much_as_the_background():
    """One vessel voxel among 511 background ones: predicting background everywhere costs half the
    maximum (the foreground half of the mean), not 1/512 of it, so the head cannot sit there."""
    labels = np.zeros((1, 8, 8, 8), np.int32)
    labels[0, 4, 4, 4] = 3
    mask = np.ones(1, np.float32)
    sure = 20.0
    all_bg = np.zeros((1, 8, 8, 8, anatomy.NUM_CLASSES), np.float32)
    all_bg[..., 0] = sure
    right = all_bg.copy()
    right[0, 4, 4, 4, 0], right[0, 4, 4, 4, 3] = 0.0, sure
    ce_bg = float(losses.segmentation_ce(jnp.asarray(all_bg), labels, mask))
    assert ce_bg == pytest.approx(0.5 * sure, rel=1e-3)          # -log softmax of the vessel voxel
    assert float(losses.segmentation_ce(jnp.asarray(right), labels, mask)) < 1e-3
    # A case without segments does not count.
    assert float(losses.segmentation_ce(jnp.asarray(all_bg), labels, np.zeros(1, np.float32))) == 0


def test_dice_ce_adds_the_cross_entropy_and_unknown_kind_raises():
    config = test_config.get_config()
    outputs, batch = _outputs_and_batch(config, jax.random.key(0))
    _, dice_only = losses.total_loss(outputs, batch, config)
    config.loss.segmentation = "dice_ce"
    _, both = losses.total_loss(outputs, batch, config)
    ce = losses.segmentation_ce(outputs["segmentation"], batch["segments"], batch["segments_mask"])
    np.testing.assert_allclose(both["segmentation"], dice_only["segmentation"] + ce, rtol=1e-6)
