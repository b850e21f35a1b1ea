"""Heatmaps -> landmark voxel coordinates and confidences (jax.numpy, jittable, batched).

The paper decodes by the argmax of each heatmap. A Gaussian peak between voxels is located more
precisely by a 3-point quadratic fit per axis in the log domain (exact for a Gaussian; for a
spatial-softmax model the logits are already that domain), or by a local soft-argmax. The fit is
the default: on noise-free and noisy synthetic Gaussians it measured better (see
``tests/test_decode.py`` and the project report).

Two kinds of heatmaps:
- ``"gaussian"``: regressed Gaussian heatmaps (L2 loss, peak ~1). Confidence = peak height.
- ``"logits"``: spatial-softmax logits (``softmax_ce`` loss). Confidence = the softmax probability
  mass within one voxel (3x3x3) of the peak.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("argmax", "quadratic", "soft")
DEFAULT_METHOD = "quadratic"
KINDS = ("gaussian", "logits")

# Offsets of the 3x3x3 neighbourhood, [27, 3].
_CUBE = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int32)
# Gaussian heatmap values below this fraction of the peak are treated as noise in the log fit.
_LOG_FLOOR = 1e-3


def _gather(flat, idx, shape):
    """Values of ``flat [N, V]`` at voxel indices ``idx [N, K, 3]`` (clipped into the volume)."""
    idx = jnp.clip(idx, 0, jnp.array(shape) - 1)
    lin = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
    return jnp.take_along_axis(flat, lin, axis=1)


def _inside(idx, shape):
    return jnp.all((idx >= 0) & (idx < jnp.array(shape)), axis=-1)


def _quadratic_offset(flat, peak_idx, shape, kind):
    """Sub-voxel offset [N, 3] from a parabola through (f[-1], f[0], f[+1]) on each axis."""
    eye = jnp.eye(3, dtype=jnp.int32)
    lo = peak_idx[:, None, :] - eye               # [N, 3 axes, 3]
    hi = peak_idx[:, None, :] + eye
    f0 = _gather(flat, peak_idx[:, None, :], shape)            # [N, 1]
    fm, fp = _gather(flat, lo, shape), _gather(flat, hi, shape)  # [N, 3]
    if kind == "gaussian":
        # log of a Gaussian is a parabola; floor relative to the peak keeps it finite.
        floor = _LOG_FLOOR * jnp.maximum(f0, 1e-12)
        f0, fm, fp = (jnp.log(jnp.maximum(v, floor)) for v in (f0, fm, fp))
    curvature = fm - 2.0 * f0 + fp
    valid = _inside(lo, shape) & _inside(hi, shape) & (curvature < 0)
    offset = 0.5 * (fm - fp) / jnp.where(valid, curvature, -1.0)
    # The argmax is the best voxel, so the true peak lies within half a voxel of it.
    return jnp.where(valid, jnp.clip(offset, -0.5, 0.5), 0.0)


def _soft_offset(flat, peak_idx, shape, kind):
    """Sub-voxel offset [N, 3]: weighted mean of the 3x3x3 neighbourhood offsets."""
    idx = peak_idx[:, None, :] + _CUBE               # [N, 27, 3]
    values = _gather(flat, idx, shape)               # [N, 27]
    if kind == "logits":
        weights = jnp.exp(values - values.max(axis=1, keepdims=True))
    else:
        weights = jnp.maximum(values, 0.0)
    weights = jnp.where(_inside(idx, shape), weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    offset = (weights[..., None] * _CUBE).sum(axis=1) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, offset, 0.0)


def _softmax_mass(flat, peak_idx, shape):
    """Spatial-softmax probability [N] within the 3x3x3 neighbourhood of the peak."""
    idx = peak_idx[:, None, :] + _CUBE
    values = _gather(flat, idx, shape)
    near = jnp.where(_inside(idx, shape), values, -jnp.inf)
    return jnp.exp(jax.nn.logsumexp(near, axis=1) - jax.nn.logsumexp(flat, axis=1))


@functools.partial(jax.jit, static_argnames=("refine", "stride", "kind"))
def decode_heatmaps(heatmaps, refine: bool | str = True, stride: int = 1, kind: str = "gaussian"):
    """Landmark coordinates and confidences from heatmaps.

    heatmaps: [B, x, y, z, L] float (L = anatomy.NUM_LANDMARKS for the network's output).
    refine: True for the default sub-voxel method (``DEFAULT_METHOD``), False for the plain argmax,
      or a method name from ``METHODS``.
    stride: heatmap stride relative to the input grid; voxel c of the heatmap is input voxel
      ``(c + 0.5) * stride - 0.5`` (the centre of the stride x stride block it summarises).
    kind: "gaussian" (regressed Gaussians: confidence = peak height) or "logits" (spatial-softmax
      logits: confidence = probability mass within one heatmap voxel of the peak).
    Returns: coords [B, L, 3] float32 voxel coordinates on the input grid, confidence [B, L] float32.
    """
    method = DEFAULT_METHOD if refine is True else ("argmax" if refine is False else refine)
    if method not in METHODS:
        raise ValueError(f"decode_heatmaps: unknown refine method {refine!r}; one of {METHODS}")
    if kind not in KINDS:
        raise ValueError(f"decode_heatmaps: unknown heatmap kind {kind!r}; one of {KINDS}")
    b, *shape, num = heatmaps.shape
    flat = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1).reshape(b * num, -1)  # [N, V]
    peak_lin = jnp.argmax(flat, axis=1)
    peak_idx = jnp.stack(jnp.unravel_index(peak_lin, shape), axis=-1).astype(jnp.int32)  # [N, 3]
    coords = peak_idx.astype(jnp.float32)
    if method == "quadratic":
        coords = coords + _quadratic_offset(flat, peak_idx, shape, kind)
    elif method == "soft":
        coords = coords + _soft_offset(flat, peak_idx, shape, kind)
    if kind == "logits":
        confidence = _softmax_mass(flat, peak_idx, shape)
    else:
        confidence = jnp.take_along_axis(flat, peak_lin[:, None], axis=1)[:, 0]
    coords = (coords + 0.5) * stride - 0.5
    return coords.reshape(b, num, 3), confidence.reshape(b, num)
