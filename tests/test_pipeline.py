"""cowjax.data.pipeline: recorded split, deterministic and resumable batches, eval crops in world mm."""

import json
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from cowjax.data import batch as batch_lib
from cowjax.data import io, pipeline, preprocess
from cowjax.errors import CowjaxError
from conftest import dir_config, write_phantom_dataset

def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_are_deterministic_and_resumable(phantom_dataset, tmp_path):
    config = dir_config(phantom_dataset, flip=True, rotate_deg=10.0, noise=0.01)
    cases = io.list_cases(phantom_dataset)
    first = _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 3)
    for batch in first:
        batch_lib.check(batch, config)
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


def test_worker_processes_give_the_same_batches(phantom_dataset, tmp_path):
    config = dir_config(phantom_dataset)
    cases = io.list_cases(phantom_dataset)
    inline = _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 2)
    config.data.num_workers = 1
    assert _same(inline, _take(pipeline.train_loader(config, cases, tmp_path / "cache"), 2))


def test_split_is_recorded_and_reused(phantom_dataset, tmp_path):
    config = dir_config(phantom_dataset)
    config.data.split = (0.5, 0.25, 0.25)
    split = pipeline.prepare_data(config, tmp_path / "run")
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert sorted(p.name for k in split for p in split[k]) == [p.name for p in io.list_cases(phantom_dataset)]
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    assert recorded["train"] == [p.name for p in split["train"]]
    config.seed = 123  # a different seed would split differently: the record wins
    assert pipeline.prepare_data(config, tmp_path / "run") == split


def test_synthetic_set_is_made_on_first_use(tmp_path, monkeypatch):
    calls = []

    def generate_dataset(out_dir, num, seed, spacing, pathology_fraction, cortex):
        calls.append((num, seed, spacing, pathology_fraction, cortex))
        write_phantom_dataset(out_dir, num, first_seed=seed)

    fake = types.ModuleType("cowjax.data.synthetic")
    fake.generate_dataset = generate_dataset
    monkeypatch.setitem(sys.modules, "cowjax.data.synthetic", fake)
    import cowjax.data
    monkeypatch.setattr(cowjax.data, "synthetic", fake, raising=False)
    config = test_config.get_config()
    config.data.num_cases = 3
    split = pipeline.prepare_data(config, tmp_path / "runs" / "a")
    assert len(calls) == 1 and calls[0][0] == 3 and calls[0][4] is False
    data_dir = split["train"][0].parent
    assert data_dir.parent == (tmp_path / "runs" / "data").resolve()
    # A second run shares the generated set instead of making it again.
    pipeline.prepare_data(config, tmp_path / "runs" / "b")
    assert len(calls) == 1
    # With cortical branches: a set of its own.
    config.data.synthetic_cortex = True
    split = pipeline.prepare_data(config, tmp_path / "runs" / "c")
    assert len(calls) == 2 and calls[1][4] is True
    assert split["train"][0].parent != data_dir


def test_eval_examples_convert_to_world(phantom_dataset, tmp_path):
    config = dir_config(phantom_dataset)
    cases = io.list_cases(phantom_dataset)
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


def test_a_broken_case_stops_the_loader(phantom_dataset, tmp_path):
    write_phantom_dataset(tmp_path, 2)
    (tmp_path / "case01" / "landmarks.mrk.json").write_text(
        (tmp_path / "case01" / "landmarks.mrk.json").read_text().replace("BA_top", "BA_tip"))
    with pytest.raises(CowjaxError, match="case01/landmarks.mrk.json: unknown landmark name"):
        pipeline.train_loader(dir_config(tmp_path), io.list_cases(tmp_path), tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("case01*"))


