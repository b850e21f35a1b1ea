"""3x3x3 convolution (SAME padding, stride 1) behind one function, fast on every platform.

XLA's CPU backend runs 3D convolutions far below its matrix-product speed (about 18 GFLOP/s for a
16->16 3x3x3 convolution on 2x64x64x48 where a matmul reaches about 200 GFLOP/s). On GPU/TPU the native
convolution is the fastest, so ``impl="auto"`` picks native there and a reformulation on CPU.

Formulations (all numerically the same convolution, up to float rounding):
- ``native``: ``lax.conv_general_dilated``.
- ``depth_sum``: a sum of three 2D convolutions, one per offset along the first spatial axis; that axis
  is folded into the batch by a free reshape.
- ``depth_stack``: the three offsets along the first axis stacked on channels, then one 2D convolution
  with 3*Cin input channels (no sum of partial outputs).
- ``im2col``: the 27 shifted copies of the input concatenated on channels, then one matrix product
  (kept for comparison: the 27x expanded buffer makes it memory bound and slower on CPU).
See BENCHMARKS.md for the per-layer measurements behind ``resolve_impl``.

Shapes: ``x [B, X, Y, Z, Cin]``, ``kernel [3, 3, 3, Cin, Cout]`` -> ``[B, X, Y, Z, Cout]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cowjax import config_check

IMPLS = config_check.CONV_IMPLS  # "auto", "native", "depth_sum", "depth_stack", "im2col"


def _native(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _depth_sum(x, kernel):
    b, nx, ny, nz, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    out = None
    for d in range(3):
        # [B, X, Y, Z, C] -> [B*X, Y, Z, C] is a free reshape, so each offset is a 2D conv.
        slab = lax.slice_in_dim(xp, d, d + nx, axis=1).reshape(b * nx, ny, nz, cin)
        y = lax.conv_general_dilated(slab, kernel[d], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = y if out is None else out + y
    return out.reshape(b, nx, ny, nz, -1)


def _depth_stack(x, kernel):
    b, nx, ny, nz, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    # The three offsets along X stacked on channels: one 2D conv with 3*Cin inputs, no output sum.
    cols = jnp.concatenate([lax.slice_in_dim(xp, d, d + nx, axis=1) for d in range(3)], axis=-1)
    k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * cin, kernel.shape[-1])
    y = lax.conv_general_dilated(cols.reshape(b * nx, ny, nz, 3 * cin), k2, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, nx, ny, nz, -1)


def _shifts(x, axes):
    """All 3^len(axes) shifted copies of ``x`` (zero padded by one along ``axes``), concatenated on
    channels in kernel order."""
    pad = [(1, 1) if a in axes else (0, 0) for a in range(x.ndim)]
    xp = jnp.pad(x, pad)
    copies = [xp]
    for a in axes:
        n = x.shape[a]
        copies = [lax.slice_in_dim(c, d, d + n, axis=a) for c in copies for d in range(3)]
    return jnp.concatenate(copies, axis=-1)


def _im2col(x, kernel):
    cols = _shifts(x, (1, 2, 3))                          # [B, X, Y, Z, 27*Cin]
    return jnp.dot(cols, kernel.reshape(-1, kernel.shape[-1]),
                   preferred_element_type=x.dtype)


_FORMULATIONS = {"native": _native, "depth_sum": _depth_sum, "depth_stack": _depth_stack,
                 "im2col": _im2col}


def resolve_impl(impl: str, platform: str | None = None, x_shape=None) -> str:
    """The concrete formulation ``impl`` stands for on ``platform`` (default: JAX's default backend)
    for an input of ``x_shape`` [B, X, Y, Z, Cin] (None: a typical layer)."""
    if impl not in IMPLS:  # a direct caller's argument (configs are checked by config_check)
        raise ValueError(f"conv_impl {impl!r}: expected one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return "native"
    # Measured on a 2-core AVX-512 CPU (BENCHMARKS.md), whole train steps: depth_stack for up to 16
    # input channels and on small grids (the bottleneck), depth_sum above (its 3x stacked input
    # grows with the channels); both are 3-10x faster than native. Taking depth_stack up to 16
    # channels instead of below 8 made the paper bench step about 10% faster, the demo's 20%.
    if x_shape is not None and (x_shape[-1] <= 16 or x_shape[1] * x_shape[2] * x_shape[3] <= 512):
        return "depth_stack"
    return "depth_sum"


def conv3d(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
    """3x3x3 convolution, SAME padding, stride 1.

    x: [B, X, Y, Z, Cin]; kernel: [3, 3, 3, Cin, Cout]. Returns [B, X, Y, Z, Cout] in x's dtype.
    """
    if kernel.shape[:3] != (3, 3, 3) or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"conv3d: kernel {kernel.shape} does not fit input {x.shape}")
    return _FORMULATIONS[resolve_impl(impl, x_shape=x.shape)](x, kernel)
