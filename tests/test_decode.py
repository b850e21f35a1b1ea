"""decode_heatmaps: sub-voxel peaks, the stride mapping, confidences, batching."""

import numpy as np
import pytest

from cowjax import anatomy
from cowjax.inference import decode

L = anatomy.NUM_LANDMARKS


def _gaussians(centres, shape, sigma, noise=0.0, seed=0):
    """[B, L, 3] voxel centres -> [B, X, Y, Z, L] Gaussian heatmaps with peak 1 (+ noise)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d2 = ((grid[None, :, :, :, None, :] - centres[:, None, None, None]) ** 2).sum(-1)
    h = np.exp(-d2 / (2 * sigma**2))
    return (h + noise * np.random.default_rng(seed).standard_normal(h.shape)).astype(np.float32)


def _centres(batch, shape, seed=0):
    return np.random.default_rng(seed).uniform(3, np.array(shape) - 4, size=(batch, L, 3))


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_recovers_subvoxel_gaussian_peak(sigma):
    shape = (16, 14, 12)
    true = _centres(2, shape)
    coords, conf = decode.decode_heatmaps(_gaussians(true, shape, sigma))
    assert coords.shape == (2, L, 3) and conf.shape == (2, L)
    assert np.abs(np.asarray(coords) - true).max() < 0.1
    # Peak height of a unit Gaussian sampled within half a voxel of its centre.
    assert np.all(np.asarray(conf) > np.exp(-3 * 0.25 / (2 * sigma**2)) - 1e-6)
    assert np.all(np.asarray(conf) <= 1.0 + 1e-6)


def test_argmax_is_the_nearest_voxel():
    shape = (12, 12, 12)
    true = _centres(1, shape, seed=1)
    coords, _ = decode.decode_heatmaps(_gaussians(true, shape, 1.5), refine=False)
    np.testing.assert_array_equal(np.asarray(coords), np.round(true))


def test_refinement_beats_argmax_on_noisy_peaks():
    shape = (16, 16, 16)
    true = _centres(2, shape, seed=2)
    h = _gaussians(true, shape, 1.5, noise=0.05, seed=3)
    err = {m: np.linalg.norm(np.asarray(decode.decode_heatmaps(h, refine=m)[0]) - true, axis=-1).mean()
           for m in decode.METHODS}
    assert err["quadratic"] < err["soft"] < err["argmax"]


@pytest.mark.parametrize("refine", [False, True])
def test_stride_maps_back_to_input_voxels(refine):
    shape = (8, 8, 8)
    true = _centres(1, shape, seed=4)
    h = _gaussians(true, shape, 1.2)
    c1, _ = decode.decode_heatmaps(h, refine=refine, stride=1)
    c2, _ = decode.decode_heatmaps(h, refine=refine, stride=2)
    # Heatmap voxel c covers input voxels 2c, 2c+1: its centre is 2c + 0.5.
    np.testing.assert_allclose(np.asarray(c2), 2 * np.asarray(c1) + 0.5, atol=1e-5)


def test_peak_on_the_border_stays_inside():
    h = np.zeros((1, 6, 6, 6, L), np.float32)
    h[0, 0, 5, 2, :] = 1.0
    h[0, 1, 5, 2, :] = 0.5
    coords, conf = decode.decode_heatmaps(h)
    assert np.all(np.isfinite(np.asarray(coords)))
    np.testing.assert_allclose(np.asarray(coords)[0, :, 1:], [[5, 2]] * L)
    assert np.all(np.asarray(coords)[0, :, 0] >= 0) and np.all(np.asarray(conf) == 1.0)


def test_logits_confidence_is_softmax_mass_near_the_peak():
    shape = (10, 10, 10)
    true = np.full((1, L, 3), 4.3)
    sharp = np.log(_gaussians(true, shape, 0.7) + 1e-9)
    flat = np.log(_gaussians(true, shape, 3.0) + 1e-9)
    c_sharp, p_sharp = decode.decode_heatmaps(sharp, kind="logits")
    _, p_flat = decode.decode_heatmaps(flat, kind="logits")
    # Log of a Gaussian is a parabola: the fit is exact on logits.
    np.testing.assert_allclose(np.asarray(c_sharp), true, atol=1e-3)
    p_sharp, p_flat = np.asarray(p_sharp), np.asarray(p_flat)
    assert np.all((p_sharp > 0.9) & (p_sharp <= 1.0 + 1e-6)) and np.all(p_flat < p_sharp)
    # Brute force: probability within one voxel of the argmax (4, 4, 4).
    prob = np.exp(flat[0, ..., 0] - flat[0, ..., 0].max())
    np.testing.assert_allclose(p_flat[0, 0], prob[3:6, 3:6, 3:6].sum() / prob.sum(), rtol=1e-4)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="refine"):
        decode.decode_heatmaps(np.zeros((1, 4, 4, 4, 2), np.float32), refine="cubic")
