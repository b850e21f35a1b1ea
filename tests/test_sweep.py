"""Sweeps: members trained together equal separate runs of their settings, whatever the strategy
and with a term off; each member is an ordinary run; a sweep resumes exactly; its members are
compared in one report; a bad sweep is one line before anything is written."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from cowjax import anatomy, config_defaults
from cowjax.errors import CowjaxError
from cowjax.training import checkpoint as ckpt
from cowjax.training import state as state_lib
from cowjax.training import sweep, train

from conftest import (ROOT, RandomBatches, compiled_once, dir_config, read_metrics, tiny_config,
                      val_examples)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3, 3), name="Conv3x3_1")(x))


class GradNormNet(nn.Module):
    """conftest.TinyNet's output contract, its convolution where GradNorm looks for CowNet's shared
    layer (``weighting.shared_layer_path``: dec0/Conv3x3_1 with two widths at full resolution)."""

    @nn.compact
    def __call__(self, image):
        h = Block(name="dec0")(image)
        pooled = h.mean(axis=(1, 2, 3))
        return {"heatmaps": nn.Conv(anatomy.NUM_LANDMARKS, (1, 1, 1))(h),
                "segmentation": nn.Conv(anatomy.NUM_CLASSES, (1, 1, 1))(h),
                "landmark_attr": nn.Dense(anatomy.NUM_LANDMARKS)(pooled),
                "segment_attr": nn.Dense(anatomy.NUM_SEGMENTS)(pooled)}


def sweep_config(steps):
    """Three members, vmapped: fixed without the segmentation term, uncertainty, gradnorm at half
    weight. (Unrolled, the CPU's default, each member's step is its run's own: the real model's
    test below.)"""
    c = tiny_config(num_train_steps=steps, checkpoint_every_steps=2, eval_every_steps=2,
                    log_every_steps=1)
    c.loss.weighting_lr = 0.2
    c.sweep.weighting = ("fixed", "uncertainty", "gradnorm")
    c.sweep.w_segmentation = (0.0, 1.0, 0.5)
    c.train.update(sweep_impl="vmap", steps_per_call=1)
    return c


def train_sweep(config, root):
    members = {n: (c, root / n) for n, c in config_defaults.sweep_configs(config).items()}
    return train.run_training(config, root, GradNormNet(), RandomBatches(config),
                              val_examples(config), members=members)


def train_run(config, workdir):
    return train.run_training(config, workdir, GradNormNet(), RandomBatches(config),
                              val_examples(config))


def final_params(config, workdir):
    tx = state_lib.make_optimizer(config)
    checkpoints = ckpt.Checkpoints(workdir, 1)
    state, _ = checkpoints.restore_latest(state_lib.abstract_state(GradNormNet(), config, tx))
    checkpoints.close()
    return state["params"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the sweep (also stopped at 2 and resumed), and each member as a separate run."""
    root = tmp_path_factory.mktemp("sweeps")
    with compiled_once(tmp_path_factory.mktemp("jax_cache")):
        train_sweep(sweep_config(4), root / "sweep")
        train_sweep(sweep_config(2), root / "resumed")
        train_sweep(sweep_config(4), root / "resumed")
        for name, c in config_defaults.sweep_configs(sweep_config(4)).items():
            train_run(c, root / "separate" / name)
    return root


def test_members_train_as_separate_runs_of_their_settings(trained):
    for name, config in config_defaults.sweep_configs(sweep_config(4)).items():
        member, separate = trained / "sweep" / name, trained / "separate" / name
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                             err_msg=name),
                     final_params(config, member), final_params(config, separate))
        got, want = read_metrics(member), read_metrics(separate)
        assert [m.keys() for m in got] == [m.keys() for m in want]      # an off term is not logged
        for a, b in zip(got, want):
            for key in a.keys() - {"split"}:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert "segmentation" not in read_metrics(trained / "sweep" / "member_0")[0]
    weights = [m["weight_heatmap"] for m in read_metrics(trained / "sweep" / "member_1")
               if m["split"] == "train"]
    assert np.ptp(weights) > 1e-4                          # uncertainty's weights move


def test_a_resumed_sweep_equals_an_uninterrupted_one(trained):
    for name, config in config_defaults.sweep_configs(sweep_config(4)).items():
        assert read_metrics(trained / "resumed" / name) == read_metrics(trained / "sweep" / name)
        jax.tree.map(np.testing.assert_array_equal, final_params(config, trained / "resumed" / name),
                     final_params(config, trained / "sweep" / name))
        assert (trained / "resumed" / name / "curves.png").is_file()


def test_member_k_is_the_base_with_the_kth_values_and_no_refinement():
    base = tiny_config()
    base.refine.num_train_steps = 5
    base.sweep.weighting, base.sweep.w_segmentation = ("fixed", "dwa"), (0.0, 2.0)
    members = config_defaults.sweep_configs(base)
    assert list(members) == ["member_0", "member_1"]
    assert (members["member_0"].loss.weighting, members["member_0"].loss.w_segmentation) == (
        "fixed", 0.0)
    assert (members["member_1"].loss.weighting, members["member_1"].loss.w_segmentation) == (
        "dwa", 2.0)
    for c in members.values():
        assert not sweep.is_sweep(c) and c.refine.num_train_steps == 0
        assert c.loss.w_heatmap == base.loss.w_heatmap and c.seed == base.seed
    assert base.sweep.weighting == ("fixed", "dwa") and base.refine.num_train_steps == 5
    assert config_defaults.sweep_configs(tiny_config()) == {}


