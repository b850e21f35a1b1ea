"""Case folders drawn again from their own label maps alone: MRA as an evaluator renders labels.

    python benchmarks/render_labels.py heldout/s5 OUT --labels segments --style soft
    python benchmarks/render_labels.py heldout/s5 OUT --labels vessels --style binary --dilate 1
    python launch.py --mode=eval --workdir=models/ready --data_dir=OUT

A stand-in for two of the issue's hidden sets (BENCHMARKS.md, 2026-12-07): TopCoW label maps
rendered as MRA (``--labels segments``: the 20 cow19 segments, the circle alone, as TopCoW labels
only the circle's arteries) and vessel masks traced from real TOF-MRA (``--labels vessels``: the
case's whole vessel mask). How the evaluator renders is not known, so the style is a choice:

- ``soft``: the mask blurred by ``BLUR_MM`` on a flat background at ``BACKGROUND`` of the vessels'
  brightness, Rician noise (sigma ``NOISE``);
- ``binary``: the mask itself, 0 and 1;
- ``binary-topcow``: the mask resampled (nearest) to TopCoW's grid, 0.3 mm in plane and 0.6 mm
  between slices (the slice axis: the voxel axis nearest the world's superior), 0 and 1; the
  case's label files are resampled with it.

``--dilate N`` grows the mask by N voxels first (6-connected): a traced mask that overstates the
calibre. Landmarks and attributes are copied; the labels stay what they were, so Dice is scored
against the original segments. The output folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cowjax.data import io, preprocess  # noqa: E402
from cowjax.errors import CowjaxError, atomic_output_dir  # noqa: E402

STYLES = ("soft", "binary", "binary-topcow")
BLUR_MM = 0.35
BACKGROUND = 0.15
NOISE = 0.06
TOPCOW_IN_PLANE_MM, TOPCOW_SLICE_MM = 0.3, 0.6


def topcow_grid(shape, affine) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of TopCoW's grid over the same field of view: voxel 0 where
    it was, 0.6 mm along the voxel axis nearest the world's superior, 0.3 mm along the others."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.full(3, TOPCOW_IN_PLANE_MM)
    spacing[np.argmax(np.abs(affine[2, :3]) / zooms)] = TOPCOW_SLICE_MM
    scale = spacing / zooms
    new_shape = tuple(int(n) for n in np.floor((np.asarray(shape) - 1) / scale) + 1)
    new_affine = np.asarray(affine, np.float64).copy()
    new_affine[:3, :3] = new_affine[:3, :3] * scale
    return new_shape, new_affine


def render(mask: np.ndarray, zooms, style: str, rng: np.random.Generator) -> np.ndarray:
    """The mask [X, Y, Z] (on its final grid, voxel sides ``zooms`` mm) drawn as an image."""
    if style != "soft":
        return mask.astype(np.float32)
    lumen = ndimage.gaussian_filter(mask.astype(np.float32), BLUR_MM / np.asarray(zooms))
    signal = BACKGROUND + (1.0 - BACKGROUND) * lumen
    real = signal + rng.normal(0.0, NOISE, mask.shape)
    imaginary = rng.normal(0.0, NOISE, mask.shape)
    return np.hypot(real, imaginary).astype(np.float32)


def render_case(case: io.Case, labels: str, style: str, dilate: int) -> io.Case:
    """The case with its image drawn from its ``labels`` ("segments" or "vessels", which it has)
    alone."""
    mask = getattr(case, labels) > 0
    if dilate:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    affine, vessels, segments = case.affine, case.vessels, case.segments
    if style == "binary-topcow":
        shape, affine = topcow_grid(mask.shape, case.affine)

        def resample(volume):
            return None if volume is None else preprocess.resample(
                volume.astype(np.uint8), case.affine, affine, shape, order=0)
        mask, vessels, segments = resample(mask), resample(vessels), resample(segments)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    image = render(mask, np.linalg.norm(affine[:3, :3], axis=0), style, rng)
    return io.Case(case.case_id, image, affine, case.landmarks, vessels, segments, case.attributes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a folder of cow19 case folders with label files")
    parser.add_argument("output", help="the folder to write (replaced if it exists)")
    parser.add_argument("--labels", choices=("segments", "vessels"), default="segments")
    parser.add_argument("--style", choices=STYLES, default="soft")
    parser.add_argument("--dilate", type=int, default=0, help="voxels to grow the mask by first")
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        if args.dilate < 0:
            raise CowjaxError(f"--dilate takes a count of voxels >= 0, got {args.dilate}")
        if not output.parent.is_dir():
            raise CowjaxError(f"{output.parent}: output's parent folder does not exist")
        cases = io.list_cases(args.source)
        if not cases:
            raise CowjaxError(f"{args.source}: no case folders")
        with atomic_output_dir(output) as tmp:
            for case_dir in tqdm(cases, desc="render labels", unit="case"):
                case = io.load_case(case_dir)
                if getattr(case, args.labels) is None:
                    raise CowjaxError(f"{case_dir}: no {args.labels} label file to draw")
                case = render_case(case, args.labels, args.style, args.dilate)
                io.save_case(tmp / case.case_id, case)
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(cases)} cases drawn from their {args.labels} ({args.style}"
          f"{f', dilated by {args.dilate}' if args.dilate else ''}) in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
