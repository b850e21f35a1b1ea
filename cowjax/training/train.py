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
for the refinement stage (``config.refine``) under ``refine/``. A sweep (``config.sweep``,
``sweep.py``) trains its members as one program, each an ordinary run workdir ``member_<k>/``.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from cowjax import config_check, devices, heatmaps, losses, weighting
from cowjax.errors import CowjaxError, atomic_output
from cowjax.training import checkpoint as ckpt
from cowjax.training import state as state_lib
from cowjax.training import sweep


def make_train_step(model, config, tx, loss_fn=None, members=None):
    """The pure train step ``(state, batch) -> (state, metrics)``.

    The loss terms (``losses.loss_terms``) are combined by ``config.loss.weighting``
    (``weighting.loss_and_grads``), whose state moves on with every kept update; the effective
    weights are logged as ``weight_<term>``. ``loss_fn(outputs, batch, config) -> (loss, terms)``
    replaces all that (the bench's side-by-side with PyTorch).

    A non-finite loss or gradient leaves params and optimizer state unchanged (counted in
    ``state["nonfinite"]`` and metrics["skipped"]; metrics["finite"] tells the host, which stops or
    goes on according to ``config.train.nonfinite``). No randomness: the step is a deterministic function of its inputs.

    members: a sweep's member configs (``config_defaults.sweep_configs`` of ``config``): the step
    then trains them all on each batch, from a state stacked on a leading member axis
    (``sweep.stack``), every metric with that axis too; member k's part is the step of a run with
    its config. How, ``config.train.sweep_impl`` says (``sweep.impl``): "vmap", one step
    ``jax.vmap``ped over the members, their loss settings traced arrays (``weighting.settings``),
    every term computed that some member has on (a member with it off gets none of it); or
    "unroll", each member's own step side by side in the program.
    """
    if members is None:
        settings = weighting.settings(config)
        step = _settings_step(model, config, tx, loss_fn, weighting.uses_gradnorm(settings))
        return lambda state, batch: step(state, batch, settings)
    if sweep.impl(config) == "unroll":
        steps = [make_train_step(model, m, tx, loss_fn) for m in members]

        def unrolled(state, batch):
            done = [step(sweep.unstack(state, k), batch) for k, step in enumerate(steps)]
            # A term a member does not compute is logged by none (run_training drops it): 0 here.
            names = set().union(*(metrics for _, metrics in done))
            return sweep.stack([(s, {n: m.get(n, jnp.zeros((), jnp.float32)) for n in names})
                                for s, m in done])
        return unrolled
    settings = sweep.stack([weighting.settings(m) for m in members], np)
    # losses.loss_terms computes the terms with a nonzero weight: every term a member has on.
    config = config.copy_and_resolve_references()
    for t in weighting.TERMS:
        config.loss[f"w_{t}"] = max(m.loss[f"w_{t}"] for m in members)
    step = _settings_step(model, config, tx, loss_fn, weighting.uses_gradnorm(settings))
    return lambda state, batch: jax.vmap(step, in_axes=(0, None, 0))(state, batch, settings)