@pytest.mark.parametrize("setting, message", [
    (dict(weighting=("fixed", "dwa"), w_heatmap=(1.0, 2.0, 3.0)),
     "config.sweep: lists of different lengths (w_heatmap: 3, weighting: 2)"),
    (dict(w_segmentation=()), "config.sweep.w_segmentation=(): a sweep needs two or more values"),
    (dict(weighting=("fixed", "softmax")),
     "config.sweep member_1 (weighting='softmax'): config.loss.weighting: unknown 'softmax'"),
    (dict(dwa_window=(1, 0)), "config.sweep member_1 (dwa_window=0): config.loss.dwa_window=0"),
    (dict(w_consistency=("a", 1.0)), "config.sweep.w_consistency: 'a' (member 0) is not a float"),
    (dict(w_segmentaton=(0.0, 1.0)), "config.sweep.w_segmentaton: not a setting a sweep can vary"),
])
def test_a_bad_sweep_is_one_line_before_anything_is_written(tmp_path, setting, message):
    config = tiny_config()
    config.loss.weighting = "dwa"
    with pytest.raises(CowjaxError) as e:
        config.sweep.update(setting)
        train.train_and_evaluate(config, tmp_path / "run")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_launch_refuses_a_bad_sweep_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/test.py",
                        "--config.sweep.weighting=('fixed','uncertainty')",
                        "--config.sweep.w_segmentation=(0.5,)", f"--workdir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(
        "error: config.sweep.w_segmentation=(0.5,): a sweep needs two or more values"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sweep_of_the_real_model_holds_runs_that_predict_and_compare(phantom_dataset,
                                                                       tmp_path, monkeypatch):
    """Two members (fixed; uncertainty without the consistency term) of CowNet on phantom cases,
    a step each (unrolled on a CPU): each member's workdir is a run whose predictions are a
    separate run's, and eval on the sweep compares both in one report."""
    from cowjax import ablation
    from cowjax.data import io
    from cowjax.inference import evaluate
    from cowjax.inference.predictor import Predictor
    config = dir_config(phantom_dataset)
    config.data.split_counts = (2, 1, 1)
    config.data.crop_shape, config.data.spacing = (16, 16, 16), (4.0, 4.0, 4.0)
    config.update(num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
    config.train.steps_per_call = 1
    config.refine.num_train_steps = 3                    # not trained by a sweep
    config.sweep.weighting = ("fixed", "uncertainty")
    config.sweep.w_consistency = (1.0, 0.0)
    root = tmp_path / "sweep"
    with compiled_once(tmp_path / "jax_cache"):
        summary = train.train_and_evaluate(config, root)
        separate = config_defaults.sweep_configs(config)["member_1"]
        train.train_and_evaluate(separate, tmp_path / "separate")
    assert list(summary) == ["member_0", "member_1"]

    record = json.loads((root / sweep.RECORD).read_text())
    assert record["members"] == {"member_0": {"w_consistency": 1.0, "weighting": "fixed"},
                                 "member_1": {"w_consistency": 0.0, "weighting": "uncertainty"}}
    split = json.loads((root / "split.json").read_text())
    for name in record["members"]:
        member = root / name
        assert json.loads((member / "split.json").read_text()) == split
        saved = json.loads((member / "config.json").read_text())
        assert saved["loss"]["weighting"] == record["members"][name]["weighting"]
        assert all(v is None for v in saved["sweep"].values())
        assert saved["refine"]["num_train_steps"] == 0 and not (member / "refine").exists()
        assert ckpt.has_checkpoint(member) and (member / "curves.png").is_file()
    assert json.loads((tmp_path / "separate" / "split.json").read_text())["test"] == split["test"]
    with pytest.raises(CowjaxError, match="a sweep; its members are the runs"):
        ckpt.load_for_inference(root)

    case = io.load_case(phantom_dataset / split["test"][0])
    found = [Predictor.from_workdir(w, tta=False, refine=False).predict(case.image, case.affine)
             for w in (root / "member_1", tmp_path / "separate")]
    np.testing.assert_allclose(found[0].landmarks, found[1].landmarks, atol=0.05)

    monkeypatch.setattr(evaluate, "NUM_MIP_CASES", 0)
    report = ablation.evaluate_sweep(root, command="python launch.py --mode=eval")
    assert list(report["arms"]) == ["member_0", "member_1"] and report["reference"] == "member_0"
    assert report["arms"]["member_1"]["settings"] == record["members"]["member_1"]
    assert report["arms"]["member_1"]["difference_from_member_0"]["num_pairs"] > 0
    md = (root / "report.md").read_text()
    assert "| member_1 | w_consistency 0.0, weighting uncertainty |" in md
    for name in ("report.json", "landmark_errors.png", "differences.png"):
        assert (root / name).is_file(), name
