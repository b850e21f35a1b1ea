"""cowjax.data.preprocess / augment: world-exact canonical grid, FOV centre, crops and the mirrored flip."""

import ml_collections
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cowjax import anatomy
from cowjax.data import augment, io, preprocess
from cowjax.errors import CowjaxError


def _oblique(rng, lps_like):
    """Oblique rotation, anisotropic zooms; LPS-like storage flips x and y and permutes axes."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag([1, 1, np.sign(np.linalg.det(q))])
    storage = np.diag([-1, -1, 1])[[1, 0, 2]] if lps_like else np.eye(3)
    angles = np.deg2rad(20) * rng.uniform(-1, 1, 3)
    rot = Rotation.from_euler("xyz", angles).as_matrix() if not lps_like else q
    a = np.eye(4)
    a[:3, :3] = rot @ storage @ np.diag([1.1, 0.9, 1.3])
    return a


def _blob_image(affine, shape, centres, sigma=2.5):
    """Gaussian blobs at world points, sampled on the image grid: [X, Y, Z] float32."""
    world = preprocess.voxel_to_world(
        np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1), affine)
    d2 = ((world[..., None, :] - centres) ** 2).sum(-1)
    return np.exp(-0.5 * d2 / sigma ** 2).sum(-1).astype(np.float32)


def _config(spacing=(1.0, 1.0, 1.0)):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"spacing": spacing})
    return c


@pytest.mark.parametrize("lps_like", [False, True])
def test_landmarks_survive_preprocessing(lps_like):
    """Landmark -> grid voxel -> world is the identity, and the image content moved with it."""
    rng = np.random.default_rng(int(lps_like))
    shape = (30, 34, 24)
    affine = _oblique(rng, lps_like)
    affine[:3, 3] = rng.uniform(-40, 40, 3)  # arbitrary world placement
    centre = preprocess.voxel_to_world((np.array(shape) - 1) / 2, affine)
    landmarks = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    landmarks[:3] = centre + rng.uniform(-6, 6, (3, 3))
    image = _blob_image(affine, shape, landmarks[:3])
    case = io.Case("c", image, affine, landmarks)
    pre = preprocess.preprocess_case(case, _config((0.9, 0.9, 1.0)))
    grid = pre["affine"]
    np.testing.assert_allclose(grid[:3, :3], np.diag([0.9, 0.9, 1.0]))
    assert np.isnan(pre["landmarks"][3:]).all()
    back = preprocess.voxel_to_world(pre["landmarks"][:3], grid)
    np.testing.assert_allclose(back, landmarks[:3], atol=1e-9)
    # The blob centred on each landmark is found there on the canonical grid (weighted centroid).
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in pre["image"].shape], indexing="ij"), -1)
    for k in range(3):
        near = np.linalg.norm((vox - pre["landmarks"][k]) * [0.9, 0.9, 1.0], axis=-1) < 3.0
        w = pre["image"] * near
        centroid = preprocess.voxel_to_world((vox * w[..., None]).sum((0, 1, 2)) / w.sum(), grid)
        ideal = (vox * (near * _blob_image(grid, pre["image"].shape, landmarks[:3]))[..., None])
        ideal = preprocess.voxel_to_world(
            ideal.sum((0, 1, 2)) / (near * _blob_image(grid, pre["image"].shape, landmarks[:3])).sum(),
            grid)
        assert np.linalg.norm(centroid - ideal) < 0.1


def test_resample_on_its_own_grid_is_identity():
    rng = np.random.default_rng(2)
    data = rng.uniform(size=(6, 7, 8)).astype(np.float32)
    affine = np.diag([0.5, 0.6, 0.8, 1.0])
    grid_affine, grid_shape = preprocess.canonical_grid(affine, data.shape, (0.5, 0.6, 0.8))
    assert grid_shape == data.shape
    np.testing.assert_allclose(preprocess.resample(data, affine, grid_affine, grid_shape, 1), data,
                               atol=1e-6)
    labels = (data * 20).astype(np.uint8)
    out = preprocess.resample(labels, affine, grid_affine, grid_shape, 0)
    assert out.dtype == np.uint8 and np.array_equal(out, labels)


def test_normalise_intensity_is_robust():
    rng = np.random.default_rng(3)
    image = rng.normal(100, 5, (20, 20, 20)).astype(np.float32)
    image[0, 0, 0] = 1e6  # one hot voxel must not squash the rest
    out = preprocess.normalise_intensity(image)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 3
    assert 0.3 < np.median(out) < 0.7
    np.testing.assert_array_equal(out, preprocess.normalise_intensity(image))


def test_fov_centre_near_the_landmarks_despite_bright_structures():
    """On synthetic cases (any orientation), with a bright slab (fat) at the bottom of the field of
    view and a large bright blob (a sinus) above the circle, both as bright as the vessels."""
    from cowjax.data import synthetic

    for index in range(3):
        case = synthetic.generate_case(3, index, spacing=(1.5, 1.5, 1.5))
        centroid = np.nanmean(case.landmarks, 0)
        world = preprocess.voxel_to_world(
            np.stack(np.meshgrid(*[np.arange(n) for n in case.image.shape], indexing="ij"), -1),
            case.affine)
        bright = np.percentile(case.image, 99.5)
        image = (case.image + bright * (np.abs(world[..., 2] - world[..., 2].min() - 6) < 3)
                 + bright * (np.linalg.norm(world - centroid - [0, 0, 25], axis=-1) < 8))
        centre = preprocess.estimate_fov_centre(image, case.affine)
        assert np.linalg.norm(centre - centroid) < 15.0


def test_crop_pads_with_zeros():
    image = np.arange(1, 1 + 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out, offset = preprocess.crop(image, (0, 0, 0), (4, 4, 4))
    np.testing.assert_array_equal(offset, [-2, -2, -2])  # round(0 - 1.5) = -2
    assert (out[:2] == 0).all() and (out[:, :2] == 0).all()
    np.testing.assert_array_equal(out[2:, 2:, 2:], image[:2, :2, :2])
    out, offset = preprocess.crop(image, (2, 2.6, 3), (3, 3, 3))
    np.testing.assert_array_equal(out, image[1:4, 2:5, 2:5])


def _example(rng):
    pre = {"image": rng.uniform(size=(24, 20, 16)).astype(np.float32),
           "landmarks": rng.uniform(2, 14, (anatomy.NUM_LANDMARKS, 3)),
           "segments": rng.integers(0, anatomy.NUM_CLASSES, (24, 20, 16)).astype(np.uint8),
           "fov_centre": np.array([12.0, 10.0, 8.0]),
           "landmark_attr": rng.integers(0, 2, 19).astype(np.float32),
           "landmark_attr_mask": np.ones(19, np.float32),
           "segment_attr": rng.integers(0, 2, 20).astype(np.float32),
           "segment_attr_mask": rng.integers(0, 2, 20).astype(np.float32)}
    pre["landmarks"][3] = np.nan
    return pre, augment.crop_example(pre, pre["fov_centre"], (16, 16, 12))[0]


def test_flip_swaps_mirrored_channels():
    rng = np.random.default_rng(4)
    _, ex = _example(rng)
    flipped = augment.flip_example(ex)
    twice = augment.flip_example(flipped)
    for k in ex:  # up to float32 rounding of x -> 15 - (15 - x)
        np.testing.assert_allclose(twice[k], ex[k], atol=1e-5)
    mirror = anatomy.MIRROR_LANDMARKS
    right, left = anatomy.LANDMARK_INDEX["M1_M2_R"], anatomy.LANDMARK_INDEX["M1_M2_L"]
    # The flipped right landmark is the original left one, mirrored in x.
    np.testing.assert_allclose(flipped["landmarks"][right],
                               [15 - ex["landmarks"][left, 0], *ex["landmarks"][left, 1:]], atol=1e-5)
    np.testing.assert_array_equal(flipped["landmark_mask"], ex["landmark_mask"][mirror])
    np.testing.assert_array_equal(flipped["image"], ex["image"][::-1])
    seg = anatomy.SEGMENT_INDEX
    flipped_m1_r = flipped["segments"] == 1 + seg["M1_R"]
    np.testing.assert_array_equal(flipped_m1_r, (ex["segments"] == 1 + seg["M1_L"])[::-1])
    np.testing.assert_array_equal(flipped["segment_attr"][seg["PCoA_L"]], ex["segment_attr"][seg["PCoA_R"]])


def test_augmentation_is_deterministic_and_moves_landmarks_with_the_image():
    rng = np.random.default_rng(5)
    pre, _ = _example(rng)
    aug = ml_collections.ConfigDict({"translate_mm": 3.0, "rotate_deg": 15.0, "scale": 0.1,
                                     "elastic_mm": 0.0, "elastic_spacing_mm": 24.0,
                                     "intensity": 0.0, "noise": 0.0, "flip": True})
    a = augment.augment_example(pre, np.random.default_rng(7), (16, 16, 12), (1.0, 1.0, 1.0), aug)
    b = augment.augment_example(pre, np.random.default_rng(7), (16, 16, 12), (1.0, 1.0, 1.0), aug)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].shape == (16, 16, 12, 1) and a["segments"].dtype == np.int32
    # A bright point at a landmark ends up at the example's landmark coordinate.
    pre["image"] = np.zeros_like(pre["image"])
    pre["image"][12, 10, 8] = 1.0
    pre["landmarks"][0] = [12, 10, 8]
    for seed in range(3):
        ex = augment.augment_example(pre, np.random.default_rng(seed), (16, 16, 12), (1.0, 1.0, 1.0),
                                     aug)
        k = 0  # BA_top is its own mirror
        peak = np.array(np.unravel_index(np.argmax(ex["image"][..., 0]), (16, 16, 12)))
        assert np.all(np.abs(peak - ex["landmarks"][k]) <= 1.0)


def test_field_of_view_cut_keeps_a_box_round_the_circle_and_the_targets():
    rng = np.random.default_rng(2)
    shape, crop, spacing = (60, 56, 48), (40, 40, 32), np.array([2.0, 2.0, 2.0])
    pre = {**_example(rng)[0], "image": rng.uniform(0.1, 1.0, shape).astype(np.float32),
           "landmarks": rng.uniform(20, 36, (anatomy.NUM_LANDMARKS, 3)), "segments": None}
    base = {"translate_mm": 6.0, "rotate_deg": 0.0, "scale": 0.0, "elastic_mm": 0.0,
            "elastic_spacing_mm": 24.0, "intensity": 0.2, "noise": 0.0, "flip": True}

    def example(seed, **aug):
        return augment.augment_example(pre, np.random.default_rng(seed), crop, spacing,
                                       ml_collections.ConfigDict({**base, **aug}))

    # Off, it draws nothing: the examples of a config without the field stay what they were.
    for k, v in example(3).items():
        np.testing.assert_array_equal(example(3, fov_cut=0.0, fov_cut_mm=(30.0, 50.0))[k], v)
    for seed in range(4):
        cut = example(seed, fov_cut=1.0, fov_cut_mm=(30.0, 50.0), flip=False, intensity=0.0)
        whole = example(seed, flip=False, intensity=0.0)
        kept = np.argwhere(cut["image"][..., 0] > 0)
        sides_mm = (np.ptp(kept, axis=0) + 1) * spacing
        assert np.all((sides_mm >= 30.0 - 2 * spacing) & (sides_mm <= 50.0 + 2 * spacing))
        circle = cut["landmarks"][augment.CIRCLE_LANDMARKS].mean(axis=0)
        middle = (kept.min(axis=0) + kept.max(axis=0)) / 2
        assert np.all(np.abs(middle - circle) * spacing <= augment.FOV_CUT_SHIFT_MM + spacing)
        # Within the box, the same image normalised on its own; the targets untouched.
        box = tuple(slice(a, b + 1) for a, b in zip(kept.min(axis=0), kept.max(axis=0)))
        np.testing.assert_allclose(cut["image"][box],
                                   preprocess.normalise_intensity(whole["image"][box]), atol=1e-6)
        for k in ("landmarks", "landmark_mask", "segments", "segment_attr"):
            np.testing.assert_array_equal(cut[k], whole[k])


def test_elastic_deformation_moves_landmarks_with_the_vessels():
    """Three bright blobs at three landmarks: after an elastic warp (plus rotation and scale)
    each blob's centre of mass is where the example says its landmark is, and the blobs no longer
    keep their relative positions (the warp is not affine)."""
    shape = crop = (40, 36, 32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    points = np.array([[13.0, 12.0, 12.0], [27.0, 14.0, 19.0], [20.0, 24.0, 15.0]])
    channels = [anatomy.LANDMARK_INDEX[n] for n in ("ICA_term_R", "ICA_term_L", "BA_top")]
    landmarks = np.full((anatomy.NUM_LANDMARKS, 3), 20.0)
    landmarks[channels] = points
    image = sum(np.exp(-((grid - p) ** 2).sum(-1) / (2 * 0.9 ** 2)) for p in points)
    pre = {**_example(np.random.default_rng(0))[0], "image": image.astype(np.float32),
           "landmarks": landmarks, "segments": None}
    aug = ml_collections.ConfigDict({"translate_mm": 2.0, "rotate_deg": 10.0, "scale": 0.05,
                                     "elastic_mm": 1.5, "elastic_spacing_mm": 16.0,
                                     "intensity": 0.0, "noise": 0.0, "flip": False})
    crop_grid = np.stack(np.meshgrid(*[np.arange(n) for n in crop], indexing="ij"), -1)
    spread = []
    for seed in range(3):
        ex = augment.augment_example(pre, np.random.default_rng(seed), crop, (1.0, 1.0, 1.0), aug)
        found = ex["landmarks"][channels]
        assert np.all((found > 4) & (found < np.array(crop) - 5))
        for p in found:  # the blob's centre of mass, within 4 voxels of where it should be
            near = np.linalg.norm(crop_grid - p, axis=-1) < 4
            w = ex["image"][..., 0] * near
            # (the warp's curvature shifts a blob's centre of mass a little; a landmark moved by the
            # affine part alone would be off by the field itself, about 1.5 voxels)
            np.testing.assert_allclose((crop_grid * w[..., None]).sum((0, 1, 2)) / w.sum(), p, atol=0.3)
        d = np.linalg.norm(found[:, None] - found[None], axis=-1)[np.triu_indices(3, 1)]
        spread.append(d / np.linalg.norm(points[:, None] - points[None], axis=-1)[np.triu_indices(3, 1)])
    # Affine-only would scale every distance by the same factor; the elastic field does not.
    assert max(np.ptp(s) for s in spread) > 0.05


def test_registration_is_injected_and_sets_the_grid_in_template_space():
    """``to_template`` (case world -> template world) turns the grid to template space: its axes are
    RAS in template space, and every position still maps to the case's own world exactly."""
    rng = np.random.default_rng(3)
    shape = (20, 22, 18)
    affine = _oblique(rng, False)
    centre = preprocess.voxel_to_world((np.array(shape) - 1) / 2, affine)
    landmarks = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    landmarks[:2] = centre + rng.uniform(-4, 4, (2, 3))
    case = io.Case("c", _blob_image(affine, shape, landmarks[:2]), affine, landmarks)
    to_template = np.eye(4)
    to_template[:3, :3] = Rotation.from_euler("xyz", [25.0, -10.0, 40.0], degrees=True).as_matrix()
    to_template[:3, 3] = [5.0, -3.0, 8.0]
    config = _config((1.5, 1.5, 1.5))
    config.data.registration = "training_sample"
    pre = preprocess.preprocess_case(case, config, fov=False,
                                     to_template=lambda image, aff: to_template)
    np.testing.assert_allclose(to_template @ pre["affine"][:, :3],
                               np.vstack([np.diag([1.5] * 3), np.zeros(3)]), atol=1e-9)
    np.testing.assert_allclose(preprocess.voxel_to_world(pre["landmarks"][:2], pre["affine"]),
                               landmarks[:2], atol=1e-9)
    # Asked for but not given, or given but not asked for: one line naming both.
    with pytest.raises(CowjaxError, match="'training_sample' but preprocess_case was given no "
                                          "to_template"):
        preprocess.preprocess_case(case, config, fov=False)
    with pytest.raises(CowjaxError, match="'none' but preprocess_case was given a to_template"):
        preprocess.preprocess_case(case, _config(), fov=False, to_template=lambda i, a: to_template)
