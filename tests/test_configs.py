"""The experiment configs load, say what their docstrings say, and take command-line overrides."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cowjax import config_check
from cowjax.errors import CowjaxError
from cowjax.model import unet
from configs import demo, paper, test as test_config


@pytest.mark.parametrize("arg", ["full", "heatmap_only", "seg", "seg_attr"])
def test_paper_ablations_switch_the_auxiliary_tasks(arg):
    c = paper.get_config(arg)
    on = {k: c.loss[k] > 0 for k in ("w_heatmap", "w_segmentation", "w_landmark_attr",
                                     "w_segment_attr", "w_consistency")}
    expected = {"heatmap_only": 1, "seg": 2, "seg_attr": 4, "full": 5}[arg]
    assert sum(on.values()) == expected and on["w_heatmap"]
    assert c.optim.learning_rate == 1e-4 and (c.optim.b1, c.optim.b2) == (0.5, 0.999)
    assert tuple(c.data.spacing) == (0.513, 0.513, 0.8)


@pytest.mark.parametrize("arg", ["heatmap_only", "seg", "seg_attr"])
def test_demo_offers_the_same_ablations_at_cpu_size(arg):
    c, p = demo.get_config(arg), paper.get_config(arg)
    # The same terms on and off; the demo's loss kinds (heatmap, segmentation) are its own
    # (README, "Deviations from the paper").
    weights = lambda loss: {k: v for k, v in loss.items() if k.startswith("w_")}  # noqa: E731
    assert weights(c.loss) == weights(p.loss)
    assert demo.get_config("").loss.w_consistency > 0


def test_paper_rejects_an_unknown_argument():
    with pytest.raises(ValueError, match="unknown argument"):
        paper.get_config("everything")


@pytest.mark.parametrize("get_config", [demo.get_config, test_config.get_config,
                                        paper.get_config])
def test_crops_fit_the_model(get_config):
    c = get_config()
    factor = max(2 ** (len(c.model.widths) - 1), c.model.heatmap_stride)
    assert all(n % factor == 0 for n in c.data.crop_shape)
    unet.build_model(c)                                   # validates the model settings


def test_demo_covers_the_circle_of_willis_on_a_small_cpu():
    c = demo.get_config()
    extent_mm = [n * s for n, s in zip(c.data.crop_shape, c.data.spacing)]
    assert all(e >= want for e, want in zip(extent_mm, (120, 80, 70))), extent_mm
    assert min(c.data.spacing) >= 1.5
    assert c.loss.heatmap == "softmax_ce"
    assert c.optim.schedule == "cosine" and 0 < c.optim.warmup_steps < c.num_train_steps
    assert c.num_train_steps % c.checkpoint_every_steps == 0
    assert math.prod(c.data.crop_shape) <= 128 ** 3 // 8


@pytest.mark.parametrize("override, message", [
    # launch.py validates the config with the overrides applied, before any work: the value that
    # reaches the config is the one named in the error.
    ("--config.num_train_steps=-5", "config.num_train_steps=-5 must be at least 1"),
    ("--config.optim.schedule=stepwise", "config.optim.schedule: unknown 'stepwise'"),
    ("--config.optim.learnig_rate=0.1", "learnig_rate"),       # a mistyped field: no new setting
])
def test_launch_applies_config_overrides_before_validating(tmp_path, override, message):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/test.py", override,
                        "--mode=train", f"--workdir={tmp_path / 'run'}"], cwd=root,
                       capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, message", [
    ("configs/nope.py", "configs/nope.py does not exist"),
    ("configs/demo.py:bogus", "unknown argument 'bogus'"),
])
def test_a_bad_config_flag_is_one_line_without_traceback(tmp_path, config, message):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "launch.py", f"--config={config}",
                        f"--workdir={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--coordinator=localhost:1"], "(missing --num_processes, --process_id)"),
    (["--coordinator=localhost:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be in 0..1"),
])
def test_incomplete_process_flags_are_one_line(tmp_path, args, message):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/test.py", *args,
                        f"--workdir={tmp_path / 'run'}"], cwd=root, capture_output=True,
                       text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_config_argument_reaches_get_config(tmp_path):
    # "path:arg" must name the file path and pass arg (the ablations and configs/paper.py:bench).
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "launch.py", "--config=configs/paper.py:bench", "--mode=bench",
                        "--parts=model"], cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout.strip().splitlines()[0])
    assert model["input"] == [2, 64, 64, 48, 1]


@pytest.mark.parametrize("arg", ["full", "heatmap_only"])
def test_paper_does_what_the_paper_did(arg):
    """25 / 5 / 10 cases per dataset on disk, 150 epochs counted from the training cases, each
    image registered to a training case; the synthetic default split by fractions."""
    from cowjax.training import train
    c = paper.get_config(arg)
    assert tuple(c.data.split_counts) == (25, 5, 10) and c.num_epochs == 150
    assert c.data.registration == "training_sample"
    splits = {"train": [f"case{i}" for i in range(25)], "val": [], "test": []}
    assert train.resolve_config(c, "runs/x", splits).num_train_steps == 1875   # 150 * 25 / 2
    splits["train"] *= 2                                                      # two datasets
    assert train.resolve_config(c, "runs/x", splits).num_train_steps == 3750
    assert train.resolve_config(c, "runs/x", splits).data.template.endswith("x/template.nii.gz")
    synthetic = round(c.data.num_cases * c.data.split[0])
    assert c.data.source == "synthetic" and synthetic == 105
    # The bench measures the network and the pipeline: no registration there.
    assert paper.get_config("bench").data.registration == "none"


def test_epochs_count_nothing_by_default():
    from cowjax.training import train
    c = demo.get_config()
    assert c.num_epochs == 0
    resolved = train.resolve_config(c, "runs/x", {"train": list(range(135))})
    assert resolved.num_train_steps == c.num_train_steps and resolved.data.template == ""


@pytest.mark.parametrize("group, field, value, message", [
    ("model", "norm", "batch", "config.model.norm: unknown 'batch'"),
    ("model", "heatmap_stride", 3, "config.model.heatmap_stride 3: expected 1, or 2"),
    ("model", "segmentation_stride", 4, "config.model.segmentation_stride 4"),
    ("model", "conv_impl", "fft", "config.model.conv_impl: unknown 'fft'"),
    ("loss", "segmentation", "focal", "config.loss.segmentation: unknown 'focal'"),
    ("loss", "heatmap", "l1", "config.loss.heatmap: unknown 'l1'"),
    ("loss", "w_consistency", -1.0, "config.loss.w_consistency=-1.0 must be 0 (off) or more"),
    ("optim", "schedule", "step", "config.optim.schedule: unknown 'step'"),
    ("train", "nonfinite", "ignore", "config.train.nonfinite: unknown 'ignore'"),
    ("train", "matmul_precision", "tf32", "config.train.matmul_precision: unknown 'tf32'"),
    ("train", "steps_per_call", -1, "config.train.steps_per_call=-1 must be 0 (auto)"),
    ("train", "cpu_opt_level", 5, "config.train.cpu_opt_level=5 must be 0-3"),
    ("data", "crop_centre", "nowhere", "config.data.crop_centre: unknown 'nowhere'"),
    ("data", "registration", "affine", "config.data.registration: unknown 'affine'"),
    ("data", "crop_shape", (31, 32, 16), "config.data.crop_shape (31, 32, 16): every side must be "
                                         "a multiple of 2"),
    ("data", "split_counts", (2, 1), "config.data.split_counts = (2, 1): expected three"),
    ("data", "split", (0.5, -0.1, 0.6), "config.data.split = "),
    ("data.augment", "fov_cut", 1.5, "config.data.augment.fov_cut=1.5 must be a share"),
    ("data.augment", "fov_cut_mm", (50.0, 40.0), "config.data.augment.fov_cut_mm=(50.0, 40.0)"),
    (None, "batch_size", 0, "config.batch_size=0 must be positive"),
    (None, "num_train_steps", 0, "config.num_train_steps=0 must be at least 1"),
])
def test_validate_names_the_first_bad_field(group, field, value, message):
    config = test_config.get_config()
    config_check.validate(config)                        # the test config itself is valid
    target = config
    for key in group.split(".") if group else ():
        target = target[key]
    target[field] = value
    with pytest.raises(CowjaxError, match=re.escape(message)):
        config_check.validate(config)


def test_validate_checks_the_refinement_stage_as_its_own_config():
    config = demo.get_config()
    config_check.validate(config)
    config.refine.crop_shape = (25, 24, 24)
    with pytest.raises(CowjaxError, match=r"crop_shape \(25, 24, 24\)"):
        config_check.validate(config)


def test_the_long_recipe_is_the_demo_trained_longer_on_more_subjects():
    from configs import long
    r, d = long.get_config().to_dict(), demo.get_config().to_dict()
    more = {"num_train_steps": (5000, 2000), "checkpoint_every_steps": (500, 200),
            "eval_every_steps": (500, 200)}
    for key, (longer, demo_value) in more.items():
        assert (r.pop(key), d.pop(key)) == (longer, demo_value)
    assert (r["data"].pop("num_cases"), d["data"].pop("num_cases")) == (320, 160)
    assert (r["refine"].pop("num_train_steps"), d["refine"].pop("num_train_steps")) == (5000, 2500)
    assert r == d                                        # everything else is the demo's
    with pytest.raises(ValueError, match="takes no argument"):
        long.get_config("seg")


def test_the_ready_recipe_is_the_long_one_on_more_subjects_for_longer():
    from configs import long, ready
    r, g = ready.get_config().to_dict(), long.get_config().to_dict()
    assert (r.pop("num_train_steps"), g.pop("num_train_steps")) == (10000, 5000)
    assert (r.pop("seed"), g.pop("seed")) == (1, 0)
    assert (r["data"].pop("num_cases"), g["data"].pop("num_cases")) == (640, 320)
    assert (r["refine"].pop("num_train_steps"), g["refine"].pop("num_train_steps")) == (10000, 5000)
    assert r == g                                        # everything else is the long recipe's
    config_check.validate(ready.get_config())
    with pytest.raises(ValueError, match="takes no argument"):
        ready.get_config("seg")
