"""Checkpoints with orbax: the train state, the config and the data-iterator position together.

Layout under the workdir:
  checkpoints/<step>/{params, opt_state, weighting, iterator, meta}   the latest ``keep_checkpoints``
  best/<step>/{params, meta}                     the one with the lowest validation MRE
``meta`` is JSON: step, skipped-update count, seed, the resolved config and the anatomy the model
was made for. ``iterator`` holds each process's data-iterator position, one file per process
(``process_<i>-of-<n>.json``, grain's orbax handler): with several processes each reads its own
share of every batch, so each resumes from its own position. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cowjax import anatomy
from cowjax.errors import CowjaxError
from cowjax.training import sweep

LATEST, BEST = "checkpoints", "best"
REFINE_DIR = "refine"  # the refinement stage's run, inside the first stage's workdir
# A folder of several runs predicted as one (``export_ensemble``, ``ensemble_members``).
ENSEMBLE_FILE = "ensemble.json"
BEST_METRIC = "val_mre_mm"


def config_to_dict(config) -> dict:
    """The config as JSON-able nested dicts (tuples become lists)."""
    return json.loads(config.to_json())


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """Inverse of ``config_to_dict``; lists come back as tuples, as the configs write them."""
    def tuples(v):
        if isinstance(v, dict):
            return {k: tuples(x) for k, x in v.items()}
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v
    return ml_collections.ConfigDict(tuples(d))


def _anatomy() -> dict:
    return {"landmarks": list(anatomy.LANDMARKS), "segments": list(anatomy.SEGMENTS)}


def iterator_state(iterator):
    """A data iterator's position as JSON (grain iterators give a dict or JSON bytes)."""
    state = iterator.get_state()
    return {"bytes": state.decode()} if isinstance(state, bytes) else {"json": state}


def set_iterator_state(iterator, saved) -> None:
    iterator.set_state(saved["bytes"].encode() if "bytes" in saved else saved["json"])


class _Position:
    """A recorded iterator position (``iterator_state``) in the shape grain's checkpoint handler
    saves and restores: training records the position before the batches it has prefetched, which
    the live iterator is past."""

    def __init__(self, position=None):
        self.position = position

    def get_state(self) -> bytes:
        return json.dumps(self.position).encode()

    def set_state(self, state: bytes) -> None:
        self.position = json.loads(state.decode())

    def start_prefetch(self) -> None:
        pass


def _manager(directory: Path, keep: int | None, best: bool = False, read_only: bool = False):
    # Synchronous saves: checkpoints are small next to a step, and a finished save() is on disk.
    # For reading, a manager that creates and cleans nothing (orbax's read_only mode only warns).
    # Reading (inference) is each process's own: no barriers with the others.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False,
        create=not read_only, cleanup_tmp_directories=not read_only,
        best_fn=(lambda m: m[BEST_METRIC]) if best else None, best_mode="min",
        multiprocessing_options=alone if read_only else ocp.options.MultiprocessingOptions())
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if not best:
        handlers["opt_state"] = ocp.StandardCheckpointHandler()
        handlers["weighting"] = ocp.StandardCheckpointHandler()
        handlers["iterator"] = grain.checkpoint.CheckpointHandler()
    return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


def check_compatible(directory: Path, step: int, meta: dict, params_metadata, abstract_params):
    """CowjaxError when a checkpoint does not fit the model the config builds."""
    if meta.get("anatomy") != _anatomy():
        got = meta.get("anatomy") or {}
        raise CowjaxError(
            f"{directory}/{step}: checkpoint made for {len(got.get('landmarks', []))} landmarks and "
            f"{len(got.get('segments', []))} segments (or other names); this code has "
            f"{anatomy.NUM_LANDMARKS} and {anatomy.NUM_SEGMENTS}")
    params_metadata = getattr(params_metadata, "tree", params_metadata)
    saved = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
             jax.tree_util.tree_leaves_with_path(params_metadata)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(abstract_params)}
    if saved != want:
        diff = sorted(set(saved.items()) ^ set(want.items()))[:3]
        raise CowjaxError(
            f"{directory}/{step}: checkpoint's model shapes differ from the config's model "
            f"(e.g. {diff}); use a new workdir or the config the checkpoint was trained with")


