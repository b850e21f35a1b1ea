"""Issue 17: several processes train one run. Two CPU processes on localhost (each one JAX device,
each reading half of every batch) give the model one process of two devices gives, evaluate on the
first process,
and both killed part-way and started again give the model of an uninterrupted two-process run.

Run as a script (``python tests/test_multiprocess.py KILL_AT LAUNCH_ARGS...``) it is ``launch.py``
with LAUNCH_ARGS; with KILL_AT > 0 the process SIGKILLs itself while writing its data-iterator
position into the checkpoint of step KILL_AT (every process does: both die mid-save).
"""

import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # starts seven training processes

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
CONFIG = ["--config=configs/test.py", f"--config.num_train_steps={STEPS}",
          "--config.checkpoint_every_steps=2", "--config.eval_every_steps=4",
          "--config.train.keep_checkpoints=2"]


def _child(kill_at: int, args: list[str]) -> None:
    if kill_at:
        import grain
        save = grain.checkpoint.CheckpointHandler.save

        def save_or_die(self, directory, item=None, args=None):
            if Path(str(directory)).parent.name.startswith(f"{kill_at}."):   # <step>.orbax-...-tmp
                os.kill(os.getpid(), signal.SIGKILL)
            return save(self, directory, item=item, args=args)
        grain.checkpoint.CheckpointHandler.save = save_or_die
    sys.argv = [str(ROOT / "launch.py"), *args]
    runpy.run_path(str(ROOT / "launch.py"), run_name="__main__")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(workdir, processes: int = 2, kill_at: int = 0, extra=("--noeval",)) -> list[tuple]:
    """Train ``workdir`` with the test config on two CPU devices: in ``processes`` processes (of
    2 // processes devices each); [(exit status, stderr)] per process."""
    devices = 2 // processes
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [*CONFIG, f"--workdir={workdir}", *extra]
    if processes > 1:
        port = _free_port()
        args += [f"--coordinator=localhost:{port}", f"--num_processes={processes}"]
    procs = [subprocess.Popen([sys.executable, __file__, str(kill_at), *args]
                              + ([f"--process_id={i}"] if processes > 1 else []),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, encoding="utf-8", errors="replace")
             for i in range(processes)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:     # one died, the other waits for it: end both
            for q in procs:
                q.kill()
            _, err = p.communicate()
        results.append((p.returncode, err))
    return results


def _ok(results):
    for code, err in results:
        assert code == 0, err[-3000:]


def _params(workdir):
    import jax
    from cowjax.model import unet
    from cowjax.training import checkpoint
    from cowjax.training import state as state_lib
    config, _ = checkpoint.load_for_inference(workdir)
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here),
                            state_lib.abstract_state(unet.build_model(config), config,
                                                     state_lib.make_optimizer(config)))
    ckpts = checkpoint.Checkpoints(workdir, 2)
    try:
        state, meta = ckpts.restore_latest(abstract)
    finally:
        ckpts.close()
    assert meta["step"] == STEPS
    return state["params"]


def _landmarks(workdir, image, affine):
    from cowjax.inference.predictor import Predictor
    return Predictor.from_workdir(workdir, tta=False).predict(image, affine).landmarks


def _max_diff(a, b) -> float:
    import jax
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_train_as_one_and_resume_exactly_after_both_are_killed(tmp_path):
    from cowjax.data import io

    _ok(_run(tmp_path / "one", processes=1))
    two = _run(tmp_path / "two", processes=2, extra=())          # trains, then evaluates
    _ok(two)
    assert (tmp_path / "two" / "eval" / "test" / "report.md").is_file()   # by the first process

    # Both killed while saving step 6 (step 4 is the last whole checkpoint), then both again.
    killed = _run(tmp_path / "killed", processes=2, kill_at=6)
    assert [code for code, _ in killed] == [-signal.SIGKILL] * 2
    steps = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps == [2, 4]
    _ok(_run(tmp_path / "killed", processes=2))

    # Each process saved its own data-iterator position.
    positions = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / str(STEPS)
                                        / "iterator").glob("process_*.json"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]

    # One process of two devices and two of one device each split every batch alike and sum the
    # same two gradients: the same numbers (measured bit for bit, also at demo size).
    one, two, resumed = (_params(tmp_path / n) for n in ("one", "two", "killed"))
    assert _max_diff(one, two) < 1e-6
    assert _max_diff(two, resumed) < 1e-6
    case = io.load_case(sorted((tmp_path / "data").glob("*/case*"))[0])
    image, affine = np.asarray(case.image, np.float32), np.asarray(case.affine)
    lm = {n: _landmarks(tmp_path / n, image, affine) for n in ("one", "two", "killed")}
    assert np.max(np.linalg.norm(lm["one"] - lm["two"], axis=-1)) < 0.05
    assert np.max(np.linalg.norm(lm["two"] - lm["killed"], axis=-1)) < 0.001


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2:])
