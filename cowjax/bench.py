"""Benchmarks: model size, train-step and inference speed, data pipeline, synthetic data, memory.

  python launch.py --mode=bench --config=configs/paper.py:bench --parts=model,step,inference
  python benchmarks/torch_reference.py --config=configs/paper.py:bench   # the same network in PyTorch
  python benchmarks/profile_step.py --config=configs/paper.py:bench      # where the step's time goes
  python launch.py --mode=bench --config=configs/demo.py --parts=sweep   # a sweep against its members

``sweep`` times the step of ``config.sweep``'s members trained together (without a sweep: the four
weighting strategies), each way they can share it (``config.train.sweep_impl``), against the sum
of the members' own steps.

Side by side with PyTorch, name ``step_mse`` (the loss both have; the default parts time ``step``, the
project's own loss): ``--parts=model,step_mse,inference`` for both commands.

Each part prints one or more JSON lines (``{"part": ..., ...}``); a part whose module is not there
prints ``{"part": ..., "skipped": why}``. Times are medians of repeated calls after compilation.
The machine is shared by whatever else runs: compare ratios measured in one run, not absolute numbers.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cowjax import config_check, devices, weighting
from cowjax.errors import CowjaxError
from cowjax.model import unet

PARTS = ("model", "step", "step_mse", "sweep", "inference", "pipeline", "synthetic", "memory")
# Dense peak FLOP/s by device kind and arithmetic (vendor datasheets): "float32" is the plain rate
# that matmul precision "highest" runs at, "tf32" the tensor-core rate NVIDIA GPUs run float32
# convolutions at under "high" and "default".
PEAK_FLOPS = {"NVIDIA H200": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989e12},
              "NVIDIA H100 80GB HBM3": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989e12},
              "NVIDIA A100-SXM4-80GB": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12}}


def _fraction_of_peak(flops_per_s, config):
    """Achieved over the device's peak for the config's arithmetic (None where the peak is not
    known, as on a CPU)."""
    dtype = config.model.dtype
    if dtype == "float32" and config.train.get("matmul_precision", "highest") != "highest":
        dtype = "tf32" if jax.devices()[0].platform == "gpu" else dtype
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind, {}).get(dtype)
    return round(flops_per_s / peak, 4) if flops_per_s and peak else None


def _peak_device_mb():
    stats = jax.devices()[0].memory_stats() or {}      # None on a CPU
    peak = stats.get("peak_bytes_in_use")
    return round(peak / 2**20) if peak else None


# A typical whole MRA field of view around the circle of Willis (mm) for the inference timing.
WHOLE_FOV_MM = (80.0, 80.0, 60.0)


def _emit(part: str, **fields) -> None:
    print(json.dumps({"part": part, "framework": "jax", **fields}), flush=True)


def load_config(spec: str):
    """``configs/x.py[:arg]`` -> its ConfigDict, for the benchmark scripts outside absl."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("cowjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(lowered) -> float | None:
    """The FLOPs of a lowered program, all devices together, as written (XLA's cost analysis
    before the backend's passes: the same count on every device; after them a GPU's cuDNN
    convolutions are not counted)."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mse_loss(outputs, batch, config):
    """Mean squared output, the loss ``benchmarks/torch_reference.py`` uses too (same cost model)."""
    del batch, config
    terms = {k: jnp.mean(jnp.square(v)) for k, v in outputs.items()}
    return sum(terms.values()), terms


def compiled_train_step(model, config, loss_fn=None, members=None):
    """The step training runs (``train.make_train_step``: the config's optimiser, clipping and
    non-finite guard, chained ``devices.steps_per_call`` steps per call), compiled for one random
    batch (``data.batch.random_batch``) on ``devices.data_mesh``: (compiled, state, batches, mesh).
    ``loss_fn`` replaces the project's loss (``mse_loss`` for the side-by-side with PyTorch);
    ``members`` (a sweep's member configs) makes it the sweep's step, on their stacked states."""
    lowered, state, batches, mesh = lowered_train_step(model, config, loss_fn, members)
    return lowered.compile(), state, batches, mesh


def lowered_train_step(model, config, loss_fn=None, members=None):
    """``compiled_train_step`` before compilation: (lowered, state, batches, mesh)."""
    from cowjax.data import batch as batch_lib
    from cowjax.training import state as state_lib
    from cowjax.training import sweep, train

    tx = state_lib.make_optimizer(config)
    mesh = devices.data_mesh(config.batch_size)
    per_call = devices.steps_per_call(config.train.steps_per_call)
    step = train.compile_train_step(train.make_train_step(model, config, tx, loss_fn, members),
                                    mesh, config.train.get("cpu_opt_level"))
    params = unet.init_params(model, jax.random.key(config.seed))
    states = [state_lib.create_state(params, tx, c) for c in members or [config]]
    state = states[0] if members is None else sweep.stack(states)
    state = jax.device_put(state, devices.replicated(mesh))
    batch = train.to_device(batch_lib.random_batch(config, seed=1), mesh)
    batches = (batch,) * per_call
    return step.lower(state, batches), state, batches, mesh


def _time_step(model, config, repeats, loss_fn=None, members=None) -> dict:
    """Compile and time the train step: {"step_s" (median, per step), "compile_s", "flops" (per
    step, all devices; None where XLA does not say), "devices", "per_call"}."""
    per_call = devices.steps_per_call(config.train.steps_per_call)
    t = time.perf_counter()
    lowered, state, batches, mesh = lowered_train_step(model, config, loss_fn, members)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops = _flops(lowered)
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batches)
        jax.block_until_ready(metrics["loss"])

    run()  # first call: allocation and warm-up
    return {"step_s": median_time(run, repeats) / per_call, "compile_s": compile_s,
            "flops": flops / per_call if flops else None, "devices": mesh.size,
            "per_call": per_call}


def _bench_step(part, model, config, shape, repeats, use_project_loss):
    loss_name, loss_fn = ("total_loss", None) if use_project_loss else ("mse", mse_loss)
    timed = _time_step(model, config, repeats, loss_fn)
    sec, flops = timed["step_s"], timed["flops"]
    voxels = config.batch_size * int(np.prod(shape))
    _emit(part, loss=loss_name, conv_impl=config.model.conv_impl, dtype=config.model.dtype,
          matmul_precision=config.train.get("matmul_precision", "highest"),
          batch=config.batch_size, devices=timed["devices"], input=list(shape),
          steps_per_call=timed["per_call"], step_s=round(sec, 4), steps_per_s=round(1 / sec, 3),
          voxels_per_s=round(voxels / sec), compile_s=round(timed["compile_s"], 1),
          flops_per_step=flops, gflops_per_s=round(flops / sec / 1e9, 1) if flops else None,
          fraction_of_peak=_fraction_of_peak(flops / sec if flops else None, config),
          peak_device_mb=_peak_device_mb())
    return sec


def _bench_sweep(model, config, repeats):
    """A sweep's step (``config.sweep``; without one, the four weighting strategies), each way the
    members can share it (``config.train.sweep_impl``), against the single steps of its members,
    all compiled and timed in this process."""
    from cowjax.config_defaults import sweep_configs
    from cowjax.training import sweep
    config = config.copy_and_resolve_references()
    if not sweep.is_sweep(config):
        config.sweep.weighting = tuple(weighting.STRATEGIES)
    members = sweep_configs(config)
    single = {name: _time_step(model, c, repeats)["step_s"] for name, c in members.items()}
    total = sum(single.values())
    swept, compile_s = {}, {}
    for impl in ("unroll", "vmap"):
        config.train.sweep_impl = impl
        timed = _time_step(model, config, repeats, members=list(members.values()))
        swept[impl], compile_s[impl] = timed["step_s"], round(timed["compile_s"], 1)
    config.train.sweep_impl = "auto"
    _emit("sweep", members=len(members), settings=sweep.settings(config, members),
          batch=config.batch_size, input=list(config.data.crop_shape), devices=timed["devices"],
          steps_per_call=timed["per_call"],
          single_step_s={n: round(v, 4) for n, v in single.items()},
          sum_single_step_s=round(total, 4),
          sweep_step_s={k: round(v, 4) for k, v in swept.items()},
          speedup={k: round(total / v, 2) for k, v in swept.items()}, auto=sweep.impl(config),
          compile_s=compile_s, device=jax.devices()[0].device_kind)


def whole_volume_shape(config) -> tuple[int, int, int]:
    """The typical whole field of view at the config's spacing, rounded up to the model's divisor."""
    factor = 2 ** (len(config.model.widths) - 1)
    vox = np.ceil(np.asarray(WHOLE_FOV_MM) / np.asarray(config.data.spacing) / factor) * factor
    return tuple(int(v) for v in vox)


def _spatial_mesh(model, shape):
    """The local devices a batch-1 volume of ``shape`` can be split over along its first axis
    (XLA partitions the convolutions, exchanging the halo): as many as keep every device's slab a
    multiple of the network's pooling factor."""
    factor = 2 ** (len(model.widths) - 1)
    n = max(k for k in range(1, jax.local_device_count() + 1) if shape[0] % (k * factor) == 0)
    return jax.sharding.Mesh(np.array(jax.local_devices()[:n]), ("data",))


def _bench_inference(model, params, config, repeats):
    for name, shape in (("crop", tuple(config.data.crop_shape)),
                        ("whole_volume", whole_volume_shape(config))):
        mesh = _spatial_mesh(model, shape)
        # Compiled as prediction compiles (``devices.jit``: XLA's CPU level 1 on a CPU).
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x),
                          compiler_options=devices.compiler_options(mesh))
        x = jax.random.normal(jax.random.key(2), (1, *shape, 1), jnp.float32)
        along_x = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
        x = jax.device_put(x, along_x)
        params = jax.device_put(params, devices.replicated(mesh))
        lowered = forward.lower(params, x)
        compiled = lowered.compile()
        flops = _flops(lowered)

        def run():
            jax.block_until_ready(compiled(params, x))

        run()
        sec = median_time(run, repeats if name == "crop" else min(repeats, 2))
        _emit("inference", volume=name, input=list(shape), spacing=list(config.data.spacing),
              conv_impl=config.model.conv_impl, dtype=config.model.dtype,
              matmul_precision=config.train.get("matmul_precision", "highest"),
              devices=mesh.size, forward_s=round(sec, 4),
              voxels_per_s=round(int(np.prod(shape)) / sec),
              gflops_per_s=round(flops / sec / 1e9, 1) if flops else None,
              fraction_of_peak=_fraction_of_peak(flops / sec if flops else None, config))


