"""Rigid intensity-based registration in JAX: the paper's normalisation of every MRA to a template.

A moving image is aligned to a fixed one (the template) by maximising the normalised
cross-correlation (NCC) between the fixed image and the moving image resampled through a rigid
transform, both first reduced to their vessels (``vessel_contrast``: a high-pass that drops the
MRA background a vessel-only template lacks). The resampler is a differentiable trilinear
gather (``jax.scipy.ndimage.map_coordinates``), the optimiser is Adam (optax) on 6 parameters, and
the search runs coarse to fine over an image pyramid (4/2/1 mm by default). Each level's
optimisation is one jitted ``lax.scan``; it is a pure function of arrays, so ``jax.vmap`` runs it over a batch of moving images (``register_rigid_batch``).

The transform maps moving world -> fixed world (RAS mm):
    A(x) = R(r) (x - c) + c + t,   params = (r [3] rotation vector, rad; t [3] translation, mm),
with ``c`` the centre of the moving image's bright structures, so the rotation and translation
are nearly decoupled. ``template_registration(config.data)`` is the ``to_template`` function that
training and prediction inject into preprocessing (``preprocess.network_grid``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from cowjax import anatomy
from cowjax.errors import CowjaxError

DEFAULT_LEVELS_MM = (4.0, 2.0, 1.0)
DEFAULT_STEPS = (150, 100, 60)
# Quantile above which voxels count as "bright" (vessel cores, not bright tissue) for centring.
_BRIGHT_QUANTILE = 0.999
# Structures wider than this (mm) count as background for ``vessel_contrast``.
_BACKGROUND_MM = 4.0


# ---------------------------------------------------------------- transforms (JAX, differentiable)

def rotation_matrix(rotvec: jax.Array) -> jax.Array:
    """Rodrigues' formula: [3] rotation vector (rad) -> [3, 3], smooth (with gradients) at 0."""
    theta2 = jnp.sum(rotvec ** 2)
    small = theta2 < 1e-8
    theta = jnp.sqrt(jnp.where(small, 1.0, theta2))      # the double-where keeps gradients finite
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / theta ** 2)
    k = jnp.array([[0.0, -rotvec[2], rotvec[1]],
                   [rotvec[2], 0.0, -rotvec[0]],
                   [-rotvec[1], rotvec[0], 0.0]])
    return jnp.eye(3) + a * k + b * (k @ k)


def rigid_matrix(params: jax.Array, centre: jax.Array) -> jax.Array:
    """[6] params (rotation vector rad, translation mm), [3] centre -> [4, 4] moving -> fixed world."""
    r = rotation_matrix(params[:3])
    t = centre + params[3:] - r @ centre
    return jnp.concatenate([jnp.concatenate([r, t[:, None]], axis=1),
                            jnp.array([[0.0, 0.0, 0.0, 1.0]])], axis=0)


def sample(image: jax.Array, affine: jax.Array, points: jax.Array) -> jax.Array:
    """Trilinear image values [P] at world points [P, 3] (mm), 0 outside; differentiable in the
    points. image: [X, Y, Z] or [X, Y, Z, C] (then [P, C]); affine: [4, 4] voxel -> world."""
    inv = jnp.linalg.inv(affine)
    coords = list((points @ inv[:3, :3].T + inv[:3, 3]).T)

    def one(channel):
        return jax.scipy.ndimage.map_coordinates(channel, coords, order=1, mode="constant")
    return one(image) if image.ndim == 3 else jax.vmap(one, in_axes=3, out_axes=1)(image)


