"""The refinement stage (``config.refine``, ``<workdir>/refine``, ``--refine``): a second, patch
network that re-detects each landmark at a finer spacing in a patch centred on its first estimate.

Patch k's heatmap k (spatial-softmax logits) plus a Gaussian log-prior around the first estimate is
decoded (``heatmaps.decode``, the run's decode method). The prior keeps the small patch network from
jumping to a similar bifurcation nearby, such as the other side's A2 end or a further M2/P2
branching.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cowjax import anatomy, devices, heatmaps
from cowjax.data import preprocess
from cowjax.inference import windows
from cowjax.model import unet
from cowjax.registration import intensity


def decode_with_prior(logits, channels, centres, sigma_vox, method: str = heatmaps.DEFAULT_METHOD):
    """Landmark ``channels [B]`` of patch logits [B, X, Y, Z, 19] -> voxel coordinates [B, 3], each
    patch's logits plus the log of a Gaussian prior (``sigma_vox [3]``) around its first estimate
    ``centres [B, 3]`` (patch voxels)."""
    logits = jnp.take_along_axis(logits, channels[:, None, None, None, None], axis=-1)
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in logits.shape[1:4]],
                                  indexing="ij"), axis=-1)                      # [X, Y, Z, 3]
    z = (grid[None] - centres[:, None, None, None]) / sigma_vox
    log_prior = -0.5 * jnp.sum(z * z, axis=-1, keepdims=True)
    return heatmaps.decode(logits + log_prior, method, kind="logits")[0][:, 0]


@functools.partial(devices.jit, static_argnums=(0, 1))
def _patch_landmarks(model, method, params, patches, channels, centres, sigma_vox):
    """Patches [B, X, Y, Z, 1] -> ``decode_with_prior`` of the patch network's heatmaps."""
    logits = model.apply({"params": params}, patches)["heatmaps"]
    return decode_with_prior(logits, channels, centres, sigma_vox, method)


class Refiner:
    """A run's refinement stage: ``refine(image, affine, landmarks)`` moves each landmark to its
    re-detection in a patch around it.

    config: the stage's own config (``config_defaults.refine_config``); ``prior_sigma_mm`` and
    ``tta_shift_mm`` default to its ``refine`` group. With ``tta_shift_mm`` (test-time augmentation)
    each landmark is also re-detected with its estimate moved by +-shift along each axis, patch and
    prior together, and the seven results are averaged. decode_method: how each patch heatmap is
    read (``heatmaps.METHODS``).
    """

    def __init__(self, config, params, prior_sigma_mm: float | None = None,
                 tta_shift_mm: float | None = None, decode_method: str = heatmaps.DEFAULT_METHOD):
        self.config = config
        self.decode_method = decode_method
        self.window = np.array(config.data.crop_shape)
        self.model = unet.build_model(config)
        self.mesh = devices.data_mesh(devices.window_batch(), local=True)
        self.params = jax.device_put(params, devices.replicated(self.mesh))
        self.prior_sigma_mm = float(config.refine.prior_sigma_mm if prior_sigma_mm is None
                                    else prior_sigma_mm)
        self.sigma_vox = np.float32(self.prior_sigma_mm) / np.asarray(config.data.spacing,
                                                                      np.float32)
        shift = config.refine.get("tta_shift_mm", 0.0) if tta_shift_mm is None else tta_shift_mm
        self.shifts_mm = np.zeros((1, 3))
        if shift:
            self.shifts_mm = np.concatenate([self.shifts_mm, shift * np.eye(3), -shift * np.eye(3)])
        # The run's registration (None without), as for the first stage.
        self.to_template = intensity.template_registration(config.data)

    def refine(self, image, affine, landmarks, to_template: np.ndarray | None = None) -> np.ndarray:
        """image [X, Y, Z], affine [4, 4], first estimates [19, 3] world RAS mm -> refined [19, 3].

        to_template: the image's registration ([4, 4] image world -> template world), when the
        caller has it (``Predictor`` registers each image once for both stages); registered here
        when None and the run registers (``config.data.registration``).
        """
        if to_template is None and self.to_template is not None:
            to_template = self.to_template(image, affine)
        grid = preprocess.network_grid(affine, image.shape, self.config.data.spacing, to_template)
        prep = preprocess.preprocess_image(image, affine, *grid, fov=False)
        volume, grid_affine = prep["image"], prep["affine"]
        n = anatomy.NUM_LANDMARKS
        shifts_vox = self.shifts_mm / np.asarray(self.config.data.spacing, np.float64)
        # [shifts, 19, 3] patch centres and starts on the grid.
        centres = preprocess.world_to_voxel(landmarks, grid_affine)[None] + shifts_vox[:, None]
        starts = windows.centred_starts(centres, self.window)
        cut = windows.cut_windows(volume, starts.reshape(-1, 3), self.window).reshape(
            *starts.shape[:2], *self.window, 1)
        batch = -(-n // self.mesh.size) * self.mesh.size   # a multiple of the devices
        split = devices.split(self.mesh)
        channels = jax.device_put(np.arange(batch) % n, split)
        coords = np.zeros(centres.shape)
        for j in range(len(centres)):  # one call per shift: 19 patches, memory stays small
            patches = np.zeros((batch, *self.window, 1), np.float32)
            patches[:n] = cut[j]
            prior = np.zeros((batch, 3), np.float32)
            prior[:n] = centres[j] - starts[j]
            c = _patch_landmarks(self.model, self.decode_method, self.params,
                                 jax.device_put(patches, split), channels,
                                 jax.device_put(prior, split), self.sigma_vox)
            coords[j] = np.asarray(c, np.float64)[:n] + starts[j]
        return preprocess.voxel_to_world(coords.mean(axis=0), grid_affine)