def _bench_pipeline(config, step_s, batches):
    try:
        from cowjax.data import pipeline
        from cowjax.registration import intensity
        from cowjax.training import train
    except ImportError:
        return _emit("pipeline", skipped="cowjax.data.pipeline is not there")
    small = config.copy_and_resolve_references()
    small.data.num_cases = min(int(config.data.num_cases), 6)
    with tempfile.TemporaryDirectory() as tmp:
        small.data.data_dir = f"{tmp}/data"
        split = pipeline.prepare_data(small, f"{tmp}/run")
        small = train.resolve_config(small, f"{tmp}/run", split)    # the template, if registered
        t = time.perf_counter()
        # Preprocesses (registers) every training case first, as training does.
        it = pipeline.train_loader(small, split["train"], f"{tmp}/cache",
                                   intensity.template_registration(small.data))
        first_s = time.perf_counter() - t
        # From the first batch on, so read-ahead buffers cannot hide the production rate.
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        per_s = batches / (time.perf_counter() - t)
    _emit("pipeline", cases=small.data.num_cases, workers=int(config.data.num_workers),
          setup_s=round(first_s, 2), batches_per_s=round(per_s, 2),
          step_consumes_per_s=round(1 / step_s, 2) if step_s else None,
          keeps_up=bool(per_s >= 1 / step_s) if step_s else None)


