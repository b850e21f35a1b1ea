"""Tiny configuration for the tests: 32 x 32 x 16 crops at 3 mm, a few steps, small widths (and a
16^3 refinement patch at 1.5 mm, trained only where a test asks for it).

  python launch.py --config=configs/test.py --workdir=/tmp/cowjax_test
"""

from cowjax.config_defaults import default_config


def get_config(arg: str = ""):
    del arg
    c = default_config()
    c.num_train_steps = 3
    c.batch_size = 2
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 2
    c.log_every_steps = 1
    c.data.num_cases = 8
    c.data.synthetic_spacing = (1.5, 1.5, 1.5)
    c.data.spacing = (3.0, 3.0, 3.0)
    c.data.crop_shape = (32, 32, 16)
    c.data.heatmap_sigma_mm = 4.0
    c.data.augment.translate_mm = 4.0
    c.model.widths = (4, 8)
    c.train.keep_checkpoints = 1
    # The refinement stage's shape, off unless a test sets refine.num_train_steps.
    c.refine.batch_size = 2
    c.refine.spacing = (1.5, 1.5, 1.5)
    c.refine.crop_shape = (16, 16, 16)
    c.refine.widths = (4, 8)
    c.refine.translate_mm = 4.0
    return c
