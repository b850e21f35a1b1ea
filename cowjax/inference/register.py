"""Register one subject (or time point) onto another through their landmarks.

  python launch.py --mode=register --workdir=runs/demo --fixed=A.nii.gz --moving=B.nii.gz \
      --output=B_on_A.nii.gz [--transform=similarity] [--fixed_landmarks=A.mrk.json ...]

Landmarks come from the trained detector in ``workdir`` (weighted by its confidences) or from
given landmark files. Writes, beside each other:
  <stem>.nii.gz          the moving image resampled onto the fixed grid (trilinear, fixed affine)
  <stem>.transform.json  the [4, 4] world transform, landmarks used, residuals, leave-one-out TRE
  <stem>.png             overlay: fixed grey, moved orange, landmarks marked (axial + coronal MIPs)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cowjax import anatomy, figures
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.registration import landmarks as lm

DIRECTION = "moving world RAS mm -> fixed world RAS mm"
# The overlay is drawn on a RAS-aligned grid with at most this many voxels along an axis.
_DISPLAY_VOXELS = 256


def output_paths(output: str | Path) -> dict[str, Path]:
    """The three output files for an output image path ``<stem>.<image suffix>``."""
    output = Path(output)
    suffix = io.image_suffix(output)
    if suffix is None or not output.name.endswith(suffix):
        raise CowjaxError(f"{output}: the output must be an image file (one of "
                          f"{', '.join(io.IMAGE_SUFFIXES)})")
    stem = output.name[: -len(suffix)]
    return {"image": output, "transform": output.with_name(f"{stem}.transform.json"),
            "overlay": output.with_name(f"{stem}.png")}


def _landmarks(path, image, affine, predictor, name):
    """(landmarks [19, 3] RAS, confidence [19] or None) from a file or from the detector."""
    if path is not None:
        return io.read_landmarks(path), None
    pred = predictor().predict(image, affine)
    print(f"{name}: detected landmarks (mean confidence {np.mean(pred.confidence):.2f})")
    return pred.landmarks, pred.confidence


def run_register(workdir, fixed, moving, output, transform: str = "rigid",
                 fixed_landmarks=None, moving_landmarks=None) -> dict:
    """Fit the landmark transform moving -> fixed, write the moved image, transform and overlay.

    workdir: run directory with a checkpoint, used to detect landmarks that are not given (may be
    None when both landmark files are given). Returns the transform record written as JSON.
    """
    if transform not in lm.KINDS:
        raise CowjaxError(f"unknown transform {transform!r}; expected one of {lm.KINDS}")
    paths = output_paths(output)
    if not paths["image"].parent.is_dir():
        raise CowjaxError(f"{paths['image']}: output directory {paths['image'].parent} does not exist")
    if (fixed_landmarks is None or moving_landmarks is None) and workdir is None:
        raise CowjaxError("register: give --workdir (a trained run) to detect landmarks, or both "
                          "--fixed_landmarks and --moving_landmarks")
    fixed_img, fixed_aff = io.load_image(fixed)
    moving_img, moving_aff = io.load_image(moving)

    cache = {}

    def predictor():
        if "p" not in cache:
            from cowjax.inference.predictor import load_predictor
            cache["p"] = load_predictor(workdir)
        return cache["p"]

    f_lm, f_conf = _landmarks(fixed_landmarks, fixed_img, fixed_aff, predictor, "fixed")
    m_lm, m_conf = _landmarks(moving_landmarks, moving_img, moving_aff, predictor, "moving")
    # Detected landmarks count by how sure the detector is on both sides.
    weights = None
    if f_conf is not None or m_conf is not None:
        weights = np.ones(anatomy.NUM_LANDMARKS)
        for conf in (f_conf, m_conf):
            weights = weights if conf is None else weights * np.clip(conf, 0.0, None)
    try:
        matrix = lm.fit_transform(f_lm, m_lm, transform, weights)
    except CowjaxError as e:
        raise CowjaxError(f"{moving} -> {fixed}: {e}")
    used = lm.common_mask(f_lm, m_lm, weights)
    res = np.where(used, lm.residuals(f_lm, m_lm, matrix), np.nan)
    tre = lm.leave_one_out_tre(f_lm, m_lm, transform, weights)

    moved = preprocess.resample(moving_img, matrix @ moving_aff, fixed_aff, fixed_img.shape, order=1)
    record = {
        "matrix": matrix.tolist(), "kind": transform, "direction": DIRECTION,
        "fixed": str(fixed), "moving": str(moving),
        "landmarks_used": [n for n, u in zip(anatomy.LANDMARKS, used) if u],
        "weights": None if weights is None else _json_floats(weights),
        "residual_mm": _json_floats(res), "loo_tre_mm": _json_floats(tre),
        "mean_residual_mm": _nanmean(res), "mean_loo_tre_mm": _nanmean(tre),
    }
    if transform == "similarity":
        record["scale"] = float(np.cbrt(np.linalg.det(matrix[:3, :3])))
    io.save_image(paths["image"], moved.astype(np.float32), fixed_aff)
    with atomic_output(paths["transform"]) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # Both images on one RAS-aligned display grid of at most _DISPLAY_VOXELS per axis.
    spacing = np.linalg.norm(fixed_aff[:3, :3], axis=0)
    extent = np.abs(fixed_aff[:3, :3]) @ (np.array(fixed_img.shape) - 1)
    step = max(spacing.min(), extent.max() / (_DISPLAY_VOXELS - 1))
    grid = preprocess.canonical_grid(fixed_aff, fixed_img.shape, (step,) * 3)
    figures.registration_overlay(
        paths["overlay"], preprocess.resample(fixed_img, fixed_aff, *grid, order=1),
        preprocess.resample(moving_img, matrix @ moving_aff, *grid, order=1), grid[0], f_lm,
        lm.apply_transform(matrix, m_lm), used,
        title=f"{Path(moving).name} -> {Path(fixed).name} ({transform})")
    print(format_table(res, tre, used))
    print(f"wrote {paths['image']}, {paths['transform'].name}, {paths['overlay'].name}")
    return record


def format_table(res: np.ndarray, tre: np.ndarray, used: np.ndarray) -> str:
    """Per-landmark residual and leave-one-out TRE (mm) as a small text table."""
    width = max(len(n) for n in anatomy.LANDMARKS)
    lines = [f"{'landmark':<{width}}  residual_mm  loo_tre_mm"]
    for name, r, t, u in zip(anatomy.LANDMARKS, res, tre, used):
        cells = (_cell(r), _cell(t)) if u else ("not used", "")
        lines.append(f"{name:<{width}}  {cells[0]:>11}  {cells[1]:>10}")
    lines.append(f"{'mean (' + str(int(used.sum())) + ' used)':<{width}}  "
                 f"{_cell(_nanmean(res)):>11}  {_cell(_nanmean(tre)):>10}")
    return "\n".join(lines)


def _nanmean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _json_floats(x) -> list:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64)]


def _cell(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.2f}"
