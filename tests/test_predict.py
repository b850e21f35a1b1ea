"""Whole-volume prediction: world coordinates for any affine and size, output files, evaluation."""

import json
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import test as test_config
from cowjax import anatomy
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError
from cowjax.inference import evaluate, predict, segment, windows
from cowjax.inference import predictor as predictor_lib
from cowjax.inference.predictor import Predictor
from cowjax.model import unet
from cowjax.registration import landmarks as landmark_registration

L = anatomy.NUM_LANDMARKS


def _config(stride=1):
    c = test_config.get_config()
    c.model.heatmap_stride = stride
    return c


def _blob_image(affine, shape, centre_ras, sigma_mm=12.0, noise=0.0, seed=0):
    """A Gaussian blob at a world position on a zero background, sampled on (affine, shape).

    Wide enough that intensity normalisation (99.9th percentile -> 1, clipped at 3) keeps its top."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    img = np.exp(-0.5 * ((world - centre_ras) ** 2).sum(-1) / sigma_mm**2)
    return (img + noise * np.random.default_rng(seed).random(shape)).astype(np.float32)


def _affine(spacing, rotation_deg=0.0, flip=(1, 1, 1), origin=(-40.0, -35.0, -30.0)):
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.array(flip) * np.array(spacing))
    a[:3, 3] = origin
    return a


class _EchoNet:
    """Stands in for the network: every heatmap channel is the input window itself (block-averaged
    for stride 2), so the decoded peak is the blob's centre whatever windows were used."""

    def __init__(self, stride):
        self.stride = stride
        self.calls = 0

    def __call__(self, params, images):
        self.calls += 1
        x = np.asarray(images)
        b, nx, ny, nz, _ = x.shape
        s = self.stride
        heat = x.reshape(b, nx // s, s, ny // s, s, nz // s, s).mean(axis=(2, 4, 6))
        return {"heatmaps": np.repeat(heat[..., None], L, axis=-1),
                "segmentation": np.zeros((b, nx, ny, nz, anatomy.NUM_CLASSES), np.float32),
                "bifurcation_prob": np.full((b, L), 0.5, np.float32),
                "present_prob": np.full((b, anatomy.NUM_SEGMENTS), 0.5, np.float32)}


def _echo_predictor(stride, forward=None, align=False, **kwargs):
    """A Predictor on the stand-in network, one forward call per window; one look (no pose fit:
    the stand-in puts every landmark at the blob) unless ``align``."""
    return Predictor(_config(stride), params=None, batch_size=1,
                     forward=forward or _EchoNet(stride), align=align, **kwargs)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine, shape, windows", [
    (_affine((1.5, 1.5, 1.5)), (40, 40, 30), 1),                     # smaller than the window
    (_affine((1.2, 0.9, 2.0), 30.0, (-1, -1, 1), (24.0, 39.0, -24.0)), (60, 70, 30), None),  # oblique
    (_affine((2.0, 2.0, 2.0), origin=(-60.0, -80.0, -50.0)), (90, 85, 60), 27),  # sliding windows
])
def test_world_coordinates_survive_any_affine_and_size(stride, affine, shape, windows):
    centre = np.array([4.0, -2.5, 1.3])
    predictor = _echo_predictor(stride)
    predictor.locate = lambda volume, first_guess: first_guess  # windows counted here: not the search
    pred = predictor.predict(_blob_image(affine, shape, centre), affine)
    assert windows is None or predictor.forward.calls == 2 * windows    # and the mirror image
    assert pred.landmarks.shape == (L, 3) and pred.confidence.shape == (L,)
    # Grid spacing is 3 mm; the peak is recovered to a fraction of a voxel.
    np.testing.assert_allclose(pred.landmarks, np.broadcast_to(centre, (L, 3)), atol=0.5)


@pytest.mark.parametrize("stride", [1, 2])
def test_locate_finds_the_circle_far_from_the_first_guess(stride):
    affine = _affine((2.0, 2.0, 2.0), origin=(-60.0, -80.0, -50.0))
    shape, centre = (90, 85, 60), np.array([70.0, 60.0, 40.0])   # near a corner of the volume
    predictor = _echo_predictor(stride)
    grid = preprocess.network_grid(affine, shape, predictor.config.data.spacing)
    prep = preprocess.preprocess_image(_blob_image(affine, shape, centre, sigma_mm=6.0), affine,
                                       *grid)
    found = predictor.locate(prep["image"], np.zeros(3))          # first guess: the far corner
    want = preprocess.world_to_voxel(centre, prep["affine"])
    assert np.linalg.norm(found - want) < 1.0                     # grid voxels (3 mm)


def test_landmarks_stay_inside_the_image():
    """Zero padding beyond the volume's edge must never win, even where the heatmap is highest."""
    affine = _affine((1.5, 1.5, 1.5))
    img = _blob_image(affine, (40, 40, 30), np.zeros(3), noise=0.3) + 0.1
    echo = _EchoNet(1)

    def inverted(params, x):  # highest where the image is darkest: the zero padding
        out = echo(params, x)
        return {**out, "heatmaps": -out["heatmaps"]}

    predictor = _echo_predictor(1, inverted)
    vox = preprocess.world_to_voxel(predictor.predict(img, affine).landmarks, affine)
    assert np.all((vox >= -0.5) & (vox <= np.array(img.shape) - 0.5))


