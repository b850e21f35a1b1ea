"""The default configuration every `configs/*.py` starts from, with each field explained.

Experiment files change only what differs (see `configs/paper.py`, `configs/demo.py`).
Two fields are filled in by the run once its split is known (`training.train.resolve_config`), and
the run's `config.json` holds the filled-in values: `num_train_steps` when `num_epochs` > 0, and
`data.template` with `data.registration = "training_sample"`.
"""

import ml_collections
from ml_collections import config_dict

from cowjax.errors import CowjaxError


# The loss settings a sweep can vary (config.sweep.<field> lists config.loss.<field>'s values).
SWEEP_FIELDS = ("w_heatmap", "w_segmentation", "w_landmark_attr", "w_segment_attr",
                "w_consistency", "weighting", "weighting_lr", "dwa_temperature", "dwa_window",
                "gradnorm_alpha")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
    c.num_epochs = 0                      # > 0: num_train_steps = ceil(num_epochs * training
                                          # cases / batch_size), resolved once the split is known
                                          # (the resolved value is what the run's config.json holds)
    c.batch_size = 2                      # global, split over the ('data',) mesh
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 200
    c.log_every_steps = 10

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"                # "synthetic": made on first use under data_dir; "dir": cases on disk
    d.data_dir = ""                       # default for synthetic: <workdir>/../data/<name> (shared across runs)
    d.num_cases = 60                      # synthetic set size (split by the fractions below)
    d.synthetic_seed = 1234
    d.synthetic_spacing = (0.513, 0.513, 0.8)
    d.pathology_fraction = 0.3
    d.synthetic_cortex = False            # the synthetic cases also draw cortical branches beyond the
                                          # terminal ones (``vessels.grow_cortex``)
    d.split = (0.7, 0.1, 0.2)             # train / val / test fractions of each dataset
                                          # (recorded in workdir/split.json)
    d.split_counts = ()                   # (train, val, test) cases per dataset, for cases on disk
                                          # (source "dir"; a data_dir of dataset folders is split
                                          # one dataset at a time), extra cases unused; () or a
                                          # synthetic set: the fractions above
    d.split_file = ""                     # JSON {"train": [...], "val": [...], "test": [...]} of
                                          # case folders (relative to data_dir, or absolute): the
                                          # split as given (it wins over counts and fractions)
    d.spacing = (0.513, 0.513, 0.8)       # network grid, mm
    d.crop_shape = (64, 64, 48)           # network input, voxels
    d.heatmap_sigma_mm = 2.0
    d.num_workers = 0                     # grain worker processes (0: in-process)
    d.registration = "none"               # rigid intensity registration of every image first:
                                          # "none", "template" (to the rendered anatomy template)
                                          # or "training_sample" (to the first training case's
                                          # image, as the paper)
    d.template = ""                       # "training_sample": set by the run to its
                                          # <workdir>/template.nii.gz (the template case's image,
                                          # copied), so prediction finds the same template
    d.segment_growth_mm = 0.0             # segment labels grown by this (mm) before resampling to the
                                          # network grid (a coarse grid's target; 0: as labelled)
    d.crop_centre = "circle"              # training crops centred on the landmarks' centroid ("circle")
                                          # or on one random landmark ("landmark": the refinement stage)
    d.augment = a = ml_collections.ConfigDict()
    a.translate_mm = 10.0                 # random translation of the crop (the paper's augmentation)
    a.rotate_deg = 0.0
    a.scale = 0.0                         # +- relative
    a.elastic_mm = 0.0                    # smooth random deformation: displacement sd per axis (0: off;
                                          # 2 mm measured worse in the demo, BENCHMARKS.md)
    a.elastic_spacing_mm = 24.0           # ... drawn at control points this far apart
    a.intensity = 0.0                     # gamma / contrast jitter strength
    a.noise = 0.0                         # additive Gaussian noise std (normalised units)
    a.flip = False                        # left-right flip with channel mirroring
    a.fov_cut = 0.0                       # share of examples whose image is cut to a small random box
                                          # (zero outside), as a scan cropped to the circle arrives
    a.fov_cut_mm = (20.0, 90.0)           # ... its side, drawn per axis from this range (mm; the
                                          # real TopCoW crop is 21 mm tall: BENCHMARKS.md, 2026-12-03)

    c.model = m = ml_collections.ConfigDict()
    m.widths = (16, 32, 64, 128)
    m.norm = "group"                      # "group", "instance" or "none" (no batch statistics: pure)
    m.dtype = "float32"                   # compute dtype; parameters stay float32
    m.heatmap_stride = 1                  # 2: heatmaps at half resolution
    m.segmentation_stride = 1             # 2: segmentation at half resolution (soft-pooled labels)
    m.conv_impl = "auto"                  # "auto": native on GPU/TPU, fastest formulation on CPU

    c.loss = l = ml_collections.ConfigDict()
    l.heatmap = "l2"                      # "l2" (paper, ratio-weighted) or "softmax_ce" (spatial softmax)
    l.segmentation = "dice"               # "dice" (paper) or "dice_ce": Dice plus cross-entropy with
                                          # foreground voxels weighted by the background/foreground ratio
    l.w_heatmap = 1.0
    l.w_segmentation = 1.0
    l.w_landmark_attr = 1.0
    l.w_segment_attr = 1.0
    l.w_consistency = 1.0
    l.weighting = "fixed"                 # how the terms are combined (cowjax/weighting.py): "fixed"
                                          # (sum of w_* x term, the paper's), "uncertainty" (learned
                                          # log-variances, Kendall et al. 2018), "dwa" (dynamic weight
                                          # averaging, Liu et al. 2019) or "gradnorm" (Chen et al.
                                          # 2018); under the last three a w_* only switches its term
                                          # on (nonzero) or off (0)
    l.weighting_lr = 0.025                # step size of the log-variances (uncertainty) and of the
                                          # log-weights (gradnorm)
    l.dwa_temperature = 2.0               # T of dwa's softmax
    l.dwa_window = 20                     # steps averaged per dwa "epoch" (the paper's epoch)
    l.gradnorm_alpha = 1.5                # gradnorm's restoring force

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 1e-4
    o.b1 = 0.5
    o.b2 = 0.999
    o.schedule = "constant"               # "constant" or "cosine" (with warmup)
    o.warmup_steps = 0
    o.grad_clip = 0.0                     # global-norm clipping; 0 disables

    # The refinement stage (0 steps: none). A second, small network trained on patches at a finer
    # spacing, each centred on one landmark moved by up to translate_mm; at inference every
    # landmark the first network found is re-detected in a patch centred on it, the refined
    # heatmap's logits weighted by a Gaussian prior (prior_sigma_mm) around the first estimate;
    # with tta_shift_mm also in six patches shifted along the axes (prior shifted with them), and
    # the seven positions averaged.
    # Trained after the first network, in <workdir>/refine, with its optimizer settings.
    c.refine = r = ml_collections.ConfigDict()
    r.num_train_steps = 0
    r.batch_size = 4
    r.spacing = (1.0, 1.0, 1.0)
    r.crop_shape = (24, 24, 24)           # the patch, voxels
    r.widths = (8, 16, 32)
    r.heatmap_sigma_mm = 2.0
    r.translate_mm = 6.0                  # the patch centre's random offset from its landmark (per axis)
    r.prior_sigma_mm = 3.0
    r.tta_shift_mm = 2.5                  # also patches shifted by this along each axis, averaged (0: off)

    # A sweep: loss settings trained side by side as one program (cowjax/training/sweep.py). Each
    # field, when set, lists the values of config.loss's field of that name, one per member, e.g.
    # --config.sweep.weighting="('fixed','uncertainty')"; every list set has the same length K >= 2
    # and member k (workdir <workdir>/member_<k>) is the base config with the k-th values. None
    # (unset): the base's value for every member. The members train the first network only.
    c.sweep = ml_collections.ConfigDict({f: config_dict.placeholder(tuple) for f in SWEEP_FIELDS})

    c.train = t = ml_collections.ConfigDict()
    t.nonfinite = "stop"                  # "stop": halt naming the step; "skip": skip the update, count it
    t.keep_checkpoints = 2
    t.distributed = False                 # call jax.distributed.initialize() (multi-host)
    t.steps_per_call = 0                  # train steps unrolled in one jitted call; 0: 4 on CPU, else 1
    t.matmul_precision = "highest"        # float32 matrix products and convolutions, training and
                                          # inference: "highest" (true float32, as on a CPU),
                                          # "high" or "default" (on NVIDIA GPUs TF32: faster, about 3
                                          # fewer significant digits; JAX's own default). The paper
                                          # network's step on an H200: 1.21 s at "highest", 0.117 s
                                          # at "default" (BENCHMARKS.md, 2026-12-04)
    t.cpu_opt_level = config_dict.placeholder(int)  # XLA's CPU optimisation level of the train
                                          # step (xla_backend_optimization_level); None: XLA's
                                          # default. 1 compiles the demo's step in half the time
                                          # (a third on AVX2) at the same step time but runs the
                                          # paper network's 6% slower (BENCHMARKS.md, 2026-12-04).
                                          # Inference compiles at 1 on a CPU. GPU/TPU: unused
    t.sweep_impl = "auto"                 # how a sweep's members share the step: "vmap" (one step
                                          # vmapped over them), "unroll" (each member's own step,
                                          # side by side in the program: on a CPU, where XLA runs
                                          # vmap's grouped convolutions slowly, bench "sweep");
                                          # "auto": unroll on a CPU, vmap on GPU/TPU
    return c


