"""cowjax.heatmaps: targets peak on the landmarks, the grid mapping, decoding (sub-voxel peaks,
confidences, batching)."""

import numpy as np
import pytest

from cowjax import anatomy
from configs import test as test_config
from cowjax import heatmaps

L = anatomy.NUM_LANDMARKS


def test_heatmap_peaks_sit_on_the_landmarks():
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    coords = rng.uniform(5, 11, (2, 19, 3))
    coords[1, 4] = np.nan
    mask = np.ones((2, 19))
    mask[0, 2] = 0
    heat = np.asarray(heatmaps.gaussian(coords, shape, (1.5, 1.5, 1.0), mask))
    assert heat.shape == (2, *shape, 19) and heat.dtype == np.float32
    assert heat[1, ..., 4].max() == 0 and heat[0, ..., 2].max() == 0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for b, k in [(0, 0), (0, 7), (1, 18)]:
        h = heat[b, ..., k]
        peak = np.array(np.unravel_index(np.argmax(h), shape))
        assert np.all(np.abs(peak - coords[b, k]) <= 0.5 + 1e-6)
        mean = (grid * h[..., None]).sum((0, 1, 2)) / h.sum()
        np.testing.assert_allclose(mean, coords[b, k], atol=1e-3)
        assert h.max() <= 1.0 and h.max() > 0.7


def test_heatmap_targets_peak_at_the_scaled_coordinate():
    config = test_config.get_config()
    config.model.heatmap_stride = 2
    coords = np.zeros((1, anatomy.NUM_LANDMARKS, 3), np.float32)
    coords[0, :] = [9.0, 5.0, 3.0]          # crop voxel 9 -> heatmap (9.5)/2 - 0.5 = 4.25 -> voxel 4
    t = np.asarray(heatmaps.targets(coords, (16, 16, 8), config))
    assert t.shape == (1, 16, 16, 8, anatomy.NUM_LANDMARKS)
    peak = np.unravel_index(np.argmax(t[0, ..., 0]), t.shape[1:4])
    assert tuple(peak) == (4, 2, 1)


def test_grid_mapping_round_trips_and_agrees_with_decoding():
    coords = np.random.default_rng(1).uniform(0, 30, (5, 3))
    for stride in (1, 2, 4):
        np.testing.assert_allclose(heatmaps.from_grid(heatmaps.to_grid(coords, stride), stride),
                                   coords, atol=1e-12)
    # The target made at a crop coordinate decodes back to it, through the stride-2 grid.
    config = test_config.get_config()
    config.model.heatmap_stride = 2
    true = np.array([[[12.3, 9.6, 6.2]] * L], np.float32)
    target = heatmaps.targets(true, (16, 16, 8), config)
    decoded, _ = heatmaps.decode(target, stride=2)
    np.testing.assert_allclose(np.asarray(decoded), true, atol=0.05)


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
    coords, conf = heatmaps.decode(_gaussians(true, shape, sigma))
    assert coords.shape == (2, L, 3) and conf.shape == (2, L)
    assert np.abs(np.asarray(coords) - true).max() < 0.1
    # Peak height of a unit Gaussian sampled within half a voxel of its centre.
    assert np.all(np.asarray(conf) > np.exp(-3 * 0.25 / (2 * sigma**2)) - 1e-6)
    assert np.all(np.asarray(conf) <= 1.0 + 1e-6)


def test_argmax_is_the_nearest_voxel():
    shape = (12, 12, 12)
    true = _centres(1, shape, seed=1)
    coords, _ = heatmaps.decode(_gaussians(true, shape, 1.5), method="argmax")
    np.testing.assert_array_equal(np.asarray(coords), np.round(true))


def test_refinement_beats_argmax_on_noisy_peaks():
    shape = (16, 16, 16)
    true = _centres(2, shape, seed=2)
    h = _gaussians(true, shape, 1.5, noise=0.05, seed=3)
    err = {m: np.linalg.norm(np.asarray(heatmaps.decode(h, method=m)[0]) - true, axis=-1).mean()
           for m in heatmaps.METHODS}
    assert err["quadratic"] < err["soft"] < err["argmax"]


@pytest.mark.parametrize("method", heatmaps.METHODS)
def test_stride_maps_back_to_input_voxels(method):
    shape = (8, 8, 8)
    true = _centres(1, shape, seed=4)
    h = _gaussians(true, shape, 1.2)
    c1, _ = heatmaps.decode(h, method, stride=1)
    c2, _ = heatmaps.decode(h, method, stride=2)
    # Heatmap voxel c covers input voxels 2c, 2c+1: its centre is 2c + 0.5.
    np.testing.assert_allclose(np.asarray(c2), 2 * np.asarray(c1) + 0.5, atol=1e-5)


def test_peak_on_the_border_stays_inside():
    h = np.zeros((1, 6, 6, 6, L), np.float32)
    h[0, 0, 5, 2, :] = 1.0
    h[0, 1, 5, 2, :] = 0.5
    coords, conf = heatmaps.decode(h)
    assert np.all(np.isfinite(np.asarray(coords)))
    np.testing.assert_allclose(np.asarray(coords)[0, :, 1:], [[5, 2]] * L)
    assert np.all(np.asarray(coords)[0, :, 0] >= 0) and np.all(np.asarray(conf) == 1.0)


def test_logits_confidence_is_softmax_mass_near_the_peak():
    shape = (10, 10, 10)
    true = np.full((1, L, 3), 4.3)
    sharp = np.log(_gaussians(true, shape, 0.7) + 1e-9)
    flat = np.log(_gaussians(true, shape, 3.0) + 1e-9)
    c_sharp, p_sharp = heatmaps.decode(sharp, kind="logits")
    _, p_flat = heatmaps.decode(flat, kind="logits")
    # Log of a Gaussian is a parabola: the fit is exact on logits.
    np.testing.assert_allclose(np.asarray(c_sharp), true, atol=1e-3)
    p_sharp, p_flat = np.asarray(p_sharp), np.asarray(p_flat)
    assert np.all((p_sharp > 0.9) & (p_sharp <= 1.0 + 1e-6)) and np.all(p_flat < p_sharp)
    # Brute force: probability within one voxel of the argmax (4, 4, 4).
    prob = np.exp(flat[0, ..., 0] - flat[0, ..., 0].max())
    np.testing.assert_allclose(p_flat[0, 0], prob[3:6, 3:6, 3:6].sum() / prob.sum(), rtol=1e-4)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'cubic'"):
        heatmaps.decode(np.zeros((1, 4, 4, 4, 2), np.float32), method="cubic")