class Checkpoints:
    """The latest checkpoints (for resuming) and the best one (for inference) of a run."""

    def __init__(self, workdir, keep: int):
        self.dir = Path(workdir)
        self.latest = _manager(self.dir / LATEST, keep)
        self.best = _manager(self.dir / BEST, 1, best=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, state, meta: dict, position, best_metric: float | None = None,
             latest: bool = True):
        """Save at ``meta["step"]`` (host int): as latest, and as best when best_metric is given
        (kept if lower than the best so far). ``position``: this process's data-iterator position
        (``iterator_state``). Every process calls this. A step already saved is left as it is."""
        step = meta["step"]
        meta = {**meta, "anatomy": _anatomy()}
        if best_metric is not None and step not in self.best.all_steps():
            self.best.save(step, metrics={BEST_METRIC: float(best_metric)},
                           args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                                   meta=ocp.args.JsonSave(meta)))
        if latest and step not in self.latest.all_steps():
            self.latest.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                weighting=ocp.args.StandardSave(state["weighting"]),
                iterator=grain.checkpoint.CheckpointSave(_Position(position)),
                meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        """The steps of the latest checkpoints kept."""
        return list(self.latest.all_steps())

    def restore_latest(self, abstract_state, step: int | None = None):
        """(state, meta) from the latest checkpoint, or the one of ``step``; abstract_state
        carries target shardings."""
        step = self.latest.latest_step() if step is None else step
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(self.dir / LATEST, step, meta,
                         self.latest.item_metadata(step)["params"], abstract_state["params"])
        r = self.latest.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            weighting=ocp.args.StandardRestore(abstract_state["weighting"])))
        state = {"step": np.int32(meta["step"]), "params": r["params"],
                 "opt_state": r["opt_state"], "nonfinite": np.int32(meta["nonfinite"]),
                 "weighting": r["weighting"]}
        return state, meta

    def position(self, step: int):
        """This process's data-iterator position saved with the latest checkpoint of ``step``."""
        meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "iterator" in meta:    # written before each process had its own position (one process)
            if jax.process_count() > 1:
                raise CowjaxError(f"{self.dir / LATEST}/{step}: written by one process; resume it "
                                  f"with one process (this run has {jax.process_count()})")
            return meta["iterator"]
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        folder = self.dir / LATEST / str(step) / "iterator"
        if not (folder / mine).is_file():
            written = sorted(p.name for p in folder.glob("process_*.json"))
            count = written[0].split("-of-")[1].removesuffix(".json") if written else "?"
            raise CowjaxError(f"{folder}: written by {count} processes; resume it with as many "
                              f"(this run has {jax.process_count()})")
        r = self.latest.restore(step, args=ocp.args.Composite(
            iterator=grain.checkpoint.CheckpointRestore(_Position())))
        return r["iterator"].position

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _inference_checkpoint(workdir):
    """(directory, manager, step) of the run's best checkpoint, else its latest; None if neither."""
    for name in (BEST, LATEST):
        directory = Path(workdir) / name
        if not directory.is_dir():
            continue
        mgr = _manager(directory, None, read_only=True)
        step = mgr.latest_step()
        if step is not None:
            return directory, mgr, step
    return None


def has_checkpoint(workdir) -> bool:
    """Whether the run has a best or latest checkpoint to load."""
    return _inference_checkpoint(workdir) is not None


