"""The refinement stage: its derived config, landmark-centred patches, the prior, two-stage runs."""

import numpy as np
import pytest

from configs import demo
from configs import test as test_config
from cowjax import anatomy
from cowjax.config_defaults import refine_config
from cowjax.data import io, pipeline
from cowjax.inference.predictor import Predictor
from cowjax.inference.refiner import Refiner, decode_with_prior
from conftest import dir_config


def test_refine_config_is_the_patch_stage():
    c = demo.get_config()
    r = refine_config(c)
    assert r.data.spacing == tuple(c.refine.spacing) and r.data.crop_shape == tuple(c.refine.crop_shape)
    assert r.data.crop_centre == "landmark" and r.data.augment.translate_mm == c.refine.translate_mm
    assert r.model.widths == tuple(c.refine.widths) and r.model.heatmap_stride == 1
    assert r.loss.heatmap == "softmax_ce" and r.loss.w_heatmap == 1.0
    assert r.loss.w_segmentation == r.loss.w_landmark_attr == r.loss.w_consistency == 0.0
    assert (r.num_train_steps, r.batch_size) == (c.refine.num_train_steps, c.refine.batch_size)
    assert r.refine.num_train_steps == 0             # no third stage
    assert c.data.crop_centre == "circle" and c.model.widths != r.model.widths  # c is untouched
    # The first stage's data and augmentation otherwise.
    assert r.data.num_cases == c.data.num_cases and r.data.augment.rotate_deg == c.data.augment.rotate_deg
    # The demo trains both stages; its ablations (":full" included) the first network alone.
    assert c.refine.num_train_steps > 0 and demo.get_config("full").refine.num_train_steps == 0


def test_training_patches_are_centred_near_one_landmark(phantom_dataset, tmp_path):
    config = refine_config(dir_config(phantom_dataset, rotate_deg=10.0, scale=0.05))
    spacing, shape = np.asarray(config.data.spacing), np.array(config.data.crop_shape)
    it = pipeline.train_loader(config, io.list_cases(phantom_dataset), tmp_path / "cache")
    # Translation up to translate_mm per axis, then rotation and scale about the centre.
    reach = np.linalg.norm(config.data.augment.translate_mm / spacing) * 1.06 + 0.5
    for _ in range(4):
        batch = next(it)
        assert batch["image"].shape[1:4] == tuple(shape)
        for lm, mask in zip(batch["landmarks"], batch["landmark_mask"]):
            near = np.linalg.norm(lm - (shape - 1) / 2, axis=-1)[mask > 0]
            assert near.size and near.min() <= reach


def test_validation_patches_one_per_known_landmark(phantom_dataset, tmp_path):
    config = refine_config(dir_config(phantom_dataset))
    cases = io.list_cases(phantom_dataset)[:2]
    examples = pipeline.eval_examples(config, cases, tmp_path / "cache")
    known = [np.isfinite(io.load_case(c).landmarks).all(axis=1).sum() for c in cases]
    assert len(examples) == sum(known)
    assert all(ex["landmark_mask"].sum() >= 1 for ex in examples)


def test_prior_keeps_the_refinement_near_the_first_estimate():
    n = 16
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(np.float32)
    near, far = np.array([5.0, 6.0, 7.0]), np.array([12.0, 11.0, 10.0])
    bump = lambda c, h: h * np.exp(-0.5 * ((grid - c) ** 2).sum(-1) / 1.5 ** 2)
    patch = (bump(near, 3.0) + bump(far, 5.0))[None, ..., None]  # the stronger peak is far away
    logits = np.repeat(patch, anatomy.NUM_LANDMARKS, axis=-1)          # every channel: the patch
    args = (logits, np.array([4]), np.array([[5.5, 6.0, 6.5]], np.float32))
    tight = decode_with_prior(*args, np.full(3, 2.0, np.float32), "quadratic")
    loose = decode_with_prior(*args, np.full(3, 1e4, np.float32), "quadratic")
    np.testing.assert_allclose(np.asarray(tight)[0], near, atol=0.6)
    np.testing.assert_allclose(np.asarray(loose)[0], far, atol=0.1)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    from cowjax.training import train
    config = test_config.get_config()
    config.refine.num_train_steps = 2
    workdir = tmp_path_factory.mktemp("two_stage") / "run"
    summary = train.train_and_evaluate(config, workdir)
    return workdir, summary


