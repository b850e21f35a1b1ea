"""The input pipeline: the dataset and its split, cached preprocessing, grain batches.

Example ``i`` of the endless training stream is a pure function of (seed, i): epoch ``i // n`` visits
the ``n`` training cases in a permutation seeded by (seed, epoch), and the augmentation of each
example draws from a Generator seeded by (seed, epoch, position). The stream is sharded over host
processes (each takes every ``process_count``-th example), batched, optionally read by grain worker
processes, and its iterator state (``get_state()`` / ``set_state()``) resumes it exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags

from cowjax.data import _parallel, augment, batch, io, preprocess
from cowjax.errors import CowjaxError, atomic_output, atomic_output_dir

_CACHE_VERSION = 3  # bump when preprocessing changes what it writes (2: .npy folders, 3: fov_centre)
_SYNTHETIC_VERSION = 2  # bump when the generator's cases change: they go to a new folder
_SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------- dataset and split

def _dataset_dir(config, workdir: Path) -> Path:
    d = config.data
    if d.data_dir:
        return Path(d.data_dir)
    if d.source != "synthetic":
        raise CowjaxError(f"config.data.data_dir is empty; set it to the folder of cases "
                          f"(config.data.source = {d.source!r})")
    spacing = "x".join(f"{s:g}" for s in d.synthetic_spacing)
    name = (f"synthetic_v{_SYNTHETIC_VERSION}_n{d.num_cases}_s{d.synthetic_seed}_{spacing}mm"
            f"_p{d.pathology_fraction:g}" + ("_cortex" if d.synthetic_cortex else ""))
    return workdir.resolve().parent / "data" / name


def _make_synthetic(config, data_dir: Path) -> None:
    """Generate the synthetic set into a temporary folder and rename it: never a half-made set."""
    from cowjax.data import synthetic  # the generator is only needed on first use

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(data_dir) as tmp:
        synthetic.generate_dataset(tmp, config.data.num_cases, config.data.synthetic_seed,
                                   spacing=tuple(config.data.synthetic_spacing),
                                   pathology_fraction=config.data.pathology_fraction,
                                   cortex=config.data.synthetic_cortex)


def prepare_data(config, workdir) -> dict[str, list[Path]]:
    """The train / val / test case folders, the split recorded in ``workdir/split.json``.

    A recorded split is re-used as is (its cases must still exist). Otherwise the split is
    ``config.data.split_file`` when set, else made: the data folder (synthetic: generated on first
    use under ``config.data.data_dir`` or ``<workdir>/../data/``) is one dataset when it holds case
    folders, one per sub-folder when it holds folders of case folders; each dataset is split by
    ``config.data.split_counts`` (cases on disk) or the fractions ``config.data.split``, with a
    permutation seeded by ``config.seed``, and the parts joined.

    split.json: ``{"data_dir": absolute, "train" / "val" / "test": [case folder relative to
    data_dir ("case" or "dataset/case"), or absolute]}``, plus ``"template"`` (a train entry) with
    ``config.data.registration == "training_sample"``: that case's image, the first training case
    in sorted order, is copied to ``<workdir>/template.nii.gz`` (``template_path``).
    """
    workdir = Path(workdir)
    split_file = workdir / "split.json"
    training_sample = config.data.get("registration", "none") == "training_sample"
    fresh = not split_file.exists()
    if fresh:
        data_dir = _dataset_dir(config, workdir)
        if config.data.source == "synthetic" and not data_dir.exists():
            _make_synthetic(config, data_dir)
        data_dir = data_dir.resolve()
        if config.data.get("split_file"):
            split = _split_from_file(Path(config.data.split_file), data_dir)
        else:
            split = _split_datasets(config, data_dir)
        record = {"data_dir": str(data_dir),
                  **{k: [_relative(p, data_dir) for p in split[k]] for k in _SPLITS}}
        if training_sample:
            record["template"] = min(record["train"])
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_output(split_file) as tmp:
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    try:
        record = json.loads(split_file.read_text(encoding="utf-8"))
        data_dir = Path(record["data_dir"])
        split = {k: [data_dir / n for n in record[k]] for k in _SPLITS}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CowjaxError(f"{split_file}: unreadable split record ({e}); delete it to re-split")
    missing = [str(p) for k in _SPLITS for p in split[k] if io.case_image(p) is None]
    if missing:
        raise CowjaxError(f"{split_file}: {len(missing)} recorded case(s) missing, e.g. "
                          f"{missing[0]}")
    if training_sample and (fresh or not template_path(workdir).is_file()):
        # Written with every new split (the template changes with it), kept on resume (the cache
        # keys on its content).
        template_case = data_dir / record.get("template", min(record["train"]))
        source = io.case_image(template_case)
        if io.image_suffix(source) == ".nii.gz":
            with atomic_output(template_path(workdir)) as tmp:
                shutil.copyfile(source, tmp)
        else:  # another format: converted once, so the cache key reads one file
            io.save_image(template_path(workdir), *io.load_image(source))
    return split


def template_path(workdir) -> Path:
    """Where ``prepare_data`` puts the template image of ``registration = "training_sample"``."""
    return Path(workdir) / "template.nii.gz"


def _relative(case_dir: Path, data_dir: Path) -> str:
    """The name split.json records: relative to data_dir (posix), absolute when outside it."""
    try:
        return case_dir.relative_to(data_dir).as_posix()
    except ValueError:
        return str(case_dir)


def _datasets(data_dir: Path) -> dict[Path, list[Path]]:
    """{dataset folder: sorted case folders}: a folder of case folders is one dataset, a folder
    of folders of case folders one dataset per sub-folder (those holding no case are skipped)."""
    if not data_dir.is_dir():
        return {data_dir: io.list_cases(data_dir)}                 # raises, naming the folder
    subdirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    cases = [p for p in subdirs if io.case_image(p) is not None]
    groups = [p for p in subdirs if p not in cases
              and any(io.case_image(q) is not None for q in p.iterdir() if q.is_dir())]
    if cases and groups:
        raise CowjaxError(f"{data_dir}: holds both case folders ({cases[0].name}) and dataset "
                          f"folders ({groups[0].name}); use one kind")
    if not groups:
        return {data_dir: io.list_cases(data_dir)}
    return {p: io.list_cases(p) for p in groups}


def _split_counts(config, num: int, dataset: Path) -> np.ndarray:
    """[3] train / val / test counts for a dataset of ``num`` cases: ``config.data.split_counts``
    for cases on disk, else the fractions ``config.data.split`` of ``num``."""
    d = config.data
    counts = tuple(d.get("split_counts", ()) or ()) if d.source == "dir" else ()
    if counts:
        if num < sum(counts):
            raise CowjaxError(f"{dataset}: {num} case(s), fewer than the {sum(counts)} that "
                              f"config.data.split_counts = {counts} asks for")
        return np.asarray(counts, int)
    fractions = np.asarray(d.split, np.float64)
    # Every non-zero fraction gets at least one case when there are enough.
    counts = np.floor(fractions / fractions.sum() * num).astype(int)
    counts = np.where((fractions > 0) & (counts == 0) & (num >= 3), 1, counts)
    counts[0] = num - counts[1:].sum()
    if counts[0] < 1:
        raise CowjaxError(f"{dataset}: {num} case(s) are too few to split {tuple(fractions)}")
    return counts


def _split_datasets(config, data_dir: Path) -> dict[str, list[Path]]:
    """Each dataset split on its own (a permutation seeded by ``config.seed``), the parts joined."""
    split = {k: [] for k in _SPLITS}
    for dataset, cases in _datasets(data_dir).items():
        counts = _split_counts(config, len(cases), dataset)
        order = np.random.default_rng(config.seed).permutation(len(cases))[:counts.sum()]
        for k, part in zip(_SPLITS, np.split(order, np.cumsum(counts)[:-1])):
            split[k] += [cases[i] for i in sorted(part)]
    return split


def _split_from_file(path: Path, data_dir: Path) -> dict[str, list[Path]]:
    """The split a JSON file gives: ``{"train": [...], "val": [...], "test": [...]}`` of case
    folders relative to ``data_dir``, or absolute; each must exist and be listed once."""
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CowjaxError(f"config.data.split_file {path}: unreadable ({e})")
    split, seen = {}, {}
    for k in _SPLITS:
        names = given.get(k) if isinstance(given, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise CowjaxError(f'{path}: expected "train", "val" and "test" lists of case '
                              f'folders; "{k}" is not one')
        split[k] = [Path(os.path.normpath(data_dir / n)) for n in names]
        for n, p in zip(names, split[k]):
            if not p.is_dir() or io.case_image(p) is None:
                raise CowjaxError(f"{path}: {k} case {n!r} not found (no image in {p})")
            if p in seen:
                raise CowjaxError(f"{path}: case {n!r} is listed twice ({seen[p]} and {k})")
            seen[p] = k
    if not split["train"]:
        raise CowjaxError(f'{path}: the "train" list is empty')
    return split


# ------------------------------------------------------------------------------ preprocessing cache

def _cache_path(case_dir: Path, data_config, cache_dir: Path) -> Path:
    """Keyed by the case folder, its files' sizes and times, the spacing, the registration (with
    "training_sample", the template image's content), the segment growth and the cache version."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in case_dir.iterdir() if p.is_file())
    registration = data_config.get("registration", "none")
    if registration == "training_sample":
        registration = [registration, _file_digest(data_config.get("template", ""))]
    key = [str(case_dir.resolve()), [float(s) for s in data_config.spacing], stats,
           _CACHE_VERSION, registration]
    grow = float(data_config.get("segment_growth_mm", 0.0))
    if grow:  # (keys of entries made without it stay as they were)
        key.append(["segment_growth_mm", grow])
    key = json.dumps(key)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{case_dir.name}_{digest}"


