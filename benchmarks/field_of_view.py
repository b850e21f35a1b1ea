"""Landmark error against the field of view: held-out cases as made, cut to a small box round the
circle, seen whole-head, and in slabs ending just below the circle (BENCHMARKS.md, 2026-12-02,
2026-12-03 and 2026-12-07).

    python benchmarks/field_of_view.py --seed 100 --num 10 models/ready runs/other
    python benchmarks/field_of_view.py --seed 101 --num 8 --whole-head models/ready
    python benchmarks/field_of_view.py --seed 101 --num 6 --below 12,5 models/ready
    python benchmarks/field_of_view.py --seed 100 --num 10 --turn 15,-15 models/ready

Cases come from the independent generator (``heldout_mra.py``; 0.5 x 0.5 x 0.8 mm). Each model
(a run or an exported folder) predicts every case as made and, by default, cut to ``--box`` mm
(the real TopCoW crop in ``shared/real-mra/`` is 44 x 38 x 21 mm) centred on the mean of the
circle's seven junctions (``augment.CIRCLE_LANDMARKS``), resampled to 0.5 mm, zero outside; the
landmarks inside the box are scored on both. With ``--whole-head`` the same subjects are instead
also seen in a 160 x 190 x 140 mm field of view at 0.6 x 0.6 x 0.8 mm (``generate_case(fov_mm=)``),
all 19 landmarks scored. With ``--below MM[,MM...]`` the whole-head view is also cut at MM below
the basilar tip (world superior axis; the voxels below dropped, as a slab whose lower edge lies
there), the landmarks above the edge scored in every view. With ``--turn DEG[,DEG...]`` the cut is
also seen turned DEG degrees about the R-L axis through its centre (a nod: the image and its
landmarks rotated together in world space, so the box's faces lie oblique to the network's
RAS-aligned grid, as a slab tilted along the skull base arrives). Presence is not scored
(``presence="network"``: landmarks only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import appearance  # noqa: E402
import heldout_mra  # noqa: E402
import real_crop  # noqa: E402
from cowjax import anatomy  # noqa: E402
from cowjax.data import augment, preprocess  # noqa: E402
from cowjax.errors import CowjaxError  # noqa: E402
from cowjax.registration.landmarks import apply_transform  # noqa: E402

SPACING = (0.5, 0.5, 0.8)
HEAD_SPACING = (0.6, 0.6, 0.8)
HEAD_FOV_MM = (160.0, 190.0, 140.0)


def _slab(image: np.ndarray, affine: np.ndarray, floor_mm: float):
    """The image without its voxels below world z = ``floor_mm`` (zero where the grid is oblique),
    cropped to the rest: (image, affine)."""
    i, j, k = np.ogrid[tuple(slice(0, n) for n in image.shape)]   # world z by broadcasting
    keep = affine[2, 0] * i + affine[2, 1] * j + affine[2, 2] * k + affine[2, 3] >= floor_mm
    kept = np.argwhere(keep)
    lo, hi = kept.min(axis=0), kept.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    moved = affine.copy()
    moved[:3, 3] = preprocess.voxel_to_world(lo[None], affine)[0]
    return np.where(keep, image, 0)[box], moved


def _views(seed: int, index: int, box, whole_head: bool, below=(), turns=()):
    """(name, image, affine, landmarks scored mask, [4, 4] world turn or None) of one subject, and
    its true landmarks (before any turn)."""
    if below:
        head, _ = heldout_mra.generate_case(seed, index, HEAD_SPACING, fov_mm=HEAD_FOV_MM)
        lm, top = head.landmarks, head.landmarks[anatomy.LANDMARK_INDEX["BA_top"], 2]
        above = lm[:, 2] >= top - min(below)
        return lm, [("whole head", head.image, head.affine, above, None)] + [
            (f"lower edge {d:g} mm below BA_top", *_slab(head.image, head.affine, top - d), above,
             None) for d in below]
    if whole_head:
        case, _ = heldout_mra.generate_case(seed, index, HEAD_SPACING)
        head, _ = heldout_mra.generate_case(seed, index, HEAD_SPACING, fov_mm=HEAD_FOV_MM)
        every = np.ones(len(case.landmarks), bool)
        return case.landmarks, [("as made", case.image, case.affine, every, None),
                                ("whole head", head.image, head.affine, every, None)]
    case, _ = heldout_mra.generate_case(seed, index, SPACING)
    lm = case.landmarks
    centre = lm[augment.CIRCLE_LANDMARKS].mean(axis=0)
    inside = np.all(np.abs(lm - centre) <= box / 2, axis=1)
    cut, cut_affine = appearance.on_box(case.image, case.affine, centre, box, 0.5)
    views = [("as made, all 19", case.image, case.affine, np.ones(len(lm), bool), None),
             ("as made, inside the box", case.image, case.affine, inside, None),
             ("cut, inside the box", cut, cut_affine, inside, None)]
    for degrees in turns:
        turn = real_crop.turn_about(0, degrees, centre)
        views.append((f"cut and turned {degrees:+g} deg about R-L, inside the box", cut,
                      turn @ cut_affine, inside, turn))
    return lm, views


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run workdirs or exported model folders")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--num", type=int, default=10)
    parser.add_argument("--box", default="44,38,21", help="R,A,S mm of the cut (default: the real crop)")
    parser.add_argument("--whole-head", action="store_true",
                        help="compare with a whole-head field of view instead of the cut")
    parser.add_argument("--below", default="",
                        help="also cut the whole-head view this many mm below the basilar tip "
                             "(comma-separated; mm >= 0)")
    parser.add_argument("--turn", default="",
                        help="also see the cut turned this many degrees about the R-L axis "
                             "(comma-separated)")
    args = parser.parse_args(argv)
    try:
        box = np.array([float(v) for v in args.box.split(",")])
        if box.shape != (3,) or np.any(box <= 0):
            raise ValueError
    except ValueError:
        print(f"error: --box takes three positive numbers (mm), got {args.box!r}", file=sys.stderr)
        return 2
    try:
        below = tuple(float(v) for v in args.below.split(",")) if args.below else ()
        if any(d < 0 for d in below):
            raise ValueError
    except ValueError:
        print(f"error: --below takes mm >= 0, comma-separated, got {args.below!r}", file=sys.stderr)
        return 2
    try:
        turns = tuple(float(v) for v in args.turn.split(",")) if args.turn else ()
        if turns and (args.whole_head or below):
            raise ValueError
    except ValueError:
        print(f"error: --turn takes degrees, comma-separated, and turns the cut (not with "
              f"--whole-head or --below), got {args.turn!r}", file=sys.stderr)
        return 2
    from cowjax.inference.predictor import load_predictor  # JAX: only once the arguments are good
    try:
        predictors = {m: load_predictor(m, presence="network") for m in args.models}
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors: dict = {}
    for k in tqdm(range(args.num), desc="field of view", unit="case"):
        truth, views = _views(args.seed, k, box, args.whole_head, below, turns)
        for model, predictor in predictors.items():
            seen = {}                               # one prediction per image, however scored
            for name, image, affine, scored, turn in views:
                key = (id(image), affine.tobytes())
                if key not in seen:
                    turned = truth if turn is None else apply_transform(turn, truth)
                    seen[key] = np.linalg.norm(
                        predictor.predict(image, affine).landmarks - turned, axis=1)
                errors.setdefault((model, name), []).append(seen[key][scored])
    print(f"held-out seed {args.seed}, {args.num} cases: MRE mm (median) [landmarks scored]")
    for (model, name), e in errors.items():
        e = np.concatenate(e)
        print(f"  {model}: {name}: {e.mean():.2f} ({np.median(e):.2f}) [{len(e)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
