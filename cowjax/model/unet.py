"""The multi-task residual 3D U-Net: landmark heatmaps, segment labels and the two attribute heads.

Flax Linen rather than NNX: ``model.apply({"params": p}, x)`` is a pure function of a plain dict of
parameters, which the train step can jit, shard and donate together with the optimiser state without
any module object in the state (there are no batch statistics: normalisation is group/instance/none).

Layout: a stem 3x3x3 convolution, then per level a residual block (two 3x3x3 convolutions with
normalisation and ReLU, identity shortcut or a 1x1x1 projection when widths differ); levels are joined by
2x2x2 stride-2 convolutions down and 2x2x2 stride-2 transposed convolutions up, written as
space-to-depth + matmul and matmul + depth-to-space (a plain matmul is fast on every backend); decoder
blocks read the upsampled features concatenated with the encoder skip. After the shared
encoder-decoder, four parallel branches (the paper's layout): 1x1x1 convolutions for the heatmaps
(full or half resolution) and the segmentation logits, and the two attribute branches
(``AttributeBranches``), which pool the decoder's features under each landmark's predicted heatmap
and over each segment's predicted voxels. (The earlier design, an MLP on the globally pooled
bottleneck, measured no better on held-out cases, 2026-12-01: variable-segment presence 83.3% both,
bifurcation 86.8% against 85.5%, one seed each; BENCHMARKS.md.)
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cowjax import anatomy, devices, heatmaps
from cowjax.errors import CowjaxError
from cowjax.model import conv

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTRIBUTE_HIDDEN = 32          # hidden units of each landmark's / segment's attribute MLP
# Regressed Gaussian heatmaps (L2 loss) peak at 1 over a background of 0: scaled by this before
# the spatial softmax, the peak outweighs the ~10^5 background voxels (e^20 : 1 each).
GAUSSIAN_ATTENTION_SCALE = 20.0


class Conv3x3(nn.Module):
    """3x3x3 SAME convolution through ``conv.conv3d`` (the per-platform fast formulation)."""
    features: int
    use_bias: bool
    dtype: jnp.dtype
    impl: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, 3, x.shape[-1], self.features), jnp.float32)
        y = conv.conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


def _norm(kind: str, dtype, name: str | None = None):
    if kind == "group":
        return lambda x: nn.GroupNorm(num_groups=math.gcd(x.shape[-1], 8), dtype=dtype,
                                      name=name)(x)
    if kind == "instance":
        return lambda x: nn.GroupNorm(num_groups=None, group_size=1, dtype=dtype, name=name)(x)
    return lambda x: x


class ResBlock(nn.Module):
    features: int
    norm: str
    dtype: jnp.dtype
    impl: str

    @nn.compact
    def __call__(self, x):
        bias = self.norm == "none"
        h = Conv3x3(self.features, bias, self.dtype, self.impl)(x)
        h = nn.relu(_norm(self.norm, self.dtype)(h))
        h = Conv3x3(self.features, bias, self.dtype, self.impl)(h)
        h = _norm(self.norm, self.dtype)(h)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="project")(x)
        return nn.relu(h + shortcut)


def space_to_depth(x):
    """[B, X, Y, Z, C] -> [B, X/2, Y/2, Z/2, 8C] (2x2x2 blocks onto channels)."""
    b, nx, ny, nz, c = x.shape
    x = x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, nx // 2, ny // 2, nz // 2, 8 * c)


def depth_to_space(x):
    """[B, X, Y, Z, 8C] -> [B, 2X, 2Y, 2Z, C] (inverse of ``space_to_depth``)."""
    b, nx, ny, nz, c8 = x.shape
    c = c8 // 8
    x = x.reshape(b, nx, ny, nz, 2, 2, 2, c)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * nx, 2 * ny, 2 * nz, c)


class Down(nn.Module):
    """2x2x2 stride-2 convolution (as space-to-depth + matmul), normalisation, ReLU."""
    features: int
    norm: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, use_bias=self.norm == "none", dtype=self.dtype)(space_to_depth(x))
        return nn.relu(_norm(self.norm, self.dtype)(h))


class Up(nn.Module):
    """2x2x2 stride-2 transposed convolution (as matmul + depth-to-space), normalisation, ReLU."""
    features: int
    norm: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = depth_to_space(nn.Dense(8 * self.features, use_bias=self.norm == "none",
                                    dtype=self.dtype)(x))
        return nn.relu(_norm(self.norm, self.dtype)(h))


class PerItemMLP(nn.Module):
    """[B, N, C] -> [B, N] logits: a one-hidden-layer MLP with its own weights for each of the N
    items (each landmark or segment asks its own question of its pooled features)."""
    hidden: int

    @nn.compact
    def __call__(self, x):
        n, c = x.shape[-2:]
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w1 = self.param("w1", init, (n, c, self.hidden))
        b1 = self.param("b1", nn.initializers.zeros, (n, self.hidden))
        w2 = self.param("w2", init, (n, self.hidden, 1))
        b2 = self.param("b2", nn.initializers.zeros, (n,))
        h = nn.relu(jnp.einsum("bnc,nch->bnh", x, w1) + b1)
        return jnp.einsum("bnh,nho->bn", h, w2) + b2


# Each segment's two ends as landmark channels; the basilar artery's free lower end (VBJ) has no
# landmark, so its features are read at BA_top twice.
_SEGMENT_END_CHANNELS = [[anatomy.LANDMARK_INDEX.get(end, anatomy.LANDMARK_INDEX["BA_top"])
                          for end in anatomy.SEGMENT_ENDS[s]] for s in anatomy.SEGMENTS]


class AttributeBranches(nn.Module):
    """The two attribute branches, read from the decoder's features (the paper's layout: four
    parallel branches after the shared encoder-decoder).

    - landmark attribute k ("sits on a bifurcation"): the features pooled under landmark k's
      predicted heatmap (its spatial softmax), through a per-landmark MLP;
    - segment attribute s ("exists"): the features pooled under the predicted probability of class
      s, the log of that class's predicted volume, and the pooled features at its two end
      landmarks, through a per-segment MLP.
    The pooling weights are held fixed (stop_gradient): the attribute losses and the
    self-consistency loss train the shared decoder through the features, while only the heatmap
    and segmentation losses move where the heatmaps and labels are.

    heat_features [B, x, y, z, C1] and heatmaps [B, x, y, z, 19] share a grid, as do seg_features
    [B, X', Y', Z', C2] and seg_logits [B, X', Y', Z', 21]. attention_scale multiplies the
    heatmaps before the softmax (1 for spatial-softmax logits; regressed Gaussians peak at 1, so
    they need a larger one). Returns (landmark logits [B, 19], segment logits [B, 20]).
    """
    hidden: int
    attention_scale: float

    @nn.compact
    def __call__(self, heat_features, heatmaps, seg_features, seg_logits):
        f32 = jnp.float32
        b, c1 = heat_features.shape[0], heat_features.shape[-1]
        heat_features = heat_features.astype(f32).reshape(b, -1, c1)
        attention = jax.lax.stop_gradient(heatmaps.astype(f32) * self.attention_scale)
        attention = jax.nn.softmax(attention.reshape(b, -1, heatmaps.shape[-1]), axis=1)
        at_landmark = jnp.einsum("bvl,bvc->blc", attention, heat_features)         # [B, 19, C1]

        c2 = seg_features.shape[-1]
        seg_features = seg_features.astype(f32).reshape(b, -1, c2)
        prob = jax.nn.softmax(jax.lax.stop_gradient(seg_logits.astype(f32)), axis=-1)
        prob = prob.reshape(b, -1, seg_logits.shape[-1])[..., 1:]                 # [B, V, 20]
        volume = prob.sum(axis=1)                                                  # [B, 20] voxels
        on_segment = jnp.einsum("bvs,bvc->bsc", prob, seg_features) / (volume[..., None] + 1.0)
        at_ends = at_landmark[:, jnp.asarray(_SEGMENT_END_CHANNELS)].reshape(b, len(anatomy.SEGMENTS),
                                                                            2 * c1)
        segment_in = jnp.concatenate([on_segment, at_ends, jnp.log1p(volume)[..., None]], axis=-1)
        return (PerItemMLP(self.hidden, name="landmark_attr")(at_landmark),
                PerItemMLP(self.hidden, name="segment_attr")(segment_in))


class CowNet(nn.Module):
    """image [B, X, Y, Z, 1] -> {"heatmaps": [B, X/s, Y/s, Z/s, 19], "segmentation": [B, X/t, Y/t,
    Z/t, 21], "landmark_attr": [B, 19], "segment_attr": [B, 20]} (s = heatmap_stride, t =
    segmentation_stride), all float32 logits or heatmaps. X, Y, Z must be divisible by
    2**(len(widths) - 1). With both strides 2 the full-resolution decoder level is not built at all,
    which halves the cost of a CPU step."""
    widths: Sequence[int] = (16, 32, 64, 128)
    norm: str = "group"
    dtype: str = "float32"
    heatmap_stride: int = 1
    segmentation_stride: int = 1
    conv_impl: str = "auto"
    attention_scale: float = 1.0

    @nn.compact
    def __call__(self, image):
        dt = _DTYPES[self.dtype]
        factor = 2 ** (len(self.widths) - 1)
        if any(n % factor for n in image.shape[1:4]):
            raise CowjaxError(f"model input {image.shape[1:4]} is not divisible by {factor} "
                              f"(2**(len(widths)-1) for widths {tuple(self.widths)})")
        x = Conv3x3(self.widths[0], True, dt, self.conv_impl, name="stem")(image.astype(dt))
        skips = []
        for i, w in enumerate(self.widths):
            if i:
                x = Down(w, self.norm, dt, name=f"down{i}")(x)
            x = ResBlock(w, self.norm, dt, self.conv_impl, name=f"enc{i}")(x)
            skips.append(x)
        half = None
        full_resolution = self.heatmap_stride == 1 or self.segmentation_stride == 1
        for i in reversed(range(len(self.widths) - 1)):
            if i == 0:
                half = x  # the decoder's half-resolution features feed the stride-2 heads
                if not full_resolution:
                    break
            x = Up(self.widths[i], self.norm, dt, name=f"up{i}")(x)
            x = ResBlock(self.widths[i], self.norm, dt, self.conv_impl, name=f"dec{i}")(
                jnp.concatenate([x, skips[i]], axis=-1))
        heat_in = x if self.heatmap_stride == 1 else half
        heatmaps = nn.Dense(anatomy.NUM_LANDMARKS, dtype=dt, name="heatmap_head")(heat_in)
        seg_in = x if self.segmentation_stride == 1 else half
        segmentation = nn.Dense(anatomy.NUM_CLASSES, dtype=dt, name="segmentation_head")(seg_in)

        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        landmark_attr, segment_attr = AttributeBranches(
            hidden=ATTRIBUTE_HIDDEN, attention_scale=self.attention_scale,
            name="attributes")(heat_in, heatmaps, seg_in, segmentation)
        return {"heatmaps": f32(heatmaps), "segmentation": f32(segmentation),
                "landmark_attr": f32(landmark_attr), "segment_attr": f32(segment_attr)}


def build_model(config) -> CowNet:
    """The network for ``config``: the full config (its ``model`` group, and its heatmap loss for
    the attention scale); ``config_check.validate`` checks the settings beforehand."""
    m = config.model
    widths = tuple(int(w) for w in m.widths)
    return CowNet(widths=widths, norm=m.norm, dtype=m.dtype, heatmap_stride=int(m.heatmap_stride),
                  segmentation_stride=int(m.segmentation_stride),
                  conv_impl=m.conv_impl,
                  attention_scale=(GAUSSIAN_ATTENTION_SCALE
                                   if heatmaps.kind_for(config) == "gaussian" else 1.0))


def init_params(model: nn.Module, key: jax.Array, shape: Sequence[int] | None = None) -> dict:
    """Float32 parameters of ``model`` (a ``CowNet``, or any module taking one image). They do not
    depend on the input's size: ``shape`` [X, Y, Z] is the input traced (default: the smallest a
    ``CowNet`` takes)."""
    return _init(model, _input_shape(model, shape), key)


def param_shapes(model: nn.Module, shape: Sequence[int] | None = None) -> dict:
    """``init_params``'s shapes and dtypes (``jax.ShapeDtypeStruct``s), computing nothing."""
    return jax.eval_shape(functools.partial(_draw, model, _input_shape(model, shape)),
                          jax.random.key(0))


def _input_shape(model, shape) -> tuple[int, ...]:
    return (2 ** (len(model.widths) - 1),) * 3 if shape is None else tuple(int(n) for n in shape)


def _draw(model, shape, key):
    return model.init(key, jnp.zeros((1, *shape, 1), jnp.float32))["params"]


# One program per model, compiled at LLVM level 1 on a CPU (``devices.jit``): the random draws are
# integer hashing and IEEE arithmetic, so the level changes no value (tests/test_training.py checks
# them against ``model.init`` run op by op), only the compile time: for the demo's first network on
# a 2-core CPU 4-7 s, against 20 s at the default level and 25-40 s op by op, which compiled every
# operation of the forward pass on its own (BENCHMARKS.md, 2026-12-03). Outside a trace only (a jit
# with compiler options cannot be nested there): ``param_shapes`` for the shapes.
_init = devices.jit(_draw, static_argnums=(0, 1))
