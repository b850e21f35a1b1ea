"""How the loss terms are weighted into the total: ``config.loss.weighting`` picks the strategy.

- "fixed": ``sum_i w_i L_i`` with the config's ``w_<term>`` (the paper's linear combination).
- "uncertainty": learned homoscedastic uncertainty (Kendall, Gal & Cipolla, CVPR 2018),
  ``sum_i exp(-s_i) L_i + s_i`` with learnable log-variances s_i.
- "dwa": dynamic weight averaging (Liu, Johns & Davison, CVPR 2019),
  ``w_i = K softmax_i(r_i / T)``, ``r_i = L_i(t-1) / L_i(t-2)``.
- "gradnorm": GradNorm (Chen et al., ICML 2018): weights that balance the gradient norms of the
  weighted terms at the last shared layer, renormalised to sum K.

A term whose config weight ``w_<term>`` is 0 is off under every strategy: weight exactly 0, kept
out of the sum by a select (so even a NaN in it cannot leak in), and K counts the terms that are on.
Under the dynamic strategies the nonzero config weights only switch terms on; their values are not
used (each strategy starts where its paper does: s_i = 0, uniform weights 1).

Everything is data: a config's weighting is a dict of arrays (``settings(config)``: the weights,
the strategy's index, its step sizes), and the state holds every strategy's fields, the strategy in
use selecting what is read and updated. In a run the settings are constants of the jitted step
(XLA folds the selection away); a vmapped sweep (``training/sweep.py``) stacks its members'
settings and states on a leading axis and vmaps one step over them, whatever strategy each member
uses. Pure and jit-able:
  ``s = settings(config)``: {"w" [5], "strategy", "lr", "temperature", "window", "alpha"};
  ``wstate = init(s)``: a dict of float32/int32 arrays (part of the train state, checkpointed);
  ``total, weights = combine(s, wstate, terms)``: the weighted sum, in a differentiated loss;
  ``total, grads, aux = loss_and_grads(s, wstate, terms_fn, params)``: or the sum and its
      gradient in one call, with the per-term gradient norms GradNorm needs;
  ``wstate = update(s, wstate, terms, grad_norms)``: after the step (no gradient through it).
Per-term vectors in the state are [5] float32 in ``TERMS`` order; entries of terms that are off,
and the fields of the strategies not in use, stay at their initial values. ``wstate["count"]``
counts the updates.

Config (``config.loss``): ``weighting``; ``weighting_lr`` (the step size of the log-variances and of
the GradNorm weights); ``dwa_temperature`` (T); ``dwa_window`` (steps averaged per DWA "epoch");
``gradnorm_alpha``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cowjax.errors import CowjaxError

# The loss terms (``losses.total_loss``'s keys); each has its config weight ``w_<term>``.
TERMS = ("heatmap", "segmentation", "landmark_attr", "segment_attr", "consistency")
STRATEGIES = ("fixed", "uncertainty", "dwa", "gradnorm")
FIXED, UNCERTAINTY, DWA, GRADNORM = range(len(STRATEGIES))
_EPS = 1e-12


def _strategy(config) -> str:
    name = config.loss.weighting
    if name not in STRATEGIES:
        raise CowjaxError(f"config.loss.weighting: unknown {name!r}; one of {STRATEGIES}")
    return name


# Each strategy's settings in config.loss: (name, valid?, what it must be).
_POSITIVE_LR = ("weighting_lr", lambda v: v > 0, "positive")
_SETTINGS = {
    "fixed": (),
    "uncertainty": (_POSITIVE_LR,),
    "dwa": (("dwa_temperature", lambda v: v > 0, "positive"),
            ("dwa_window", lambda v: v >= 1 and int(v) == v,
             "a whole number of steps, at least 1")),
    "gradnorm": (_POSITIVE_LR, ("gradnorm_alpha", lambda v: v >= 0, "at least 0")),
}


def check_config(config) -> None:
    """CowjaxError (one line) for an unknown strategy or a missing or out-of-range setting of it."""
    name, lc = _strategy(config), config.loss
    for field, valid, must in _SETTINGS[name]:
        if field not in lc:
            raise CowjaxError(f"config.loss.{field} is missing (needed by weighting {name!r})")
        if not valid(lc[field]):
            raise CowjaxError(f"config.loss.{field}={lc[field]} must be {must}")


def settings(config) -> dict:
    """The config's weighting as numpy arrays: ``{"w": [5] float32 (the config weights, TERMS
    order), "strategy": int32 (index into STRATEGIES), "lr", "temperature", "alpha": float32,
    "window": int32}``. A setting the strategy does not use may be missing from the config (1)."""
    lc = config.loss
    get = lambda field: lc.get(field, 1)  # noqa: E731
    return {"w": np.array([lc[f"w_{t}"] for t in TERMS], np.float32),
            "strategy": np.int32(STRATEGIES.index(_strategy(config))),
            "lr": np.float32(get("weighting_lr")),
            "temperature": np.float32(get("dwa_temperature")),
            "window": np.int32(get("dwa_window")), "alpha": np.float32(get("gradnorm_alpha"))}


def uses_gradnorm(settings) -> bool:
    """Whether some run of ``settings`` (numpy, as made by ``settings``, or stacked) uses
    "gradnorm": known before tracing, it decides whether the per-term gradient norms are
    computed."""
    return bool(np.any(np.asarray(settings["strategy"]) == GRADNORM))


def _active(settings):
    """[5] bool: which terms are on (config weight nonzero)."""
    return settings["w"] != 0


def _vector(terms: dict, active) -> jnp.ndarray:
    """{term: scalar} -> [5] float32 in TERMS order; 0 for terms that are off or not computed
    (whatever their value, so the state holds no NaN from them)."""
    return jnp.stack([jnp.where(on, jnp.asarray(terms[t], jnp.float32), 0.0) if t in terms
                      else jnp.zeros((), jnp.float32) for t, on in zip(TERMS, active)])


def _normalise(w, active):
    """Weights on the active terms rescaled to sum K (the number of active terms); 0 elsewhere."""
    w = jnp.where(active, w, 0.0)
    return w * (active.sum() / jnp.maximum(w.sum(), _EPS))


def init(settings) -> dict:
    """The weighting state: every strategy's fields (one structure for all, so a sweep's members
    stack), shaped like ``settings`` (a leading member axis when they are stacked).

    count:                           updates so far
    log_var [5]:                     uncertainty's s_i = 0: weight 1
    window_sum, last, before [5]:    dwa's loss history
    weights, initial [5]:            gradnorm's weights (1 on active terms) and L_i(0)
    """
    # A fresh array per entry: the train step donates the state, and one buffer donated twice
    # (the same zeros under two keys) crashes XLA.
    shape = np.shape(settings["w"])
    zeros = lambda: jnp.zeros(shape, jnp.float32)  # noqa: E731
    return {"count": jnp.zeros(shape[:-1], jnp.int32), "log_var": zeros(), "window_sum": zeros(),
            "last": zeros(), "before": zeros(),
            "weights": jnp.asarray(_active(settings), jnp.float32), "initial": zeros()}


def weights(settings, wstate) -> jnp.ndarray:
    """[5] float32: the weight of each term in ``combine`` now; exactly 0 for terms that are off."""
    active = _active(settings)
    return jnp.select([settings["strategy"] == i for i in range(len(STRATEGIES))], [
        jnp.asarray(settings["w"], jnp.float32),
        jnp.where(active, jnp.exp(-wstate["log_var"]), 0.0),
        _dwa_weights(settings, wstate, active),
        jnp.where(active, wstate["weights"], 0.0)])


def combine(settings, wstate, terms: dict) -> tuple[jnp.ndarray, dict]:
    """The total loss and the effective weights, to use inside the differentiated loss.

    terms: {term: scalar} (``losses.total_loss``'s second output); terms that are off are ignored
    even if present. Returns (total scalar, {term: weight scalar} for all five terms). The total is
    ``sum_i w_i L_i`` over the active terms, plus ``sum_i s_i`` under "uncertainty" (the
    regulariser that keeps s_i from growing without bound; the total can then be negative). For the
    network's gradient the weights are constants; ``d total / d s_i = 1 - exp(-s_i) L_i`` is what
    ``update`` descends.
    """
    active = _active(settings)
    w = weights(settings, wstate)
    total = jnp.zeros((), jnp.float32)
    for i, t in enumerate(TERMS):
        if t in terms:
            total = total + jnp.where(active[i], w[i] * terms[t], 0.0)
    regulariser = jnp.sum(jnp.where(active, wstate["log_var"], 0.0))
    total = total + jnp.where(settings["strategy"] == UNCERTAINTY, regulariser, 0.0)
    return total, {t: w[i] for i, t in enumerate(TERMS)}


def update(settings, wstate, terms: dict, grad_norms: dict | None = None) -> dict:
    """The state after a step whose unweighted terms were ``terms`` ({term: scalar}).

    grad_norms ({term: ||dL_i/dW||}, from ``loss_and_grads``) is needed by "gradnorm" only. Call it
    only for steps whose update is kept (a skipped non-finite step must not enter the history).
    """
    strategy, active = settings["strategy"], _active(settings)
    if grad_norms is None and not isinstance(strategy, jax.Array) and strategy == GRADNORM:
        raise CowjaxError("config.loss.weighting 'gradnorm': update needs grad_norms "
                          "(from weighting.loss_and_grads)")
    loss = _vector(terms, active)
    steps = {UNCERTAINTY: {"log_var": _uncertainty_step(settings, wstate["log_var"], loss, active)},
             DWA: _dwa_history(settings, wstate, loss)}
    if grad_norms is not None:
        norms = _vector(grad_norms, active)
        steps[GRADNORM] = _gradnorm_step(settings, wstate, loss, norms, active)
    new = {**wstate, "count": wstate["count"] + 1}
    for index, fields in steps.items():     # each strategy's fields move only when it is in use
        new.update({k: jnp.where(strategy == index, v, wstate[k]) for k, v in fields.items()})
    return new


def _uncertainty_step(settings, log_var, loss, active):
    """One gradient step on s of ``sum_i exp(-s_i) L_i + s_i``: s_i -= lr (1 - exp(-s_i) L_i).

    s has its own plain SGD step (rather than the network's Adam) with the closed-form gradient, so
    the network's parameters and optimizer state keep their shapes (checkpoints, inference). Near
    its optimum s_i = log L_i the step is an exponential average of log L_i with a time constant of
    1 / lr steps, whatever the scale of L_i.
    """
    grad = 1.0 - jnp.exp(-log_var) * loss
    return jnp.where(active, log_var - settings["lr"] * grad, log_var)


def _dwa_history(settings, wstate, loss):
    """Loss averages over windows of ``dwa_window`` steps: "last" and "before" are the means of the
    last two complete windows (the paper's epochs; with a window of 1, the previous two steps).
    Averaging over a window keeps the ratio from following the noise of one small batch."""
    window = settings["window"]
    total = wstate["window_sum"] + loss
    closes = (wstate["count"] + 1) % window == 0
    return {"window_sum": jnp.where(closes, 0.0, total),
            "last": jnp.where(closes, total / window, wstate["last"]),
            "before": jnp.where(closes, wstate["last"], wstate["before"])}


def _dwa_weights(settings, wstate, active):
    """w_i = K softmax_i(r_i / T) over the active terms, r_i = L_i(t-1) / L_i(t-2) (window means);
    1 for every active term until two windows are complete. A term whose loss falls more slowly has
    a larger r_i and gains weight."""
    ratio = wstate["last"] / jnp.maximum(wstate["before"], _EPS)
    logits = jnp.where(active, ratio / settings["temperature"], -jnp.inf)
    dwa = active.sum() * jax.nn.softmax(logits)
    ready = wstate["count"] >= 2 * settings["window"]
    return jnp.where(ready, dwa, jnp.asarray(active, jnp.float32))


def _gradnorm_step(settings, wstate, loss, grad_norm, active):
    """One GradNorm step on the weights, then renormalisation to sum K.

    With G_i = ||dL_i/dW|| (W: the last shared layer) and G_W^(i) = w_i G_i, the paper's loss is
    ``L_grad = sum_i |G_W^(i) - mean(G_W) r_i^alpha|``, with r_i = L~_i / mean(L~),
    L~_i = L_i(t) / L_i(0), and the target ``mean(G_W) r_i^alpha`` held constant. L_grad is divided
    by mean(G_W) (a constant too) and descended in log w_i:
    ``log w_i -= lr sign(G_W^(i) - target_i) G_W^(i) / mean(G_W)``. So the step is dimensionless
    (one ``weighting_lr`` for any scale of gradients), relative (weights that must differ by orders
    of magnitude get there geometrically, without overshooting through 0) and keeps w_i > 0.
    L_i(0) is the loss at the first update.
    """
    first = wstate["count"] == 0
    initial = jnp.where(first, loss, wstate["initial"])
    k = active.sum()
    mean = lambda v: jnp.sum(jnp.where(active, v, 0.0)) / k   # noqa: E731
    relative = jnp.where(active, loss / jnp.maximum(initial, _EPS), 0.0)
    rate = relative / jnp.maximum(mean(relative), _EPS)
    weighted = wstate["weights"] * grad_norm
    scale = jnp.maximum(mean(weighted), _EPS)
    target = scale * rate ** settings["alpha"]
    step = jnp.sign(weighted - target) * weighted / scale
    w = wstate["weights"] * jnp.exp(-settings["lr"] * step)
    return {"weights": _normalise(w, active), "initial": initial}


def shared_layer_path(config) -> tuple[str, ...]:
    """Where GradNorm's W lies in CowNet's params: the kernel of the second 3x3x3 convolution of
    the last block whose output every head and attribute branch reads. That block is ``dec0``
    with both heads at full resolution; with either at half resolution it is ``dec1`` (``dec0``
    then feeds the full-resolution head only), or the bottom encoder block when there is no
    ``dec1`` (two widths). "Conv3x3_1" is Flax's name for ``unet.ResBlock``'s second convolution."""
    m = config.model
    levels = len(m.widths)
    level = 0 if m.heatmap_stride == 1 and m.segmentation_stride == 1 else 1
    block = f"dec{level}" if level < levels - 1 else f"enc{levels - 1}"
    return (block, "Conv3x3_1", "kernel")


def loss_and_grads(settings, wstate, terms_fn: Callable[[dict], dict], params: dict,
                   path: tuple[str, ...] | None = None, grad_norms: bool | None = None):
    """The weighted loss and its gradient from one forward pass; with "gradnorm" also G_i.

    terms_fn: params -> {term: scalar} (the model's forward pass and ``losses.loss_terms``, which
    holds the terms computed). Returns ``(total, grads, aux)``: grads like params (the gradient of
    ``combine``'s total, the weights held constant), aux = {"terms", "weights", "grad_norms"},
    grad_norms = {term: ||dL_i/dW||_2} when ``grad_norms`` (default ``uses_gradnorm(settings)``;
    pass it where the settings are traced, as in a sweep) and None otherwise, W the leaf of params
    at ``path`` (``shared_layer_path(config)``: needed with the norms).

    One ``jax.vjp`` serves both: the weighted gradient is its pullback of the weights, and the
    per-term gradients its pullbacks of one-hot cotangents (batched by vmap; only their W slice is
    used, so XLA keeps just the backward pass through the layers after W). Measured 2026-12-01 on
    2 shared AMD EPYC cores (CowNet widths (4, 8) at 32x32x16 and (8, 16, 32) at 32^3, batch 2):
    with "fixed" as fast as today's ``jax.value_and_grad``; with "gradnorm" 1.5-1.9x that (a
    separate ``jax.jacrev`` of the terms in W, with its second forward pass: 1.8-2.2x).
    A term is computed once per run (or sweep member) whatever the weights: a term off for this
    run gets a zero cotangent, which keeps its value out but not a NaN its own backward pass makes.
    """
    terms, pullback = jax.vjp(terms_fn, params)
    total, w = combine(settings, wstate, terms)
    grads = pullback({t: w[t] for t in terms})[0]
    norms = None
    if uses_gradnorm(settings) if grad_norms is None else grad_norms:
        if path is None:
            raise CowjaxError("weighting.loss_and_grads: the gradient norms need the shared "
                              "layer's path (weighting.shared_layer_path(config))")
        names = list(terms)
        onehot = {t: jnp.asarray([float(t == u) for u in names], jnp.float32) for t in names}
        per_term = jax.vmap(pullback)(onehot)[0]
        for key in path:
            per_term = per_term[key]                                   # [K, *W.shape]
        norms = {t: jnp.sqrt(jnp.sum(jnp.square(per_term[i]))) for i, t in enumerate(names)}
    return total, grads, {"terms": terms, "weights": w, "grad_norms": norms}
