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
    assert "dec0" in full and "dec0" not in half
    # The attribute branches read wider (half-resolution) features; the trunk itself is smaller.
    trunk = lambda p: _n_params({k: v for k, v in p.items() if k != "attributes"})  # noqa: E731
    assert trunk(half) < trunk(full)
    out = _model(heatmap_stride=2, segmentation_stride=2).apply({"params": half},
                                                                jnp.ones((1, *SHAPE, 1)))
    assert out["segmentation"].shape == (1, *(n // 2 for n in SHAPE), anatomy.NUM_CLASSES)
    assert out["heatmaps"].shape == (1, *(n // 2 for n in SHAPE), anatomy.NUM_LANDMARKS)


def test_input_not_divisible_by_the_pooling_is_refused():
    model = _model()
    params = unet.init_params(model, jax.random.key(0))
    with pytest.raises(CowjaxError, match="divisible"):
        model.apply({"params": params}, jnp.ones((1, 15, 16, 8, 1)))


def _attribute_loss(params, model, x):
    out = model.apply({"params": params}, x)
    return jnp.sum(out["landmark_attr"] ** 2) + jnp.sum(out["segment_attr"] ** 2)


def _grad_norms(grads):
    return {k: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(v))) for k, v in grads.items()}


@pytest.mark.parametrize("stride", [1, 2])
def test_attribute_branches_train_the_decoder_but_not_the_heads_they_read(stride):
    """The paper's four parallel branches: the attribute losses reach the shared decoder through the
    pooled features, while the heatmaps and labels they pool under are held fixed."""
    model = _model(widths=(4, 8, 16), heatmap_stride=stride, segmentation_stride=stride)
    params = unet.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, *SHAPE, 1))
    norms = _grad_norms(jax.grad(_attribute_loss)(params, model, x))
    # The decoder level the heads read: full resolution (dec0) or half (dec1, dec0 not built).
    decoder = "dec0" if stride == 1 else "dec1"
    assert norms["attributes"] > 0 and norms[decoder] > 0 and norms["up1"] > 0
    assert norms["heatmap_head"] == 0 and norms["segmentation_head"] == 0


def test_landmark_attribute_reads_the_features_under_its_heatmap():
    """Moving one landmark's heatmap peak changes that landmark's attribute logit, not another's:
    each landmark's attribute is read where its heatmap points."""
    branches = unet.AttributeBranches(hidden=8, attention_scale=1.0)
    key = jax.random.key(0)
    feats = jax.random.normal(key, (1, 8, 8, 8, 6))
    heat = jnp.full((1, 8, 8, 8, anatomy.NUM_LANDMARKS), -10.0).at[:, 2, 2, 2, :].set(10.0)
    seg_logits = jnp.zeros((1, 8, 8, 8, anatomy.NUM_CLASSES))
    params = branches.init(key, feats, heat, feats, seg_logits)
    lm_a, _ = branches.apply(params, feats, heat, feats, seg_logits)
    moved = heat.at[:, 2, 2, 2, 3].set(-10.0).at[:, 6, 5, 4, 3].set(10.0)
    lm_b, _ = branches.apply(params, feats, moved, feats, seg_logits)
    changed = jnp.abs(lm_a - lm_b)[0] > 1e-6
    assert bool(changed[3]) and int(changed.sum()) == 1
