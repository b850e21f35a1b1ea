"""Devices: one JAX CPU device per core, and the ('data',) mesh a batch is split over.

XLA's CPU backend runs each operation (a convolution, a fusion) on a single thread; a program keeps
several cores busy only where its graph has independent operations, which a U-Net's chain of layers
rarely has (profiled on 2 cores: each core idle about a third of the train step; BENCHMARKS.md). With
one CPU device per core the batch is split over the cores like over GPUs, every core runs its share,
and the step is the same computation (``tests/test_training.py`` checks one device against four).
On GPU/TPU nothing changes: the CPU devices are not the default backend's.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_cpu_cores(n: int | None = None) -> None:
    """Ask for ``n`` (default: one per core) JAX CPU devices. Call before JAX computes anything;
    does nothing when XLA_FLAGS already sets the host device count (the user's choice wins)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    jax.config.update("jax_num_cpu_devices", int(n or cpu_cores()))


def start_processes(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> None:
    """Join a run of several processes: ``jax.distributed.initialize`` with these (None: what it
    finds in a cluster's environment, as on Slurm, Open MPI or Cloud TPU). Call before JAX computes
    anything; a second call does nothing. Every process then sees every process's devices
    (``jax.devices()``), the batch is split over all of them, and each process reads its share."""
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def stop_processes() -> None:
    """Leave the run of several processes (waits for all of them); what follows is this
    process's own (the first process evaluates a run once training is done)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def primary_first(fn, *args, name: str):
    """``fn(*args)`` on the first process, then on the others once it has returned: what the
    first writes (the generated cases, the split, the preprocessed cache) the others then find
    instead of writing it at the same time. One process: just ``fn(*args)``."""
    if jax.process_count() == 1:
        return fn(*args)
    from jax.experimental import multihost_utils
    result = fn(*args) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(name)
    return fn(*args) if jax.process_index() != 0 else result


def data_mesh(batch_size: int, local: bool = False) -> Mesh:
    """A ('data',) mesh for a global batch of ``batch_size``: every device when several processes
    train together (the batch must divide over them: ``batch_error``); in one process, or over this
    process's devices with ``local``, the most devices the batch divides over (batch 2 on 4 CPU
    devices: 2 of them)."""
    devices = jax.local_devices() if local else jax.devices()
    if local or jax.process_count() == 1:
        n = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
        devices = devices[:n]
    return Mesh(np.array(devices), ("data",))


def batch_error(batch_size: int) -> str | None:
    """Why ``batch_size`` cannot be split over this run's devices, or None."""
    if batch_size < 1:
        return f"config.batch_size={batch_size} must be positive"
    n = jax.device_count()
    if jax.process_count() > 1 and batch_size % n:
        return (f"config.batch_size={batch_size} must be a multiple of the {n} devices of the "
                f"{jax.process_count()} processes")
    return None


# XLA's CPU backend at LLVM optimisation level 1 instead of its default. The convolutions and
# dots are library kernels, which the level does not touch; it sets how long LLVM works on the
# generated fusions. Inference's forward passes compile sooner at the same run time (the demo's
# first case some 5 s sooner; the paper network's forward 1.54 against 1.52 s, within noise);
# a train step compiles in a third to a half of the time but may run slower (the paper network's
# 6%), so it takes its level from ``config.train.cpu_opt_level`` (BENCHMARKS.md, 2026-12-04).
CPU_OPT_LEVEL = 1


def compiler_options(mesh: Mesh | None = None, level: int | None = CPU_OPT_LEVEL) -> dict | None:
    """``jax.jit``'s compiler options for a program on ``mesh`` (default: the default backend):
    XLA's CPU backend optimisation level ``level`` on a CPU; None (XLA's own) on GPU/TPU or for
    ``level`` None."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "cpu" or level is None:
        return None
    return {"xla_backend_optimization_level": int(level)}


def jit(fun, **kwargs):
    """``jax.jit(fun, **kwargs)`` with ``compiler_options()`` for the default backend, looked up at
    the first call: a module-level function jitted here does not start the backend on import
    (which ``jax.distributed.initialize`` must precede). Not inside a trace (a jit with compiler
    options cannot be nested in one)."""
    @functools.cache
    def jitted():
        return jax.jit(fun, compiler_options=compiler_options(), **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
        return jitted()(*args, **kw)
    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P("data"))


def steps_per_call(requested: int = 0) -> int:
    """Train steps per jitted call: ``requested``, or with 0 (auto) 4 on a CPU and 1 elsewhere.

    XLA's CPU runtime allocates a program's working memory afresh at every call and the kernel
    zero-fills each new page on first touch: a quarter of the paper network's CPU step went to
    page faults (BENCHMARKS.md). Several steps unrolled in one program share one allocation (and
    ``launch.py``'s huge pages make each fault cheaper: ``cowjax/huge_pages.py``); on GPU/TPU a
    call costs little and unrolling only lengthens compilation.
    """
    if requested:
        return requested
    return 4 if jax.default_backend() == "cpu" else 1


def use_matmul_precision(config) -> None:
    """Float32 matrix products and convolutions at ``config.train.matmul_precision`` from here on
    ("highest" for runs whose config predates the field): NVIDIA GPUs otherwise run them in TF32."""
    jax.config.update("jax_default_matmul_precision",
                      config.train.get("matmul_precision", "highest"))


def precision_note(config) -> str | None:
    """A line for a run about to compute float32 at "highest" on a GPU (None otherwise): true
    float32 convolutions ran the paper network's train step 10x slower than TF32 on an H200
    (BENCHMARKS.md, 2026-12-04), so the user learns the cost and the switch before a long run."""
    if (jax.default_backend() != "gpu" or config.model.dtype != "float32"
            or config.train.get("matmul_precision", "highest") != "highest"):
        return None
    return ("note: float32 convolutions at matmul precision 'highest' (true float32) are slow on "
            "a GPU: 10x TF32's step time on an H200 (BENCHMARKS.md). For speed: "
            "--config.train.matmul_precision=default (TF32) or --config.model.dtype=bfloat16")


# ``launch.py --windows_per_call``: inference windows per network call (0: ``window_batch``'s
# default). A process-wide setting, as the device count is.
WINDOWS_PER_CALL = 0


def window_batch(accelerator_batch: int = 8) -> int:
    """Windows per inference call: ``WINDOWS_PER_CALL`` when set, else one per local device on CPU
    (so every core runs one) and ``accelerator_batch`` on an accelerator; always rounded up to a
    multiple of the local devices (each device gets its share)."""
    n = jax.local_device_count()
    if WINDOWS_PER_CALL:
        return math.ceil(WINDOWS_PER_CALL / n) * n
    if jax.default_backend() == "cpu":
        return n
    return math.ceil(accelerator_batch / n) * n
