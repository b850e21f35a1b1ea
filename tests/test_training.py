"""The train step, data parallelism, checkpoint/resume and non-finite handling, on a tiny stand-in
model and deterministic random batches (the real model and pipeline have their own tests).

Run as a script (``python tests/test_training.py OUT N_STEPS``) it trains the stand-in for N steps in
a fresh workdir and writes the final params to OUT (.npz): the 1-vs-4-device test runs it twice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cowjax import devices
from cowjax.data import batch as batch_lib
from cowjax.errors import CowjaxError
from cowjax.model import unet
from cowjax.training import checkpoint as ckpt
from cowjax.training import state as state_lib
from cowjax.training import train

from configs import test as test_config
from conftest import ROOT, RandomBatches, TinyNet, read_metrics, tiny_config, val_examples
from conftest import train_stand_in as run


def test_loss_falls_when_overfitting_one_batch():
    config = tiny_config()
    config.loss.heatmap = "softmax_ce"
    config.model.heatmap_stride = 2
    model, tx = TinyNet(2), state_lib.make_optimizer(config)
    state = state_lib.create_state(state_lib.init_params(model, config), tx, config)
    mesh = train.make_mesh(config.batch_size)
    step = train.compile_train_step(train.make_train_step(model, config, tx), mesh)
    batch = train.to_device(batch_lib.random_batch(config), mesh)
    losses = []
    for _ in range(12):
        state, metrics = step(state, (batch,))
        losses.append(float(metrics["loss"][0]))
    assert int(state["step"]) == 12
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.97 * losses[0], losses


def test_cpu_opt_level_compiles_the_same_steps():
    # XLA's CPU optimisation level (config.train.cpu_opt_level) is a compile-time setting: the
    # steps it compiles compute what the default level's do, to float rounding.
    config = tiny_config()
    model, tx = TinyNet(), state_lib.make_optimizer(config)
    mesh = train.make_mesh(config.batch_size)
    batches = tuple(train.to_device(batch_lib.random_batch(config, index=i), mesh) for i in range(3))
    losses = {}
    for level in (None, 1):
        params = state_lib.init_params(model, config)     # the state is donated: a new one each
        assert devices.compiler_options(mesh, level) == (
            None if level is None else {"xla_backend_optimization_level": level})
        step = train.compile_train_step(train.make_train_step(model, config, tx), mesh, level)
        state, metrics = step(state_lib.create_state(params, tx, config), batches)
        losses[level] = np.asarray(metrics["loss"])
    np.testing.assert_allclose(losses[1], losses[None], rtol=1e-5)
    assert losses[1][-1] < losses[1][0]


def test_train_call_makes_no_host_device_transfers():
    # State and batches on the devices: a call of k steps reads and writes nothing on the host.
    config = tiny_config()
    model, tx = TinyNet(), state_lib.make_optimizer(config)
    mesh = train.make_mesh(config.batch_size)
    state = jax.device_put(state_lib.create_state(state_lib.init_params(model, config), tx, config),
                           devices.replicated(mesh))
    step = train.compile_train_step(train.make_train_step(model, config, tx), mesh)
    batches = tuple(train.to_device(batch_lib.random_batch(config, index=i), mesh) for i in range(3))
    with jax.transfer_guard("disallow"):
        state, metrics = step(state, batches)
        jax.block_until_ready((state, metrics))
    assert int(state["step"]) == 3 and metrics["loss"].shape == (3,)
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Tt]ransfer"):
        step(state, (batch_lib.random_batch(config),))          # the guard does catch a host batch


def test_resume_continues_at_the_right_step_and_equals_an_uninterrupted_run(tmp_path):
    full = run(tiny_config(num_train_steps=4), tmp_path / "full")
    run(tiny_config(num_train_steps=2), tmp_path / "resumed")
    assert ckpt.Checkpoints(tmp_path / "resumed", 1).latest_step() == 2
    resumed = run(tiny_config(num_train_steps=4), tmp_path / "resumed")
    assert resumed["loss"] == full["loss"]                 # step 4 from restored state + iterator
    assert resumed["val_mre_mm"] == full["val_mre_mm"]
    got, want = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "full")
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert got == want
    assert (tmp_path / "resumed" / "best").is_dir()


def test_steps_per_call_gives_the_same_training(tmp_path):
    # Several steps unrolled in one call (devices.steps_per_call) are the same steps; calls end on
    # validation and checkpoint steps (here 1-3, 4-5, 6 with 3 per call).
    runs = {}
    for k in (1, 3):
        config = tiny_config(num_train_steps=6, eval_every_steps=4, checkpoint_every_steps=5)
        config.train.steps_per_call = k
        runs[k] = (run(config, tmp_path / str(k)), read_metrics(tmp_path / str(k)))
        assert ckpt.Checkpoints(tmp_path / str(k), 1).latest_step() == 6
    (one, one_log), (three, three_log) = runs[1], runs[3]
    assert [(m["step"], m["split"]) for m in three_log] == [(m["step"], m["split"]) for m in one_log]
    assert [m["step"] for m in one_log if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one_log, three_log):
        assert a.keys() == b.keys()
        for key in a.keys() - {"split"}:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(three["val_mre_mm"], one["val_mre_mm"], rtol=1e-5)


def test_seed_decides_the_initial_params_and_is_recorded(tmp_path):
    # (Same config and seed -> identical curves is checked by the resume test above.)
    model = TinyNet()
    p0, p0_again, p7 = (state_lib.init_params(model, tiny_config(seed=s)) for s in (0, 0, 7))
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p0, p0_again)
    differ = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p0, p7)
    assert all(jax.tree.leaves(same))
    assert any(jax.tree.leaves(differ))
    train.save_config(tiny_config(seed=7), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7


@pytest.mark.parametrize("which", ["stand-in", "unet"])
def test_initial_params_are_those_of_model_init_run_op_by_op(which):
    # init_params compiles the draws in one program at a low optimisation level; the values must be
    # those of flax's init run eagerly (what the shipped ready model was trained from).
    config = test_config.get_config()
    model = TinyNet() if which == "stand-in" else unet.build_model(config)
    key = jax.random.key(config.seed)
    eager = model.init(key, jnp.zeros((1, *config.data.crop_shape, 1), jnp.float32))["params"]
    compiled = state_lib.init_params(model, config)
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(num_train_steps=6, checkpoint_every_steps=2, eval_every_steps=100)
    with pytest.raises(CowjaxError, match=r"step 4: the loss or a gradient is not finite"):
        run(config, tmp_path, nan_at=3)                     # batch index 3 is step 4
    assert ckpt.Checkpoints(tmp_path, 1).latest_step() == 2


def test_nonfinite_skip_mode_counts_and_goes_on(tmp_path):
    config = tiny_config(num_train_steps=4, eval_every_steps=3, checkpoint_every_steps=2)
    config.train.nonfinite = "skip"
    summary = run(config, tmp_path, nan_at=1)
    assert np.isfinite(summary["loss"])
    metrics = read_metrics(tmp_path)
    assert [m["skipped"] for m in metrics if m["split"] == "train"] == [0, 1, 1, 1]
    # Best by validation MRE, including evaluations between checkpoint steps (step 3).
    val = {m["step"]: m["mre_mm"] for m in metrics if m["split"] == "val"}
    assert sorted(val) == [3, 4]
    assert ckpt.Checkpoints(tmp_path, 1).best.latest_step() == min(val, key=val.get)


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path):
    run(tiny_config(num_train_steps=1), tmp_path)
    config = tiny_config(num_train_steps=2)
    with pytest.raises(CowjaxError, match="model shapes differ"):
        train.run_training(config, tmp_path, TinyNet(width=5), RandomBatches(config),
                           val_examples(config))


def test_config_round_trips_through_json():
    config = test_config.get_config()
    again = ckpt.config_from_dict(ckpt.config_to_dict(config))
    assert again.data.crop_shape == tuple(config.data.crop_shape)
    assert again.to_json() == config.to_json()


def test_load_for_inference_best_else_latest_and_clear_errors(tmp_path):
    from cowjax.model import unet
    with pytest.raises(CowjaxError, match="no checkpoint found"):
        ckpt.load_for_inference(tmp_path)
    config = tiny_config(num_train_steps=1)
    config.model.widths = (4, 8)
    model = unet.build_model(config)
    train.run_training(config, tmp_path, model, RandomBatches(config), val_examples(config))
    loaded_config, params = ckpt.load_for_inference(tmp_path)
    assert loaded_config.to_json() == config.to_json()
    abstract = state_lib.abstract_state(model, config, state_lib.make_optimizer(config))
    latest, _ = ckpt.Checkpoints(tmp_path, 1).restore_latest(abstract)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(latest["params"])):
        np.testing.assert_array_equal(a, b)
    # A checkpoint made for another anatomy (20 landmarks) is refused, naming the checkpoint.
    for meta_file in tmp_path.glob("*/1/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["anatomy"]["landmarks"].append("extra")
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(CowjaxError, match="20 landmarks"):
        ckpt.load_for_inference(tmp_path)


@pytest.mark.parametrize("strategy", ["uncertainty", "dwa"])
def test_weighting_strategies_log_their_weights_and_resume_exactly(strategy, tmp_path):
    """What a strategy learns or tracks is in the checkpoint: stopped at step 2 and resumed, the run
    logs the same losses and weights as one never stopped; the weights move, and are drawn."""
    def config(steps):
        c = tiny_config(num_train_steps=steps, checkpoint_every_steps=2, eval_every_steps=100,
                        log_every_steps=1)
        c.loss.update(weighting=strategy, dwa_window=1, weighting_lr=0.2)
        return c
    run(config(5), tmp_path / "full")
    run(config(2), tmp_path / "resumed")
    run(config(5), tmp_path / "resumed")
    train_log = [m for m in read_metrics(tmp_path / "resumed") if m["split"] == "train"]
    assert train_log == [m for m in read_metrics(tmp_path / "full") if m["split"] == "train"]
    weights = np.array([[m[f"weight_{t}"] for t in ("heatmap", "segmentation", "consistency")]
                        for m in train_log])
    assert np.all(np.isfinite([m["loss"] for m in train_log])) and np.all(weights > 0)
    assert np.ptp(weights[:, 0]) > 1e-4                       # the weights are not fixed
    assert (tmp_path / "full" / "curves.png").is_file()


@pytest.mark.slow
def test_gradnorm_trains_the_network_and_balances_at_its_shared_layer(tmp_path):
    from cowjax.model import unet
    config = tiny_config(num_train_steps=3, eval_every_steps=100, log_every_steps=1)
    config.model.widths = (4, 8)
    config.loss.update(weighting="gradnorm", weighting_lr=0.2)
    train.run_training(config, tmp_path, unet.build_model(config), RandomBatches(config),
                       val_examples(config))
    train_log = [m for m in read_metrics(tmp_path) if m["split"] == "train"]
    terms = [k.removeprefix("weight_") for k in train_log[0] if k.startswith("weight_")]
    assert len(terms) == 5 and all(np.isfinite(m["loss"]) for m in train_log)
    first, last = (np.array([m[f"weight_{t}"] for t in terms]) for m in (train_log[0], train_log[-1]))
    np.testing.assert_allclose(first, 1.0)                     # GradNorm starts uniform
    np.testing.assert_allclose(last.sum(), len(terms), rtol=1e-5)   # and keeps the sum K
    assert np.abs(last - 1).max() > 1e-3


def _train_and_dump(out, num_steps):
    config = tiny_config(num_train_steps=int(num_steps), batch_size=4, eval_every_steps=100)
    workdir = Path(out).with_suffix(".workdir")
    model, tx = TinyNet(1), state_lib.make_optimizer(config)
    train.run_training(config, workdir, model, RandomBatches(config), val_examples(config))
    mgr = ckpt.Checkpoints(workdir, 1)
    abstract = state_lib.abstract_state(model, config, tx)
    state, _ = mgr.restore_latest(abstract)
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    np.savez(out, devices=jax.device_count(),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


@pytest.mark.slow
def test_one_device_equals_four(tmp_path):
    results = []
    for n in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"params{n}.npz"
        subprocess.run([sys.executable, __file__, str(out), "2"], env=env, check=True,
                       capture_output=True, timeout=120)
        results.append(np.load(out))
    one, four = results
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    keys = [k for k in one.files if k != "devices"]
    assert keys
    for k in keys:
        np.testing.assert_allclose(one[k], four[k], rtol=1e-4, atol=1e-6, err_msg=k)


if __name__ == "__main__":
    _train_and_dump(*sys.argv[1:])