def _settings_step(model, config, tx, loss_fn, grad_norms: bool):
    """``make_train_step``'s step with the weighting settings an argument: ``(state, batch,
    settings) -> (state, metrics)``. grad_norms (static): compute GradNorm's G_i."""
    path = weighting.shared_layer_path(config) if grad_norms else None

    def gradients(state, batch, settings):
        """(loss, grads, terms, the weighting state after this step, {weight_<term>: w})"""
        if loss_fn is not None:
            objective = lambda p: loss_fn(model.apply({"params": p}, batch["image"]), batch, config)
            (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
            return loss, grads, terms, state["weighting"], {}
        terms_fn = lambda p: losses.loss_terms(model.apply({"params": p}, batch["image"]), batch,
                                               config)
        loss, grads, aux = weighting.loss_and_grads(settings, state["weighting"], terms_fn,
                                                    state["params"], path, grad_norms)
        wstate = weighting.update(settings, state["weighting"], aux["terms"], aux["grad_norms"])
        shown = {f"weight_{t}": w for t, w in aux["weights"].items() if t in aux["terms"]}
        return loss, grads, aux["terms"], wstate, shown

    def step(state, batch, settings):
        loss, grads, terms, wstate, shown = gradients(state, batch, settings)
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


def compile_train_step(step_fn, mesh: Mesh, cpu_opt_level: int | None = None):
    """jit of ``chain_steps(step_fn)``: every batch split over 'data', the state replicated and
    donated. A tuple of k batches runs k steps (one compilation per k). ``cpu_opt_level``: XLA's
    CPU optimisation level (``config.train.cpu_opt_level``; None: XLA's default)."""
    replicated = devices.replicated(mesh)
    return jax.jit(chain_steps(step_fn), in_shardings=(replicated, devices.split(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0,
                   compiler_options=devices.compiler_options(mesh, cpu_opt_level))


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

    @devices.jit
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
        coords = eval_fn(params, images)
        if not coords.is_fully_addressable:   # split over several processes' devices
            coords = multihost_utils.process_allgather(coords, tiled=True)
        coords = np.asarray(coords)
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


def run_training(config, workdir, model, train_iter, val_examples, desc: str = "train",
                 members: dict | None = None) -> dict:
    """Train ``model`` on batches from ``train_iter``, resuming from the workdir's checkpoint.

    train_iter: an iterator of batch dicts (this process's share) with get_state()/set_state().
    val_examples: a re-iterable of validation examples (see ``validation_mre``).
    desc: the progress bar's label.
    members: a sweep's ``{name: (config, workdir)}`` (``sweep.py``; ``config`` is then the sweep's
    and ``workdir`` its root): trained together from one stacked state (``make_train_step``), each
    checkpointed, logged, validated and drawn in its own workdir as a run is; resumed from the
    latest step all of them saved.
    Returns the last train metrics and validation MRE as a dict of floats; a sweep's, one such dict
    per member.
    """
    workdir = Path(workdir)
    config_check.validate(config)
    runs = {workdir.name: (config, workdir)} if members is None else dict(members)
    # A sweep's state and metrics have a leading member axis; a run's are its own.
    take = (lambda tree, k: tree) if members is None else sweep.unstack
    mesh = make_mesh(config.batch_size)
    replicated = devices.replicated(mesh)
    tx = state_lib.make_optimizer(config)
    checkpoints = {n: ckpt.Checkpoints(d, c.train.keep_checkpoints) for n, (c, d) in runs.items()}
    common = set.intersection(*(set(c.steps()) for c in checkpoints.values()))
    if common:
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                state_lib.abstract_state(model, config, tx))
        states = [c.restore_latest(abstract, max(common))[0] for c in checkpoints.values()]
        ckpt.set_iterator_state(train_iter, next(iter(checkpoints.values())).position(max(common)))
    else:
        params = state_lib.init_params(model, config)
        states = [state_lib.create_state(params, tx, c) for c, _ in runs.values()]
    state = jax.device_put(states[0] if members is None else sweep.stack(states), replicated)
    start = int(take(state, 0)["step"])
    logs = {n: _Metrics(d / "metrics.jsonl", start) for n, (_, d) in runs.items()}
    # What a member does not train is not in its log (a run would not compute it).
    off = {n: {k for t in weighting.TERMS if not c.loss[f"w_{t}"] for k in (t, f"weight_{t}")}
           for n, (c, _) in runs.items()}
    step_fn = make_train_step(model, config, tx,
                              members=None if members is None else [c for c, _ in runs.values()])
    train_step = compile_train_step(step_fn, mesh, config.train.get("cpu_opt_level"))
    eval_fn = make_eval_fn(model, config)

    def save(step, position, mres, latest):
        for k, (name, (c, _)) in enumerate(runs.items()):
            member = take(state, k)
            meta = {"step": step, "nonfinite": int(member["nonfinite"]), "seed": c.seed,
                    "config": ckpt.config_to_dict(c)}
            checkpoints[name].save(member, meta, position, best_metric=mres[name], latest=latest)

    per_call = devices.steps_per_call(config.train.steps_per_call)

    def call_end(step):
        """The last step of the call after ``step``: at most ``per_call`` steps, ending on every
        validation and checkpoint step (the state is whole only between calls)."""
        ends = [config.num_train_steps, step + per_call]
        ends += [(step // every + 1) * every
                 for every in (config.eval_every_steps, config.checkpoint_every_steps)]
        return min(ends)

    summaries = {n: {} for n in runs}
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
                shown = {}
                for i, at in enumerate(range(step + 1, end + 1)):
                    for k, name in enumerate(runs):
                        metrics = take({key: v[i] for key, v in history.items()}, k)
                        who = f"{name}, " if members is not None else ""
                        if not metrics["finite"]:
                            if config.train.nonfinite == "stop":
                                latest = checkpoints[name].latest_step()
                                raise CowjaxError(
                                    f"{who}step {at}: the loss or a gradient is not finite (loss="
                                    f"{float(metrics['loss'])}); stopped, keeping the last good "
                                    f"checkpoint (step {latest or 'none yet'}) in "
                                    f"{runs[name][1]}")
                            bar.write(f"{who}step {at}: non-finite loss or gradient, update skipped")
                        record = {key: float(v) for key, v in metrics.items()
                                  if key not in ("finite", "skipped") and key not in off[name]}
                        summaries[name].update(record)
                        if at % config.log_every_steps == 0 or at == config.num_train_steps:
                            logs[name].write({"step": at, "split": "train", **record,
                                              "skipped": int(metrics["skipped"]),
                                              "steps_per_s": (at - start) / (time.perf_counter() - t0)})
                        shown = record if members is None else {**shown, name: record["loss"]}
                # The loss terms; the weights are in metrics.jsonl and curves.png.
                bar.set_postfix({key: f"{v:.4g}" for key, v in shown.items()
                                 if not key.startswith("weight_")}, refresh=False)
                bar.update(end - step)
                step = end
                mres = dict.fromkeys(runs)
                if step % config.eval_every_steps == 0 or last:
                    for k, name in enumerate(runs):
                        mre = validation_mre(eval_fn, take(state, k)["params"], val_examples,
                                             config.data.spacing, mesh)
                        summaries[name]["val_mre_mm"] = mre
                        logs[name].write({"step": step, "split": "val", "mre_mm": mre})
                        mres[name] = mre if np.isfinite(mre) else None
                    text = ", ".join(f"{summaries[n]['val_mre_mm']:.3f} mm"
                                     + (f" ({n})" if members is not None else "") for n in runs)
                    bar.write(f"step {step}: validation MRE {text}")
                latest = step % config.checkpoint_every_steps == 0 or last or sigterm.received
                if latest or any(m is not None for m in mres.values()):
                    save(step, position, mres, latest)
                if sigterm.received and not last:
                    raise CowjaxError(f"SIGTERM at step {step}: checkpoint saved in {workdir}; "
                                      "run the same command again to resume")
    finally:
        bar.close()
        for c in checkpoints.values():
            c.close()
    if jax.process_index() == 0:
        from cowjax import figures  # matplotlib, only once a run is done
        for name, log in logs.items():
            figures.training_curves(runs[name][1] / "curves.png", log.records())
    return summaries[workdir.name] if members is None else summaries


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
    split. Returns the first stage's summary, with the refinement's under "refine".

    With ``config.sweep`` set, the sweep's members are trained together instead (``sweep.py``),
    each in ``<workdir>/member_<k>``, the first network only; returns {member: summary}."""
    from cowjax.config_defaults import refine_config, sweep_configs
    from cowjax.data import pipeline
    if config.train.distributed:
        devices.start_processes()   # launch.py has already, with its --coordinator flags
    config_check.validate(config)   # before any data is made or written
    devices.use_matmul_precision(config)
    note = devices.precision_note(config)
    if note and jax.process_index() == 0:
        print(note, file=sys.stderr)
    workdir = Path(workdir)
    if sweep.is_sweep_dir(workdir) and not sweep.is_sweep(config):
        raise CowjaxError(f"{workdir} holds a sweep ({sweep.RECORD}); train a run in another "
                          f"--workdir, or this sweep with its config.sweep")
    splits = devices.primary_first(pipeline.prepare_data, config, workdir, name="prepare_data")
    config = resolve_config(config, workdir, splits)
    if sweep.is_sweep(config):
        members = sweep_configs(config)
        dirs = devices.primary_first(sweep.prepare, workdir, config, members, name="sweep")
        if config.refine.num_train_steps > 0 and jax.process_index() == 0:
            print(f"sweep of {len(members)}: the members train the first network only "
                  f"(config.refine.num_train_steps={config.refine.num_train_steps} unused)")
        return _train_stage(config, workdir, workdir, splits, "sweep",
                            {n: (c, dirs[n]) for n, c in members.items()})
    summary = _train_stage(config, workdir, workdir, splits, "train")
    if config.refine.num_train_steps > 0:
        summary["refine"] = _train_stage(refine_config(config), workdir / ckpt.REFINE_DIR, workdir,
                                         splits, "refine")
    return summary


def _train_stage(config, stage_dir: Path, workdir: Path, splits: dict, desc: str,
                 members: dict | None = None) -> dict:
    from cowjax.data import pipeline
    from cowjax.model import unet
    from cowjax.registration import intensity
    stage_dir.mkdir(parents=True, exist_ok=True)
    for c, d in (members or {stage_dir.name: (config, stage_dir)}).values():
        save_config(c, d)
    # Preprocessed cases are keyed by case path and spacing, so runs side by side share the cache.
    cache_dir = workdir.resolve().parent / "cache"
    to_template = intensity.template_registration(config.data)   # None without registration
    # The first process preprocesses and caches the cases; the others then read its cache.
    train_iter = devices.primary_first(pipeline.train_loader, config, splits["train"], cache_dir,
                                       to_template, name=f"{desc}_loader")
    val_examples = pipeline.eval_examples(config, splits["val"], cache_dir, to_template)
    return run_training(config, stage_dir, unet.build_model(config), train_iter, val_examples,
                        desc, members)
