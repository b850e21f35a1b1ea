"""The plain-dict train state and the optimizer.

State: ``{"step": int32 [], "params": pytree, "opt_state": pytree, "nonfinite": int32 [],
"weighting": dict}``; ``nonfinite`` counts the updates skipped because the loss or a gradient was
not finite; ``weighting`` is what the loss weighting strategy learns or tracks
(``weighting.init``). A sweep's state is its members' stacked on a leading axis
(``sweep.stack``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cowjax import weighting
from cowjax.model import unet


def learning_rate_schedule(config):
    """config.optim.schedule: "constant" (after an optional linear warmup) or "cosine" (warmup,
    then cosine decay to 0 at ``num_train_steps``)."""
    o = config.optim
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, o.warmup_steps, max(config.num_train_steps, o.warmup_steps + 1))
    if o.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
                                     optax.constant_schedule(o.learning_rate)], [o.warmup_steps])
    return o.learning_rate


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam(b1, b2) on the schedule, after global-norm clipping when config.optim.grad_clip > 0."""
    o = config.optim
    adam = optax.adam(learning_rate_schedule(config), b1=o.b1, b2=o.b2)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam) if o.grad_clip else adam


def init_params(model, config):
    """Parameters from ``config.seed`` (float32 whatever the compute dtype)."""
    return unet.init_params(model, jax.random.key(config.seed), config.data.crop_shape)


def create_state(params, tx, config) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "nonfinite": jnp.zeros((), jnp.int32),
            "weighting": weighting.init(weighting.settings(config))}


def abstract_state(model, config, tx) -> dict:
    """Shapes and dtypes of the state, without computing it (for restoring checkpoints)."""
    params = unet.param_shapes(model, config.data.crop_shape)
    return jax.eval_shape(lambda p: create_state(p, tx, config), params)
