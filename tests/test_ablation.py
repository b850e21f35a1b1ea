"""The ablation command: four arms x seeds trained and tested on the same cases, resumable; its
paired statistics; its user errors (one line, exit status 2 from launch.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from conftest import compiled_once
from cowjax import ablation, anatomy
from cowjax.errors import CowjaxError
from cowjax.training import checkpoint as ckpt

pytestmark = pytest.mark.slow  # trains real runs: minutes on a 2-core CPU

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 2


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Five tiny synthetic cases on disk at 2 mm (3 train, 1 validation, 1 test)."""
    from cowjax.data import synthetic
    out = tmp_path_factory.mktemp("cases")
    synthetic.generate_dataset(out, 5, seed=5, spacing=(2.0, 2.0, 2.0), progress=False, workers=1)
    return out


def _base(cases):
    c = test_config.get_config()
    c.data.source, c.data.data_dir, c.data.split = "dir", str(cases), (3, 1, 1)
    c.num_train_steps = c.checkpoint_every_steps = c.eval_every_steps = 1
    c.train.steps_per_call = 1
    c.seed = 7
    c.loss.w_segmentation = 0.5          # the base's weight: kept by the arms with segmentation
    return c


@pytest.fixture(scope="module")
def ablated(cases, tmp_path_factory):
    """Two seeds of the four arms, one training step each, evaluated on the one test case."""
    from cowjax.inference import evaluate
    root = tmp_path_factory.mktemp("ablation") / "runs"
    with compiled_once(tmp_path_factory.mktemp("jax_cache")), pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "NUM_MIP_CASES", 0)          # no per-run pictures: time
        report = ablation.run_ablation(_base(cases), root, seeds=SEEDS,
                                       command="python launch.py test")
    return root, report


def _checkpoint_files(root):
    """{file: mtime} of every run's checkpoints (latest and best)."""
    return {p: p.stat().st_mtime_ns for folder in (ckpt.LATEST, ckpt.BEST)
            for p in root.glob(f"*_s*/{folder}/**/*") if p.is_file()}


def test_arms_keep_the_base_and_switch_off_their_terms():
    base = test_config.get_config()
    base.loss.w_segmentation, base.refine.num_train_steps, base.seed = 0.5, 5, 10
    runs = ablation.arm_configs(base, 2)
    assert list(runs) == [f"{a}_s{s}" for s in range(2) for a in ablation.ARMS]
    assert runs["heatmap_only_s1"].seed == 11 and runs["full_s0"].seed == 10
    assert runs["heatmap_only_s0"].loss.w_segmentation == 0.0
    assert runs["seg_s0"].loss.w_segmentation == runs["full_s1"].loss.w_segmentation == 0.5
    assert runs["seg_s0"].loss.w_landmark_attr == 0.0 and runs["seg_attr_s0"].loss.w_segment_attr == 1.0
    assert runs["seg_attr_s0"].loss.w_consistency == 0.0 and runs["full_s0"].loss.w_consistency == 1.0
    assert all(c.refine.num_train_steps == 0 for c in runs.values())
    assert base.refine.num_train_steps == 5 and base.loss.w_segmentation == 0.5  # base untouched


def test_every_run_is_trained_and_tested_on_the_same_cases(ablated):
    root, report = ablated
    split = json.loads((root / "split.json").read_text())
    assert len(split["test"]) == 1
    for s in range(SEEDS):
        for arm in ablation.ARMS:
            run = root / f"{arm}_s{s}"
            assert ckpt.has_checkpoint(run), run
            assert json.loads((run / "split.json").read_text()) == split
            config = json.loads((run / "config.json").read_text())
            assert config["seed"] == 7 + s and config["refine"]["num_train_steps"] == 0
    assert report["cases"] == split["test"] and report["seeds"] == SEEDS
    assert list(report["arms"]) == list(ablation.ARMS)
    for arm, a in report["arms"].items():
        assert len(a["runs"]) == SEEDS
        mre = a["metrics"]["mre_mm"]
        assert mre["n"] == SEEDS and mre["ci95"][0] <= mre["mean"] <= mre["ci95"][1]
        assert np.isfinite(a["pooled_mre_mm"])
        d = a["difference_from_heatmap_only"]
        if arm == "heatmap_only":
            assert d is None
        else:
            assert d["num_pairs"] == SEEDS * anatomy.NUM_LANDMARKS - _unknown(root, arm)
            assert d["ci95_mm"][0] <= d["mean_mm"] <= d["ci95_mm"][1]
    for name in ("report.json", "report.md", "landmark_errors.png", "differences.png"):
        assert (root / name).is_file(), name
    assert json.loads((root / "report.json").read_text())["arms"].keys() == report["arms"].keys()
    md = (root / "report.md").read_text()
    assert "python launch.py test" in md and "| seg_attr |" in md and "Wilcoxon" in md