def test_two_stage_training_writes_both_runs(two_stage_run):
    workdir, summary = two_stage_run
    assert np.isfinite(summary["val_mre_mm"]) and np.isfinite(summary["refine"]["val_mre_mm"])
    from cowjax.training import checkpoint
    assert checkpoint.has_checkpoint(workdir) and checkpoint.has_checkpoint(workdir / "refine")
    config, _ = checkpoint.load_for_inference(workdir / "refine")
    assert config.data.crop_centre == "landmark" and config.model.heatmap_stride == 1


def test_refined_landmarks_stay_in_their_patch_and_in_world_coordinates(two_stage_run, tmp_path):
    workdir, _ = two_stage_run
    case = io.load_case(io.list_cases(next((workdir.parent / "data").iterdir()))[0])
    refined = Predictor.from_workdir(workdir)
    first = Predictor.from_workdir(workdir, refine=False)
    assert refined.refiner is not None and first.refiner is None
    a = refined.predict(case.image, case.affine)
    b = first.predict(case.image, case.affine)
    half = (np.array(refined.refiner.config.data.crop_shape) / 2
            * np.asarray(refined.refiner.config.data.spacing))
    assert np.all(np.abs(a.landmarks - b.landmarks) <= half + 1e-3)
    assert not np.allclose(a.landmarks, b.landmarks)
    # The same image stored LPS-ordered (first two axes reversed) gives the same world landmarks.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(case.image.shape[:2]) - 1
    c = refined.predict(case.image[::-1, ::-1], case.affine @ flip)
    np.testing.assert_allclose(c.landmarks, a.landmarks, atol=1e-3)


def test_one_registration_per_image_serves_both_stages(two_stage_run):
    """The image and its mirror image are registered once each; the refinement stage re-uses the
    first stage's registration (here the identity, so the landmarks are those without one)."""
    workdir, _ = two_stage_run
    case = io.load_case(io.list_cases(next((workdir.parent / "data").iterdir()))[0])
    predictor = Predictor.from_workdir(workdir)
    plain = predictor.predict(case.image, case.affine)
    registered = []

    def identity(image, affine):
        registered.append(np.linalg.det(affine[:3, :3]))
        return np.eye(4)

    def never(image, affine):
        raise AssertionError("the refinement stage registered the image again")

    predictor.to_template, predictor.refiner.to_template = identity, never
    got = predictor.predict(case.image, case.affine)
    assert len(registered) == 2 and registered[0] * registered[1] < 0     # the image, its mirror
    np.testing.assert_allclose(got.landmarks, plain.landmarks, atol=1e-6)


def test_eval_of_a_two_stage_run_says_it_refined(two_stage_run):
    from cowjax.inference import evaluate
    workdir, _ = two_stage_run
    report = evaluate.run_eval([workdir])[str(workdir)]
    assert "refinement stage: 16x16x16 patches at 1.5x1.5x1.5 mm" in report["decode"]
    assert "aligned to the template" in report["decode"]
    assert np.isfinite(report["groups"]["all"]["mre_mm"])
    # --noalign: the image's own axes, and the report says so by not claiming the alignment.
    plain = evaluate.run_eval([workdir], align=False)[str(workdir)]
    assert "aligned to the template" not in plain["decode"]
    assert np.isfinite(plain["groups"]["all"]["mre_mm"])


def test_shifted_patches_average_the_single_refinements(two_stage_run):
    # One batched call over the seven positions equals refining at each shift and averaging.
    from cowjax.training import checkpoint
    workdir, _ = two_stage_run
    config, params = checkpoint.load_for_inference(workdir / "refine")
    case = io.load_case(io.list_cases(next((workdir.parent / "data").iterdir()))[0])
    first = Predictor.from_workdir(workdir, refine=False).predict(case.image, case.affine)
    tta = Refiner(config, params, tta_shift_mm=2.0)
    single = Refiner(config, params, tta_shift_mm=0.0)
    assert len(tta.shifts_mm) == 7 and len(single.shifts_mm) == 1
    got = tta.refine(case.image, case.affine, first.landmarks)
    each = [single.refine(case.image, case.affine, first.landmarks + d) for d in tta.shifts_mm]
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-3)