def _file_digest(path: str) -> str:
    """sha1 of a file's bytes ("" when there is none): runs registered to the same template share
    their cache entries whatever their workdirs."""
    if not path or not os.path.isfile(path):
        return ""
    stat = os.stat(path)
    return _digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def preprocessed(case_dir, config, cache_dir, to_template=None) -> dict:
    """``preprocess_case`` of a case folder, read from / written to the cache.

    The cache entry is a folder of ``.npy`` files, one per array; volumes are read back memory-mapped,
    so an example reads only the voxels its crop touches (a 24^3 patch of a 1 mm case: 10 ms to load
    the whole case from an ``.npz``, well under 1 ms mapped). ``to_template``: the registration
    ``config.data.registration`` asks for, passed to ``preprocess_case`` (None for "none").
    """
    case_dir, cache_dir = Path(case_dir), Path(cache_dir)
    path = _cache_path(case_dir, config.data, cache_dir)
    if not path.is_dir():
        pre = preprocess.preprocess_case(io.load_case(case_dir), config, to_template=to_template)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(path) as tmp:
            for k, v in pre.items():
                if v is not None:
                    np.save(tmp / f"{k}.npy", v)
        return pre
    return load_cached(path)


def _cache_case(job) -> None:
    preprocessed(*job)


