"""Where the JAX train step's time goes: a profiler trace of one jitted call of ``step_mse`` steps
(``--steps_per_call``, default the config's: 4 on a CPU), summed per
XLA op (fusion, convolution, copy, ...), biggest first.

  python benchmarks/profile_step.py --config=configs/paper.py:bench [--top=40] [--inference]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cowjax import bench, devices, huge_pages  # noqa: E402
from cowjax.model import unet  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--steps_per_call", type=int, default=None,
                        help="train steps per call (default: the config's)")
    parser.add_argument("--inference", action="store_true", help="profile the forward pass only")
    args = parser.parse_args()
    devices.use_cpu_cores()
    config = bench.load_config(args.config)
    if args.steps_per_call is not None:
        config.train.steps_per_call = args.steps_per_call
    model = unet.build_model(config)
    if args.inference:
        params = unet.init_params(model, jax.random.key(0))
        image = jax.random.normal(jax.random.key(1), (config.batch_size, *config.data.crop_shape, 1))
        f = jax.jit(lambda p, x: model.apply({"params": p}, x))
        run = lambda: jax.block_until_ready(f(params, image))  # noqa: E731
    else:
        # The step training runs, with the loss PyTorch's reference uses.
        step, state, batches, _ = bench.compiled_train_step(model, config, bench.mse_loss)
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batches)
            jax.block_until_ready(metrics["loss"])
    run()
    t = time.perf_counter()
    run()
    print(f"untraced call: {time.perf_counter() - t:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t = time.perf_counter()
        run()
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        xspace = next(Path(tmp).rglob("*.xplane.pb")).read_bytes()
    data = jax.profiler.ProfileData.from_serialized_xspace(xspace)
    # XLA's worker threads ("tf_XLAEigen...") record one event per executed op (fusion, dot, ...).
    ops = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):
                for ev in line.events:
                    if ev.name != "ThunkExecutor::Execute":
                        ops[ev.name] += ev.duration_ns / 1e9
    kinds = collections.Counter()
    for name, sec in ops.items():
        kinds[name.split(".")[0]] += sec
    print(f"traced call: {wall:.3f} s; per op kind (thread seconds, two threads):")
    for name, sec in kinds.most_common(15):
        print(f"{sec:8.3f} s  {name}")
    print("per op (look the names up in an XLA_FLAGS=--xla_dump_to=DIR dump):")
    for name, sec in ops.most_common(args.top):
        print(f"{sec:8.3f} s  {name}")


if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()   # as launch.py runs the step
    main()
