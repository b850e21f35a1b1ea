"""Every 3x3x3 convolution formulation equals the native one: forward and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cowjax.model import conv

FORMULATIONS = [i for i in conv.IMPLS if i not in ("auto", "native")]


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("impl", FORMULATIONS)
@pytest.mark.parametrize("shape,cin,cout", [((2, 6, 5, 7), 3, 4), ((1, 8, 8, 4), 8, 8)])
def test_formulation_matches_native(impl, shape, cin, cout):
    kx, kk, kg = jax.random.split(jax.random.key(hash((impl, shape)) % 2**31), 3)
    x = jax.random.normal(kx, (*shape, cin), jnp.float32)
    w = jax.random.normal(kk, (3, 3, 3, cin, cout), jnp.float32)
    probe = jax.random.normal(kg, (*shape, cout), jnp.float32)

    def loss(impl_):
        # A random linear functional of the output: its gradients are the transposed convolutions.
        return jax.jit(jax.value_and_grad(lambda x_, w_: jnp.sum(conv.conv3d(x_, w_, impl_) * probe),
                                          argnums=(0, 1)))

    ref_y = conv.conv3d(x, w, "native")
    y = jax.jit(conv.conv3d, static_argnums=2)(x, w, impl)
    assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
    assert _rel(y, ref_y) < 1e-4
    _, (ref_gx, ref_gw) = loss("native")(x, w)
    _, (gx, gw) = loss(impl)(x, w)
    assert _rel(gx, ref_gx) < 1e-4
    assert _rel(gw, ref_gw) < 1e-4


def test_auto_is_native_off_cpu_and_a_depth_formulation_on_it():
    assert conv.resolve_impl("auto", "gpu") == "native"
    assert conv.resolve_impl("auto", "tpu") == "native"
    # On a CPU: depth_stack for few input channels or a small grid, depth_sum otherwise.
    assert conv.resolve_impl("auto", "cpu", (1, 64, 64, 48, 1)) == "depth_stack"
    assert conv.resolve_impl("auto", "cpu", (1, 8, 8, 8, 128)) == "depth_stack"
    assert conv.resolve_impl("auto", "cpu", (1, 32, 32, 24, 64)) == "depth_sum"
    assert conv.resolve_impl("auto", "cpu") == "depth_sum"      # a typical layer
    assert conv.resolve_impl("im2col", "gpu") == "im2col"        # an explicit choice is kept


def test_bad_kernel_and_impl_rejected():
    x = jnp.zeros((1, 4, 4, 4, 2))
    with pytest.raises(ValueError, match="kernel"):
        conv.conv3d(x, jnp.zeros((3, 3, 3, 3, 2)))
    with pytest.raises(ValueError, match="conv_impl"):
        conv.conv3d(x, jnp.zeros((3, 3, 3, 2, 2)), "fft")
    assert np.all(np.isfinite(conv.conv3d(x, jnp.ones((3, 3, 3, 2, 1)), "native")))
