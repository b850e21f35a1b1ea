"""The default configuration every `configs/*.py` starts from, with each field explained.

Experiment files change only what differs (see `configs/paper.py`, `configs/demo.py`).
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
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
    d.split = (0.7, 0.1, 0.2)             # train / val / test fractions (recorded in workdir/split.json)
    d.spacing = (0.513, 0.513, 0.8)       # network grid, mm
    d.crop_shape = (64, 64, 48)           # network input, voxels
    d.heatmap_sigma_mm = 2.0
    d.num_workers = 0                     # grain worker processes (0: in-process)
    d.registration = "none"               # "none" or "template": rigid intensity registration first
    d.augment = a = ml_collections.ConfigDict()
    a.translate_mm = 10.0                 # random translation of the crop (the paper's augmentation)
    a.rotate_deg = 0.0
    a.scale = 0.0                         # +- relative
    a.intensity = 0.0                     # gamma / contrast jitter strength
    a.noise = 0.0                         # additive Gaussian noise std (normalised units)
    a.flip = False                        # left-right flip with channel mirroring

    c.model = m = ml_collections.ConfigDict()
    m.widths = (16, 32, 64, 128)
    m.norm = "group"                      # "group", "instance" or "none" (no batch statistics: pure)
    m.dtype = "float32"                   # compute dtype; parameters stay float32
    m.heatmap_stride = 1                  # 2: heatmaps at half resolution
    m.segmentation_stride = 1             # 2: segmentation at half resolution (soft-pooled labels)
    m.conv_impl = "auto"                  # "auto": native on GPU/TPU, fastest formulation on CPU

    c.loss = l = ml_collections.ConfigDict()
    l.heatmap = "l2"                      # "l2" (paper, ratio-weighted) or "softmax_ce" (spatial softmax)
    l.w_heatmap = 1.0
    l.w_segmentation = 1.0
    l.w_landmark_attr = 1.0
    l.w_segment_attr = 1.0
    l.w_consistency = 1.0

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 1e-4
    o.b1 = 0.5
    o.b2 = 0.999
    o.schedule = "constant"               # "constant" or "cosine" (with warmup)
    o.warmup_steps = 0
    o.grad_clip = 0.0                     # global-norm clipping; 0 disables

    c.train = t = ml_collections.ConfigDict()
    t.nonfinite = "stop"                  # "stop": halt naming the step; "skip": skip the update, count it
    t.keep_checkpoints = 2
    t.distributed = False                 # call jax.distributed.initialize() (multi-host)
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
