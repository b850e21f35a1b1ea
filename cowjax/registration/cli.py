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

import io as _bytes_io
import json
from pathlib import Path

import numpy as np

from cowjax import anatomy
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.registration import landmarks as lm

DIRECTION = "moving world RAS mm -> fixed world RAS mm"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The overlay is drawn on a RAS-aligned grid with at most this many voxels along an axis.
_DISPLAY_VOXELS = 256
_ORANGE = np.array([1.0, 0.55, 0.0])


def output_paths(output: str | Path) -> dict[str, Path]:
    """The three output files for an output image path ``<stem>.nii[.gz]``."""
    output = Path(output)
    suffix = next((s for s in _NIFTI_SUFFIXES[::-1] if output.name.endswith(s)), None)
    if suffix is None:
        raise CowjaxError(f"{output}: the output must be a NIfTI file (.nii or .nii.gz)")
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
            from cowjax.inference.predict import Predictor
            cache["p"] = Predictor.from_workdir(workdir)
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
    png = overlay_png(fixed_img, fixed_aff, moving_img, matrix @ moving_aff,
                      f_lm, lm.apply_transform(matrix, m_lm), used,
                      title=f"{Path(moving).name} -> {Path(fixed).name} ({transform})")

    io.save_image(paths["image"], moved.astype(np.float32), fixed_aff)
    with atomic_output(paths["transform"]) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    with atomic_output(paths["overlay"]) as tmp:
        tmp.write_bytes(png)
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


def overlay_png(fixed, fixed_affine, moving, moved_affine, fixed_lm, moved_lm, used,
                title: str = "") -> bytes:
    """PNG bytes: axial and coronal MIPs of the fixed image (grey) with the moved one (orange).

    moved_affine: the moving image's affine already composed with the transform, so both images
    are drawn in fixed world space. Landmarks: fixed as cyan circles, moved as magenta crosses.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spacing = np.linalg.norm(fixed_affine[:3, :3], axis=0)
    extent = np.abs(fixed_affine[:3, :3]) @ (np.array(fixed.shape) - 1)
    step = max(spacing.min(), extent.max() / (_DISPLAY_VOXELS - 1))
    grid_affine, grid_shape = preprocess.canonical_grid(fixed_affine, fixed.shape, (step,) * 3)
    f = _unit(preprocess.resample(fixed, fixed_affine, grid_affine, grid_shape, order=1))
    m = _unit(preprocess.resample(moving, moved_affine, grid_affine, grid_shape, order=1))
    lo = grid_affine[:3, 3]
    hi = lo + np.diag(grid_affine)[:3] * (np.array(grid_shape) - 1)

    fig = Figure(figsize=(11, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    # (projected axis, horizontal axis, vertical axis): axial looks down z, coronal along y.
    for k, (name, proj, h, v) in enumerate((("axial", 2, 0, 1), ("coronal", 1, 0, 2))):
        ax = fig.add_subplot(1, 2, k + 1)
        fm, mm = f.max(axis=proj), m.max(axis=proj)
        # Orange at most 60% opaque, so the grey fixed image shows through where they overlap.
        alpha = 0.6 * mm[..., None]
        rgb = (1 - alpha) * fm[..., None] + alpha * _ORANGE
        # Rows are the vertical axis; the +v direction is drawn upwards.
        ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower",
                  extent=(lo[h] - step / 2, hi[h] + step / 2, lo[v] - step / 2, hi[v] + step / 2))
        for pts, style in ((fixed_lm, dict(marker="o", mfc="none", mec="cyan", ms=8, mew=1.5)),
                           (moved_lm, dict(marker="+", color="magenta", ms=9, mew=1.5))):
            p = pts[used]
            ax.plot(p[:, h], p[:, v], ls="none", **style)
        ax.set_xlim(lo[h] - step / 2, hi[h] + step / 2)
        ax.set_ylim(lo[v] - step / 2, hi[v] + step / 2)
        ax.set_title(f"{name} MIP")
        ax.set_xlabel("x (mm, +right)")
        ax.set_ylabel("y (mm, +anterior)" if v == 1 else "z (mm, +superior)")
    fig.suptitle(f"{title}\ngrey: fixed, orange: moved; cyan o: fixed landmarks, magenta +: moved")
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _unit(image: np.ndarray) -> np.ndarray:
    """Robust [0, 1] display scaling (1st to 99.9th percentile)."""
    lo, hi = np.percentile(image, [1.0, 99.9])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def _nanmean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _json_floats(x) -> list:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64)]


def _cell(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.2f}"