def load_for_inference(workdir):
    """(config, params) of a run: the best checkpoint, else the latest.

    The config is the one the run was trained with. Raises CowjaxError when there is no
    checkpoint, or when it does not fit the model its config builds (anatomy or shapes).
    """
    from cowjax.model import unet
    found = _inference_checkpoint(workdir)
    if found is None and sweep.is_sweep_dir(workdir):
        raise CowjaxError(f"{workdir}: a sweep; its members are the runs ({workdir}/member_<k>), "
                          f"and --mode=eval on {workdir} compares them")
    if found is None:
        raise CowjaxError(f"{workdir}: no checkpoint found (train a run there first)")
    directory, mgr, step = found
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = config_from_dict(meta["config"])
    model = unet.build_model(config)
    # On this process's first device (not where the saving run's processes had them).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here),
                            unet.param_shapes(model, config.data.crop_shape))
    check_compatible(directory, step, meta, mgr.item_metadata(step)["params"], abstract)
    params = mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))["params"]
    return config, params


def export_for_inference(workdir, out) -> list[str]:
    """Copy what prediction needs from a run into ``out``: its config and best checkpoint, the
    refinement stage's likewise, the registration template if the run has one (no optimiser
    state, no older checkpoints: a few MB for the demo). ``out`` is then a workdir that
    ``--mode=predict`` and ``--mode=eval --data_dir`` read; written whole or not at all.
    Returns the stages copied ("", and "refine" if the run has one)."""
    from cowjax.errors import atomic_output_dir
    out = Path(out)
    stages = _exported_stages(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out) as tmp:
        _export_into(workdir, stages, tmp)
    return stages


def export_ensemble(workdirs, out) -> list[list[str]]:
    """Several runs exported as one ensemble folder (what ``inference.predictor.load_predictor``
    reads as one predictor): each run as ``export_for_inference`` into ``out/member_<k>``, and
    ``ENSEMBLE_FILE`` listing them; written whole or not at all. Returns each run's stages."""
    from cowjax.errors import atomic_output_dir
    out = Path(out)
    if len(workdirs) < 2:
        raise CowjaxError(f"an ensemble needs at least two runs (got {len(workdirs)})")
    stages = [_exported_stages(w) for w in workdirs]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out) as tmp:
        members = [f"member_{k}" for k in range(len(workdirs))]
        for w, s, m in zip(workdirs, stages, members):
            (tmp / m).mkdir()
            _export_into(w, s, tmp / m)
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(
            {"members": members, "runs": [str(w) for w in workdirs]}, indent=1) + "\n",
            encoding="utf-8")
    return stages


def ensemble_members(folder) -> list[Path] | None:
    """The member folders listed in ``folder``'s ``ENSEMBLE_FILE`` (relative to it), or None
    without one; one line naming the file and the problem when it cannot be used."""
    manifest = Path(folder) / ENSEMBLE_FILE
    if not manifest.is_file():
        return None
    try:
        paths = [Path(folder) / str(m)
                 for m in json.loads(manifest.read_text(encoding="utf-8"))["members"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CowjaxError(f"{manifest}: not an ensemble manifest ({e})")
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise CowjaxError(f"{manifest}: member folder(s) not found: {', '.join(missing)}")
    return paths


def _exported_stages(workdir) -> list[str]:
    workdir = Path(workdir)
    stages = [s for s in ("", REFINE_DIR) if (workdir / s / BEST).is_dir()]
    if "" not in stages:
        raise CowjaxError(f"{workdir}: no best checkpoint ({workdir / BEST}) to export")
    return stages


def _export_into(workdir, stages, dst: Path) -> None:
    from cowjax.data import pipeline
    workdir = Path(workdir)
    for stage in stages:
        mgr = _manager(workdir / stage / BEST, None, read_only=True)
        step = mgr.latest_step()
        mgr.close()
        (dst / stage).mkdir(exist_ok=True)
        shutil.copytree(workdir / stage / BEST / str(step), dst / stage / BEST / str(step))
        if (workdir / stage / "config.json").is_file():   # for people: the checkpoint has it too
            shutil.copyfile(workdir / stage / "config.json", dst / stage / "config.json")
    template = pipeline.template_path(workdir)
    if template.is_file():
        shutil.copyfile(template, pipeline.template_path(dst))
