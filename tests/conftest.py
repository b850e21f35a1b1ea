"""Shared test fixtures and stand-ins.

The tests run on the devices the program uses: on a CPU, one JAX device per core
(``cowjax.devices.use_cpu_cores``), so the sharded paths (train step, inference windows) are the
ones tested. Integration tests that train or predict with real models are marked ``slow`` (CI runs
them too; ``-m "not slow"`` skips them while iterating).
"""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the configs/ package, for tests and the scripts they start

from configs import test as test_config  # noqa: E402
from cowjax import anatomy, devices  # noqa: E402
from cowjax.data import batch as batch_lib  # noqa: E402
from cowjax.data import io  # noqa: E402
from cowjax.training import train  # noqa: E402

devices.use_cpu_cores()


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------- a tube phantom dataset

def tube_phantom(spacing=1.0, absent=(), seed=0, margin=8.0):
    """Tubes of the template radii along the (jittered) template segments, on an RAS grid.

    Returns (image [X, Y, Z] float32, affine, landmarks [19, 3] RAS, vessels uint8, segments uint8).
    """
    rng = np.random.default_rng(seed)
    points = {k: v + rng.normal(0, 1.0, 3) for k, v in anatomy.TEMPLATE.items()}
    landmarks = np.stack([points[n] for n in anatomy.LANDMARKS])
    every = np.stack(list(points.values()))
    lo, hi = every.min(0) - margin, every.max(0) + margin
    shape = tuple(np.ceil((hi - lo) / spacing).astype(int) + 1)
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = lo
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * spacing + lo
    nearest = np.full(shape, np.inf)  # distance / radius of the closest tube so far
    segments = np.zeros(shape, np.uint8)
    for s, name in enumerate(anatomy.SEGMENTS):
        if name in absent:
            continue
        a, b = (points[n] for n in anatomy.SEGMENT_ENDS[name])
        t = np.clip(((world - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        d = np.linalg.norm(world - (a + t[..., None] * (b - a)), axis=-1) / anatomy.RADII[name]
        inside = (d <= 1) & (d < nearest)
        segments[inside] = s + 1
        nearest = np.where(inside, d, nearest)
    vessels = (segments > 0).astype(np.uint8)
    image = (vessels + rng.normal(0, 0.05, shape)).astype(np.float32)
    return image, affine, landmarks, vessels, segments


def write_phantom_dataset(root, num, first_seed=0):
    """``num`` phantom case folders (``caseNN``: image, landmarks, vessel mask) under ``root``."""
    for i in range(num):
        image, affine, landmarks, vessels, _ = tube_phantom(1.2, seed=first_seed + i, margin=6.0)
        io.save_case(Path(root) / f"case{i:02d}", io.Case(f"case{i:02d}", image, affine, landmarks,
                                                          vessels=vessels))


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """Four phantom cases, written once per test session."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, 4)
    return root


def dir_config(dataset, **augment):
    """The test config reading ``dataset`` (source "dir"), with ``data.augment`` overrides."""
    c = test_config.get_config()
    c.data.source = "dir"
    c.data.data_dir = str(dataset)
    c.data.augment.update(augment)
    return c


# ------------------------------------------------- a tiny stand-in model on deterministic batches

class TinyNet(nn.Module):
    """Stand-in with the model's output contract: image [B,X,Y,Z,1] -> the four outputs."""
    stride: int = 1
    width: int = 4

    @nn.compact
    def __call__(self, image):
        h = nn.relu(nn.Conv(self.width, (3, 3, 3))(image))
        s = self.stride
        hm_in = nn.avg_pool(h, (s, s, s), (s, s, s)) if s > 1 else h
        pooled = h.mean(axis=(1, 2, 3))
        return {"heatmaps": nn.Conv(anatomy.NUM_LANDMARKS, (1, 1, 1))(hm_in),
                "segmentation": nn.Conv(anatomy.NUM_CLASSES, (1, 1, 1))(h),
                "landmark_attr": nn.Dense(anatomy.NUM_LANDMARKS)(pooled),
                "segment_attr": nn.Dense(anatomy.NUM_SEGMENTS)(pooled)}


class RandomBatches:
    """A checkpointable iterator of ``data.batch.random_batch``es; ``nan_at`` poisons one batch's image."""

    def __init__(self, config, seed=0, nan_at=None):
        self.config, self.seed, self.nan_at, self.index = config, seed, nan_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = batch_lib.random_batch(self.config, self.seed, self.index)
        if self.index == self.nan_at:
            batch["image"][0, 0, 0, 0, 0] = np.nan
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def val_examples(config, n=2):
    batch = batch_lib.random_batch(config, index=10_000)
    return [{"image": batch["image"][i], "landmarks": batch["landmarks"][i],
             "landmark_mask": batch["landmark_mask"][i]} for i in range(n)]


def tiny_config(**top):
    config = test_config.get_config()
    config.data.crop_shape = (16, 16, 8)
    config.data.spacing = (2.0, 2.0, 2.0)
    config.data.heatmap_sigma_mm = 3.0
    config.optim.learning_rate = 1e-2
    config.update(top)
    return config


def train_stand_in(config, workdir, **iter_kwargs):
    return train.run_training(config, workdir, TinyNet(config.model.heatmap_stride),
                              RandomBatches(config, **iter_kwargs), val_examples(config))


def read_metrics(workdir, drop=("steps_per_s",)):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]



@contextlib.contextmanager
def compiled_once(cache_dir):
    """JAX's on-disk compilation cache for the block, so runs of one program (the seeds of an
    ablation arm, a sweep stopped and resumed, every run's validation) compile it once: eight
    compilations of the train step take minutes on a busy 2-core CPU. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, n) for n in names]
    for n, v in zip(names, (str(cache_dir), 0.0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for n, v in zip(names, before):
            jax.config.update(n, v)
        compilation_cache.reset_cache()