# np.load parses each .npy header with ast.literal_eval, and CPython 3.11 can fail AST
# construction when threads (grain's prefetch) do that at once ("AST constructor recursion depth
# mismatch", python/cpython#106905): every read of the cache goes through this one lock.
_LOAD_LOCK = threading.Lock()


def load_cached(path) -> dict:
    """A cache entry (folder of ``.npy`` files) as a dict of arrays, volumes memory-mapped;
    thread-safe, and each entry is opened once per process."""
    with _LOAD_LOCK:
        return _load_cached(str(path))


def clear_loaded() -> None:
    """Forget the entries opened so far (the next read opens them again)."""
    with _LOAD_LOCK:
        _load_cached.cache_clear()


# Each mapped volume holds a file descriptor: 64 cases hold about 128.
@functools.lru_cache(maxsize=64)
def _load_cached(path: str) -> dict:
    pre = {}
    for f in Path(path).glob("*.npy"):
        a = np.load(f, mmap_mode="r")
        pre[f.stem] = np.asarray(a) if a.ndim == 3 else np.array(a)  # plain ndarrays
    pre.setdefault("segments", None)
    return pre


# ----------------------------------------------------------------------------------------- batches

class _TrainExample:
    """Global example index -> augmented example (picklable for grain worker processes)."""

    def __init__(self, case_dirs, config, cache_dir, to_template=None):
        self.case_dirs = [str(p) for p in case_dirs]
        self.config = config
        self.cache_dir = str(cache_dir)
        self.to_template = to_template

    def __call__(self, index: int) -> dict:
        n = len(self.case_dirs)
        seed = self.config.seed
        epoch, position = divmod(int(index), n)
        case = np.random.default_rng([seed, epoch]).permutation(n)[position]
        pre = preprocessed(self.case_dirs[case], self.config, self.cache_dir, self.to_template)
        rng = np.random.default_rng([seed, epoch, position])
        d = self.config.data
        centre = None
        if d.crop_centre == "landmark":
            known = np.flatnonzero(np.all(np.isfinite(pre["landmarks"]), axis=-1))
            if known.size:
                centre = pre["landmarks"][rng.choice(known)]
        example = augment.augment_example(pre, rng, d.crop_shape, d.spacing, d.augment, centre)
        batch.check(example, self.config, batch_size=0)
        return example


