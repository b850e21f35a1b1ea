"""Registration: landmark fits (exact, under noise, LOO TRE, reflections), JAX rigid intensity
registration recovering a known pose, and ``run_register`` end to end with world coordinates checked."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cowjax import anatomy
from cowjax.data import io
from cowjax.errors import CowjaxError
from cowjax.inference import register
from cowjax.registration import intensity
from cowjax.registration import landmarks as lm


def _transform(rotvec_deg, translation, scale=1.0):
    m = np.eye(4)
    rotvec = np.radians(np.asarray(rotvec_deg, float))
    m[:3, :3] = scale * Rotation.from_rotvec(rotvec).as_matrix()
    m[:3, 3] = translation
    return m


def _oblique_affine(spacing, shape, rotvec_deg=(0, 0, 0), perm=(0, 1, 2), flip=(1, 1, 1),
                    centre=(0, 0, 0)):
    """Voxel -> world with permuted/flipped/rotated axes, centred on ``centre``."""
    lin = np.zeros((3, 3))
    for i, (p, f) in enumerate(zip(perm, flip)):
        lin[p, i] = spacing * f
    lin = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix() @ lin
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(centre) - lin @ ((np.array(shape) - 1) / 2)
    return aff


MOVING = anatomy.TEMPLATE_LANDMARKS.copy()


# ------------------------------------------------------------------------------ landmark fits

@pytest.mark.parametrize("kind,scale", [("rigid", 1.0), ("similarity", 1.13)])
def test_fit_recovers_known_transform_exactly(kind, scale):
    truth = _transform([20, -35, 50], [12.0, -7.5, 30.0], scale)
    moving = MOVING.copy()
    fixed = lm.apply_transform(truth, moving)
    moving[3] = np.nan                                # unknown on one side or the other: dropped
    fixed[7] = np.nan
    est = lm.fit_transform(fixed, moving, kind)
    np.testing.assert_allclose(est, truth, atol=1e-9)
    res = lm.residuals(fixed, moving, est)
    assert np.isnan(res[[3, 7]]).all() and np.nanmax(res) < 1e-9


def test_rigid_fit_error_under_noise_matches_theory():
    # Isotropic noise sigma on N fixed points: E[sum of squared residuals] = sigma^2 (3N - 6) and
    # the error of the fitted transform at the landmark centroid has E|e|^2 = 3 sigma^2 / N.
    rng = np.random.default_rng(0)
    sigma, trials, n = 1.0, 400, len(MOVING)
    truth = _transform([5, 10, -15], [3.0, 4.0, -5.0])
    clean = lm.apply_transform(truth, MOVING)
    centroid = MOVING.mean(axis=0)
    sse, centre_err2 = [], []
    for _ in range(trials):
        fixed = clean + rng.normal(0, sigma, clean.shape)
        est = lm.fit_transform(fixed, MOVING)
        sse.append(np.sum(lm.residuals(fixed, MOVING, est) ** 2))
        err = lm.apply_transform(est, centroid) - lm.apply_transform(truth, centroid)
        centre_err2.append(np.sum(err ** 2))
    assert np.mean(sse) == pytest.approx(sigma ** 2 * (3 * n - 6), rel=0.05)
    assert np.mean(centre_err2) == pytest.approx(3 * sigma ** 2 / n, rel=0.15)


def test_weights_drop_and_downweight():
    truth = _transform([0, 30, 0], [1.0, 2.0, 3.0])
    fixed = lm.apply_transform(truth, MOVING)
    fixed[5] += [15.0, 0.0, 0.0]                     # a detection gone wrong
    w = np.ones(len(MOVING))
    w[5] = 0.0                                        # zero weight == not used
    dropped = MOVING.copy()
    dropped[5] = np.nan
    np.testing.assert_allclose(lm.fit_transform(fixed, MOVING, weights=w),
                               lm.fit_transform(fixed, dropped), atol=1e-9)
    np.testing.assert_allclose(lm.fit_transform(fixed, MOVING, weights=w), truth, atol=1e-9)
    w[5] = 0.01                                       # low confidence: small influence
    err_low = np.abs(lm.fit_transform(fixed, MOVING, weights=w) - truth).max()
    err_equal = np.abs(lm.fit_transform(fixed, MOVING) - truth).max()
    assert err_low < 0.05 * err_equal


def test_leave_one_out_tre():
    truth = _transform([10, 0, -20], [0.0, 5.0, 0.0])
    fixed = lm.apply_transform(truth, MOVING)
    np.testing.assert_allclose(lm.leave_one_out_tre(fixed, MOVING), 0.0, atol=1e-9)
    # One displaced landmark: the fit without it is exact, so its LOO TRE is its displacement,
    # while it spoils every other landmark's leave-one-out fit.
    fixed[4] += [3.0, -4.0, 12.0]
    fixed[9] = np.nan
    tre = lm.leave_one_out_tre(fixed, MOVING)
    assert tre[4] == pytest.approx(13.0, abs=1e-9)
    assert np.isnan(tre[9])
    others = np.delete(tre, [4, 9])
    assert (others > 1e-3).all() and (others < 13.0).all()


def test_reflection_never_returned():
    # The fixed set is a mirror image: the best proper rotation is wanted, not the reflection.
    rng = np.random.default_rng(1)
    fixed = MOVING * [-1.0, 1.0, 1.0]
    centred_f, centred_m = fixed - fixed.mean(0), MOVING - MOVING.mean(0)
    u, _, vt = np.linalg.svd(centred_f.T @ centred_m)
    assert np.linalg.det(u @ vt) < 0                 # plain Kabsch would reflect here
    est = lm.fit_transform(fixed, MOVING)
    assert np.linalg.det(est[:3, :3]) == pytest.approx(1.0, abs=1e-12)
    cost = np.sum(lm.residuals(fixed, MOVING, est) ** 2)
    for _ in range(50):                              # no nearby proper rotation does better
        p = _transform(rng.normal(0, 2.0, 3), rng.normal(0, 0.5, 3)) @ est
        assert np.sum(lm.residuals(fixed, MOVING, p) ** 2) >= cost - 1e-9


def test_fit_errors():
    fixed = lm.apply_transform(_transform([0, 0, 10], [1, 2, 3]), MOVING)
    two = MOVING.copy()
    two[2:] = np.nan
    with pytest.raises(CowjaxError, match="at least 3 landmarks.*got 2"):
        lm.fit_transform(fixed, two)
    line = np.full_like(MOVING, np.nan)
    line[:5] = np.arange(5)[:, None] * [1.0, 2.0, 3.0]
    with pytest.raises(CowjaxError, match="collinear"):
        lm.fit_transform(line, line, "similarity")
    with pytest.raises(CowjaxError, match="unknown transform kind"):
        lm.fit_transform(fixed, MOVING, "affine")
    with pytest.raises(CowjaxError, match="shape"):
        lm.fit_transform(fixed[:5], MOVING)


# ------------------------------------------------------------------------------ intensity

_TUBES = np.array([[[-20, -15, -10], [18, 12, 8]], [[-15, 15, -5], [10, -18, 12]],
                   [[5, -20, -15], [0, 20, 18]], [[-18, 0, 15], [15, 5, -15]],
                   [[12, 14, -12], [20, -10, 0]]], float)


def _tube_scene(points):
    """A few bright tubes (Gaussian profile, sigma 2.5 mm) at world points [P, 3] -> [P]."""
    out = np.zeros(len(points))
    for a, b in _TUBES:
        u = np.clip((points - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
        d = np.linalg.norm(points - (a + u[:, None] * (b - a)), axis=1)
        out = np.maximum(out, np.exp(-0.5 * (d / 2.5) ** 2))
    return out


def _render(affine, shape, moving_to_scene=np.eye(4)):
    """The scene seen by an image whose world is mapped into scene space by ``moving_to_scene``."""
    world = intensity.voxel_centres(affine, shape)
    return _tube_scene(lm.apply_transform(moving_to_scene, world)).reshape(shape).astype(np.float32)


def _pose_errors(est, truth, points):
    """(rotation error deg, max displacement error mm over points)."""
    disp = lm.apply_transform(est, points) - lm.apply_transform(truth, points)
    return lm.rotation_angle_deg(est @ np.linalg.inv(truth)), np.linalg.norm(disp, axis=1).max()


FAST = dict(levels_mm=(4.0, 2.0), steps=(80, 50))


def test_intensity_registration_recovers_known_rigid_transforms():
    shape = (32, 32, 32)
    fixed_aff = _oblique_affine(2.0, shape)
    fixed = _render(fixed_aff, shape)
    truths = [_transform(10 * np.array([1, 2, -1]) / np.sqrt(6), [6.0, -5.0, 5.5]),
              _transform([0, -8, 6], [-10.0, 0.0, 0.0])]
    # Moving images on other grids (permuted, flipped, obliquely rotated axes) and of other sizes.
    mshapes = [(30, 34, 32), (28, 32, 36)]
    maffs = [_oblique_affine(2.0, mshapes[0], perm=(1, 0, 2), flip=(-1, 1, 1), centre=(3, -2, 1)),
             _oblique_affine(2.0, mshapes[1], rotvec_deg=(0, 0, 25), centre=(-4, 0, 2))]
    movings = [_render(a, s, t) for a, s, t in zip(maffs, mshapes, truths)]
    est = intensity.register_rigid_batch(fixed, fixed_aff, movings, maffs, **FAST)
    points = intensity.voxel_centres(fixed_aff, shape)
    for e, t in zip(est, truths):
        rot_err, disp_err = _pose_errors(e, t, points)
        assert rot_err < 0.5 and disp_err < 0.5, (rot_err, disp_err)
        assert _pose_errors(np.eye(4), t, points)[1] > 10.0      # the start was far off


def test_vessel_contrast_removes_smooth_background():
    shape = (24, 24, 24)
    aff = _oblique_affine(2.0, shape)
    tubes = _render(aff, shape)
    ramp = intensity.voxel_centres(aff, shape) @ [0.5, -0.2, 0.3]
    shaded = 3.0 * tubes + 100.0 + ramp.reshape(shape)          # scale, offset and shading
    inner = (slice(6, -6),) * 3                                 # away from the border's padding
    np.testing.assert_allclose(intensity.vessel_contrast(shaded, aff)[inner],
                               intensity.vessel_contrast(tubes, aff)[inner], atol=0.02)


def test_render_template_tubes_pass_through_landmarks():
    from scipy import ndimage
    image, affine = intensity.render_template(spacing_mm=1.0)
    vox = np.linalg.solve(affine, np.c_[anatomy.TEMPLATE_LANDMARKS, np.ones(19)].T)[:3]
    assert (ndimage.map_coordinates(image, vox, order=1) > 0.5).all()
    assert np.mean(image > 0.5) < 0.05                          # thin vessels, dark background


def test_rigid_matrix_matches_scipy_and_has_gradient_at_zero():
    import jax
    import jax.numpy as jnp
    p = jnp.array([0.1, -0.2, 0.3, 1.0, 2.0, 3.0])
    c = jnp.array([5.0, -4.0, 2.0])
    m = np.asarray(intensity.rigid_matrix(p, c))
    r = Rotation.from_rotvec(np.asarray(p[:3])).as_matrix()
    np.testing.assert_allclose(m[:3, :3], r, atol=1e-6)
    np.testing.assert_allclose(lm.apply_transform(m, np.asarray(c)), np.asarray(c + p[3:]), atol=1e-5)
    g = jax.jacfwd(lambda v: intensity.rotation_matrix(v))(jnp.zeros(3))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() == pytest.approx(1.0)


def test_intensity_registration_bad_input():
    with pytest.raises(CowjaxError, match="constant"):
        intensity.register_rigid(np.ones((8, 8, 8)), np.eye(4), np.random.rand(8, 8, 8), np.eye(4))
    with pytest.raises(CowjaxError, match="3D"):
        intensity.register_rigid(np.ones((8, 8)), np.eye(4), np.random.rand(8, 8, 8), np.eye(4))


# ------------------------------------------------------------------------------ run_register

def _blob_image(affine, shape, centre_world, sigma=3.0):
    world = intensity.voxel_centres(affine, shape)
    d2 = np.sum((world - centre_world) ** 2, axis=1)
    return (np.exp(-0.5 * d2 / sigma ** 2) + 0.01).reshape(shape).astype(np.float32)


def _centroid_world(path):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, np.float64)
    w = np.clip(data - 0.2 * data.max(), 0, None)
    vox = (np.argwhere(np.ones_like(w, bool)) * w.reshape(-1, 1)).sum(0) / w.sum()
    return img.affine[:3, :3] @ vox + img.affine[:3, 3], img.affine


@pytest.mark.parametrize("kind,scale", [("rigid", 1.0), ("similarity", 0.9)])
def test_run_register_with_landmark_files(tmp_path, capsys, kind, scale):
    truth = _transform([15, -10, 20], [8.0, -6.0, 4.0], scale)
    fshape, mshape = (28, 30, 26), (26, 28, 30)
    fixed_aff = _oblique_affine(2.5, fshape, rotvec_deg=(0, 15, 0), perm=(2, 0, 1), flip=(1, -1, 1))
    moving_aff = _oblique_affine(2.2, mshape, rotvec_deg=(-10, 0, 5))
    blob = np.array([4.0, -3.0, 2.0])                          # moving world
    io.save_image(tmp_path / "fixed.nii.gz", _blob_image(fixed_aff, fshape, [0, 0, 0]), fixed_aff)
    io.save_image(tmp_path / "moving.nii.gz", _blob_image(moving_aff, mshape, blob), moving_aff)
    moving_lm = MOVING.copy()
    moving_lm[2] = np.nan
    io.write_landmarks(tmp_path / "fixed.mrk.json", lm.apply_transform(truth, MOVING))
    io.write_landmarks(tmp_path / "moving.fcsv", moving_lm)
    out = tmp_path / "moved.nii.gz"
    record = register.run_register(None, tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", out,
                              transform=kind, fixed_landmarks=tmp_path / "fixed.mrk.json",
                              moving_landmarks=tmp_path / "moving.fcsv")
    centroid, affine = _centroid_world(out)
    np.testing.assert_allclose(affine, fixed_aff, atol=1e-5)
    np.testing.assert_allclose(centroid, lm.apply_transform(truth, blob), atol=0.3)
    saved = json.loads((tmp_path / "moved.transform.json").read_text())
    assert saved == record
    np.testing.assert_allclose(saved["matrix"], truth, atol=1e-6)
    assert saved["kind"] == kind and saved["direction"] == register.DIRECTION
    assert saved["landmarks_used"] == [n for i, n in enumerate(anatomy.LANDMARKS) if i != 2]
    assert saved["residual_mm"][2] is None and max(saved["loo_tre_mm"][3:]) < 1e-4
    png = (tmp_path / "moved.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "loo_tre_mm" in printed and anatomy.LANDMARKS[-1] in printed


def test_run_register_detected_landmarks_are_confidence_weighted(tmp_path, monkeypatch):
    from cowjax.inference import predictor
    truth = _transform([0, 0, 30], [5.0, 0.0, 0.0])
    fshape, mshape = (20, 20, 20), (18, 20, 22)
    for name, shape in (("f", fshape), ("m", mshape)):
        aff = _oblique_affine(3.0, shape)
        io.save_image(tmp_path / f"{name}.nii.gz", _blob_image(aff, shape, [0, 0, 0]), aff)
    fixed_lm = lm.apply_transform(truth, MOVING)
    fixed_lm[0] += 20.0                                        # a wrong, unconfident detection
    conf = np.ones(19)
    conf[0] = 0.0

    class FakePredictor:
        def predict(self, image, affine):
            found = fixed_lm if image.shape == fshape else MOVING
            return predictor.Prediction(found, conf, np.ones(19), np.ones(20))

    monkeypatch.setattr(predictor, "load_predictor", lambda workdir: FakePredictor())
    record = register.run_register(tmp_path, tmp_path / "f.nii.gz", tmp_path / "m.nii.gz",
                              tmp_path / "out.nii.gz")
    np.testing.assert_allclose(record["matrix"], truth, atol=1e-6)
    assert anatomy.LANDMARKS[0] not in record["landmarks_used"]


def test_run_register_bad_input(tmp_path):
    shape = (12, 12, 12)
    aff = _oblique_affine(3.0, shape)
    io.save_image(tmp_path / "a.nii.gz", _blob_image(aff, shape, [0, 0, 0]), aff)
    two = np.full((19, 3), np.nan)
    two[:2] = MOVING[:2]
    io.write_landmarks(tmp_path / "two.mrk.json", two)
    io.write_landmarks(tmp_path / "all.mrk.json", MOVING)
    a, lms = tmp_path / "a.nii.gz", dict(fixed_landmarks=tmp_path / "all.mrk.json",
                                         moving_landmarks=tmp_path / "all.mrk.json")
    with pytest.raises(CowjaxError, match="missing.nii.gz: file not found"):
        register.run_register(None, tmp_path / "missing.nii.gz", a, tmp_path / "o.nii.gz", **lms)
    with pytest.raises(CowjaxError, match="output directory .* does not exist"):
        register.run_register(None, a, a, tmp_path / "no" / "o.nii.gz", **lms)
    with pytest.raises(CowjaxError, match="must be an image file"):
        register.run_register(None, a, a, tmp_path / "o.png", **lms)
    with pytest.raises(CowjaxError, match="--workdir"):
        register.run_register(None, a, a, tmp_path / "o.nii.gz", fixed_landmarks=lms["fixed_landmarks"])
    with pytest.raises(CowjaxError, match="at least 3 landmarks"):
        register.run_register(None, a, a, tmp_path / "o.nii.gz", fixed_landmarks=tmp_path / "two.mrk.json",
                         moving_landmarks=lms["moving_landmarks"])
    # Nothing was written by the failed runs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "all.mrk.json", "two.mrk.json"]


# ------------------------------------------------------------------------------ "training_sample"

def test_training_sample_registration_puts_a_rotated_copy_on_the_template_grid(tmp_path):
    """Preprocessing with ``registration = "training_sample"``: a case whose world is the template
    case's turned by about 11 degrees and shifted (and stored with other axes) lands on a grid whose
    axes are RAS in the template's world: template-space distances become grid distances."""
    import dataclasses

    import ml_collections

    from cowjax.data import preprocess
    shape, spacing = (24, 24, 24), 2.5
    t_aff = _oblique_affine(spacing, shape)
    io.save_image(tmp_path / "template.nii.gz", _render(t_aff, shape), t_aff)
    config = ml_collections.ConfigDict({"data": {
        "spacing": (spacing,) * 3, "registration": "training_sample",
        "template": str(tmp_path / "template.nii.gz")}})
    to_template = intensity.template_registration(config.data)
    assert to_template == intensity.TemplateRegistration(str(tmp_path / "template.nii.gz"))
    truth = _transform([8, -6, 5], [4.0, -3.0, 2.0])        # case world -> template world
    c_shape = (22, 26, 24)
    c_aff = _oblique_affine(spacing, c_shape, perm=(1, 0, 2), flip=(-1, 1, 1), centre=(2, -1, 0))
    case = io.Case("c", _render(c_aff, c_shape, truth), c_aff, np.full((19, 3), np.nan))
    # One pyramid level: each level is a compilation, most of this test's time.
    fast = dataclasses.replace(to_template, levels_mm=(5.0,), steps=(100,))
    pre = preprocess.preprocess_case(case, config, fov=False, to_template=fast)
    points = _TUBES.reshape(-1, 3)                           # template world
    in_case = lm.apply_transform(np.linalg.inv(truth), points)

    def grid_error(grid_affine):
        """Largest mismatch (mm) between template-space offsets and grid offsets x spacing."""
        vox = preprocess.world_to_voxel(in_case, grid_affine)
        return np.abs((vox - vox[0]) * spacing - (points - points[0])).max()

    assert grid_error(pre["affine"]) < 0.75
    assert lm.rotation_angle_deg(truth @ pre["affine"]) < 1.0
    # Without registration the grid is RAS in the case's own world: off by the rotation.
    none, _ = preprocess.canonical_grid(c_aff, c_shape, (spacing,) * 3)
    assert grid_error(none) > 5.0


def test_template_registration_from_the_config():
    import ml_collections
    data = ml_collections.ConfigDict({"registration": "none", "template": ""})
    assert intensity.template_registration(data) is None
    data.registration = "template"
    assert intensity.template_registration(data) == intensity.TemplateRegistration("")
    data.registration = "training_sample"
    with pytest.raises(CowjaxError, match="config.data.template is empty"):
        intensity.template_registration(data)