def masked_ncc(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """Normalised cross-correlation of [P] a and b over the points where mask [P] is true."""
    w = mask.astype(a.dtype)
    n = jnp.maximum(w.sum(), 1.0)
    am = a - (w * a).sum() / n
    bm = b - (w * b).sum() / n
    cov = (w * am * bm).sum()
    return cov * jax.lax.rsqrt((w * am ** 2).sum() * (w * bm ** 2).sum() + 1e-12)


# ---------------------------------------------------------------- one pyramid level (jitted)

def _params(z: jax.Array, radius: jax.Array) -> jax.Array:
    # The optimiser sees the rotation as arc length (mm) at ``radius``, so one Adam step size
    # means the same displacement for rotation and translation.
    return jnp.concatenate([z[:3] / radius, z[3:]])


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def fit_level(fixed_values: jax.Array, fixed_points: jax.Array, moving: jax.Array,
              moving_affine: jax.Array, centre: jax.Array, radius: jax.Array, params0: jax.Array,
              *, steps: int, learning_rate: float) -> tuple[jax.Array, jax.Array]:
    """Adam on the 6 rigid parameters at one resolution; a pure function, vmap-able.

    fixed_values: [P] fixed intensities at fixed_points [P, 3] (world mm);
    moving: [X, Y, Z, 2] (intensity, validity: 1 where the voxel lies inside the original image)
    with moving_affine [4, 4] voxel -> moving world; centre: [3]; radius: [] mm; params0: [6].
    Returns (params [6], final NCC []).
    """
    def loss(z):
        p = _params(z, radius)
        # Fixed world -> moving world is the inverse of A: x = R^T (y - c - t) + c.
        points = (fixed_points - centre - p[3:]) @ rotation_matrix(p[:3]) + centre
        values = sample(moving, moving_affine, points)
        # Only points that see the original image count (not padding, not outside its FOV).
        inside = values[:, 1] > 0.999
        values = values[:, 0]
        return -masked_ncc(fixed_values, values, inside)

    # Cosine decay: big steps to travel, small ones to settle below a voxel.
    optimiser = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02))
    z0 = jnp.concatenate([params0[:3] * radius, params0[3:]])

    def step(carry, _):
        z, opt_state = carry
        grad = jax.grad(loss)(z)
        updates, opt_state = optimiser.update(grad, opt_state, z)
        return (optax.apply_updates(z, updates), opt_state), None

    (z, _), _ = jax.lax.scan(step, (z0, optimiser.init(z0)), None, length=steps)
    return _params(z, radius), -loss(z)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _fit_batch(values, points, movings, affines, centres, radius, params0, *, steps, learning_rate):
    fit = functools.partial(fit_level, steps=steps, learning_rate=learning_rate)
    return jax.vmap(fit, in_axes=(None, None, 0, 0, 0, None, 0))(
        values, points, movings, affines, centres, radius, params0)


# ---------------------------------------------------------------- host-side pyramid