def train_loader(config, case_dirs, cache_dir, to_template=None):
    """An endless, checkpointable iterator of this host's training batches (dicts of numpy arrays).

    The global batch ``config.batch_size`` is split over ``jax.process_count()`` hosts; the stream is
    the same for a given ``config.seed`` whatever ``config.data.num_workers``. Every case is
    preprocessed (and cached) before the first batch, so a bad case fails now, naming its file.
    ``to_template``: as for ``preprocessed`` (picklable: preprocessing runs in spawned processes).
    """
    case_dirs = [Path(p) for p in case_dirs]
    if not case_dirs:
        raise CowjaxError("no training cases")
    _parallel.map_cases(_cache_case, [(p, config, cache_dir, to_template) for p in case_dirs],
                        "preprocess")
    hosts, host = jax.process_count(), jax.process_index()
    if config.batch_size % hosts:
        raise CowjaxError(f"batch_size {config.batch_size} does not divide over {hosts} hosts")
    # Lazily indexed: the length is only an upper bound on the examples ever read.
    ds = grain.MapDataset.range(len(case_dirs) * 10**7).map(_TrainExample(case_dirs, config,
                                                                          cache_dir, to_template))
    ds = ds[host::hosts].batch(config.batch_size // hosts, drop_remainder=True)
    it_ds = ds.to_iter_dataset()
    if config.data.num_workers > 0:
        # Grain's workers read absl flags; outside launch.py (tests, notebooks) use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(it_ds)


def _eval_centres(pre: dict, config, index: int) -> np.ndarray:
    """Validation crop centres [N, 3] (grid voxels): the training crops' centre ("circle"), or each
    known landmark moved by a fixed pseudo-random offset within the training's ("landmark")."""
    if config.data.crop_centre == "circle":
        return augment.crop_centre(pre)[None]
    known = pre["landmarks"][np.all(np.isfinite(pre["landmarks"]), axis=-1)]
    shift_mm = np.random.default_rng([config.seed, index]).uniform(-1, 1, known.shape)
    return known + shift_mm * config.data.augment.translate_mm / np.asarray(config.data.spacing)


def eval_examples(config, case_dirs, cache_dir, to_template=None) -> list[dict]:
    """Un-augmented examples centred as training crops are, for validation: on the landmarks'
    centroid (``augment.crop_centre``), or with ``data.crop_centre = "landmark"`` one per known
    landmark near it.

    Each has the training keys (no batch axis) plus ``case_id``, ``grid_affine [4, 4]`` (canonical
    grid voxel -> world RAS), ``offset [3]`` (crop voxel + offset = grid voxel) and ``crop_affine``
    (crop voxel -> world RAS mm), so predicted crop coordinates convert to world mm.
    ``to_template``: as for ``preprocessed``.
    """
    examples = []
    for index, case_dir in enumerate(map(Path, case_dirs)):
        pre = preprocessed(case_dir, config, cache_dir, to_template)
        for centre in _eval_centres(pre, config, index):
            example, offset = augment.crop_example(pre, centre, config.data.crop_shape)
            shift = np.eye(4)
            shift[:3, 3] = offset
            examples.append({**example, "case_id": case_dir.name, "grid_affine": pre["affine"],
                             "offset": offset, "crop_affine": pre["affine"] @ shift})
    return examples