def _bench_synthetic(config, cases):
    try:
        from cowjax.data import synthetic
    except ImportError:
        return _emit("synthetic", skipped="cowjax.data.synthetic is not there")
    spacing = tuple(config.data.synthetic_spacing)
    t = time.perf_counter()
    for i in range(cases):
        synthetic.generate_case(config.data.synthetic_seed, i, spacing=spacing)
    sec = time.perf_counter() - t
    _emit("synthetic", spacing=list(spacing), cases=cases, cases_per_s=round(cases / sec, 3))


def run_bench(config, parts=PARTS, repeats: int = 5) -> None:
    """Measure the chosen ``parts`` (see ``PARTS``) for ``config`` and print JSON lines."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CowjaxError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    config_check.validate(config)
    devices.use_matmul_precision(config)   # as training and prediction run float32
    model = unet.build_model(config)
    shape = tuple(int(n) for n in config.data.crop_shape)
    params = unet.init_params(model, jax.random.key(config.seed))
    dev = jax.devices()[0]
    if "model" in parts:
        _emit("model", widths=list(model.widths), norm=model.norm, dtype=model.dtype,
              heatmap_stride=model.heatmap_stride, input=[config.batch_size, *shape, 1],
              parameters=int(sum(p.size for p in jax.tree.leaves(params))),
              device=dev.device_kind, platform=dev.platform, devices=jax.device_count())
    step_s = None
    if "step" in parts:
        step_s = _bench_step("step", model, config, shape, repeats, True)
    if "step_mse" in parts:
        step_s = _bench_step("step_mse", model, config, shape, repeats, False)
    if "sweep" in parts:
        _bench_sweep(model, config, repeats)
    if "inference" in parts:
        _bench_inference(model, params, config, repeats)
    if "pipeline" in parts:
        _bench_pipeline(config, step_s, batches=10 * repeats)
    if "synthetic" in parts:
        _bench_synthetic(config, cases=2)
    if "memory" in parts:
        # ru_maxrss is in KiB on Linux.
        _emit("memory", peak_host_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              peak_device_mb=_peak_device_mb(), device=dev.device_kind)
