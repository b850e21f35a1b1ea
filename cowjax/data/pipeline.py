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
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags

from cowjax.data import _parallel, augment, io, preprocess
from cowjax.errors import CowjaxError, atomic_output, atomic_output_dir

_CACHE_VERSION = 2  # bump when preprocessing changes what it writes (2: .npy folders)
_SYNTHETIC_VERSION = 2  # bump when the generator's cases change: they go to a new folder
_SPLITS = ("train", "val", "test")
_CROP_CENTRES = ("circle", "landmark")


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
            f"_p{d.pathology_fraction:g}")
    return workdir.resolve().parent / "data" / name


def _make_synthetic(config, data_dir: Path) -> None:
    """Generate the synthetic set into a temporary folder and rename it: never a half-made set."""
    from cowjax.data import synthetic  # the generator is only needed on first use

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(data_dir) as tmp:
        synthetic.generate_dataset(tmp, config.data.num_cases, config.data.synthetic_seed,
                                   spacing=tuple(config.data.synthetic_spacing),
                                   pathology_fraction=config.data.pathology_fraction)


def prepare_data(config, workdir) -> dict[str, list[Path]]:
    """The train / val / test case folders, the split recorded in ``workdir/split.json``.

    A recorded split is re-used as is (its cases must still exist); otherwise the dataset is listed
    (synthetic: generated on first use under ``config.data.data_dir`` or ``<workdir>/../data/``)
    and split by ``config.data.split`` with a permutation seeded by ``config.seed``.
    """
    workdir = Path(workdir)
    split_file = workdir / "split.json"
    if split_file.exists():
        try:
            recorded = json.loads(split_file.read_text())
            data_dir = Path(recorded["data_dir"])
            split = {k: [data_dir / n for n in recorded[k]] for k in _SPLITS}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CowjaxError(f"{split_file}: unreadable split record ({e}); delete it to re-split")
        missing = [str(p) for k in _SPLITS for p in split[k] if not (p / io.IMAGE).is_file()]
        if missing:
            raise CowjaxError(f"{split_file}: {len(missing)} recorded case(s) missing, e.g. "
                              f"{missing[0]}")
        return split
    data_dir = _dataset_dir(config, workdir)
    if config.data.source == "synthetic" and not data_dir.exists():
        _make_synthetic(config, data_dir)
    cases = io.list_cases(data_dir)
    fractions = np.asarray(config.data.split, np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise CowjaxError(f"config.data.split = {tuple(config.data.split)}: expected three "
                          f"non-negative train/val/test fractions")
    # Every non-zero fraction gets at least one case when there are enough.
    counts = np.floor(fractions / fractions.sum() * len(cases)).astype(int)
    counts = np.where((fractions > 0) & (counts == 0) & (len(cases) >= 3), 1, counts)
    counts[0] = len(cases) - counts[1:].sum()
    if counts[0] < 1:
        raise CowjaxError(f"{data_dir}: {len(cases)} case(s) are too few to split {tuple(fractions)}")
    order = np.random.default_rng(config.seed).permutation(len(cases))
    bounds = np.cumsum(counts)[:-1]
    split = {k: [cases[i] for i in sorted(part)]
             for k, part in zip(_SPLITS, np.split(order, bounds))}
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"data_dir": str(data_dir.resolve()), **{k: [p.name for p in split[k]] for k in _SPLITS}}
    with atomic_output(split_file) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return {k: [data_dir.resolve() / p.name for p in split[k]] for k in _SPLITS}


# ------------------------------------------------------------------------------ preprocessing cache

