"""Landmark error on the one real TOF-MRA here, against landmarks the project placed on it.

    python benchmarks/real_crop.py models/ready runs/other
    python benchmarks/real_crop.py --ways models/ready
    python benchmarks/real_crop.py --perturb models/ready

The image is the TopCoW example crop in ``../shared/real-mra/`` (kept out of the repository); the
9 landmarks defined on it (the circle's junctions) are in ``benchmarks/data/real_crop_landmarks.
json``, with how they were placed: skeleton junctions of the thresholded vessels, identified by
eye, not by a clinician; about 1-2 mm of uncertainty. One image: a check of the appearance gap,
not an accuracy figure, and nothing to tune on. Each model predicts with its default inference;
``--ways`` also prints the first network alone and each without test-time augmentation.

``--perturb`` sees the same image as another scanner or another placement of the head would give
it (``perturbations``: the head turned 15 degrees, the voxels resampled, the contrast bent by a
gamma, a bias field, more noise, a thinner slab), the placed landmarks moved with it where the
world moves, and prints beside each error how far the prediction moved from the one as read
(mean over the landmarks of |error vector - error vector as read|): how steady the model is on a
real image, not how accurate. The noise is seeded, the whole table deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cowjax import anatomy  # noqa: E402
from cowjax.data import preprocess  # noqa: E402
from cowjax.errors import CowjaxError  # noqa: E402
from cowjax.registration.landmarks import apply_transform  # noqa: E402

LANDMARKS = Path(__file__).resolve().parent / "data" / "real_crop_landmarks.json"
IMAGE = ROOT.parent / "shared" / "real-mra" / "topcow_mr_crop.mha"


def turn_about(axis: int, degrees: float, centre) -> np.ndarray:
    """[4, 4] world -> world: ``degrees`` about world axis ``axis`` (0 R, 1 A, 2 S) through
    ``centre`` (mm), right-handed: about R, a positive turn lifts the anterior end."""
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_rotvec(np.eye(3)[axis] * degrees, degrees=True).as_matrix()
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    return turn


def _resampled(image, affine, spacing):
    """The image on a grid of ``spacing`` mm along its own axes, centred as before, smoothed first
    where the new voxels are larger (Gaussian, half the size ratio less one)."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.asarray(spacing, np.float64)
    shape = np.floor(np.array(image.shape) * zooms / spacing).astype(int)
    grid = affine.copy()
    grid[:3, :3] = affine[:3, :3] / zooms * spacing
    middle = preprocess.voxel_to_world((np.array(image.shape) - 1) / 2, affine)
    grid[:3, 3] = middle - grid[:3, :3] @ ((shape - 1) / 2)
    sigma = np.maximum(spacing / zooms - 1, 0) / 2
    return preprocess.resample(ndimage.gaussian_filter(image, sigma), affine, grid, shape, 1), grid


def perturbations(image, affine, centre, seed: int = 0):
    """Yield (label, image, affine, turn) for the image as read and as other scans of the same
    head would give it; ``turn`` [4, 4] maps the world as read to the view's (a rotation about
    ``centre``, world mm, for the turned views; the identity otherwise)."""
    rng = np.random.default_rng(seed)
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, [1, 99.9])
    same = np.eye(4)
    yield "as read", image, affine, same
    for axis, degrees, how in [(0, 15, "nod"), (0, -15, "nod"), (1, 15, "roll"), (2, 15, "yaw")]:
        turn = turn_about(axis, degrees, centre)
        yield f"turned {degrees:+d} deg about {'RAS'[axis]} ({how})", image, turn @ affine, turn
    for spacing in [(0.5, 0.5, 0.8), (0.6, 0.6, 0.6)]:
        yield (f"resampled to {' x '.join(f'{v:g}' for v in spacing)} mm",
               *_resampled(image, affine, spacing), same)
    for g in (0.6, 1.6):
        bent = np.clip((image - lo) / (hi - lo), 0, None) ** g * (hi - lo) + lo
        yield f"gamma {g:g} (1st-99.9th percentile range)", bent.astype(np.float32), affine, same
    superior = np.argmax(np.abs(affine[2, :3]))          # the voxel axis nearest world S
    ramp = np.linspace(1.3, 0.7, image.shape[superior])    # inflow: brighter where blood enters
    if affine[2, superior] < 0:
        ramp = ramp[::-1]
    shape = [1, 1, 1]
    shape[superior] = -1
    yield ("bias 1.3 inferior to 0.7 superior", (image * ramp.reshape(shape)).astype(np.float32),
           affine, same)
    for fraction in (0.05, 0.10):
        sigma = fraction * hi
        noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
        yield (f"Rician noise {fraction:.0%} of the 99.9th percentile", noisy.astype(np.float32),
               affine, same)
    cut = int(round(4.0 / np.linalg.norm(affine[:3, superior])))
    for side in ("superior", "inferior"):
        keep = [slice(None)] * 3
        drop_low = (side == "inferior") == (affine[2, superior] > 0)
        keep[superior] = slice(cut, None) if drop_low else slice(0, image.shape[superior] - cut)
        moved = affine.copy()
        if drop_low:
            start = np.zeros(3)
            start[superior] = cut
            moved[:3, 3] = preprocess.voxel_to_world(start, affine)
        yield f"4 mm off the {side} end", np.ascontiguousarray(image[tuple(keep)]), moved, same