def _unknown(root, arm):
    """Pairs without ground truth (NaN in either run), from the runs' evaluation records."""
    n = 0
    for s in range(SEEDS):
        a, b = (np.array(json.loads((root / "evaluations" / f"{x}_s{s}.json").read_text())
                         ["errors_mm"], float) for x in (arm, "heatmap_only"))
        n += int((~np.isfinite(a - b)).sum())
    return n


def test_started_again_it_trains_and_evaluates_nothing(ablated, cases, capsys):
    root, report = ablated
    before = _checkpoint_files(root)
    assert {p.relative_to(root).parts[:2] for p in before} == {
        (f"{arm}_s{s}", folder) for arm in ablation.ARMS for s in range(SEEDS)
        for folder in (ckpt.LATEST, ckpt.BEST)}
    again = ablation.run_ablation(_base(cases), root, seeds=SEEDS)
    out = capsys.readouterr().out
    assert out.count("skip, finished") == len(ablation.ARMS) * SEEDS
    assert out.count("evaluation up to date") == len(ablation.ARMS) * SEEDS
    assert _checkpoint_files(root) == before
    assert again["arms"]["full"]["metrics"] == report["arms"]["full"]["metrics"]


def test_another_base_config_is_refused_before_training(ablated, cases):
    root, _ = ablated
    base = _base(cases)
    base.num_train_steps = 2
    with pytest.raises(CowjaxError, match="num_train_steps = 1 then, 2 now"):
        ablation.run_ablation(base, root, seeds=1)


def test_paired_difference_of_known_arrays():
    rng = np.random.default_rng(0)
    reference = rng.uniform(1.0, 4.0, (2, 6, anatomy.NUM_LANDMARKS))
    errors = reference + 0.5 + rng.normal(0.0, 0.2, reference.shape)
    errors[0, 2, 4] = np.nan                     # unknown in one run: that pair does not count
    d = ablation.paired_difference(errors, reference)
    diff = errors - reference
    assert d["mean_mm"] == pytest.approx(np.nanmean(diff))
    assert d["num_pairs"] == diff.size - 1 and d["num_cases"] == 6
    assert d["ci95_mm"][0] < d["mean_mm"] < d["ci95_mm"][1] and d["ci95_mm"][0] > 0.3
    assert d["p_wilcoxon"] < 1e-6
    assert ablation.paired_difference(errors, reference) == d            # fixed RNG seed
    same = ablation.paired_difference(reference, reference)
    assert same["mean_mm"] == 0.0 and same["p_wilcoxon"] == 1.0


def test_mean_interval_over_seeds():
    m = ablation.mean_interval([1.0, 2.0, 3.0])
    half = 4.303 / 3 ** 0.5                      # t(0.975, 2 degrees of freedom) x sd 1 / sqrt(3)
    assert m["mean"] == 2.0 and m["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-3)
    assert ablation.mean_interval([1.5, None]) == {"mean": 1.5, "ci95": None, "n": 1}
    # Two seeds' accuracies near 1: the t interval, 0.95 +- 12.706 x 0.0707 / sqrt 2, is cut at 1.
    wide = ablation.mean_interval([0.9, 1.0], bounds=(0.0, 1.0))
    assert wide["mean"] == pytest.approx(0.95)
    assert wide["ci95"] == pytest.approx([0.95 - 0.6353, 1.0], abs=1e-3)
    assert ablation.mean_interval([0.9, 1.0])["ci95"][1] > 1.0     # unbounded by default


def test_user_mistakes_are_one_line_errors(tmp_path):
    base = test_config.get_config()
    with pytest.raises(CowjaxError, match="--seeds=0"):
        ablation.run_ablation(base, tmp_path / "a", seeds=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(CowjaxError, match="not a directory"):
        ablation.run_ablation(base, tmp_path / "file", seeds=1)
    base.loss.w_consistency = 0.0                # an ablation variant as the base
    with pytest.raises(CowjaxError, match="w_consistency = 0"):
        ablation.run_ablation(base, tmp_path / "b", seeds=1)
    base = test_config.get_config()
    base.sweep.weighting = ("fixed", "dwa")      # a sweep as the base
    with pytest.raises(CowjaxError, match="the base config has a sweep"):
        ablation.run_ablation(base, tmp_path / "c", seeds=1)
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("args, message", [
    (["--seeds=0"], "error: --seeds=0: the number of seeds per arm must be at least 1"),
    (["--seeds=two"], "error: flag --seeds=two"),
    ([], "error: --mode=ablate needs --config and --workdir"),
])
def test_launch_ablate_flag_errors_exit_2_with_one_line(tmp_path, args, message):
    config = [] if not args else ["--config=configs/test.py", f"--workdir={tmp_path / 'w'}"]
    result = subprocess.run([sys.executable, "launch.py", "--mode=ablate", *config, *args],
                            cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)
    assert not (tmp_path / "w").exists()
