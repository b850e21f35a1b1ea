"""Synthetic data sets on disk: case folders written in parallel, and the command line
``python -m cowjax.data.synthetic``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cowjax.data import _parallel, io
from cowjax.data.synthetic.case import PAPER_SPACING, generate_case
from cowjax.errors import ArgumentParser, CowjaxError, atomic_output_dir


def _write_case(out_dir: Path, case: io.Case, info: dict, preview: bool) -> Path:
    """Write one case folder atomically (``atomic_output_dir``)."""
    final = out_dir / case.case_id
    with atomic_output_dir(final) as tmp:
        io.save_case(tmp, case)
        (tmp / "pathology.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        if preview:
            from cowjax import figures  # matplotlib: only in the workers that draw previews
            figures.case_preview(tmp / "preview.png", case)
    return final


def generate_dataset(out_dir: str | Path, num: int, seed: int, spacing=PAPER_SPACING,
                     pathology_fraction: float = 0.3, preview: bool = False,
                     progress: bool = True, workers: int | None = None,
                     cortex: bool = False) -> list[Path]:
    """Write cases ``case_0000`` .. ``case_{num-1}`` under ``out_dir`` (created if missing),
    over ``workers`` processes (default: one per core).

    Each case is ``generate_case(seed, index, ...)``, so a case does not depend on ``num``
    (``cortex``: with the cortical branches).
    Returns the case folders.
    """
    if num < 1:
        raise CowjaxError(f"--num must be at least 1, got {num}")
    if not 0.0 <= pathology_fraction <= 1.0:
        raise CowjaxError(f"pathology fraction must be in [0, 1], got {pathology_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CowjaxError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, index, tuple(spacing), pathology_fraction, preview, cortex)
            for index in range(num)]
    return _parallel.map_cases(_make_case, jobs, "synthetic cases", progress, workers)


def _make_case(job) -> Path:
    out_dir, seed, index, spacing, pathology_fraction, preview, cortex = job
    case, info = generate_case(seed, index, spacing, pathology_fraction, return_info=True,
                               cortex=cortex)
    return _write_case(out_dir, case, info, preview)


def _parse_spacing(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.1 <= v <= 10.0 for v in values):
        raise CowjaxError(f"--spacing must be three numbers in [0.1, 10] mm like 0.513,0.513,0.8, "
                          f"got {text!r}")
    return values


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m cowjax.data.synthetic",
                     description="Write synthetic Circle of Willis TOF-MRA cases.")
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, required=True, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", default=",".join(map(str, PAPER_SPACING)), help="X,Y,Z mm")
    parser.add_argument("--preview", action="store_true", help="write <case>/preview.png (MIPs)")
    parser.add_argument("--pathology", type=float, default=0.3, help="share of cases with pathology")
    parser.add_argument("--cortex", action="store_true",
                        help="also the cortical branches beyond the terminal ones")
    args = parser.parse_args(argv)
    try:
        if args.seed < 0:
            raise CowjaxError(f"--seed must be non-negative, got {args.seed}")
        spacing = _parse_spacing(args.spacing)
        start = time.perf_counter()
        dirs = generate_dataset(args.out_dir, args.num, args.seed, spacing, args.pathology,
                                preview=args.preview, cortex=args.cortex)
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = (time.perf_counter() - start) / len(dirs)
    print(f"wrote {len(dirs)} cases to {args.out_dir}: {seconds:.2f} s per case")
    return 0

