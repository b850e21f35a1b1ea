"""A real TOF-MRA beside our generator's and the held-out generator's images, at one field of view
and resolution: the picture in the README (does the generator look like real TOF-MRA?).

    python benchmarks/appearance.py ../shared/real-mra/topcow_mr_crop.mha \
        benchmarks/figures/appearance.png

The real image is shown whole; each synthetic case is cut to the same box (the real image's extent
on a RAS-aligned grid at its finest spacing) centred on the circle (the mean of its seven junction
landmarks, ``augment.CIRCLE_LANDMARKS``), after being generated at the real image's voxel size.
Columns: the real image, then ``--cases`` cases of each generator (seed ``--seed``). Intensities
are windowed per image (20th to 99.8th percentile), as each scanner's scale is arbitrary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import heldout_mra  # noqa: E402
from cowjax import figures  # noqa: E402
from cowjax.data import augment, io, preprocess  # noqa: E402
from cowjax.data.synthetic import case as synthetic  # noqa: E402
from cowjax.errors import CowjaxError  # noqa: E402

def on_box(image, affine, centre, extent, spacing):
    """``image`` resampled onto the RAS-aligned box of ``extent`` mm (3,) centred at ``centre``."""
    shape = tuple(int(n) for n in np.round(extent / spacing) + 1)
    grid_affine = np.diag([spacing] * 3 + [1.0])
    grid_affine[:3, 3] = centre - (np.array(shape) - 1) / 2 * spacing
    return preprocess.resample(np.asarray(image, np.float32), affine, grid_affine, shape, 1), \
        grid_affine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", help="a real TOF-MRA in any format cowjax reads")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--cases", type=int, default=1, help="cases of each generator")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        real, real_affine = io.load_image(args.real)
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    zooms = np.linalg.norm(real_affine[:3, :3], axis=0)
    grid_affine, shape = preprocess.finest_canonical_grid(real_affine, real.shape)
    spacing = float(grid_affine[0, 0])
    extent = (np.array(shape) - 1) * spacing
    centre = grid_affine[:3, 3] + extent / 2
    columns = {f"real: {Path(args.real).name}":
               on_box(real, real_affine, centre, extent, spacing)}
    # The real image's voxel size along each world axis (R, A, S), for the generators' grids.
    world_zooms = zooms[np.argmax(np.abs(real_affine[:3, :3]), axis=1)]
    for k in range(args.cases):
        ours = synthetic.generate_case(args.seed, k, spacing=tuple(world_zooms))
        held, _ = heldout_mra.generate_case(args.seed, k, spacing=tuple(world_zooms))
        for name, case in ((f"ours, case {k}", ours), (f"held-out generator, case {k}", held)):
            centre = case.landmarks[augment.CIRCLE_LANDMARKS].mean(axis=0)
            columns[name] = on_box(case.image, case.affine, centre, extent, spacing)
    size = " x ".join(f"{e:.0f}" for e in extent)
    path = figures.compare_images(
        args.out, columns, slab_mm=3.0,
        title=f"Real TOF-MRA and synthetic cases: the same {size} mm box at {spacing:.2f} mm")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