def _cache_path(case_dir: Path, data_config, cache_dir: Path) -> Path:
    """Keyed by the case folder, its files' sizes and times, the spacing, the registration and the
    cache version."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in case_dir.iterdir() if p.is_file())
    key = json.dumps([str(case_dir.resolve()), [float(s) for s in data_config.spacing], stats,
                      _CACHE_VERSION, data_config.get("registration", "none")])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{case_dir.name}_{digest}"


def preprocessed(case_dir, config, cache_dir) -> dict:
    """``preprocess_case`` of a case folder, read from / written to the cache.

    The cache entry is a folder of ``.npy`` files, one per array; volumes are read back memory-mapped,
    so an example reads only the voxels its crop touches (a 24^3 patch of a 1 mm case: 10 ms to load
    the whole case from an ``.npz``, well under 1 ms mapped).
    """
    case_dir, cache_dir = Path(case_dir), Path(cache_dir)
    path = _cache_path(case_dir, config.data, cache_dir)
    if not path.is_dir():
        pre = preprocess.preprocess_case(io.load_case(case_dir), config)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output_dir(path) as tmp:
            for k, v in pre.items():
                if v is not None:
                    np.save(tmp / f"{k}.npy", v)
        return pre
    return _load_cached(str(path))


def _cache_case(job) -> None:
    preprocessed(*job)


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

    def __init__(self, case_dirs, config, cache_dir):
        self.case_dirs = [str(p) for p in case_dirs]
        self.config = config
        self.cache_dir = str(cache_dir)

    def __call__(self, index: int) -> dict:
        n = len(self.case_dirs)
        seed = self.config.seed
        epoch, position = divmod(int(index), n)
        case = np.random.default_rng([seed, epoch]).permutation(n)[position]
        pre = preprocessed(self.case_dirs[case], self.config, self.cache_dir)
        rng = np.random.default_rng([seed, epoch, position])
        d = self.config.data
        center = None
        if d.crop_centre == "landmark":
            known = np.flatnonzero(np.all(np.isfinite(pre["landmarks"]), axis=-1))
            if known.size:
                center = pre["landmarks"][rng.choice(known)]
        return augment.augment_example(pre, rng, d.crop_shape, d.spacing, d.augment, center)


def train_loader(config, case_dirs, cache_dir):
    """An endless, checkpointable iterator of this host's training batches (dicts of numpy arrays).

    The global batch ``config.batch_size`` is split over ``jax.process_count()`` hosts; the stream is
    the same for a given ``config.seed`` whatever ``config.data.num_workers``. Every case is
    preprocessed (and cached) before the first batch, so a bad case fails now, naming its file.
    """
    case_dirs = [Path(p) for p in case_dirs]
    if not case_dirs:
        raise CowjaxError("no training cases")
    _check_crop_centre(config)
    _parallel.map_cases(_cache_case, [(p, config, cache_dir) for p in case_dirs], "preprocess")
    hosts, host = jax.process_count(), jax.process_index()
    if config.batch_size % hosts:
        raise CowjaxError(f"batch_size {config.batch_size} does not divide over {hosts} hosts")
    # Lazily indexed: the length is only an upper bound on the examples ever read.
    ds = grain.MapDataset.range(len(case_dirs) * 10**7).map(_TrainExample(case_dirs, config,
                                                                          cache_dir))
    ds = ds[host::hosts].batch(config.batch_size // hosts, drop_remainder=True)
    it_ds = ds.to_iter_dataset()
    if config.data.num_workers > 0:
        # Grain's workers read absl flags; outside launch.py (tests, notebooks) use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(it_ds)


def _check_crop_centre(config) -> None:
    if config.data.crop_centre not in _CROP_CENTRES:
        raise CowjaxError(f"config.data.crop_centre: unknown {config.data.crop_centre!r}; one of "
                          f"{_CROP_CENTRES}")


def _eval_centres(pre: dict, config, index: int) -> np.ndarray:
    """Validation crop centres [N, 3] (grid voxels): the training crops' centre ("circle"), or each
    known landmark moved by a fixed pseudo-random offset within the training's ("landmark")."""
    if config.data.crop_centre == "circle":
        return augment.crop_center(pre)[None]
    known = pre["landmarks"][np.all(np.isfinite(pre["landmarks"]), axis=-1)]
    shift_mm = np.random.default_rng([config.seed, index]).uniform(-1, 1, known.shape)
    return known + shift_mm * config.data.augment.translate_mm / np.asarray(config.data.spacing)


def eval_examples(config, case_dirs, cache_dir) -> list[dict]:
    """Un-augmented examples centred as training crops are, for validation: on the landmarks'
    centroid (``augment.crop_center``), or with ``data.crop_centre = "landmark"`` one per known
    landmark near it.

    Each has the training keys (no batch axis) plus ``case_id``, ``grid_affine [4, 4]`` (canonical
    grid voxel -> world RAS), ``offset [3]`` (crop voxel + offset = grid voxel) and ``crop_affine``
    (crop voxel -> world RAS mm), so predicted crop coordinates convert to world mm.
    """
    _check_crop_centre(config)
    examples = []
    for index, case_dir in enumerate(map(Path, case_dirs)):
        pre = preprocessed(case_dir, config, cache_dir)
        for center in _eval_centres(pre, config, index):
            example, offset = augment.crop_example(pre, center, config.data.crop_shape)
            shift = np.eye(4)
            shift[:3, 3] = offset
            examples.append({**example, "case_id": case_dir.name, "grid_affine": pre["affine"],
                             "offset": offset, "crop_affine": pre["affine"] @ shift})
    return examples
