"""Training losses: pure functions of (model outputs, batch) -> scalars, and their weighted sum.

Shapes (B batch, X,Y,Z crop, x,y,z heatmap grid = crop / ``config.model.heatmap_stride``):
  outputs: ``heatmaps [B,x,y,z,19]``, ``segmentation [B,X,Y,Z,21]`` logits,
           ``landmark_attr [B,19]`` logits, ``segment_attr [B,20]`` logits.
  batch:   ``landmarks [B,19,3]`` crop voxel coords, ``landmark_mask [B,19]``, ``segments [B,X,Y,Z]``,
           ``segments_mask [B]``, ``landmark_attr(_mask) [B,19]``, ``segment_attr(_mask) [B,20]``.
Heatmap targets are made on the device from the coordinates (``heatmaps.targets``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cowjax import anatomy, heatmaps

# A target voxel above this (Gaussian peak 1) counts as foreground for the ratio weighting.
FOREGROUND_THRESHOLD = 0.01
_EPS = 1e-6


def _masked_mean(values, mask):
    """Mean of ``values`` over entries where ``mask`` is 1; 0 when nothing is masked in."""
    mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def heatmap_l2(pred, target, landmark_mask):
    """L2 on heatmaps, foreground weighted by the background/foreground voxel ratio.

    Per (case, landmark) channel, foreground = target > FOREGROUND_THRESHOLD. Foreground voxels
    get weight n_bg / n_fg, background 1, and the weighted sum is divided by 2 n_bg: the loss is
    the mean of the background MSE and the foreground MSE, so the few voxels near the landmark
    count as much as the whole background. Channels with landmark_mask 0 are left out.

    Its plateau: for a Gaussian target the foreground is a ball whose size scales with sigma, so a
    constant map scores the same at any sigma, about 0.024 for zeros and 0.019 at its best
    (0.065), while the right Gaussian in the wrong place scores about 0.024. A flat map beats a
    misplaced peak, so training can sit near 0.02 with its argmax anywhere (BENCHMARKS.md,
    2026-12-05).

    pred, target: [B,x,y,z,L]; landmark_mask: [B,L]. Returns a scalar.
    """
    sq = jnp.square(pred - target)
    fg = (target > FOREGROUND_THRESHOLD).astype(sq.dtype)
    axes = (1, 2, 3)
    n_fg = jnp.sum(fg, axis=axes)
    n_bg = jnp.sum(1.0 - fg, axis=axes)
    mse_fg = jnp.sum(sq * fg, axis=axes) / jnp.maximum(n_fg, 1.0)
    mse_bg = jnp.sum(sq * (1.0 - fg), axis=axes) / jnp.maximum(n_bg, 1.0)
    return _masked_mean(0.5 * (mse_fg + mse_bg), landmark_mask)


def heatmap_softmax_ce(logits, target, landmark_mask):
    """Per-landmark spatial-softmax cross-entropy against the normalised target.

    Each channel's logits are a distribution over the voxels (softmax over x,y,z); the target
    Gaussian is normalised to sum 1. Masked channels are left out.

    logits, target: [B,x,y,z,L]; landmark_mask: [B,L]. Returns a scalar.
    """
    b, *spatial, n = logits.shape
    logits = logits.reshape(b, -1, n)
    target = target.reshape(b, -1, n)
    q = target / jnp.maximum(jnp.sum(target, axis=1, keepdims=True), _EPS)
    ce = -jnp.sum(q * jax.nn.log_softmax(logits, axis=1), axis=1)
    return _masked_mean(ce, landmark_mask)


def dice_loss(logits, labels, segments_mask):
    """1 - class-weighted soft Dice over the classes, on cases with segments_mask 1.

    Dice per class is pooled over the (masked) batch. Class weights are the inverse voxel
    frequencies in the target, normalised to sum 1 over the classes present; absent classes
    get weight 0 (their false positives are still paid for through the other classes).

    logits: [B,X/s,Y/s,Z/s,C] (s = segmentation stride, 1 or 2); labels: [B,X,Y,Z] int;
    segments_mask: [B]. Returns a scalar in [0,1]. At stride 2 the targets are the class fractions
    of each 2x2x2 block (soft labels), so vessels thinner than a coarse voxel still count.
    """
    m = segments_mask.astype(logits.dtype)[:, None, None, None, None]
    p = jax.nn.softmax(logits, axis=-1) * m
    t = _block_fractions(labels, logits.shape[-1], logits.shape[1:4]).astype(logits.dtype) * m
    axes = (0, 1, 2, 3)
    inter = jnp.sum(p * t, axis=axes)
    n_t = jnp.sum(t, axis=axes)
    dice = (2.0 * inter + _EPS) / (jnp.sum(p, axis=axes) + n_t + _EPS)
    w = jnp.where(n_t > 0, 1.0 / jnp.maximum(n_t, _EPS), 0.0)
    w = w / jnp.maximum(jnp.sum(w), _EPS)
    # No segmented case in the batch -> no loss (sum(w) = 0).
    return jnp.sum(w) - jnp.sum(w * dice)


def _block_fractions(labels, num_classes, shape):
    """One-hot labels [B,X,Y,Z] -> class fractions [B,x,y,z,C] of each s x s x s block (s = X/x)."""
    t = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if t.shape[1:4] != tuple(shape):
        b, (x, y, z) = t.shape[0], shape
        s = t.shape[1] // x
        t = t.reshape(b, x, s, y, s, z, s, num_classes).mean(axis=(2, 4, 6))
    return t


def segmentation_ce(logits, labels, segments_mask):
    """Cross-entropy against the (block-fraction) labels, foreground weighted by the ratio.

    As ``heatmap_l2``: a voxel's foreground share is 1 minus its background fraction, and the loss is
    the mean of the background-weighted and the foreground-weighted cross-entropy over the masked
    cases, so the few vessel voxels count as much as the whole background. Without it the
    segmentation head sits at "all background" for hundreds of steps (a soft Dice over 21 classes
    gives a thin class almost no gradient while its false-positive mass fills the denominator).

    logits: [B,x,y,z,C]; labels: [B,X,Y,Z] int; segments_mask: [B]. Returns a scalar.
    """
    t = _block_fractions(labels, logits.shape[-1], logits.shape[1:4])
    ce = -jnp.sum(t * jax.nn.log_softmax(logits, axis=-1), axis=-1)             # [B,x,y,z]
    m = segments_mask.astype(ce.dtype)[:, None, None, None]
    fg = (1.0 - t[..., 0]) * m
    bg = t[..., 0] * m
    ce_fg = jnp.sum(ce * fg) / jnp.maximum(jnp.sum(fg), _EPS)
    ce_bg = jnp.sum(ce * bg) / jnp.maximum(jnp.sum(bg), _EPS)
    return 0.5 * (ce_fg + ce_bg)


def attribute_bce(logits, labels, mask):
    """Masked mean sigmoid (binary) cross-entropy. logits, labels, mask: [B,N]."""
    return _masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def consistency_loss(landmark_attr_logits, segment_attr_logits):
    """Landmark attributes implied by the predicted segment attributes supervise the predicted ones.

    The soft cow19 rule (``anatomy.landmark_attributes`` on sigmoid probabilities) gives targets
    that are held fixed (stop_gradient); BCE on the landmarks variation can change only.

    landmark_attr_logits: [B,19]; segment_attr_logits: [B,20]. Returns a scalar.
    """
    implied = anatomy.landmark_attributes(jax.nn.sigmoid(segment_attr_logits))
    implied = jax.lax.stop_gradient(implied)
    mask = jnp.asarray(anatomy.VARIABLE_LANDMARK_MASK, landmark_attr_logits.dtype)
    return attribute_bce(landmark_attr_logits, implied, mask[None, :])


def loss_terms(outputs, batch, config) -> dict:
    """The unweighted loss terms {name: scalar}; a term whose weight ``config.loss.w_<name>`` is 0
    is not computed. ``config.loss.heatmap`` picks "l2" or "softmax_ce", ``config.loss.segmentation``
    "dice" or "dice_ce" (Dice + ratio-weighted cross-entropy). How they are combined is
    ``config.loss.weighting`` (``weighting.combine``; "fixed" is ``total_loss``)."""
    lc = config.loss
    terms = {}
    if lc.w_heatmap:
        hm = outputs["heatmaps"]
        target = heatmaps.targets(batch["landmarks"], hm.shape[1:4], config)
        loss = heatmap_l2 if lc.heatmap == "l2" else heatmap_softmax_ce
        terms["heatmap"] = loss(hm, target, batch["landmark_mask"])
    if lc.w_segmentation:
        seg_args = (outputs["segmentation"], batch["segments"], batch["segments_mask"])
        terms["segmentation"] = dice_loss(*seg_args)
        if lc.segmentation == "dice_ce":
            terms["segmentation"] = terms["segmentation"] + segmentation_ce(*seg_args)
    if lc.w_landmark_attr:
        terms["landmark_attr"] = attribute_bce(outputs["landmark_attr"], batch["landmark_attr"],
                                               batch["landmark_attr_mask"])
    if lc.w_segment_attr:
        terms["segment_attr"] = attribute_bce(outputs["segment_attr"], batch["segment_attr"],
                                              batch["segment_attr_mask"])
    if lc.w_consistency:
        terms["consistency"] = consistency_loss(outputs["landmark_attr"], outputs["segment_attr"])
    return terms


def total_loss(outputs, batch, config):
    """The fixed weighting: (sum of ``config.loss.w_<name>`` x term, {name: unweighted term})."""
    terms = loss_terms(outputs, batch, config)
    loss = sum((config.loss[f"w_{k}"] * v for k, v in terms.items()), jnp.zeros((), jnp.float32))
    return loss, terms
