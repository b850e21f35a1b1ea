"""``validate(config)``: every setting checked in one place, before any work starts.

launch.py validates (and locks) the config right after parsing the flags, and the library's entry
points (training, the ablation, the bench) validate again, so a notebook user gets the same one-line
``CowjaxError`` as the command line. The modules themselves trust a validated config.
"""

from __future__ import annotations

from cowjax.errors import CowjaxError

# The choices of each string setting. The modules that act on a setting import its tuple from here.
HEATMAP_LOSSES = ("l2", "softmax_ce")
SEGMENTATION_LOSSES = ("dice", "dice_ce")
NORMS = ("group", "instance", "none")
DTYPES = ("float32", "bfloat16")
CONV_IMPLS = ("auto", "native", "depth_sum", "depth_stack", "im2col")
SCHEDULES = ("constant", "cosine")
NONFINITE = ("stop", "skip")
REGISTRATIONS = ("none", "template", "training_sample")
CROP_CENTRES = ("circle", "landmark")
MATMUL_PRECISIONS = ("highest", "high", "default")
SOURCES = ("synthetic", "dir")
SWEEP_IMPLS = ("auto", "vmap", "unroll")


def _choice(config, path: str, choices) -> None:
    value = config
    for key in path.split("."):
        value = value[key]
    if value not in choices:
        raise CowjaxError(f"config.{path}: unknown {value!r}; one of {choices}")


def _at_least(config, path: str, minimum, what: str = "") -> None:
    value = config
    for key in path.split("."):
        value = value[key]
    if value < minimum:
        raise CowjaxError(f"config.{path}={value} must be {what or f'at least {minimum}'}")


def validate(config) -> None:
    """Raise ``CowjaxError`` (one line naming the field) for the first invalid setting."""
    from cowjax import devices  # jax: imported only when a config is checked

    for path, choices in (("loss.heatmap", HEATMAP_LOSSES),
                          ("loss.segmentation", SEGMENTATION_LOSSES),
                          ("model.norm", NORMS), ("model.dtype", DTYPES),
                          ("model.conv_impl", CONV_IMPLS), ("optim.schedule", SCHEDULES),
                          ("train.nonfinite", NONFINITE),
                          ("train.matmul_precision", MATMUL_PRECISIONS),
                          ("data.registration", REGISTRATIONS),
                          ("data.crop_centre", CROP_CENTRES), ("data.source", SOURCES),
                          ("train.sweep_impl", SWEEP_IMPLS)):
        _choice(config, path, choices)
    problem = devices.batch_error(config.batch_size)
    if problem:
        raise CowjaxError(problem)
    _at_least(config, "num_epochs", 0, "0 (count steps) or more")
    steps = ("checkpoint_every_steps", "eval_every_steps", "log_every_steps")
    if config.num_epochs == 0:
        steps = ("num_train_steps",) + steps  # else resolved from the split
    for name in steps:
        _at_least(config, name, 1)
    _at_least(config, "train.steps_per_call", 0, "0 (auto) or positive")
    level = config.train.get("cpu_opt_level")
    if level is not None and level not in (0, 1, 2, 3):
        raise CowjaxError(f"config.train.cpu_opt_level={level} must be 0-3 (XLA's CPU "
                          f"optimisation level) or None (XLA's default)")
    _at_least(config, "data.num_workers", 0)
    _at_least(config, "data.segment_growth_mm", 0.0)
    share, sides = (config.data.augment.get("fov_cut", 0.0),
                    tuple(config.data.augment.get("fov_cut_mm", (20.0, 90.0))))
    if not 0.0 <= share <= 1.0:
        raise CowjaxError(f"config.data.augment.fov_cut={share} must be a share, 0 to 1")
    if len(sides) != 2 or not 0 < sides[0] <= sides[1]:
        raise CowjaxError(f"config.data.augment.fov_cut_mm={sides}: expected (smallest, largest) "
                          f"side in mm, 0 < smallest <= largest")
    for name in ("w_heatmap", "w_segmentation", "w_landmark_attr", "w_segment_attr",
                 "w_consistency"):
        _at_least(config, f"loss.{name}", 0.0, "0 (off) or more")

    m = config.model
    widths = tuple(m.widths)
    if not widths or min(widths) < 1:
        raise CowjaxError(f"config.model.widths {m.widths}: need at least one positive width")
    for field in ("heatmap_stride", "segmentation_stride"):
        if m[field] not in (1, 2) or (m[field] == 2 and len(widths) < 2):
            raise CowjaxError(f"config.model.{field} {m[field]}: expected 1, or 2 with at least "
                              f"two widths")
    factor = 2 ** (len(widths) - 1)
    if any(int(n) % factor for n in config.data.crop_shape):
        raise CowjaxError(f"config.data.crop_shape {tuple(config.data.crop_shape)}: every side "
                          f"must be a multiple of {factor} (the model pools {len(widths) - 1} times)")
    counts = tuple(config.data.split_counts)
    if counts and (len(counts) != 3 or any(not isinstance(c, int) or c < 0 for c in counts)
                   or counts[0] < 1):
        raise CowjaxError(f"config.data.split_counts = {counts}: expected three train/val/test "
                          f"case counts (integers >= 0, train >= 1)")
    split = tuple(config.data.split)
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise CowjaxError(f"config.data.split = {split}: expected three non-negative "
                          f"train/val/test fractions")
    if config.data.source == "dir" and not config.data.data_dir:
        raise CowjaxError("config.data.data_dir is empty; set it to the folder of cases "
                          "(config.data.source is 'dir')")
    from cowjax import weighting
    weighting.check_config(config)
    _check_sweep(config)
    if config.refine.num_train_steps:
        from cowjax.config_defaults import refine_config
        validate(refine_config(config))


def _check_sweep(config) -> None:
    """``config.sweep``: known fields, lists of one length K >= 2, every member a valid config."""
    from cowjax.config_defaults import SWEEP_FIELDS, sweep_configs
    swept = {f: v for f, v in (config.get("sweep") or {}).items() if v is not None}
    for f, values in swept.items():
        if f not in SWEEP_FIELDS:
            raise CowjaxError(f"config.sweep.{f}: not a setting a sweep can vary; one of "
                              f"{SWEEP_FIELDS}")
        if not isinstance(values, (tuple, list)):
            raise CowjaxError(f"config.sweep.{f}={values!r}: expected a list of values, one per "
                              f"member, e.g. \"(0.5, 1.0)\"")
        if len(values) < 2:
            raise CowjaxError(f"config.sweep.{f}={tuple(values)}: a sweep needs two or more values "
                              f"(for one, set config.loss.{f})")
    swept = {f: swept[f] for f in SWEEP_FIELDS if f in swept}
    lengths = {f: len(v) for f, v in swept.items()}
    if len(set(lengths.values())) > 1:
        raise CowjaxError("config.sweep: lists of different lengths ("
                          + ", ".join(f"{f}: {n}" for f, n in lengths.items())
                          + "); each gives one value per member")
    for name, member in sweep_configs(config).items():
        try:
            validate(member)
        except CowjaxError as e:
            values = ", ".join(f"{f}={member.loss[f]!r}" for f in swept)
            raise CowjaxError(f"config.sweep {name} ({values}): {e}") from None
