"""Issue 8: a run killed at any moment and started again with the same command ends with the same
numbers as a run never interrupted.

Run as a script (``python tests/test_reliability.py WORKDIR``) it is that command: the stand-in
model of ``test_training`` on deterministic batches, 12 steps, checkpoints every 3. With
``KILL_IN_SAVE_AT=N`` it SIGKILLs itself while writing the checkpoint of step N.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # starts, kills and restarts training processes

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 12


def _child(workdir):
    import orbax.checkpoint as ocp
    import conftest as tt
    from cowjax.errors import CowjaxError
    from cowjax.training import train

    kill_at = int(os.environ.get("KILL_IN_SAVE_AT", "0"))
    if kill_at:
        json_save = ocp.JsonCheckpointHandler.async_save

        async def async_save(self, directory, item=None, args=None):
            if (args.item if args is not None else item).get("step") == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)    # params written, meta not: a torn write
            return await json_save(self, directory, item=item, args=args)
        ocp.JsonCheckpointHandler.async_save = async_save

    class SlowBatches(tt.RandomBatches):
        def __next__(self):
            time.sleep(0.15)                         # room to signal the run between steps
            return super().__next__()

    config = tt.tiny_config(num_train_steps=NUM_STEPS, checkpoint_every_steps=3,
                            eval_every_steps=4)
    # Calls of up to 2 steps (1-2, 3, 4, 5-6, 7-8, 9, 10-11, 12): a SIGTERM after the checkpoint
    # of step 9 stops the run at 11, before its last call.
    config.train.steps_per_call = 2
    try:
        train.run_training(config, workdir, tt.TinyNet(), SlowBatches(config),
                           tt.val_examples(config))
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _start(workdir, **env):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "JAX_PLATFORMS": "cpu", **env}
    return subprocess.Popen([sys.executable, __file__, str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")


def _metrics(workdir):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "steps_per_s"} for x in lines]


def _final_params(workdir):
    import conftest as tt
    from cowjax.training import checkpoint as ckpt
    from cowjax.training import state as state_lib
    config = tt.tiny_config(num_train_steps=NUM_STEPS)
    model = tt.TinyNet()
    abstract = state_lib.abstract_state(model, config, state_lib.make_optimizer(config))
    checkpoints = ckpt.Checkpoints(workdir, 1)
    state, meta = checkpoints.restore_latest(abstract)
    assert meta["step"] == NUM_STEPS
    return [np.asarray(x) for x in __import__("jax").tree.leaves(state["params"])]


def test_sigkill_mid_checkpoint_and_sigterm_then_resume_equals_uninterrupted(tmp_path):
    reference = _start(tmp_path / "reference")
    # 1. SIGKILL while the checkpoint of step 9 is being written.
    killed = _start(tmp_path / "run", KILL_IN_SAVE_AT="9")
    assert killed.wait(timeout=120) == -signal.SIGKILL, killed.communicate()[1][-2000:]
    assert reference.wait(timeout=120) == 0, reference.communicate()[1][-2000:]
    assert not (tmp_path / "run" / "checkpoints" / "9").exists()
    assert list((tmp_path / "run" / "checkpoints").glob("9.*"))     # the torn write is there
    # 2. The same command again (it resumes at step 6); SIGTERM once it has redone step 9.
    terminated = _start(tmp_path / "run")
    deadline = time.time() + 90
    while not (tmp_path / "run" / "checkpoints" / "9").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    terminated.send_signal(signal.SIGTERM)
    _, err = terminated.communicate(timeout=60)
    assert terminated.returncode == 2, err[-2000:]
    assert "SIGTERM at step" in err and "checkpoint saved" in err
    stopped = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert 9 <= stopped < NUM_STEPS
    assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()
    # 3. Once more, to the end.
    finished = _start(tmp_path / "run")
    assert finished.wait(timeout=120) == 0, finished.communicate()[1][-2000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*tmp*"))  # cleaned up

    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "reference")
    for a, b in zip(_final_params(tmp_path / "run"), _final_params(tmp_path / "reference")):
        np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
    _child(sys.argv[1])
