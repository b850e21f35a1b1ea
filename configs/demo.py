"""The demo: train on a synthetic CoW set on a 2-core CPU in under 20 minutes, then evaluate.

  python launch.py --config=configs/demo.py --workdir=runs/demo

Shorter or longer: ``--config.num_train_steps=300``, ``--config.refine.num_train_steps=500`` (also
``seed``, ``checkpoint_every_steps``, ``eval_every_steps``, any ``--config.group.field``). Started
again with the same command, a run resumes from its last checkpoint. The paper's ablations at CPU
size, one run each: ``configs/demo.py:heatmap_only``, ``:seg``, ``:seg_attr``, ``:full`` (the
multi-task loss); these train the first network alone, without the refinement stage, so they
compare the auxiliary tasks; compare them with ``launch.py --mode=eval --workdir=runs/a,runs/b,...``.

Two stages, both trained by the one command:
- the first network: 2 mm voxels, a 64 x 40 x 40 crop (128 x 80 x 80 mm: the whole circle with a
  margin), widths (8, 16, 32, 64), heatmaps and segmentation at half resolution (so the
  full-resolution decoder level is not built), the full multi-task loss with spatial-softmax
  cross-entropy on the heatmaps and Dice + ratio-weighted cross-entropy on the segment labels grown
  by 2 mm (at 4 mm a segment is a fraction of a voxel: BENCHMARKS.md, 2026-12-01), 2000 steps of
  batch 2; the segments it writes are the image's lumen labelled by its landmarks;
- the refinement stage (``config.refine``, in ``runs/demo/refine``): 24^3 patches at 1 mm around one
  landmark each (offset up to 6 mm per axis), widths (8, 16, 32), heatmaps at full resolution,
  heatmap loss only, 2500 steps of batch 4; at inference each landmark is re-detected in its patch
  under a 3 mm Gaussian prior around the first estimate, and in six patches shifted 2.5 mm along
  the axes (prior shifted with them), the seven positions averaged.
Both: Adam at lr 1e-3 with a short warmup and cosine decay, translation/rotation/scale/intensity/
noise/flip augmentation (the first network also sees three examples in ten cut to a random 20-90 mm
box round the circle, zero outside, as a scan cropped to the circle arrives: ``data.augment.fov_cut``),
160 synthetic cases (135 train, 9 validation, 16 test): with more subjects the first network leans
less on the template's shape.
Measured on 2-core dev CPUs (one JAX device per core, four steps per jitted call): about 0.2-0.3 s
per first-stage step and 0.1 s per refinement step; the whole command from a fresh clone (install,
data, both stages, test evaluation) in 12-23 minutes with AVX-512 (2026-12-03: 19 min 51 s and 21 min
56 s; 2026-12-04, the train steps at XLA's level 1: 19 min 44 s; 2026-12-05, a fast hour, without the
install: 13 min 46 s, and with huge pages 13 min 21 s; 2026-12-06 on an Intel Xeon with AMX, without
the install: 11 min 49 s; README has the output), 26.5
minutes on an AVX2-only CPU (2026-12-03, without the install, before level 1).
"""

from cowjax.config_defaults import apply_ablation, default_config


def get_config(arg: str = ""):
    c = default_config()
    c.num_train_steps = 2000
    c.batch_size = 2
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 200
    c.log_every_steps = 10

    d = c.data
    d.num_cases = 160
    d.split = (0.84, 0.06, 0.1)
    d.synthetic_spacing = (1.0, 1.0, 1.0)
    d.spacing = (2.0, 2.0, 2.0)
    d.crop_shape = (64, 40, 40)
    d.heatmap_sigma_mm = 3.0
    d.segment_growth_mm = 2.0
    d.augment.translate_mm = 12.0
    d.augment.rotate_deg = 8.0
    d.augment.scale = 0.05
    d.augment.intensity = 0.25
    d.augment.noise = 0.02
    d.augment.flip = True
    d.augment.fov_cut = 0.3               # scans cropped to the circle (BENCHMARKS.md, 2026-12-02)

    c.model.widths = (8, 16, 32, 64)
    c.model.heatmap_stride = 2
    c.model.segmentation_stride = 2

    c.loss.heatmap = "softmax_ce"
    c.loss.segmentation = "dice_ce"

    r = c.refine
    r.num_train_steps = 2500
    r.batch_size = 4
    r.spacing = (1.0, 1.0, 1.0)
    r.crop_shape = (24, 24, 24)
    r.widths = (8, 16, 32)
    r.translate_mm = 6.0
    r.prior_sigma_mm = 3.0
    r.tta_shift_mm = 2.5

    o = c.optim
    o.learning_rate = 1e-3
    o.b1 = 0.9
    o.schedule = "cosine"
    o.warmup_steps = 30
    o.grad_clip = 1.0
    # Both stages' train steps compiled at XLA's CPU level 1: 29 + 19 s sooner on an AVX-512 CPU
    # at a step time the same within noise (73 s sooner for the first network on an AVX2 CPU).
    c.train.cpu_opt_level = 1
    if arg:  # the ablations compare the first network alone
        r.num_train_steps = 0
    return apply_ablation(c, arg, "configs/demo.py")