def test_sliding_windows_and_blending():
    starts, central = windows.axis_starts(40.0, size=100, window=32, step=6, align=2)
    assert starts == [18, 24, 30] and starts[central] == 24
    # Kept inside the volume, and one window when the volume is smaller than it.
    starts, _ = windows.axis_starts(90.0, size=100, window=32, step=6, align=1)
    assert starts == [62, 68]
    starts, central = windows.axis_starts(5.0, size=12, window=32, step=6, align=1)
    assert len(starts) == 1 and -20 <= starts[0] <= 0 and central == 0
    # Windows cut from one field blend back to that field wherever they cover it.
    field = np.random.default_rng(0).random((6, 5, 6, 2)).astype(np.float32)
    starts = np.array([[0, 0, 0], [2, 1, 2], [2, 0, 0], [0, 1, 2]])
    blend = windows.Blend((6, 5, 6), (4, 4, 4), 2)
    covered = np.zeros((6, 5, 6), bool)
    for a, b, c in starts:
        blend.add(field[a:a + 4, b:b + 4, c:c + 4], (a, b, c))
        covered[a:a + 4, b:b + 4, c:c + 4] = True
    np.testing.assert_allclose(blend.result()[covered], field[covered], rtol=1e-6)


# ----------------------------------------------------------------- with a checkpointed random model

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory holding a checkpoint of a randomly initialised tiny model."""
    from cowjax.training import checkpoint, state as state_lib
    config = _config()
    model = unet.build_model(config)
    tx = state_lib.make_optimizer(config)
    # Random weights of the right shapes without compiling model.init (slow on a busy 2-core CPU).
    shapes = unet.param_shapes(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    state = state_lib.create_state(params, tx, config)
    wd = tmp_path_factory.mktemp("run")
    ckpts = checkpoint.Checkpoints(wd, keep=1)
    ckpts.save(state, {"step": 0, "nonfinite": 0, "seed": 0,
                       "config": checkpoint.config_to_dict(config)}, {"json": {}},
               best_metric=1.0)
    ckpts.close()
    return wd


def _image():
    affine = _affine((1.5, 1.5, 1.5))
    return _blob_image(affine, (40, 36, 30), np.array([0.0, 0.0, 0.0]), noise=0.3), affine


def test_ras_and_lps_storage_give_same_world_landmarks(workdir, tmp_path):
    img, affine = _image()
    # The same image stored LPS-ordered: first two axes reversed, affine compensating.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(img.shape[:2]) - 1
    io.save_image(tmp_path / "ras.nii.gz", img, affine)
    io.save_image(tmp_path / "lps.nii.gz", img[::-1, ::-1], affine @ flip)
    predictor = Predictor.from_workdir(workdir)
    a = predictor.predict(*io.load_image(tmp_path / "ras.nii.gz"))
    b = predictor.predict(*io.load_image(tmp_path / "lps.nii.gz"))
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
    np.testing.assert_allclose(a.present_prob, b.present_prob, atol=1e-4)


def test_windows_split_over_devices_give_the_same_prediction(workdir):
    # Batches of windows are split over the devices (conftest: one CPU device per core); the
    # prediction must not depend on how many windows go into one call, padding included.
    from cowjax.training import checkpoint
    config, params = checkpoint.load_for_inference(workdir)
    img, affine = _image()
    one = Predictor(config, params, batch_size=1, margin_mm=3.0).predict(img, affine)
    n = 2 * jax.local_device_count()          # 27 windows: the last batch is partly padding
    many = Predictor(config, params, batch_size=n, margin_mm=3.0)
    assert many.mesh.size == jax.local_device_count()
    got = many.predict(img, affine)
    np.testing.assert_allclose(got.landmarks, one.landmarks, atol=1e-3)
    np.testing.assert_allclose(got.present_prob, one.present_prob, atol=1e-5)


def test_an_exported_run_predicts_as_the_run_and_holds_no_optimiser_state(workdir, tmp_path):
    from cowjax.training import checkpoint
    assert checkpoint.export_for_inference(workdir, tmp_path / "model") == [""]
    files = [p.relative_to(tmp_path / "model").parts for p in (tmp_path / "model").rglob("*")]
    assert not any("opt_state" in parts or "checkpoints" in parts for parts in files)
    img, affine = _image()
    a = Predictor.from_workdir(workdir).predict(img, affine)
    b = Predictor.from_workdir(tmp_path / "model").predict(img, affine)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    with pytest.raises(CowjaxError, match="no best checkpoint"):
        checkpoint.export_for_inference(tmp_path / "nothing", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_softmax_model_confidences_are_probabilities(workdir):
    from cowjax.training import checkpoint
    config, params = checkpoint.load_for_inference(workdir)
    config.loss.heatmap = "softmax_ce"
    img, affine = _image()
    pred = Predictor(config, params, margin_mm=3.0).predict(img, affine)
    assert np.all(np.isfinite(pred.landmarks))
    assert np.all((pred.confidence > 0) & (pred.confidence <= 1 + 1e-6))


def test_every_output_format_reads_back(workdir, tmp_path):
    img, affine = _image()
    io.save_image(tmp_path / "img.nii.gz", img, affine)
    expected = Predictor.from_workdir(workdir).predict(img, affine)
    for name in ("out.mrk.json", "out.csv", "out.json"):
        predict.run_predict(workdir, tmp_path / "img.nii.gz", tmp_path / name,
                            save_segmentation=name == "out.json")
    for name in ("out.mrk.json", "out.csv"):
        np.testing.assert_allclose(io.read_landmarks(tmp_path / name), expected.landmarks, atol=1e-3)
    doc = json.loads((tmp_path / "out.json").read_text())
    got = np.array([doc["landmarks"][n]["position_ras_mm"] for n in anatomy.LANDMARKS])
    np.testing.assert_allclose(got, expected.landmarks, atol=1e-6)
    assert set(doc["segments"]) == set(anatomy.SEGMENTS)
    assert all(0 <= v["bifurcation_prob"] <= 1 for v in doc["landmarks"].values())
    written = nib.load(tmp_path / "out_segments.nii.gz")
    seg, seg_affine = np.asarray(written.dataobj), written.affine
    assert seg.shape == img.shape and seg.dtype == np.uint8 and seg.max() <= anatomy.NUM_SEGMENTS
    np.testing.assert_allclose(seg_affine, affine, atol=1e-5)


def test_directories_of_cases_and_of_images(workdir, tmp_path):
    img, affine = _image()
    for cid in ("case_a", "case_b"):
        io.save_case(tmp_path / "cases" / cid,
                     io.Case(cid, img, affine, np.full((L, 3), np.nan)))
    (tmp_path / "images").mkdir()
    # The same volume in NIfTI, MetaImage and NRRD: the same world landmarks.
    for name in ("x1.nii.gz", "x2.mha", "x3.nrrd"):
        io.save_image(tmp_path / "images" / name, img, affine)
    predict.run_predict(workdir, tmp_path / "cases", tmp_path / "out_cases")
    predict.run_predict(workdir, tmp_path / "images", tmp_path / "out_images", save_segmentation=True)
    names = sorted(p.name for p in (tmp_path / "out_cases").iterdir())
    assert names == ["case_a.json", "case_a.mrk.json", "case_b.json", "case_b.mrk.json"]
    names = sorted(p.name for p in (tmp_path / "out_images").iterdir())
    assert names == ["segments.ctbl"] + [f"x{i}{s}" for i in (1, 2, 3)
                                         for s in (".json", ".mrk.json", "_segments.nii.gz")]
    assert np.all(np.isfinite(io.read_landmarks(tmp_path / "out_cases" / "case_b.mrk.json")))
    first = io.read_landmarks(tmp_path / "out_images" / "x1.mrk.json")
    for other in ("x2", "x3"):
        np.testing.assert_allclose(io.read_landmarks(tmp_path / "out_images" / f"{other}.mrk.json"),
                                   first, atol=1e-3)


def test_figure_shows_the_prediction_on_the_image(workdir, tmp_path):
    import matplotlib.image
    img, affine = _image()
    io.save_image(tmp_path / "img.nii.gz", img, affine)
    # An oblique image: the figure is drawn on a RAS-aligned grid.
    (tmp_path / "images").mkdir()
    io.save_image(tmp_path / "images" / "tilted.nii.gz", img, _affine((1.5, 1.5, 1.5), 20.0))
    single = predict.run_predict(workdir, tmp_path / "img.nii.gz", tmp_path / "out.mrk.json",
                                 save_segmentation=True, figure=True)
    many = predict.run_predict(workdir, tmp_path / "images", tmp_path / "out", figure=True)
    assert tmp_path / "out.png" in single and tmp_path / "out" / "tilted.png" in many
    with_segments = matplotlib.image.imread(tmp_path / "out.png")
    landmarks_only = matplotlib.image.imread(tmp_path / "out" / "tilted.png")
    # Two rows of MIPs (landmarks, segments) against one; not a blank canvas.
    assert with_segments.shape[0] > 1.6 * landmarks_only.shape[0]
    for picture in (with_segments, landmarks_only):
        assert picture[..., :3].std() > 0.05


def test_bad_inputs_raise_one_clear_error(workdir, tmp_path):
    img, affine = _image()
    io.save_image(tmp_path / "img.nii.gz", img, affine)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "images").mkdir()
    io.save_image(tmp_path / "images" / "x.nii.gz", img, affine)
    cases = [
        (tmp_path / "empty_run", tmp_path / "img.nii.gz", tmp_path / "o.json", "no checkpoint"),
        (workdir, tmp_path / "broken.nii.gz", tmp_path / "o.json", "broken.nii.gz"),
        (workdir, tmp_path / "img.nii.gz", tmp_path / "o.txt", "unknown output type"),
        (workdir, tmp_path / "img.nii.gz", tmp_path / "missing" / "o.json", "does not exist"),
        (workdir, tmp_path / "nothing.nii.gz", tmp_path / "o.json", "not found"),
        (workdir, tmp_path / "images", tmp_path / "a" / "b", "does not exist"),
        (workdir, tmp_path / "images", tmp_path / "img.nii.gz", "must be a directory"),
    ]
    for run, inp, out, message in cases:
        with pytest.raises(CowjaxError, match=message):
            predict.run_predict(run, inp, out)
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.txt").exists()


def test_eval_scores_cases_and_writes_the_report(workdir, tmp_path, capsys):
    img, affine = _image()
    truth = np.random.default_rng(1).uniform(-10, 10, (L, 3))
    truth[3] = np.nan
    segments = np.zeros(img.shape, np.uint8)
    segments[10:20, 10:20, 10:15] = 1
    present = {n: n != "ACoA" for n in anatomy.SEGMENTS}
    attrs = {"segments": present,
             "landmarks": anatomy.landmark_dict(anatomy.landmark_attributes(
                 np.array([present[n] for n in anatomy.SEGMENTS])))}
    io.save_case(tmp_path / "data" / "c1", io.Case("c1", img, affine, truth, segments=segments,
                                                   attributes=attrs))
    io.save_case(tmp_path / "data" / "c2", io.Case("c2", img, affine, truth))
    other = tmp_path / "ablation"
    shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("eval"))
    reports = evaluate.run_eval([workdir, other], tmp_path / "data")
    report = reports[str(workdir)]
    out = workdir / "eval" / "data"
    for name in ("report.json", "report.md", "landmark_errors.png", "mip_c1.png", "comparison.png",
                 "comparison.md"):
        assert (out / name).is_file(), name
    assert reports[str(other)]["groups"]["all"]["mre_mm"] == pytest.approx(
        report["groups"]["all"]["mre_mm"])
    pred = Predictor.from_workdir(workdir).predict(img, affine)
    err = np.linalg.norm(pred.landmarks - truth, axis=-1)
    g = report["groups"]["all"]
    assert g["num_cases"] == 2 and g["num_landmarks"] == 2 * (L - 1)
    assert g["mre_mm"] == pytest.approx(np.nanmean(err), abs=1e-3)
    assert g["num_cases_with_segments"] == 1 and g["segment_attr_count"] == anatomy.NUM_SEGMENTS
    assert report["groups"]["variant"]["num_cases"] == 1
    assert report["groups"]["complete"]["num_cases"] == 0
    # The image and its mirror were averaged: every scored landmark falls in one spread band.
    bands = g["error_by_spread"]
    assert sum(b["count"] for b in bands) == g["num_landmarks"]
    band = np.searchsorted(evaluate.SPREAD_BANDS_MM, pred.spread_mm, side="right") - 1
    for k, b in enumerate(bands):
        assert b["count"] == 2 * np.sum((band == k) & np.isfinite(truth[:, 0]))
    assert "Errors by the passes' spread" in (out / "report.md").read_text(encoding="utf-8")
    assert "report.md" in capsys.readouterr().out


def test_errors_by_spread_bands():
    errors = np.array([[0.5, 5.0, np.nan, 1.0], [3.0, 6.0, 2.0, 9.0]])
    spreads = np.array([[0.1, 0.2, 0.3, 0.7], [0.7, 1.5, 2.5, np.nan]])
    bands = evaluate.error_by_spread(errors, spreads)
    assert [b["count"] for b in bands] == [2, 2, 1, 1]      # NaN error or spread: left out
    assert bands[0]["mre_mm"] == pytest.approx(2.75) and bands[0]["over_4mm"] == 0.5
    assert bands[1]["mre_mm"] == pytest.approx(2.0) and bands[1]["over_4mm"] == 0.0
    assert bands[2]["over_4mm"] == 1.0 and bands[3]["mre_mm"] == pytest.approx(2.0)
    assert bands[-1]["to_mm"] is None
    empty = evaluate.error_by_spread([[1.0]], [[0.2]])[1]
    assert empty["count"] == 0 and empty["mre_mm"] is None and empty["over_4mm"] is None
    assert evaluate.error_by_spread(errors, np.full_like(spreads, np.nan)) is None


def test_eval_names_the_cases_of_two_datasets_apart(workdir, tmp_path):
    """Two datasets of the test split both hold ``c1``: each gets its own report entry and
    figure."""
    img, affine = _image()
    truth = np.random.default_rng(1).uniform(-10, 10, (L, 3))
    for dataset in ("a", "b"):
        io.save_case(tmp_path / "data" / dataset / "c1", io.Case("c1", img, affine, truth))
    run = tmp_path / "run"
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("eval"))
    (run / "split.json").write_text(json.dumps({"data_dir": str(tmp_path / "data"), "train": [],
                                                "val": [], "test": ["a/c1", "b/c1"]}))
    report, errors, out = evaluate.evaluate_run(run, tta=False)
    assert report["cases"] == ["a/c1", "b/c1"] and len(report["per_case_mre_mm"]) == 2
    assert (out / "mip_a_c1.png").is_file() and (out / "mip_b_c1.png").is_file()


def test_flip_brings_the_mirror_image_back_onto_the_right_channels():
    """In the mirrored world the network calls the patient's left landmarks _R: the mirror pass
    must be negated in x and its _R/_L channels swapped before averaging. The stand-in network
    finds landmark k at the blob shifted by d_k grid voxels (d mirrored between each _R/_L pair, as
    the anatomy is), so both passes agree on blob + d_k only when both are undone."""
    d = np.zeros((L, 3), int)
    for k, m in enumerate(anatomy.MIRROR_LANDMARKS):
        j = min(k, m)
        d[k] = [0 if m == k else (2 if k < m else -2), j % 5 - 2, j % 3 - 1]
    echo = _EchoNet(1)

    def shifted(params, images):
        out = echo(params, images)
        maps = out["heatmaps"]
        out["heatmaps"] = np.stack([np.roll(maps[..., k], d[k], axis=(1, 2, 3)) for k in range(L)],
                                   axis=-1)
        return out

    predictor = _echo_predictor(1, shifted)
    predictor.locate = lambda volume, first_guess: first_guess
    affine, centre = _affine((1.5, 1.5, 1.5)), np.array([-8.0, -4.0, -7.0])
    pred = predictor.predict(_blob_image(affine, (40, 40, 30), centre), affine)
    spacing = np.asarray(predictor.config.data.spacing)
    np.testing.assert_allclose(pred.landmarks, centre + d * spacing, atol=0.5)


def test_the_spread_is_how_far_the_image_and_its_mirror_put_each_landmark_from_their_mean(
        tmp_path):
    """The passes averaged disagree by a known amount; the spread is half the distance between
    them (the mirror pass undone first), is written beside the positions, and is left out after
    a single pass."""
    rng = np.random.default_rng(1)
    direct, in_mirror = rng.normal(0, 5, (L, 3)), rng.normal(0, 5, (L, 3))
    mirror = in_mirror[anatomy.MIRROR_LANDMARKS] * [-1.0, 1.0, 1.0]   # back in the patient's world
    for flip in (True, False):
        predictor = _echo_predictor(1, flip=flip)
        answers = iter([direct, in_mirror])
        predictor._predict_pass = lambda image, aff, head: (predictor_lib.Prediction(
            next(answers).copy(), np.ones(L), np.full(L, 0.5), np.ones(anatomy.NUM_SEGMENTS)), None)
        pred, _ = predictor.network_prediction(np.zeros((8, 8, 8), np.float32), np.eye(4))
        if not flip:
            assert pred.spread_mm is None and "spread_mm" not in (
                predict.prediction_dict(pred)["landmarks"]["BA_top"])
            continue
        np.testing.assert_allclose(pred.landmarks, (direct + mirror) / 2)
        np.testing.assert_allclose(pred.spread_mm, np.linalg.norm(direct - mirror, axis=-1) / 2)
        doc = predict.prediction_dict(pred)["landmarks"]
        np.testing.assert_allclose([doc[n]["spread_mm"] for n in anatomy.LANDMARKS], pred.spread_mm)
        for name in ("out.mrk.json", "out.csv"):
            predict.write_prediction(tmp_path / name, pred)
            np.testing.assert_allclose(io.read_landmarks(tmp_path / name), pred.landmarks,
                                       atol=1e-9)
        markup = json.loads((tmp_path / "out.mrk.json").read_text())["markups"][0]
        point = markup["controlPoints"][0]
        assert point["description"] == f"confidence=1.0000 spread_mm={pred.spread_mm[0]:.2f}"
        header = (tmp_path / "out.csv").read_text().splitlines()[1]
        assert header == "name,x,y,z,confidence,spread_mm"


def _turn(degrees, shift=(5.0, -3.0, 2.0)):
    """[4, 4]: a rotation about the world's x axis (a nod) and a shift."""
    t = np.deg2rad(degrees)
    m = np.eye(4)
    m[:3, :3] = [[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]
    m[:3, 3] = shift
    return m


def test_the_pose_is_fitted_only_to_landmarks_that_look_like_a_circle():
    template = anatomy.TEMPLATE_LANDMARKS
    wobble = np.random.default_rng(0).normal(0.0, 2.0, template.shape)
    head = landmark_registration.apply_transform(_turn(30.0), template + wobble)
    back = predictor_lib.pose_to_template(head)                # the head turned back upright
    assert back is not None
    # Within a few degrees (the landmarks wobble 2 mm); 30 degrees off would be 0.5 apart.
    np.testing.assert_allclose(back[:3, :3], _turn(30.0)[:3, :3].T, atol=0.1)
    assert predictor_lib.pose_to_template(np.zeros((L, 3))) is None          # no pose at all
    scattered = np.random.default_rng(1).permutation(head)     # the right points, wrong landmarks
    assert predictor_lib.pose_to_template(scattered) is None


def test_the_first_stage_looks_on_a_grid_aligned_to_the_template(monkeypatch):
    """With ``align``, the landmarks of the window that found the circle fix a rigid transform
    onto the template; the first stage's windows are placed on a grid aligned to it, centred on
    those landmarks, and the refinement stage gets the same transform. Predictions still come
    back in the image's own world."""
    turn, fitted = _turn(30.0), []

    def pose(landmarks):
        fitted.append(np.array(landmarks))
        return turn

    monkeypatch.setattr(predictor_lib, "pose_to_template", pose)
    grids = []
    network_grid = preprocess.network_grid

    def spy(affine, shape, spacing, to_template=None):
        grids.append(to_template)
        return network_grid(affine, shape, spacing, to_template)

    monkeypatch.setattr(predictor_lib.preprocess, "network_grid", spy)

    class Refiner:
        def refine(self, image, affine, landmarks, to_template):
            self.to_template = to_template
            return landmarks

    affine = _affine((1.2, 0.9, 2.0), 30.0, (-1, -1, 1), (24.0, 39.0, -24.0))
    centre, shape = np.array([4.0, -2.5, 1.3]), (60, 70, 30)
    # The stand-in pose is a turn, not a fit to the template: no gate round the template's landmarks.
    predictor = _echo_predictor(2, flip=False, align=True, gate_mm=None)
    predictor.refiner = Refiner()
    pred = predictor.predict(_blob_image(affine, shape, centre), affine)
    assert len(fitted) == 1                                   # from the search's window
    np.testing.assert_allclose(fitted[0], np.broadcast_to(centre, (L, 3)), atol=1.0)
    assert len(grids) == 2 and grids[0] is None and grids[1] is turn   # search, aligned grid
    assert predictor.refiner.to_template is turn
    np.testing.assert_allclose(pred.landmarks, np.broadcast_to(centre, (L, 3)), atol=0.5)
    # No pose fitted (the stand-in's landmarks all at one point): the image's own axes.
    monkeypatch.undo()
    monkeypatch.setattr(predictor_lib.preprocess, "network_grid", spy)
    grids.clear()
    pred = predictor.predict(_blob_image(affine, shape, centre), affine)
    assert grids == [None, None] and predictor.refiner.to_template is None
    np.testing.assert_allclose(pred.landmarks, np.broadcast_to(centre, (L, 3)), atol=0.5)


def test_segment_labellings_only_when_asked_for():
    """--save_segmentation writes the lumen labelled by the landmarks; the head's labelling (for
    the evaluation) is made only when asked for, and the reverse."""
    affine = _affine((1.5, 1.5, 1.5))
    img = _blob_image(affine, (40, 40, 30), np.zeros(3), sigma_mm=3.0)
    predictor = _echo_predictor(1, flip=False)
    predictor.locate = lambda volume, first_guess: first_guess
    written = predictor.predict(img, affine, segmentation=True)
    head = predictor.predict(img, affine, head_segmentation=True)
    assert written.head_segmentation is None and head.segmentation is None
    for labels in (written.segmentation, head.head_segmentation):
        assert labels.shape == img.shape and labels.dtype == np.uint8


def test_argmax_decoding_lands_on_grid_voxels_and_tta_can_be_turned_off():
    """--decode=argmax --tta=none, the paper's scoring: each landmark sits on a voxel centre of the
    network grid (no sub-voxel fit), and the mirror image is not predicted."""
    centre = np.array([4.0, -2.5, 1.3])
    affine = _affine((1.5, 1.5, 1.5))
    predictor = _echo_predictor(1, flip=False, decode_method="argmax")
    predictor.locate = lambda volume, first_guess: first_guess
    pred = predictor.predict(_blob_image(affine, (40, 40, 30), centre), affine)
    assert predictor.forward.calls == 1                                  # no mirror pass
    grid = preprocess.canonical_grid(affine, (40, 40, 30), _config(1).data.spacing)[0]
    vox = preprocess.world_to_voxel(pred.landmarks, grid)
    np.testing.assert_allclose(vox, np.round(vox), atol=1e-6)
    np.testing.assert_allclose(pred.landmarks, np.broadcast_to(centre, (L, 3)), atol=1.6)
    with pytest.raises(CowjaxError, match="decode"):
        Predictor(_config(1), params=None, decode_method="centroid")


def test_bifurcation_follows_the_predicted_presence_by_the_cow19_rule():
    present = np.full(anatomy.NUM_SEGMENTS, 0.9)
    present[anatomy.SEGMENT_INDEX["PCoA_R"]] = 0.1            # PCoA_R most likely absent
    pred = predictor_lib.Prediction(np.zeros((L, 3)), np.ones(L), np.full(L, 0.7), present)
    np.testing.assert_array_equal(pred.bifurcation_prob > 0.5,
                                  anatomy.landmark_attributes(present > 0.5))
    assert pred.bifurcation_prob[anatomy.LANDMARK_INDEX["ICA_PCoA_R"]] < 0.5
    assert pred.bifurcation_prob[anatomy.LANDMARK_INDEX["ICA_PCoA_L"]] > 0.5
    np.testing.assert_allclose(pred.bifurcation_branch_prob, 0.7)   # the branch's own, kept


def test_windows_per_call_sets_the_predictor_batch(monkeypatch):
    import jax
    from cowjax import devices
    n = jax.local_device_count()
    assert Predictor(_config(), params=None).batch_size == devices.window_batch()
    monkeypatch.setattr(devices, "WINDOWS_PER_CALL", 3)
    assert devices.window_batch() == -(-3 // n) * n            # a multiple of the devices
    assert Predictor(_config(), params=None).batch_size == -(-3 // n) * n


def test_presence_from_the_image_or_from_the_network():
    """presence="image" (the default) replaces the variable segments' presence where the image
    measured a radius and keeps the network's elsewhere; "network" keeps the branch's (the paper)."""
    affine = _affine((1.5, 1.5, 1.5))
    img = _blob_image(affine, (40, 40, 30), np.zeros(3), sigma_mm=3.0)
    preds = {}
    for presence in predictor_lib.PRESENCE:
        predictor = _echo_predictor(1, flip=False, presence=presence)
        predictor.locate = lambda volume, first_guess: first_guess
        preds[presence] = predictor.predict(img, affine)
    network, image = preds["network"], preds["image"]
    assert network.segment_radius_mm is None
    np.testing.assert_allclose(network.present_prob, 0.5)              # the stand-in's branch
    radii = image.segment_radius_mm
    measured = np.isfinite(radii)
    assert measured.any() and not measured[~anatomy.VARIABLE_SEGMENT_MASK].any()
    np.testing.assert_allclose(image.present_prob[measured],
                               segment.presence_probability(radii[measured]))
    np.testing.assert_allclose(image.present_prob[~measured], 0.5)
    np.testing.assert_allclose(image.landmarks, network.landmarks)
    with pytest.raises(CowjaxError, match="presence"):
        Predictor(_config(1), params=None, presence="atlas")


def test_an_untrained_segment_branch_decides_nothing():
    """A run trained without the segment attribute term (an ablation arm) has a branch whose
    presence is noise: the segments it alone would decide are taken as present, so the written
    labelling keeps them, and with presence="network" evaluation scores no attributes."""
    from cowjax.data.io import Case
    from cowjax.inference import evaluate
    affine = _affine((1.5, 1.5, 1.5))
    img = _blob_image(affine, (40, 40, 30), np.zeros(3), sigma_mm=3.0)
    attributes = {"segments": {n: True for n in anatomy.SEGMENTS},
                  "landmarks": {n: True for n in anatomy.LANDMARKS}}
    case = Case("c", img, affine, np.zeros((L, 3)), attributes=attributes)
    for learned in (True, False):
        preds, scores = {}, {}
        for presence in predictor_lib.PRESENCE:
            config = _config(1)
            config.loss.w_segment_attr = float(learned)
            predictor = Predictor(config, params=None, batch_size=1, forward=_EchoNet(1),
                                  align=False, flip=False, presence=presence)
            predictor.locate = lambda volume, first_guess: first_guess
            preds[presence] = predictor.predict(img, affine)
            scores[presence] = evaluate.summarize([evaluate.score_case(predictor, case)])
        measured = np.isfinite(preds["image"].segment_radius_mm)
        assert measured.any() and not measured.all()
        branch = 0.5 if learned else 1.0                  # the stand-in's branch, or the prior
        np.testing.assert_allclose(preds["network"].present_prob, branch)
        np.testing.assert_allclose(preds["image"].present_prob[~measured], branch)
        assert scores["image"]["segment_attr_count"] == anatomy.NUM_SEGMENTS
        assert scores["network"]["segment_attr_count"] == (anatomy.NUM_SEGMENTS if learned else 0)
        assert (scores["network"]["landmark_attr_accuracy"] is None) == (not learned)


def test_an_ensemble_averages_its_members_and_reads_the_image_once(monkeypatch):
    """Each member finds the landmarks its own way; the ensemble averages them (and their
    confidences and branch outputs) in world space, then reads presence and the labelling off
    the image once, from the averaged landmarks."""
    affine = _affine((1.5, 1.5, 1.5))
    img = _blob_image(affine, (40, 40, 30), np.zeros(3), sigma_mm=3.0)
    members = [_echo_predictor(1, flip=False) for _ in range(2)]
    rng = np.random.default_rng(0)
    found = [predictor_lib.Prediction(landmarks=rng.normal(0, 5, (L, 3)),
                                      confidence=rng.random(L),
                                      bifurcation_branch_prob=rng.random(L),
                                      present_prob=rng.random(anatomy.NUM_SEGMENTS),
                                      spread_mm=rng.random(L))
             for _ in members]
    for m, p in zip(members, found):
        m.network_prediction = lambda image, aff, head=False, p=p: (
            predictor_lib.Prediction(**{k: v.copy() for k, v in vars(p).items()
                                        if v is not None}), None)
    read = []
    real_radii = segment.presence_radii
    monkeypatch.setattr(segment, "presence_radii",
                        lambda image, aff, landmarks, maps=None: read.append(landmarks.copy())
                        or real_radii(image, aff, landmarks, maps))
    pred = predictor_lib.Ensemble(members).predict(img, affine, segmentation=True)
    mean = (found[0].landmarks + found[1].landmarks) / 2
    np.testing.assert_allclose(pred.landmarks, mean)
    np.testing.assert_allclose(pred.confidence, (found[0].confidence + found[1].confidence) / 2)
    np.testing.assert_allclose(pred.bifurcation_branch_prob,
                               (found[0].bifurcation_branch_prob
                                + found[1].bifurcation_branch_prob) / 2)
    # The spread of all four passes about the mean: each member's two passes lie its own spread
    # either side of its landmarks (any direction; here along a random one).
    passes = []
    for p in found:
        u = rng.normal(size=(L, 3))
        u *= (p.spread_mm / np.linalg.norm(u, axis=-1))[:, None]
        passes += [p.landmarks + u, p.landmarks - u]
    rms = np.sqrt(np.mean([np.sum((q - mean) ** 2, axis=-1) for q in passes], axis=0))
    np.testing.assert_allclose(pred.spread_mm, rms)
    assert len(read) == 1
    np.testing.assert_allclose(read[0], mean)
    np.testing.assert_allclose(pred.segment_radius_mm, real_radii(img, affine, mean),
                               equal_nan=True)
    assert pred.segmentation is not None and pred.segmentation.shape == img.shape
    with pytest.raises(CowjaxError, match="at least two"):
        predictor_lib.Ensemble(members[:1])
    with pytest.raises(CowjaxError, match="same way"):
        predictor_lib.Ensemble([members[0], _echo_predictor(1, flip=True)])


def test_an_ensemble_folder_predicts_and_evaluates_as_its_runs(workdir, tmp_path):
    """``export_ensemble`` writes a folder that is one predictor wherever a workdir is taken: the
    same run twice predicts as the run alone; a broken manifest is one clear error."""
    from cowjax.training import checkpoint
    folder = tmp_path / "ensemble"
    assert checkpoint.export_ensemble([workdir, workdir], folder) == [[""], [""]]
    manifest = json.loads((folder / checkpoint.ENSEMBLE_FILE).read_text())
    assert manifest["members"] == ["member_0", "member_1"]
    img, affine = _image()
    single = Predictor.from_workdir(workdir).predict(img, affine)
    ensemble = predictor_lib.load_predictor(folder)
    assert isinstance(ensemble, predictor_lib.Ensemble) and len(ensemble.members) == 2
    both = ensemble.predict(img, affine)
    np.testing.assert_allclose(both.landmarks, single.landmarks, atol=1e-9)
    np.testing.assert_allclose(both.present_prob, single.present_prob, atol=1e-9)
    io.save_image(tmp_path / "img.nii.gz", img, affine)
    predict.run_predict(folder, tmp_path / "img.nii.gz", tmp_path / "out.mrk.json")
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "out.mrk.json"), single.landmarks,
                               atol=1e-3)
    truth = np.random.default_rng(1).uniform(-10, 10, (L, 3))
    io.save_case(tmp_path / "data" / "c1", io.Case("c1", img, affine, truth))
    report = evaluate.run_eval([folder], tmp_path / "data")[str(folder)]
    assert report["groups"]["all"]["mre_mm"] == pytest.approx(
        np.mean(np.linalg.norm(single.landmarks - truth, axis=-1)), abs=1e-3)
    assert report["decode"].startswith("the mean of 2 runs' landmarks")
    for text, message in (("{", "not an ensemble manifest"),
                          (json.dumps({"runs": []}), "not an ensemble manifest"),
                          (json.dumps({"members": ["gone"]}), "not found"),
                          (json.dumps({"members": ["member_0"]}), "at least two")):
        (folder / checkpoint.ENSEMBLE_FILE).write_text(text)
        with pytest.raises(CowjaxError, match=message):
            predictor_lib.load_predictor(folder)
    with pytest.raises(CowjaxError, match="at least two runs"):
        checkpoint.export_ensemble([workdir], tmp_path / "one")
    with pytest.raises(CowjaxError, match="no best checkpoint"):
        checkpoint.export_ensemble([workdir, tmp_path / "nothing"], tmp_path / "none")
    assert not (tmp_path / "one").exists() and not (tmp_path / "none").exists()


def test_each_landmark_is_read_near_where_the_fitted_template_puts_it(monkeypatch):
    """A second, brighter peak further than ``gate_mm`` from the template fitted to the search's
    landmarks is not taken; without the gate the highest peak wins, wherever it is."""
    affine = _affine((2.0, 2.0, 2.0), origin=(-60.0, -50.0, -40.0))
    shape, near, far = (60, 50, 40), np.array([-20.0, 0.0, 0.0]), np.array([20.0, 0.0, 0.0])
    image = (_blob_image(affine, shape, far, sigma_mm=6.0)
             + 0.6 * _blob_image(affine, shape, near, sigma_mm=6.0))
    monkeypatch.setattr(predictor_lib, "pose_to_template", lambda landmarks: np.eye(4))
    monkeypatch.setattr(predictor_lib.anatomy, "TEMPLATE_LANDMARKS", np.tile(near, (L, 1)))
    gated = _echo_predictor(1, flip=False, align=True).predict(image, affine).landmarks
    np.testing.assert_allclose(gated, np.broadcast_to(near, (L, 3)), atol=1.0)
    plain = _echo_predictor(1, flip=False, align=True, gate_mm=None).predict(image, affine)
    np.testing.assert_allclose(plain.landmarks, np.broadcast_to(far, (L, 3)), atol=1.0)