def pyramid_level(image: np.ndarray, affine: np.ndarray,
                  spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth and subsample an image to about ``spacing_mm`` per voxel, keeping its orientation.

    Returns (image [x, y, z] float32, affine [4, 4]) with the same world extent; voxel i of the
    result sits at original voxel ``i * step``. Axes already coarser than spacing_mm stay as they are.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    step = np.maximum(spacing_mm / spacing, 1.0)
    smooth = smooth_to(image, affine, spacing_mm)
    shape = tuple(int(s) for s in np.floor((np.array(image.shape) - 1) / step) + 1)
    # Coarse voxel i samples original voxel i * step: a diagonal map, exact at the borders.
    coarse = ndimage.affine_transform(smooth, step, output_shape=shape, order=1, mode="nearest",
                                      prefilter=False)
    return coarse, affine @ np.diag([*step, 1.0])


def smooth_to(image: np.ndarray, affine: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Gaussian blur that takes the image's native resolution to about ``spacing_mm`` (anti-aliasing
    before sampling it that coarsely)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    sigma = np.sqrt(np.maximum((0.5 * spacing_mm) ** 2 - (0.5 * spacing) ** 2, 0.0)) / spacing
    return ndimage.gaussian_filter(np.asarray(image, np.float32), sigma, mode="nearest")


def moving_window(image: np.ndarray, affine: np.ndarray, window_affine: np.ndarray,
                  window_shape) -> np.ndarray:
    """The (smoothed) moving image on a window grid: [x, y, z, 2] (intensity, validity).

    window_affine maps window voxels to moving world. Every case gets the same window shape at a
    level, so the jitted optimiser compiles once for all of them (and they stack for vmap).
    """
    src = np.linalg.inv(affine) @ window_affine
    values = ndimage.affine_transform(image, src[:3, :3], offset=src[:3, 3],
                                      output_shape=tuple(window_shape), order=1, mode="constant",
                                      cval=0.0, prefilter=False)
    vox = voxel_centres(src, window_shape).reshape(*window_shape, 3)
    valid = np.all((vox > -1e-3) & (vox < np.array(image.shape) - 1 + 1e-3), axis=-1)
    return np.stack([values, valid.astype(np.float32)], axis=-1)


def vessel_contrast(image: np.ndarray, affine: np.ndarray,
                    background_mm: float = _BACKGROUND_MM) -> np.ndarray:
    """Bright thin structures only: the image minus its Gaussian blur (``background_mm``), >= 0,
    scaled so the 99.9th percentile is 1 and clipped there.

    MRA backgrounds (tissue, fat, coil shading) and aneurysm-sized blobs otherwise dominate the
    correlation with a vessel-only template.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = np.asarray(image, np.float32)
    background = ndimage.gaussian_filter(image, background_mm / spacing, mode="nearest")
    high = np.maximum(image - background, 0.0)
    top = np.quantile(high, 0.999)
    return np.minimum(high / top, 1.0) if top > 0 else high


def voxel_centres(affine: np.ndarray, shape) -> np.ndarray:
    """[prod(shape), 3] world coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def bright_centre(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """[3] world centroid of the brightest voxels (the vessels in an MRA)."""
    image = np.asarray(image)
    mask = image >= np.quantile(image, _BRIGHT_QUANTILE)
    idx = np.argwhere(mask).astype(np.float64)
    weights = image[mask].astype(np.float64) - image.min() + 1e-6
    centroid = (weights @ idx) / weights.sum()
    return affine[:3, :3] @ centroid + affine[:3, 3]


def _fixed_samples(image, affine, max_points, seed):
    points = voxel_centres(affine, image.shape)
    values = image.reshape(-1)
    if len(values) > max_points:
        # A fixed random subset bounds the cost per step (the stochastic sampling of ITK/elastix).
        keep = np.random.default_rng(seed).choice(len(values), max_points, replace=False)
        points, values = points[keep], values[keep]
    return jnp.asarray(values, jnp.float32), jnp.asarray(points, jnp.float32)


def _check(image, affine, name):
    image, affine = np.asarray(image), np.asarray(affine, np.float64)
    if image.ndim != 3 or affine.shape != (4, 4) or not np.isfinite(image).all():
        raise CowjaxError(f"{name} image must be a finite 3D array with a [4, 4] affine, "
                          f"got {image.shape} and {affine.shape}")
    if np.ptp(image) == 0:
        raise CowjaxError(f"{name} image is constant: nothing to register")
    return image.astype(np.float32), affine


# ---------------------------------------------------------------- public API

def register_rigid(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray,
                   moving_affine: np.ndarray, levels_mm=DEFAULT_LEVELS_MM, steps=DEFAULT_STEPS,
                   learning_rate: float = 0.5, max_points: int = 1 << 16,
                   init: str = "identity", enhance: bool = True, margin_voxels: float = 5.0,
                   seed: int = 0) -> np.ndarray:
    """Rigid transform aligning ``moving`` to ``fixed`` by NCC, coarse to fine.

    fixed: [X, Y, Z], fixed_affine [4, 4]; moving: [X', Y', Z'], moving_affine [4, 4].
    levels_mm: pyramid spacings, coarse first; steps: Adam steps per level.
    learning_rate: Adam's step at the coarsest level in mm (scaled with the level spacing).
    init: "identity" starts at A = I (world frames roughly agree, as for head MRA in scanner
    coordinates); "centre" first matches the centroids of the brightest voxels, for frames far
    apart (misled when the image holds bright vessels the template lacks, e.g. the vertebrals).
    enhance: register ``vessel_contrast`` images (vessels without background) instead of raw ones.
    margin_voxels: how far the fixed region may move within one level, in that level's voxels.
    Returns: [4, 4] float64, moving world RAS mm -> fixed world RAS mm.
    """
    matrices = register_rigid_batch(fixed, fixed_affine, [moving], [moving_affine], levels_mm,
                                    steps, learning_rate, max_points, init, enhance,
                                    margin_voxels, seed)
    return matrices[0]


def register_rigid_batch(fixed: np.ndarray, fixed_affine: np.ndarray, movings: np.ndarray,
                         moving_affines: np.ndarray, levels_mm=DEFAULT_LEVELS_MM,
                         steps=DEFAULT_STEPS, learning_rate: float = 0.5,
                         max_points: int = 1 << 16, init: str = "identity",
                         enhance: bool = True, margin_voxels: float = 5.0,
                         seed: int = 0) -> np.ndarray:
    """``register_rigid`` for a batch of moving images, vmapped on the device.

    movings: B arrays [X_b, Y_b, Z_b] (shapes may differ: each level resamples them onto one
    window shape); moving_affines: [B, 4, 4]. Returns [B, 4, 4] moving -> fixed world.
    """
    if len(levels_mm) != len(steps):
        raise CowjaxError(f"registration levels {levels_mm} and steps {steps} differ in length")
    if init not in ("centre", "identity"):
        raise CowjaxError(f"unknown registration init {init!r}; expected 'centre' or 'identity'")
    fixed, fixed_affine = _check(fixed, fixed_affine, "fixed")
    pairs = [_check(m, a, "moving") for m, a in zip(movings, moving_affines)]
    if enhance:
        fixed = vessel_contrast(fixed, fixed_affine)
        pairs = [(vessel_contrast(m, a), a) for m, a in pairs]
    fixed_centre = bright_centre(fixed, fixed_affine)
    centres = np.stack([bright_centre(m, a) for m, a in pairs])
    params = np.zeros((len(pairs), 6))
    if init == "centre":
        params[:, 3:] = fixed_centre - centres
    for level_mm, level_steps in zip(levels_mm, steps):
        f_img, f_aff = pyramid_level(fixed, fixed_affine, level_mm)
        values, points = _fixed_samples(f_img, f_aff, max_points, seed)
        # Rotation is measured as arc length at the RMS radius of the sampled region.
        radius = jnp.sqrt(jnp.mean(jnp.sum((points - points.mean(0)) ** 2, axis=1)))
        # Each moving image is cut to one window: the fixed samples' box plus a margin, mapped
        # into moving space by the current estimate, at this level's spacing.
        lo = np.asarray(points).min(0) - margin_voxels * level_mm
        hi = np.asarray(points).max(0) + margin_voxels * level_mm
        shape = tuple(int(n) for n in np.ceil((hi - lo) / level_mm) + 1)
        box = np.diag([level_mm] * 3 + [1.0])
        box[:3, 3] = lo
        win_affs = [np.linalg.inv(_matrix(p, c)) @ box for p, c in zip(params, centres)]
        windows = np.stack([moving_window(smooth_to(m, a, level_mm), a, w, shape)
                            for (m, a), w in zip(pairs, win_affs)])
        lr = learning_rate * level_mm / levels_mm[0]
        params, _ = _fit_batch(values, points, jnp.asarray(windows),
                               jnp.asarray(np.stack(win_affs), jnp.float32),
                               jnp.asarray(centres, jnp.float32), radius,
                               jnp.asarray(params, jnp.float32), steps=int(level_steps),
                               learning_rate=float(lr))
        params = np.asarray(params, np.float64)
    return np.stack([_matrix(p, c) for p, c in zip(params, centres)])


def _matrix(params, centre) -> np.ndarray:
    return np.asarray(rigid_matrix(jnp.asarray(params, jnp.float32),
                                   jnp.asarray(centre, jnp.float32)), np.float64)


def render_template(spacing_mm: float = 1.0, margin_mm: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic template volume: the 20 segments of ``anatomy.TEMPLATE`` as bright tubes.

    Tubes have the typical radii with a soft edge (partial volume), background 0, on a RAS-aligned
    grid covering the template points plus ``margin_mm``. Returns (image [X,Y,Z] float32, affine).
    """
    ends = {n: anatomy.TEMPLATE[n] for n in anatomy.TEMPLATE}
    pts = np.stack(list(ends.values()))
    lo, hi = pts.min(0) - margin_mm, pts.max(0) + margin_mm
    shape = tuple(int(s) for s in np.ceil((hi - lo) / spacing_mm) + 1)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = lo
    world = voxel_centres(affine, shape)
    image = np.zeros(len(world), np.float32)
    for seg, (a, b) in anatomy.SEGMENT_ENDS.items():
        a, b = ends[a], ends[b]
        u = np.clip((world - a) @ (b - a) / ((b - a) @ (b - a)), 0.0, 1.0)
        dist = np.linalg.norm(world - (a + u[:, None] * (b - a)), axis=1)
        edge = 0.5 * max(spacing_mm, 0.5)
        image = np.maximum(image, 1.0 / (1.0 + np.exp((dist - anatomy.RADII[seg]) / edge)))
    return image.reshape(shape), affine


@dataclasses.dataclass(frozen=True)
class TemplateRegistration:
    """The ``to_template`` that ``preprocess.preprocess_case`` takes: ``(image [X, Y, Z], affine
    [4, 4]) -> [4, 4]`` rigid image world -> template world RAS mm (``register_rigid``).

    template: a NIfTI path (``"training_sample"``: a training case's image), or "" for the rendered
    anatomy template (``"template"``). Picklable, as preprocessing runs in spawned processes; each
    process reads the template once.
    """
    template: str = ""
    levels_mm: tuple = DEFAULT_LEVELS_MM
    steps: tuple = DEFAULT_STEPS

    def __call__(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        fixed, fixed_affine = _template_volume(self.template)
        return register_rigid(fixed, fixed_affine, image, affine, levels_mm=self.levels_mm,
                              steps=self.steps)


@functools.lru_cache(maxsize=2)
def _template_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not path:
        return render_template(1.0)
    from cowjax.data import io
    return io.load_image(path)


def template_registration(data_config) -> TemplateRegistration | None:
    """The registration ``config.data.registration`` asks for, as the ``to_template`` function that
    preprocessing takes (None for "none"): the caller (training, prediction) injects it, so the data
    package needs no registration code."""
    kind = data_config.registration
    if kind == "none":
        return None
    if kind == "template":
        return TemplateRegistration("")
    template = data_config.get("template", "")
    if not template:
        raise CowjaxError("config.data.registration 'training_sample': config.data.template is "
                          "empty (a training run sets it to <workdir>/template.nii.gz)")
    return TemplateRegistration(str(template))
