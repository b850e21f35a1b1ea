# PyTorch is not a cowjax requirement; for this comparison only, into the project's venv:
#   pip install torch==2.13.0        (the CPU wheel; no other version)
"""The cowjax network in PyTorch, timed like ``cowjax.bench`` so the two can be compared side by side.

  python benchmarks/torch_reference.py --config=configs/paper.py:bench --parts=model,step_mse,inference
  python launch.py --mode=bench --config=configs/paper.py:bench --parts=model,step_mse,inference

Same widths, residual blocks, group norm, 2x2x2 strided down / transposed up convolutions, concatenated
skips, heads and input as ``cowjax/model/unet.py``; the train step is Adam on the same MSE-of-outputs
loss as the ``step_mse`` part. Prints JSON lines with the same keys (``"framework": "torch"``).
Run both in one session on the same machine and compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cowjax import anatomy  # noqa: E402
from cowjax import bench  # noqa: E402
from cowjax.bench import whole_volume_shape  # noqa: E402


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 8), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, c, 3, padding=1, bias=False)
        self.norm1 = _gn(c)
        self.conv2 = nn.Conv3d(c, c, 3, padding=1, bias=False)
        self.norm2 = _gn(c)
        self.project = nn.Conv3d(cin, c, 1, bias=False) if cin != c else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.project(x))


class CowNetTorch(nn.Module):
    def __init__(self, widths, heatmap_stride: int = 1):
        super().__init__()
        self.stride = heatmap_stride
        self.stem = nn.Conv3d(1, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv3d(widths[i - 1], widths[i], 2, stride=2, bias=False),
                          _gn(widths[i]), nn.ReLU()) for i in range(1, len(widths)))
        self.enc = nn.ModuleList(ResBlock(w, w) for w in widths)
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2, bias=False),
                          _gn(widths[i]), nn.ReLU()) for i in range(len(widths) - 1))
        self.dec = nn.ModuleList(ResBlock(2 * w, w) for w in widths[:-1])
        heat_w = widths[0] if heatmap_stride == 1 else widths[1]
        self.heatmap_head = nn.Conv3d(heat_w, anatomy.NUM_LANDMARKS, 1)
        self.segmentation_head = nn.Conv3d(widths[0], anatomy.NUM_CLASSES, 1)
        self.attr_hidden = nn.Linear(2 * widths[-1], widths[-1])
        self.landmark_attr_head = nn.Linear(widths[-1], anatomy.NUM_LANDMARKS)
        self.segment_attr_head = nn.Linear(widths[-1], anatomy.NUM_SEGMENTS)

    def forward(self, image):  # image [B, 1, X, Y, Z]
        x = self.stem(image)
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = self.down[i - 1](x)
            x = block(x)
            skips.append(x)
        bottleneck, half = x, None
        for i in reversed(range(len(self.dec))):
            if i == 0:
                half = x
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        pooled = torch.cat([bottleneck.mean(dim=(2, 3, 4)), bottleneck.amax(dim=(2, 3, 4))], dim=1)
        h = torch.relu(self.attr_hidden(pooled))
        return {"heatmaps": self.heatmap_head(x if self.stride == 1 else half),
                "segmentation": self.segmentation_head(x),
                "landmark_attr": self.landmark_attr_head(h),
                "segment_attr": self.segment_attr_head(h)}


def _emit(part, **fields):
    print(json.dumps({"part": part, "framework": "torch", **fields}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/*.py[:arg]")
    parser.add_argument("--parts", default="model,step_mse,inference")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = bench.load_config(args.config)
    parts = args.parts.split(",")
    torch.manual_seed(config.seed)
    widths = tuple(config.model.widths)
    model = CowNetTorch(widths, config.model.heatmap_stride)
    shape = tuple(int(n) for n in config.data.crop_shape)
    b = config.batch_size
    if "model" in parts:
        _emit("model", widths=list(widths), input=[b, *shape, 1], threads=torch.get_num_threads(),
              parameters=sum(p.numel() for p in model.parameters()), torch=torch.__version__)
    if "step_mse" in parts or "step" in parts:
        opt = torch.optim.Adam(model.parameters(), lr=config.optim.learning_rate,
                               betas=(config.optim.b1, config.optim.b2))
        image = torch.randn(b, 1, *shape)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(image)
            loss = sum(v.square().mean() for v in out.values())
            loss.backward()
            opt.step()

        step()
        sec = bench.median_time(step, args.repeats)
        _emit("step_mse", loss="mse", batch=b, input=list(shape), step_s=round(sec, 4),
              steps_per_s=round(1 / sec, 3), voxels_per_s=round(b * math.prod(shape) / sec))
    if "inference" in parts:
        model.eval()
        for name, vol in (("crop", shape), ("whole_volume", whole_volume_shape(config))):
            x = torch.randn(1, 1, *vol)
            with torch.inference_mode():
                model(x)
                sec = bench.median_time(lambda: model(x),
                                   args.repeats if name == "crop" else min(args.repeats, 2))
            _emit("inference", volume=name, input=list(vol), forward_s=round(sec, 4),
                  voxels_per_s=round(math.prod(vol) / sec))
    if "memory" in parts:
        _emit("memory", peak_host_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


if __name__ == "__main__":
    main()
