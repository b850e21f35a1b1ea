"""Landmark error on the one real TOF-MRA here, against landmarks the project placed on it.

    python benchmarks/real_crop.py models/ready runs/other
    python benchmarks/real_crop.py --ways models/ready

The image is the TopCoW example crop in ``../shared/real-mra/`` (kept out of the repository); the
9 landmarks defined on it (the circle's junctions) are in ``benchmarks/data/real_crop_landmarks.
json``, with how they were placed: skeleton junctions of the thresholded vessels, identified by
eye, not by a clinician; about 1-2 mm of uncertainty. One image: a check of the appearance gap,
not an accuracy figure, and nothing to tune on. Each model predicts with its default inference;
``--ways`` also prints the first network alone and each without test-time augmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cowjax import anatomy  # noqa: E402
from cowjax.errors import CowjaxError  # noqa: E402

LANDMARKS = Path(__file__).resolve().parent / "data" / "real_crop_landmarks.json"
IMAGE = ROOT.parent / "shared" / "real-mra" / "topcow_mr_crop.mha"


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
    args = parser.parse_args(argv)
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
        for model in args.models:
            for refine, tta in ways:
                predictor = load_predictor(model, refine=refine, tta=tta, presence="network")
                found = predictor.predict(image, affine).landmarks
                errors = np.linalg.norm(found[index] - truth, axis=1)
                how = "" if not args.ways else (
                    f" ({'both stages' if refine else 'first network'}, "
                    f"{'mirror averaged' if tta else 'one look'})")
                rows.append((f"{model}{how}", errors))
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(label) for label, _ in rows)
    print(f"{Path(args.image).name}: error (mm) at the {len(names)} placed landmarks")
    print(" " * width + "  " + " ".join(f"{n:>10}" for n in names) + "       mean")
    for label, errors in rows:
        print(f"{label:<{width}}  " + " ".join(f"{e:10.1f}" for e in errors)
              + f" {errors.mean():10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
