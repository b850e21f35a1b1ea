"""Heatmaps, in one place: the Gaussian targets, the mapping onto the heatmap grid, the heatmap kind
and decoding heatmaps back to landmark coordinates (jax.numpy, jittable, batched).

The heatmap grid. With ``config.model.heatmap_stride`` s, heatmap voxel i summarises the s x s x s
block of input voxels [s*i, s*i + s), so input coordinate c is heatmap coordinate
``(c + 0.5) / s - 0.5`` (``to_grid``) and back (``from_grid``).

Two kinds of heatmaps (``kind_for(config)``):
- ``"gaussian"``: regressed Gaussian heatmaps (L2 loss, the paper's; peak ~1). Confidence = peak
  height.
- ``"logits"``: spatial-softmax logits (``softmax_ce`` loss). Confidence = the softmax probability
  mass within one voxel (3x3x3) of the peak.

Decoding. The paper decodes by the argmax of each heatmap. The default here refines it: a quadratic
fit per axis, in the log domain (exact for a Gaussian; a spatial-softmax model's logits already are
that domain), through the plane averages of the 3x3x3 neighbourhood of the peak. Measured on
synthetic Gaussian peaks in a 24^3 volume (mean error over 64 peaks, voxels; argmax / 3-point
soft-argmax / this fit): sigma 2 noise-free 0.45 / 0.37 / 0.00; sigma 2 + noise 0.05 0.57 / 0.48 /
0.17; sigma 4 + noise 0.05 0.96 / 0.93 / 0.54; sigma 1 + noise 0.1 0.54 / 0.27 / 0.27. (A plain
3-point fit along each axis through the peak: 0.32 at sigma 2 + noise 0.05, 0.82 at sigma 4 +
noise 0.05.)
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


def kind_for(config) -> str:
    """The kind of heatmaps the config's model is trained to output (its heatmap loss decides)."""
    return "logits" if config.loss.heatmap == "softmax_ce" else "gaussian"


def to_grid(coords, stride: int):
    """Input-grid voxel coordinates -> heatmap-grid voxel coordinates (works on numpy and jax)."""
    return (coords + 0.5) / stride - 0.5


def from_grid(coords, stride: int):
    """Heatmap-grid voxel coordinates -> input-grid voxel coordinates (the block's centre)."""
    return (coords + 0.5) * stride - 0.5

# Offsets of the 3x3x3 neighbourhood, [27, 3].
_CUBE = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int32)
# Gaussian heatmap values below this fraction of the peak are treated as noise in the log fit.
_LOG_FLOOR = 1e-3


def gaussian(coords, shape, sigma_vox, mask=None):
    """Separable Gaussian heatmaps, peak 1 at each landmark.

    coords: [B, L, 3] voxel coordinates (NaN = unknown); shape: (X, Y, Z); sigma_vox: scalar or [3];
    mask: optional [B, L], 0 -> zero map. Returns [B, X, Y, Z, L] float32. Built as the outer product
    of three 1-D Gaussians per landmark, so the cost is one multiply per output element.
    """
    coords = jnp.asarray(coords, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma_vox, jnp.float32), (3,))
    valid = jnp.all(jnp.isfinite(coords), axis=-1)
    if mask is not None:
        valid = valid & (jnp.asarray(mask) > 0)
    coords = jnp.where(valid[..., None], coords, 0.0)
    axes = []
    for a, n in enumerate(shape):
        x = jnp.arange(n, dtype=jnp.float32)
        axes.append(jnp.exp(-0.5 * ((x - coords[..., a, None]) / sigma[a]) ** 2))  # [B, L, n]
    gx = axes[0] * valid[..., None]
    return jnp.einsum("blx,bly,blz->bxyzl", gx, axes[1], axes[2])


def sigma_for(config) -> np.ndarray:
    """The Gaussian's sigma [3] in heatmap-grid voxels: ``data.heatmap_sigma_mm`` over the spacing,
    shrunk by the heatmap stride."""
    return (np.asarray(config.data.heatmap_sigma_mm) / np.asarray(config.data.spacing)
            / config.model.heatmap_stride)


def targets(coords, heatmap_shape, config):
    """Gaussian heatmap targets on the heatmap grid, made on the device from the coordinates
    (batches carry no heatmaps).

    coords: [B,19,3] voxel coords in the crop (NaN unknown). heatmap_shape: (x,y,z).
    Returns [B,x,y,z,19] float32, peak 1 at ``to_grid(coords)``.
    """
    grid_coords = to_grid(coords, config.model.heatmap_stride)
    return gaussian(grid_coords, tuple(heatmap_shape), sigma_for(config))


def _gather(flat, idx, shape):
    """Values of ``flat [N, V]`` at voxel indices ``idx [N, K, 3]`` (clipped into the volume)."""
    idx = jnp.clip(idx, 0, jnp.array(shape) - 1)
    lin = (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]
    return jnp.take_along_axis(flat, lin, axis=1)


def _inside(idx, shape):
    return jnp.all((idx >= 0) & (idx < jnp.array(shape)), axis=-1)


def _quadratic_offset(flat, peak_idx, shape, kind):
    """Sub-voxel offset [N, 3]: per axis, a parabola through the 3x3x3 neighbourhood's three planes.

    In the log domain a Gaussian is a sum of per-axis parabolas, so averaging each plane (the 3x3
    values at offset -1, 0, +1 along the axis) keeps the fit exact while averaging out noise.
    """
    values = _gather(flat, peak_idx[:, None, :] + _CUBE, shape)          # [N, 27]
    if kind == "gaussian":
        # Floor relative to the peak keeps the log finite where the heatmap is ~0 or negative.
        peak = values[:, 13:14]
        values = jnp.log(jnp.maximum(values, _LOG_FLOOR * jnp.maximum(peak, 1e-12)))
    cube = values.reshape(-1, 3, 3, 3)
    planes = jnp.stack([cube.mean(axis=(2, 3)), cube.mean(axis=(1, 3)), cube.mean(axis=(1, 2))],
                       axis=1)                                            # [N, axis, -1/0/+1]
    fm, f0, fp = planes[..., 0], planes[..., 1], planes[..., 2]
    curvature = fm - 2.0 * f0 + fp
    inside = (peak_idx > 0) & (peak_idx < jnp.array(shape) - 1)
    valid = inside & (curvature < 0)
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


@functools.partial(jax.jit, static_argnames=("method", "stride", "kind"))
def decode(heatmaps, method: str = DEFAULT_METHOD, stride: int = 1, kind: str = "gaussian"):
    """Landmark coordinates and confidences from heatmaps.

    heatmaps: [B, x, y, z, L] float (L = anatomy.NUM_LANDMARKS for the network's output).
    method: one of ``METHODS``: "argmax" (the paper's), "quadratic" (the default sub-voxel fit) or
      "soft" (the 3x3x3 soft-argmax).
    stride: heatmap stride relative to the input grid (coordinates are returned by ``from_grid``).
    kind: "gaussian" (regressed Gaussians: confidence = peak height) or "logits" (spatial-softmax
      logits: confidence = probability mass within one heatmap voxel of the peak).
    Returns: coords [B, L, 3] float32 voxel coordinates on the input grid, confidence [B, L] float32.
    """
    if method not in METHODS:
        raise ValueError(f"heatmaps.decode: unknown method {method!r}; one of {METHODS}")
    if kind not in KINDS:
        raise ValueError(f"heatmaps.decode: unknown heatmap kind {kind!r}; one of {KINDS}")
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
    coords = from_grid(coords, stride)
    return coords.reshape(b, num, 3), confidence.reshape(b, num)
