"""CowNet contracts: output shapes and dtypes, float32 parameters, purity, config checks."""

import jax
import jax.numpy as jnp
import pytest

from cowjax import anatomy
from cowjax.errors import CowjaxError
from cowjax.model import unet
from configs import test as test_config

SHAPE = (16, 16, 8)


def _model(**overrides):
    c = test_config.get_config()
    c.model.update(overrides)
    return unet.build_model(c)


def _n_params(params):
    return sum(p.size for p in jax.tree.leaves(params))


@pytest.mark.parametrize("stride,dtype", [(1, "float32"), (2, "bfloat16")])
def test_outputs_shapes_and_dtypes(stride, dtype):
    model = _model(heatmap_stride=stride, dtype=dtype)
    params = unet.init_params(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (2, *SHAPE, 1))
    out = jax.jit(model.apply)({"params": params}, x)
    hm = tuple(n // stride for n in SHAPE)
    assert out["heatmaps"].shape == (2, *hm, anatomy.NUM_LANDMARKS)
    assert out["segmentation"].shape == (2, *SHAPE, anatomy.NUM_CLASSES)
    assert out["landmark_attr"].shape == (2, anatomy.NUM_LANDMARKS)
    assert out["segment_attr"].shape == (2, anatomy.NUM_SEGMENTS)
    for v in out.values():
        assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v)))


def test_pure_and_width_dependent():
    model = _model()
    params = unet.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, *SHAPE, 1))
    a = model.apply({"params": params}, x)
    b = jax.jit(model.apply)({"params": params}, x)
    for k in a:
        assert jnp.allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert jnp.array_equal(model.apply({"params": params}, x)["heatmaps"], a["heatmaps"])
    n = _n_params(params)
    assert n > 0
    wider = _model(widths=(8, 16))
    assert _n_params(unet.init_params(wider, jax.random.key(0))) > n


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_norms_and_native_conv_agree_in_shape(norm):
    model = _model(norm=norm, conv_impl="native")
    params = unet.init_params(model, jax.random.key(0))
    out = model.apply({"params": params}, jnp.ones((1, *SHAPE, 1)))
    assert out["segmentation"].shape == (1, *SHAPE, anatomy.NUM_CLASSES)


def test_half_resolution_heads_skip_the_full_resolution_decoder():
    full = unet.init_params(_model(heatmap_stride=2), jax.random.key(0))
    half = unet.init_params(_model(heatmap_stride=2, segmentation_stride=2), jax.random.key(0))
    assert "dec0" in full and "dec0" not in half and _n_params(half) < _n_params(full)
    out = _model(heatmap_stride=2, segmentation_stride=2).apply({"params": half},
                                                                jnp.ones((1, *SHAPE, 1)))
    assert out["segmentation"].shape == (1, *(n // 2 for n in SHAPE), anatomy.NUM_CLASSES)
    assert out["heatmaps"].shape == (1, *(n // 2 for n in SHAPE), anatomy.NUM_LANDMARKS)


def test_bad_config_and_input_raise():
    with pytest.raises(CowjaxError, match="norm"):
        _model(norm="batch")
    with pytest.raises(CowjaxError, match="heatmap_stride"):
        _model(heatmap_stride=3)
    with pytest.raises(CowjaxError, match="segmentation_stride"):
        _model(segmentation_stride=4)
    model = _model()
    params = unet.init_params(model, jax.random.key(0))
    with pytest.raises(CowjaxError, match="divisible"):
        model.apply({"params": params}, jnp.ones((1, 15, 16, 8, 1)))
