"""cowjax.data.pipeline: recorded split, deterministic and resumable batches, eval crops in world mm."""

import json
import sys
import types

import numpy as np
import pytest

from configs import test as test_config
from cowjax.data import io, pipeline, preprocess
from cowjax.errors import CowjaxError
from test_targets import tube_phantom

KEYS = {"image": (32, 32, 16, 1), "landmarks": (19, 3), "landmark_mask": (19,),
        "segments": (32, 32, 16), "segments_mask": (), "landmark_attr": (19,),
        "landmark_attr_mask": (19,), "segment_attr": (20,), "segment_attr_mask": (20,)}


def _write_dataset(root, num, first_seed=0):
    for i in range(num):
        image, affine, landmarks, vessels, _ = tube_phantom(1.2, seed=first_seed + i, margin=6.0)
        io.save_case(root / f"case{i:02d}", io.Case(f"case{i:02d}", image, affine, landmarks,
                                                    vessels=vessels))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    _write_dataset(root, 4)
    return root


def _config(dataset, **augment):
    c = test_config.get_config()
    c.data.source = "dir"
    c.data.data_dir = str(dataset)
    c.data.augment.update(augment)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_are_deterministic_and_resumable(dataset, tmp_path):
    config = _config(dataset, flip=True, rotate_deg=10.0, noise=0.01)
    cases = io.list_cases(dataset)
    first = _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 3)
    for batch in first:
        assert {k: v.shape[1:] for k, v in batch.items()} == KEYS
        assert batch["image"].dtype == np.float32 and batch["segments"].dtype == np.int32
        assert batch["landmarks"].shape[0] == config.batch_size
    assert _same(first, _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 3))
    config.seed = 1
    assert not _same(first, _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 3))
    config.seed = 0
    it = pipeline.train_loader(config, cases, tmp_path / "cache")
    _take(it, 1)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    resumed = pipeline.train_loader(config, cases, tmp_path / "cache")
    resumed.set_state(state)
    assert _same(first[1:], _take(resumed, 2))


def test_worker_processes_give_the_same_batches(dataset, tmp_path):
    config = _config(dataset)
    cases = io.list_cases(dataset)
    inline = _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 2)
    config.data.num_workers = 1
    assert _same(inline, _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 2))


def test_split_is_recorded_and_reused(dataset, tmp_path):
    config = _config(dataset)
    config.data.split = (0.5, 0.25, 0.25)
    split = pipeline.prepare_data(config, tmp_path / "run")
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert sorted(p.name for k in split for p in split[k]) == [p.name for p in io.list_cases(dataset)]
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    assert recorded["train"] == [p.name for p in split["train"]]
    config.seed = 123  # a different seed would split differently: the record wins
    assert pipeline.prepare_data(config, tmp_path / "run") == split


def test_synthetic_set_is_made_on_first_use(tmp_path, monkeypatch):
    calls = []

    def generate_dataset(out_dir, num, seed, spacing, pathology_fraction):
        calls.append((num, seed, spacing, pathology_fraction))
        _write_dataset(out_dir, num, first_seed=seed)

    fake = types.ModuleType("cowjax.data.synthetic")
    fake.generate_dataset = generate_dataset
    monkeypatch.setitem(sys.modules, "cowjax.data.synthetic", fake)
    import cowjax.data
    monkeypatch.setattr(cowjax.data, "synthetic", fake, raising=False)
    config = test_config.get_config()
    config.data.num_cases = 3
    split = pipeline.prepare_data(config, tmp_path / "runs" / "a")
    assert len(calls) == 1 and calls[0][0] == 3
    data_dir = split["train"][0].parent
    assert data_dir.parent == (tmp_path / "runs" / "data").resolve()
    # A second run shares the generated set instead of making it again.
    pipeline.prepare_data(config, tmp_path / "runs" / "b")
    assert len(calls) == 1


def test_eval_examples_convert_to_world(dataset, tmp_path):
    config = _config(dataset)
    cases = io.list_cases(dataset)
    examples = pipeline.eval_examples(config, cases, tmp_path / "cache")
    assert len(examples) == len(cases)
    for ex, case_dir in zip(examples, cases):
        truth = io.load_case(case_dir).landmarks
        inside = ex["landmark_mask"] > 0
        assert inside.sum() >= 10
        world = preprocess.voxel_to_world(ex["landmarks"][inside], ex["crop_affine"])
        np.testing.assert_allclose(world, truth[inside], atol=1e-3)
        assert ex["case_id"] == case_dir.name
        assert ex["segments_mask"] == 1 and ex["segment_attr_mask"].all()
        assert ex["segments"].max() > 0


def test_a_broken_case_stops_the_loader(dataset, tmp_path):
    _write_dataset(tmp_path, 2)
    (tmp_path / "case01" / "landmarks.mrk.json").write_text(
        (tmp_path / "case01" / "landmarks.mrk.json").read_text().replace("BA_top", "BA_tip"))
    with pytest.raises(CowjaxError, match="case01/landmarks.mrk.json: unknown landmark name"):
        pipeline.train_loader(_config(tmp_path), io.list_cases(tmp_path), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("case01*"))


def test_cached_case_reads_back_as_made(dataset, tmp_path):
    """The cache gives back what preprocessing made, the volumes mapped read-only (so no example
    can alter the cached case), and another spacing is another entry."""
    config = _config(dataset)
    case = io.list_cases(dataset)[0]
    made = pipeline.preprocessed(case, config, tmp_path / "cache")
    pipeline._load_cached.cache_clear()
    read = pipeline.preprocessed(case, config, tmp_path / "cache")
    assert made.keys() == read.keys()
    for k, v in made.items():
        if v is not None:
            np.testing.assert_array_equal(read[k], v)
            assert type(read[k]) is np.ndarray and read[k].dtype == v.dtype
    assert not read["image"].flags.writeable
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [pipeline._cache_path(
        case, config.data, tmp_path / "cache").name]                     # no temp folders left
    config.data.spacing = (1.5, 1.5, 1.5)
    pipeline.preprocessed(case, config, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
