"""The paper's setting: 0.513 x 0.513 x 0.8 mm, Adam(b1=0.5, b2=0.999), lr 1e-4, 150 epochs.

  python launch.py --config=configs/paper.py --workdir=runs/paper            # full multi-task
  python launch.py --config=configs/paper.py:heatmap_only --workdir=runs/hm  # ablations:
  python launch.py --config=configs/paper.py:seg --workdir=runs/seg          #   + segmentation
  python launch.py --config=configs/paper.py:seg_attr --workdir=runs/sa      #   + attributes
Arguments: full (default), heatmap_only, seg, seg_attr (the auxiliary tasks added one by one);
bench: the full model at a 64 x 64 x 48 input, the shape BENCHMARKS.md compares with PyTorch.
"""

from cowjax.config_defaults import apply_ablation, default_config

EPOCHS = 150


def get_config(arg: str = "full"):
    c = default_config()
    c.data.num_cases = 150
    # 131 x 82 x 77 mm at the paper's spacing: the whole circle with a margin (GPU/TPU sized);
    # ":bench" keeps the 64 x 64 x 48 input the JAX-vs-PyTorch benchmark times.
    c.data.crop_shape = (64, 64, 48) if arg == "bench" else (256, 160, 96)
    c.batch_size = 2
    n_train = round(c.data.num_cases * c.data.split[0])
    c.num_train_steps = EPOCHS * n_train // c.batch_size
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 1000
    apply_ablation(c, "full" if arg == "bench" else arg, "configs/paper.py")
    return c