def sweep_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{"member_<k>": config} of a sweep, in order; {} without one (no ``config.sweep`` set).

    Member k is ``config`` with ``loss.<field>`` = the k-th value of each set ``sweep.<field>``,
    ``sweep`` unset and the refinement stage off (a sweep compares what the loss settings do to the
    first network; ``config_check.validate`` checks the sweep and every member)."""
    swept = {f: tuple(v) for f, v in (config.get("sweep") or {}).items() if v is not None}
    size = max((len(v) for v in swept.values()), default=0)
    members = {}
    for k in range(size):
        c = ml_collections.ConfigDict(config.to_dict())
        for f in swept:
            try:
                c.loss[f] = swept[f][k]
            except TypeError:
                raise CowjaxError(f"config.sweep.{f}: {swept[f][k]!r} (member {k}) is not a "
                                  f"{type(config.loss[f]).__name__}, as config.loss.{f} is")
            c.sweep[f] = None
        c.refine.num_train_steps = 0
        members[f"member_{k}"] = c
    return members


def refine_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The full config of the refinement stage: ``config`` with ``config.refine`` applied.

    Heatmaps at full resolution, trained with the spatial-softmax loss alone (the prior is added to
    its logits at inference); the augmentation other than translation and the field-of-view cut
    is the first stage's.
    """
    r = config.refine
    c = ml_collections.ConfigDict(config.to_dict())
    c.num_train_steps, c.batch_size = r.num_train_steps, r.batch_size
    c.num_epochs = 0                      # the refinement stage counts steps, not epochs
    c.data.spacing, c.data.crop_shape = tuple(r.spacing), tuple(r.crop_shape)
    c.data.heatmap_sigma_mm, c.data.augment.translate_mm = r.heatmap_sigma_mm, r.translate_mm
    c.data.augment.fov_cut = 0.0          # its patches are smaller than any field of view
    c.data.crop_centre = "landmark"
    c.model.widths, c.model.heatmap_stride, c.model.segmentation_stride = tuple(r.widths), 1, 1
    c.loss.heatmap = "softmax_ce"
    c.loss.update(w_heatmap=1.0, weighting="fixed", **ABLATIONS["heatmap_only"])
    c.refine.num_train_steps = 0
    for field in c.get("sweep") or {}:   # one refinement stage, whatever a sweep varies
        c.sweep[field] = None
    return c


# The paper's ablations: the auxiliary tasks added one by one (loss weights set to zero).
ABLATIONS = {
    "heatmap_only": dict(w_segmentation=0.0, w_landmark_attr=0.0, w_segment_attr=0.0,
                         w_consistency=0.0),
    "seg": dict(w_landmark_attr=0.0, w_segment_attr=0.0, w_consistency=0.0),
    "seg_attr": dict(w_consistency=0.0),
    "full": {},
}


def apply_ablation(config: ml_collections.ConfigDict, arg: str, source: str):
    """Set the loss weights of ablation ``arg`` ("" means full); ValueError naming ``source``."""
    arg = arg or "full"
    if arg not in ABLATIONS:
        raise ValueError(f"{source}: unknown argument {arg!r}; one of {sorted(ABLATIONS)}")
    config.loss.update(ABLATIONS[arg])
    return config