def test_cached_case_reads_back_as_made(phantom_dataset, tmp_path):
    """The cache gives back what preprocessing made, the volumes mapped read-only (so no example
    can alter the cached case), and another spacing is another entry."""
    config = dir_config(phantom_dataset)
    case = io.list_cases(phantom_dataset)[0]
    made = pipeline.preprocessed(case, config, tmp_path / "cache")
    pipeline.clear_loaded()
    read = pipeline.preprocessed(case, config, tmp_path / "cache")
    assert made.keys() == read.keys()
    for k, v in made.items():
        if v is not None:
            np.testing.assert_array_equal(read[k], v)
            assert type(read[k]) is np.ndarray and read[k].dtype == v.dtype
    assert not read["image"].flags.writeable
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")   # no temp folders left
    config.data.spacing = (1.5, 1.5, 1.5)
    pipeline.preprocessed(case, config, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cached_loader_is_safe_from_many_threads(tmp_path):
    """grain's prefetch threads read cache entries at once: on CPython 3.11 concurrent .npy header
    parsing could fail AST construction (python/cpython#106905). Eight threads reading forty fresh
    entries at once all get their arrays back intact."""
    entries = []
    for i in range(40):
        entry = tmp_path / f"entry{i:02d}"
        entry.mkdir()
        np.save(entry / "image.npy", np.full((4, 4, 4), i, np.float32))
        np.save(entry / "landmarks.npy", np.full((19, 3), i, np.float64))
        entries.append(entry)
    errors, results = [], {}
    barrier = threading.Barrier(8)

    def read(worker):
        try:
            barrier.wait()
            for k in range(len(entries)):
                i = (k + 5 * worker) % len(entries)
                pre = pipeline.load_cached(entries[i])
                results[(worker, i)] = (float(pre["image"][0, 0, 0]), float(pre["landmarks"][0, 0]))
        except Exception as e:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(e)

    for _ in range(3):
        pipeline.clear_loaded()
        threads = [threading.Thread(target=read, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) == 8 * len(entries)
    assert all(v == (float(i), float(i)) for (_, i), v in results.items())


# ------------------------------------------------------------------- split per dataset, split file

def _case_folders(root, names):
    """Case folders that ``io.list_cases`` accepts (the split never reads the images)."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / io.IMAGE).write_bytes(name.encode())
    return root


def _split_config(data_dir, **data):
    c = test_config.get_config()
    c.data.update(source="dir", data_dir=str(data_dir), **data)
    return c


def test_each_dataset_is_split_by_the_counts(tmp_path):
    data = tmp_path / "data"
    _case_folders(data, [f"A/a{i}" for i in range(5)] + [f"B/b{i}" for i in range(4)])
    (data / "notes").mkdir()                              # a folder without cases is no dataset
    config = _split_config(data, split_counts=(2, 1, 1), registration="training_sample")
    split = pipeline.prepare_data(config, tmp_path / "run")
    for k, n in zip(("train", "val", "test"), (2, 1, 1)):
        for dataset in ("A", "B"):
            assert sum(p.parent.name == dataset for p in split[k]) == n, (k, dataset)
    used = [p for k in split for p in split[k]]
    assert len(set(used)) == 8                            # disjoint; one case of A left out
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    # Names relative to data_dir ("A/a3"), as evaluate joins them under recorded["data_dir"].
    assert [str(Path(recorded["data_dir"]) / n) for n in recorded["test"]] == \
        [str(p) for p in split["test"]]
    assert all(n.count("/") == 1 for k in ("train", "val", "test") for n in recorded[k])
    # The template: the first training case in sorted order, its image copied into the workdir.
    assert recorded["template"] == min(recorded["train"]) == split["train"][0].relative_to(
        data.resolve()).as_posix()
    assert pipeline.template_path(tmp_path / "run").read_bytes() == \
        (split["train"][0] / io.IMAGE).read_bytes()
    assert pipeline.prepare_data(config, tmp_path / "run") == split   # read back from the record
    config.seed = 5
    other = pipeline.prepare_data(config, tmp_path / "run2")
    assert other != split and {len(other[k]) for k in other} == {4, 2}


def test_too_few_cases_for_the_counts_is_one_line(tmp_path):
    data = _case_folders(tmp_path / "data", ["big/c0", "big/c1", "big/c2", "big/c3", "small/c0",
                                             "small/c1", "small/c2"])
    config = _split_config(data, split_counts=(2, 1, 1))
    with pytest.raises(CowjaxError) as e:
        pipeline.prepare_data(config, tmp_path / "run")
    assert str(e.value) == (f"{(data / 'small').resolve()}: 3 case(s), fewer than the 4 that "
                            f"config.data.split_counts = (2, 1, 1) asks for")
    assert not (tmp_path / "run" / "split.json").exists()


def test_synthetic_set_keeps_the_fractions(tmp_path):
    data = _case_folders(tmp_path / "data", [f"c{i}" for i in range(10)])
    config = _split_config(data, split_counts=(2, 1, 1), split=(0.6, 0.2, 0.2))
    config.data.source = "synthetic"                       # made already: data_dir exists
    split = pipeline.prepare_data(config, tmp_path / "run")
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 2, 2]


def test_split_file_is_the_split(tmp_path):
    data = _case_folders(tmp_path / "data", ["A/a0", "A/a1", "B/b0", "B/b1"])
    outside = _case_folders(tmp_path / "elsewhere", ["x0"]) / "x0"
    given = {"train": ["B/b1", "A/a0"], "val": ["A/a1"], "test": [str(outside.resolve())]}
    (tmp_path / "split_in.json").write_text(json.dumps(given))
    config = _split_config(data, split_file=str(tmp_path / "split_in.json"),
                           split_counts=(3, 3, 3))    # the file wins over counts and fractions
    split = pipeline.prepare_data(config, tmp_path / "run")
    assert split == {"train": [data.resolve() / "B/b1", data.resolve() / "A/a0"],
                     "val": [data.resolve() / "A/a1"], "test": [outside.resolve()]}
    recorded = json.loads((tmp_path / "run" / "split.json").read_text())
    assert {k: recorded[k] for k in given} == given
    assert pipeline.prepare_data(config, tmp_path / "run") == split


@pytest.mark.parametrize("given, message", [
    ({"train": ["a0"], "val": ["nope"], "test": []}, "val case 'nope' not found"),
    ({"train": ["a0", "a1"], "val": ["a1"], "test": []},
     "case 'a1' is listed twice (train and val)"),
    ({"train": ["a0"], "val": "a1", "test": []}, '"val" is not one'),
    ({"train": [], "val": ["a1"], "test": []}, 'the "train" list is empty'),
    ("not json", "unreadable"),
])
def test_bad_split_file_is_one_line(tmp_path, given, message):
    data = _case_folders(tmp_path / "data", ["a0", "a1"])
    path = tmp_path / "split_in.json"
    path.write_text(given if isinstance(given, str) else json.dumps(given))
    with pytest.raises(CowjaxError) as e:
        pipeline.prepare_data(_split_config(data, split_file=str(path)), tmp_path / "run")
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "run" / "split.json").exists()


def test_epochs_resolve_the_steps_saved_and_trained(tmp_path, monkeypatch):
    from cowjax.training import train
    data = _case_folders(tmp_path / "data", [f"A/a{i}" for i in range(4)] + ["B/b0", "B/b1",
                                                                             "B/b2"])
    config = _split_config(data, split_counts=(2, 1, 0))
    config.update(num_epochs=3, num_train_steps=0, batch_size=2)
    config.refine.num_train_steps = 2
    trained = {}
    monkeypatch.setattr(pipeline, "train_loader", lambda *a: None)
    monkeypatch.setattr(pipeline, "eval_examples", lambda *a: [])

    def run_training(config, stage_dir, *args):
        trained[stage_dir.name] = config
        return {}

    monkeypatch.setattr(train, "run_training", run_training)
    train.train_and_evaluate(config, tmp_path / "run")
    # 4 training cases (2 per dataset), 3 epochs, batch 2: ceil(3 * 4 / 2) = 6 steps.
    assert trained["run"].num_train_steps == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_train_steps"] == 6
    refine = json.loads((tmp_path / "run" / "refine" / "config.json").read_text())
    assert (refine["num_train_steps"], refine["num_epochs"]) == (2, 0)
    assert trained["refine"].num_train_steps == 2
    assert config.num_train_steps == 0                    # the caller's config is left alone
