"""The benchmark: it times what training runs, counts the work the same way on every device, and
its pipeline part reads registered cases as training does."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import test as test_config
from cowjax import bench, devices

ROOT = Path(__file__).resolve().parents[1]


def _lines(stdout: str) -> dict:
    return {(r["part"], r.get("volume")): r for r in map(json.loads, stdout.strip().splitlines())}


@pytest.mark.slow
def test_bench_step_and_pipeline_with_registration_to_a_training_case():
    # The paper registers every image to a training case; the pipeline part used to refuse that.
    r = subprocess.run([sys.executable, "launch.py", "--mode=bench", "--config=configs/test.py",
                        "--parts=step,pipeline", "--config.data.registration=training_sample",
                        "--config.data.num_cases=4"], cwd=ROOT, capture_output=True,
                       text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _lines(r.stdout)
    step, pipe = lines[("step", None)], lines[("pipeline", None)]
    assert step["matmul_precision"] == "highest" and step["dtype"] == "float32"
    assert step["step_s"] > 0 and step["flops_per_step"] > 0
    assert pipe["batches_per_s"] > 0 and pipe["cases"] == 4


def test_the_flop_count_is_the_whole_batch_whatever_the_devices(monkeypatch):
    """A train step over 2 examples counts about 3 forward passes of each (forward, and the
    backward's two products), on one device or split over two."""
    if jax.device_count() < 2:
        pytest.skip("one device")
    c = test_config.get_config()
    c.train.steps_per_call = 1
    model = bench.unet.build_model(c)
    counts = []
    for n in (1, 2):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
        monkeypatch.setattr(devices, "data_mesh", lambda batch_size, m=mesh: m)
        lowered, _, _, used = bench.lowered_train_step(model, c)
        assert used.size == n
        counts.append(bench._flops(lowered))
    params = bench.unet.init_params(model, jax.random.key(0))
    x = jax.numpy.zeros((1, *c.data.crop_shape, 1))
    forward = bench._flops(jax.jit(lambda p, v: model.apply({"params": p}, v)).lower(params, x))
    assert counts[0] == pytest.approx(counts[1], rel=0.01)
    assert 2 * 2.5 * forward < counts[0] < 2 * 4 * forward


def test_float32_peak_and_the_precision_note_follow_the_matmul_precision(monkeypatch):
    c = test_config.get_config()
    assert devices.precision_note(c) is None                   # a CPU: no note
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "matmul_precision=default" in devices.precision_note(c)
    c.train.matmul_precision = "default"
    assert devices.precision_note(c) is None
    c.train.matmul_precision = "highest"
    c.model.dtype = "bfloat16"
    assert devices.precision_note(c) is None

    class H200:
        device_kind, platform = "NVIDIA H200", "gpu"

    monkeypatch.setattr(jax, "devices", lambda: [H200()])
    c.model.dtype = "float32"
    assert bench._fraction_of_peak(67e11, c) == pytest.approx(0.1)
    c.train.matmul_precision = "high"                         # TF32 on an NVIDIA GPU
    assert bench._fraction_of_peak(494.7e11, c) == pytest.approx(0.1)
    c.model.dtype = "bfloat16"
    assert bench._fraction_of_peak(989e11, c) == pytest.approx(0.1)
