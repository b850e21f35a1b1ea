"""Data-parallel training with automatic resume: ``train_and_evaluate(config, workdir)``.

One jitted call of k train steps ``(state, (batch,) * k) -> (state, metrics)`` (k:
``devices.steps_per_call``, 4 on a CPU) over a ``('data',)`` mesh
(``devices.data_mesh``: every device, or on one host as many as the batch divides over, which on a
CPU means one per core): the batch is split over the devices, the state replicated and donated.
Checkpoints are made at fixed steps (every ``checkpoint_every_steps`` and the last), on SIGTERM,
and hold the data iterator's position, so a run killed at any moment and started again with the
same command continues where the last checkpoint was and ends with the same numbers.

Workdir: ``config.json`` (the resolved config and seed), ``metrics.jsonl`` (train metrics every
``log_every_steps``, validation every ``eval_every_steps``), ``checkpoints/``, ``best/``, and the same
for the refinement stage (``config.refine``) under ``refine/``.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from cowjax import config_check, devices, heatmaps, losses, weighting
from cowjax.errors import CowjaxError, atomic_output
from cowjax.training import checkpoint as ckpt
from cowjax.training import state as state_lib


def make_train_step(model, config, tx, loss_fn=None):
    """The pure train step ``(state, batch) -> (state, metrics)``.

    The loss terms (``losses.loss_terms``) are combined by ``config.loss.weighting``
    (``weighting.loss_and_grads``), whose state moves on with every kept update; the effective
    weights are logged as ``weight_<term>``. ``loss_fn(outputs, batch, config) -> (loss, terms)``
    replaces all that (the bench's side-by-side with PyTorch).

    A non-finite loss or gradient leaves params and optimizer state unchanged (counted in
    ``state["nonfinite"]`` and metrics["skipped"]; metrics["finite"] tells the host, which stops or
    goes on according to ``config.train.nonfinite``). No randomness: the step is a deterministic function of its inputs.
    """
    def gradients(state, batch):
        """(loss, grads, terms, the weighting state after this step, {weight_<term>: w})"""
        if loss_fn is not None:
            objective = lambda p: loss_fn(model.apply({"params": p}, batch["image"]), batch, config)
            (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
            return loss, grads, terms, state["weighting"], {}
        terms_fn = lambda p: losses.loss_terms(model.apply({"params": p}, batch["image"]), batch,
                                               config)
        loss, grads, aux = weighting.loss_and_grads(config, state["weighting"], terms_fn,
                                                    state["params"])
        wstate = weighting.update(config, state["weighting"], aux["terms"], aux["grad_norms"])
        shown = {f"weight_{t}": w for t, w in aux["weights"].items() if t in aux["terms"]}
        return loss, grads, aux["terms"], wstate, shown

    def step(state, batch):
        loss, grads, terms, wstate, shown = gradients(state, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(jnp.add, state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1,
                     "params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
                     # A skipped step does not enter what the weighting tracks.
                     "weighting": keep(wstate, state["weighting"])}
        metrics = {"loss": loss, **terms, **shown, "grad_norm": grad_norm, "finite": finite,
                   "skipped": new_state["nonfinite"]}
        return new_state, metrics

    return step


def make_mesh(batch_size: int) -> Mesh:
    return devices.data_mesh(batch_size)


def chain_steps(step_fn):
    """``(state, batches) -> (state, metrics)``: ``step_fn`` applied to each batch of the tuple in
    turn, unrolled in one program (one call, one allocation of working memory: ``devices.
    steps_per_call``); each metric stacked over the steps on a leading axis."""
    def steps(state, batches):
        history = []
        for batch in batches:
            state, metrics = step_fn(state, batch)
            history.append(metrics)
        return state, jax.tree.map(lambda *m: jnp.stack(m), *history)
    return steps


def compile_train_step(step_fn, mesh: Mesh):
    """jit of ``chain_steps(step_fn)``: every batch split over 'data', the state replicated and
    donated. A tuple of k batches runs k steps (one compilation per k)."""
    replicated = devices.replicated(mesh)
    return jax.jit(chain_steps(step_fn), in_shardings=(replicated, devices.split(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def to_device(batch: dict, mesh: Mesh) -> dict:
    """This process's share of a batch -> global arrays split over 'data'."""
    sharding = devices.split(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def _prefetched(iterator, mesh):
    """Yield (iterator position before the batch, the batch on the devices)."""
    while True:
        position = ckpt.iterator_state(iterator)
        yield position, to_device(next(iterator), mesh)


def make_eval_fn(model, config):
    """Jitted ``(params, image [B,X,Y,Z,1]) -> coords [B,19,3]`` crop voxel coords."""
    kind = heatmaps.kind_for(config)

    @jax.jit
    def predict(params, image):
        out = model.apply({"params": params}, image)["heatmaps"]
        return heatmaps.decode(out, stride=config.model.heatmap_stride, kind=kind)[0]
    return predict


def validation_mre(eval_fn, params, examples, spacing, mesh: Mesh | None = None) -> float:
    """Mean radial error (mm) over the known landmarks of the validation examples.

    examples: iterable of dicts with ``image [X,Y,Z,1]``, ``landmarks [19,3]`` crop voxel coords and
    ``landmark_mask [19]``. Voxel differences times spacing give millimetres. With ``mesh`` (the
    one ``params`` are replicated on), the examples are split over its devices.
    """
    errors = []
    examples = list(examples)
    spacing = np.asarray(spacing)
    n = mesh.size if mesh is not None else 1
    for i in range(0, len(examples), n):  # n examples per call: one per device of the mesh
        chunk = examples[i:i + n]
        images = np.stack([np.asarray(ex["image"]) for ex in chunk])
        images = np.concatenate([images, np.zeros((n - len(chunk),) + images.shape[1:],
                                                  images.dtype)])
        if mesh is not None:
            images = jax.device_put(images, devices.split(mesh))
        coords = np.asarray(eval_fn(params, images))
        for ex, c in zip(chunk, coords):
            err = np.linalg.norm((c - ex["landmarks"]) * spacing, axis=-1)
            errors.append(err[np.asarray(ex["landmark_mask"]) > 0])
    errors = np.concatenate(errors) if errors else np.zeros(0)
    return float(errors.mean()) if errors.size else float("nan")


class _Metrics:
    """JSON lines in workdir/metrics.jsonl; on resume, lines after the restored step are dropped
    so a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.primary = jax.process_index() == 0
        if self.primary and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            with atomic_output(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.primary:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]


class _Sigterm:
    """Remembers a SIGTERM so the loop can checkpoint and exit between steps."""

    def __init__(self):
        self.received = False

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere SIGTERM keeps its default.
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


def save_config(config, workdir: Path) -> None:
    """The resolved config (with its seed) as workdir/config.json."""
    if jax.process_index() == 0:
        with atomic_output(workdir / "config.json") as tmp:
            tmp.write_text(json.dumps(ckpt.config_to_dict(config), indent=2) + "\n", encoding="utf-8")


def run_training(config, workdir, model, train_iter, val_examples, desc: str = "train") -> dict:
    """Train ``model`` on batches from ``train_iter``, resuming from the workdir's checkpoint.

    train_iter: an iterator of batch dicts (this process's share) with get_state()/set_state().
    val_examples: a re-iterable of validation examples (see ``validation_mre``).
    desc: the progress bar's label.
    Returns the last train metrics and validation MRE as a dict of floats.
    """
    workdir = Path(workdir)
    config_check.validate(config)
    mesh = make_mesh(config.batch_size)
    replicated = devices.replicated(mesh)
    tx = state_lib.make_optimizer(config)
    checkpoints = ckpt.Checkpoints(workdir, config.train.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                state_lib.abstract_state(model, config, tx))
        state, meta = checkpoints.restore_latest(abstract)
        ckpt.set_iterator_state(train_iter, meta["iterator"])
    else:
        state = state_lib.create_state(state_lib.init_params(model, config), tx, config)
    state = jax.device_put(state, replicated)
    start = int(state["step"])
    metrics_log = _Metrics(workdir / "metrics.jsonl", start)
    train_step = compile_train_step(make_train_step(model, config, tx), mesh)
    eval_fn = make_eval_fn(model, config)

    def save(step, position, mre, latest):
        meta = {"step": step, "nonfinite": int(state["nonfinite"]), "seed": config.seed,
                "iterator": position, "config": ckpt.config_to_dict(config)}
        checkpoints.save(state, meta, best_metric=mre, latest=latest)

    per_call = devices.steps_per_call(config.train.steps_per_call)

    def call_end(step):
        """The last step of the call after ``step``: at most ``per_call`` steps, ending on every
        validation and checkpoint step (the state is whole only between calls)."""
        ends = [config.num_train_steps, step + per_call]
        ends += [(step // every + 1) * every
                 for every in (config.eval_every_steps, config.checkpoint_every_steps)]
        return min(ends)

    summary = {}
    batches = _prefetched(train_iter, mesh)
    pending = collections.deque()        # (iterator position before the batch, device batch)

    def fetch(n):
        while len(pending) < n:
            pending.append(next(batches))

    bar = tqdm(total=config.num_train_steps, initial=start, desc=desc, unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    step = start
    t0 = time.perf_counter()
    try:
        with _Sigterm() as sigterm:
            while step < config.num_train_steps:
                end = call_end(step)
                fetch(end - step)
                state, history = train_step(state, tuple(pending.popleft()[1]
                                                         for _ in range(end - step)))
                last = end == config.num_train_steps
                # Fetch the next call's batches while the device computes this one; `position` is
                # where the iterator stands for step end + 1 (what a checkpoint at `end` records).
                if not last:
                    fetch(call_end(end) - end)
                position = pending[0][0] if pending else ckpt.iterator_state(train_iter)
                history = jax.device_get(history)
                for i, at in enumerate(range(step + 1, end + 1)):
                    metrics = {k: v[i] for k, v in history.items()}
                    if not metrics["finite"]:
                        if config.train.nonfinite == "stop":
                            raise CowjaxError(
                                f"step {at}: the loss or a gradient is not finite (loss="
                                f"{float(metrics['loss'])}); stopped, keeping the last good "
                                f"checkpoint (step {checkpoints.latest_step() or 'none yet'}) in "
                                f"{workdir}")
                        bar.write(f"step {at}: non-finite loss or gradient, update skipped")
                    record = {k: float(v) for k, v in metrics.items()
                              if k not in ("finite", "skipped")}
                    summary.update(record)
                    if at % config.log_every_steps == 0 or at == config.num_train_steps:
                        metrics_log.write({"step": at, "split": "train", **record,
                                           "skipped": int(metrics["skipped"]),
                                           "steps_per_s": (at - start) / (time.perf_counter() - t0)})
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()}, refresh=False)
                bar.update(end - step)
                step = end
                mre = None
                if step % config.eval_every_steps == 0 or last:
                    mre = validation_mre(eval_fn, state["params"], val_examples, config.data.spacing,
                                          mesh)
                    summary["val_mre_mm"] = mre
                    metrics_log.write({"step": step, "split": "val", "mre_mm": mre})
                    bar.write(f"step {step}: validation MRE {mre:.3f} mm")
                mre = mre if mre is not None and np.isfinite(mre) else None
                latest = step % config.checkpoint_every_steps == 0 or last or sigterm.received
                if latest or mre is not None:
                    save(step, position, mre, latest)
                if sigterm.received and not last:
                    raise CowjaxError(f"SIGTERM at step {step}: checkpoint saved in {workdir}; "
                                      "run the same command again to resume")
    finally:
        bar.close()
        checkpoints.close()
    if jax.process_index() == 0:
        from cowjax import figures  # matplotlib, only once a run is done
        figures.training_curves(workdir / "curves.png", metrics_log.records())
    return summary


def resolve_config(config, workdir, splits: dict):
    """The run's config with what its split decides filled in (what config.json saves and
    training uses): ``num_train_steps`` = ceil(num_epochs * training cases / batch_size) when
    ``config.num_epochs`` > 0, and ``data.template`` = the template image ``prepare_data`` copied
    into the workdir when ``data.registration == "training_sample"``. Returns a new config."""
    from cowjax.data import pipeline
    config = config.copy_and_resolve_references()
    if config.get("num_epochs", 0) > 0:
        config.num_train_steps = math.ceil(config.num_epochs * len(splits["train"])
                                           / config.batch_size)
    if config.data.get("registration", "none") == "training_sample":
        config.data.template = str(pipeline.template_path(workdir).resolve())
    return config


def train_and_evaluate(config, workdir) -> dict:
    """Prepare the data, build the model, train (resuming if the workdir has a checkpoint); then,
    with ``config.refine.num_train_steps``, the refinement stage in ``<workdir>/refine`` on the same
    split. Returns the first stage's summary, with the refinement's under "refine"."""
    from cowjax.config_defaults import refine_config
    from cowjax.data import pipeline
    if config.train.distributed:
        jax.distributed.initialize()
    config_check.validate(config)   # before any data is made or written
    workdir = Path(workdir)
    splits = pipeline.prepare_data(config, workdir)
    config = resolve_config(config, workdir, splits)
    summary = _train_stage(config, workdir, workdir, splits, "train")
    if config.refine.num_train_steps > 0:
        summary["refine"] = _train_stage(refine_config(config), workdir / ckpt.REFINE_DIR, workdir,
                                         splits, "refine")
    return summary


def _train_stage(config, stage_dir: Path, workdir: Path, splits: dict, desc: str) -> dict:
    from cowjax.data import pipeline
    from cowjax.model import unet
    from cowjax.registration import intensity
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, stage_dir)
    # Preprocessed cases are keyed by case path and spacing, so runs side by side share the cache.
    cache_dir = workdir.resolve().parent / "cache"
    to_template = intensity.template_registration(config.data)   # None without registration
    train_iter = pipeline.train_loader(config, splits["train"], cache_dir, to_template)
    val_examples = pipeline.eval_examples(config, splits["val"], cache_dir, to_template)
    return run_training(config, stage_dir, unet.build_model(config), train_iter, val_examples,
                        desc)