def read_truth(path: Path = LANDMARKS) -> tuple[list[str], np.ndarray]:
    """(names, [K, 3] world RAS mm) of the placed landmarks."""
    placed = json.loads(path.read_text(encoding="utf-8"))["landmarks"]
    unknown = sorted(set(placed) - set(anatomy.LANDMARKS))
    if unknown:
        raise CowjaxError(f"{path}: not cow19 landmarks: {', '.join(unknown)}")
    return list(placed), np.array(list(placed.values()), np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run workdirs or exported model folders")
    parser.add_argument("--image", default=str(IMAGE), help="the real crop (default: %(default)s)")
    parser.add_argument("--ways", action="store_true",
                        help="also without the refinement stage and without test-time augmentation")
    parser.add_argument("--perturb", action="store_true",
                        help="also the image turned, resampled, re-contrasted, noised and cut")
    args = parser.parse_args(argv)
    if args.ways and args.perturb:
        print("error: --ways and --perturb: one at a time", file=sys.stderr)
        return 2
    if not Path(args.image).is_file():
        print(f"error: {args.image}: no such file (the real crop lives outside the repository)",
              file=sys.stderr)
        return 2
    from cowjax.data import io  # JAX and SimpleITK: only once the arguments are good
    from cowjax.inference.predictor import load_predictor
    try:
        names, truth = read_truth()
        index = [anatomy.LANDMARK_INDEX[n] for n in names]
        image, affine = io.load_image(args.image)
        ways = ([(False, False), (False, True), (True, False), (True, True)] if args.ways
                else [(True, True)])
        rows = []
        views = (list(perturbations(image, affine, truth.mean(axis=0))) if args.perturb
                 else [("", image, affine, np.eye(4))])
        for model in args.models:
            for refine, tta in ways:
                predictor = load_predictor(model, refine=refine, tta=tta, presence="network")
                how = "" if not args.ways else (
                    f" ({'both stages' if refine else 'first network'}, "
                    f"{'mirror averaged' if tta else 'one look'})")
                as_read = None
                for view, im, af, turn in tqdm(views, desc=Path(model).name, unit="view",
                                               disable=len(views) == 1, leave=False):
                    found = predictor.predict(im, af).landmarks[index]
                    # Back in the world as read: error vectors compare across the views.
                    off = apply_transform(np.linalg.inv(turn), found) - truth
                    as_read = off if as_read is None else as_read
                    moved = np.linalg.norm(off - as_read, axis=1).mean()
                    label = f"{model}{how}" + (f": {view}" if view else "")
                    rows.append((label, np.linalg.norm(off, axis=1), moved))
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(label) for label, _, _ in rows)
    print(f"{Path(args.image).name}: error (mm) at the {len(names)} placed landmarks"
          + ("; moved: mean shift from the prediction as read" if args.perturb else ""))
    print(" " * width + "  " + " ".join(f"{n:>10}" for n in names) + "       mean"
          + ("      moved" if args.perturb else ""))
    for label, errors, moved in rows:
        print(f"{label:<{width}}  " + " ".join(f"{e:10.1f}" for e in errors)
              + f" {errors.mean():10.2f}" + (f" {moved:10.2f}" if args.perturb else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
