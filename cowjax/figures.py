"""Report figures as PNG (matplotlib, Agg backend: no display needed).

Every image panel is a maximum intensity projection drawn one way (``_mip``): axial or coronal, in
world mm, radiological (patient right on the image's left, as clinicians read), R and L marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from cowjax import anatomy, metrics  # noqa: E402
from cowjax.errors import atomic_output  # noqa: E402


def _save(fig, path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def landmark_error_bars(path, errors_by_run: dict[str, np.ndarray]) -> Path:
    """Mean radial error per landmark with standard deviation bars, one bar group per run.

    errors_by_run: {run name: errors [cases, 19] mm, NaN unknown}.
    """
    names = anatomy.LANDMARKS
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(errors_by_run)
    x = np.arange(len(names))
    for k, (run, err) in enumerate(errors_by_run.items()):
        err = np.asarray(err, np.float64)
        # NaN-ignoring; a landmark never annotated gets no bar.
        mean = metrics.mre(err, axis=0)
        std = np.sqrt(metrics.mre((err - mean) ** 2, axis=0))
        ax.bar(x + (k - (len(errors_by_run) - 1) / 2) * width, mean, width, yerr=std, capsize=2,
               label=f"{run} (MRE {float(metrics.mre(err)):.2f} mm)")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("radial error (mm), mean ± sd")
    ax.set_title("Landmark error per landmark")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# One colour per segment (class 1 + j gets SEGMENT_COLOURS[j]): matplotlib's 20 qualitative colours.
SEGMENT_COLOURS = np.array(plt.get_cmap("tab20").colors)


def _segment_legend(fig) -> None:
    """The 20 segments' colours and names down the figure's right edge."""
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SEGMENT_COLOURS]
    fig.legend(handles, anatomy.SEGMENTS, loc="center right", fontsize=7, frameon=False)


def _label_mip(image, labels, axis):
    """The label of the brightest labelled voxel along each ray (0 where the ray meets none)."""
    score = np.where(labels > 0, image, -np.inf)
    idx = np.expand_dims(np.argmax(score, axis=axis), axis)
    return np.where(np.isfinite(np.take_along_axis(score, idx, axis)),
                    np.take_along_axis(labels, idx, axis), 0).squeeze(axis)


# The two MIP views: (projected axis, horizontal world axis, vertical world axis).
_VIEWS = {"axial": (2, 0, 1), "coronal": (1, 0, 2)}
_AXIS_LABELS = ("x (mm, +R)", "y (mm, anterior up)", "z (mm, superior up)")
_ORANGE = np.array([1.0, 0.55, 0.0])


def _mip(ax, image, grid_affine, view: str, labels=None, overlay=None) -> tuple[int, int]:
    """Draw the grey maximum intensity projection of ``image`` [X, Y, Z] on a RAS-aligned grid
    (``grid_affine``: diag(spacing) + origin) in world mm, radiological: patient right on the left
    (x grows leftwards), anterior (axial) or superior (coronal) up.

    labels: optional [X, Y, Z] segment labels drawn in colour over it (``_label_mip``); overlay:
    optional [X, Y, Z] second image on the same grid, its MIP drawn in orange over the grey (at most
    60% opaque, so the grey shows through). Returns the world axes (horizontal, vertical) for
    drawing points in world mm.
    """
    drop, h, v = _VIEWS[view]
    spacing, origin = np.diag(grid_affine)[:3], grid_affine[:3, 3]
    lo, hi = origin - spacing / 2, origin + (np.array(image.shape) - 0.5) * spacing
    extent = (lo[h], hi[h], lo[v], hi[v])
    mip = image.max(axis=drop)
    # Background to black, the brightest vessels just saturated.
    vmin, vmax = np.percentile(mip, [20, 99.8])
    ax.imshow(mip.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, extent=extent)
    if labels is not None:
        colours = np.concatenate([np.zeros((1, 3)), SEGMENT_COLOURS])
        ray = _label_mip(image, labels, drop).T
        rgba = np.concatenate([colours[ray], (ray > 0)[..., None] * 0.85], axis=-1)
        ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest")
    if overlay is not None:
        top = overlay.max(axis=drop).T
        lo_o, hi_o = np.percentile(top, [20, 99.8])
        alpha = 0.6 * np.clip((top - lo_o) / max(hi_o - lo_o, 1e-12), 0.0, 1.0)
        ax.imshow(np.concatenate([np.broadcast_to(_ORANGE, top.shape + (3,)), alpha[..., None]],
                                 axis=-1), origin="lower", extent=extent)
    ax.set_xlim(hi[h], lo[h])                                    # patient right on the left
    ax.set_ylim(lo[v], hi[v])
    ax.set_aspect("equal")
    ax.set_xlabel(_AXIS_LABELS[h])
    ax.set_ylabel(_AXIS_LABELS[v])
    for x, side in ((0.01, "R"), (0.99, "L")):
        ax.text(x, 0.5, side, transform=ax.transAxes, ha="left" if side == "R" else "right",
                va="center", color="yellow", fontsize=11, fontweight="bold")
    return h, v


def landmark_mips(path, image, grid_affine, true_ras, pred_ras, title: str) -> Path:
    """Axial and coronal MIPs (``_mip``) with true (green) and predicted (red) points.

    image: [X, Y, Z] on a RAS-aligned grid (``grid_affine`` diagonal + origin); landmarks [19, 3]
    RAS.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, view in zip(axes, _VIEWS):
        a, b = _mip(ax, image, grid_affine, view)
        for pts, colour, label in ((true_ras, "lime", "true"), (pred_ras, "red", "predicted")):
            ax.scatter(pts[:, a], pts[:, b], s=22, facecolors="none", edgecolors=colour,
                       linewidths=1.3, label=label)
        for t, p in zip(true_ras, pred_ras):
            if np.all(np.isfinite(t)):
                ax.plot([t[a], p[a]], [t[b], p[b]], color="yellow", linewidth=0.6)
        ax.set_title(f"{view} MIP")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def prediction_mips(path, image, grid_affine, landmarks, title: str, labels=None) -> Path:
    """What ``--mode=predict --figure`` writes for one image: axial and coronal MIPs (``_mip``) with
    the predicted landmarks named, and where ``labels`` is given a second row with the segments in
    colour and their legend.

    image and labels: [X, Y, Z] on one RAS-aligned grid (``grid_affine`` diagonal + origin);
    landmarks: [19, 3] RAS mm.
    """
    rows = 1 if labels is None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 5 * rows), squeeze=False)
    for ax, view in zip(axes[0], _VIEWS):
        a, b = _mip(ax, image, grid_affine, view)
        ax.scatter(landmarks[:, a], landmarks[:, b], s=22, facecolors="none", edgecolors="red",
                   linewidths=1.3)
        for name, p in zip(anatomy.LANDMARKS, landmarks):
            ax.annotate(name, (p[a], p[b]), xytext=(3, 3), textcoords="offset points",
                        color="cyan", fontsize=6)
        ax.set_title(f"{view} MIP, predicted landmarks")
    if labels is not None:
        for ax, view in zip(axes[1], _VIEWS):
            _mip(ax, image, grid_affine, view, labels)
            ax.set_title(f"{view} MIP, segments")
        _segment_legend(fig)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88 if labels is not None else 1, 1))
    return _save(fig, path)


def compare_images(path, images: dict[str, tuple[np.ndarray, np.ndarray]], slab_mm: float,
                   title: str) -> Path:
    """Images side by side, one column each: axial and coronal MIPs (``_mip``) and an axial MIP
    of a ``slab_mm`` slab through the middle (tissue texture and noise, which a full MIP hides).

    images: {column title: (image [X, Y, Z], grid_affine)}, each on a RAS-aligned grid.
    """
    fig, axes = plt.subplots(3, len(images), figsize=(4.2 * len(images), 11), squeeze=False)
    for col, (name, (image, grid_affine)) in enumerate(images.items()):
        for row, view in enumerate(_VIEWS):
            _mip(axes[row, col], image, grid_affine, view)
            axes[row, col].set_title(f"{name}\n{view} MIP", fontsize=9)
        half = max(1, round(slab_mm / 2 / grid_affine[2, 2]))
        middle = image.shape[2] // 2
        slab_affine = grid_affine.copy()
        slab_affine[2, 3] += (middle - half) * grid_affine[2, 2]
        _mip(axes[2, col], image[..., middle - half:middle + half], slab_affine, "axial")
        axes[2, col].set_title(f"{name}\naxial {slab_mm:g} mm slab", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def segment_mips(path, image, grid_affine, labels_by_row: dict[str, np.ndarray],
                 title: str) -> Path:
    """Axial and coronal MIPs (``_mip``) with segment labels in colour, one row per labelling (e.g.
    truth and prediction), and a legend of the 20 segments.

    image and each labelling: [X, Y, Z] on one RAS-aligned grid (``grid_affine`` diagonal + origin).
    A ray's colour is the label of its brightest labelled voxel, as the grey MIP shows that voxel.
    """
    rows = len(labels_by_row)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.6 * rows), squeeze=False)
    for r, (name, labels) in enumerate(labels_by_row.items()):
        for ax, view in zip(axes[r], _VIEWS):
            _mip(ax, image, grid_affine, view, labels)
            ax.set_title(f"{name}: {view} MIP")
    _segment_legend(fig)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return _save(fig, path)


def compare_runs(path, summaries: dict[str, dict]) -> Path:
    """MRE (bars, with the median as a dot) and SDR at 2 mm per run, for the ablation runs.

    summaries: {run name: evaluate's overall summary}.
    """
    runs = list(summaries)
    mre = [summaries[r]["mre_mm"] for r in runs]
    med = [summaries[r]["median_mm"] for r in runs]
    sdr2 = [summaries[r]["sdr"]["2.0"] * 100 for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(5 + 2 * len(runs), 4))
    x = np.arange(len(runs))
    ax1.bar(x, mre, color="tab:blue", label="mean")
    ax1.plot(x, med, "o", color="black", label="median")
    for i, v in enumerate(mre):
        ax1.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, runs, rotation=20, ha="right")
    ax1.set_ylabel("radial error (mm)")
    ax1.set_title("MRE per run")
    ax1.legend(fontsize=8)
    ax2.bar(x, sdr2, color="tab:green")
    for i, v in enumerate(sdr2):
        ax2.annotate(f"{v:.1f}%", (i, v), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, runs, rotation=20, ha="right")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("% of landmarks within 2 mm")
    ax2.set_title("SDR at 2 mm")
    fig.tight_layout()
    return _save(fig, path)


def landmark_error_boxes(path, errors_by_arm: dict[str, np.ndarray]) -> Path:
    """Per-landmark error distributions as box plots, the arms side by side (the paper's Fig. 5).

    errors_by_arm: {arm: errors [..., 19] mm, NaN unknown}; the leading axes (seeds, cases) are
    pooled. The legend gives each arm's MRE over all its known errors.
    """
    from matplotlib.patches import Patch
    names = anatomy.LANDMARKS
    width = 0.8 / len(errors_by_arm)
    fig, ax = plt.subplots(figsize=(13, 4.5))
    x = np.arange(len(names))
    handles = []
    for k, (arm, err) in enumerate(errors_by_arm.items()):
        err = np.asarray(err, np.float64).reshape(-1, len(names))
        colour = f"C{k}"
        # A landmark never annotated gets an empty box (boxplot draws nothing for it).
        columns = [col[np.isfinite(col)] for col in err.T]
        boxes = ax.boxplot(columns, positions=x + (k - (len(errors_by_arm) - 1) / 2) * width,
                           widths=width * 0.85, patch_artist=True, manage_ticks=False,
                           medianprops={"color": "black", "linewidth": 0.8},
                           flierprops={"marker": ".", "markersize": 2, "markeredgecolor": colour})
        for box in boxes["boxes"]:
            box.set(facecolor=colour, alpha=0.7, linewidth=0.6)
        handles.append(Patch(
            facecolor=colour, alpha=0.7, label=f"{arm} (MRE {float(metrics.mre(err)):.2f} mm)"))
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("radial error (mm)")
    ax.set_title("Landmark error per landmark and arm")
    ax.legend(handles=handles, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def paired_differences(path, differences: dict[str, dict], reference: str) -> Path:
    """Each arm's mean paired error difference from ``reference`` with its 95% interval.

    differences: {arm: {"mean_mm", "ci95_mm": [lo, hi], "p_wilcoxon"}} (``ablation.paired_difference``).
    """
    arms = list(differences)
    mean = np.array([differences[a]["mean_mm"] for a in arms], np.float64)
    ci = np.array([differences[a]["ci95_mm"] for a in arms], np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.6 * len(arms)))
    y = np.arange(len(arms))[::-1]
    # A percentile interval need not surround the mean: clip, never draw a negative bar.
    xerr = np.clip(np.stack([mean - ci[:, 0], ci[:, 1] - mean]), 0.0, None)
    ax.errorbar(mean, y, xerr=xerr, fmt="o", color="tab:blue", capsize=4)
    for yi, a, m in zip(y, arms, mean):
        ax.annotate(f"{m:+.2f} mm, p={differences[a]['p_wilcoxon']:.2g}", (m, yi),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    lo, hi = min(0.0, np.nanmin(ci)), max(0.0, np.nanmax(ci))
    pad = 0.3 * (hi - lo) or 0.1                       # room for the labels; zero always in view
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(y, arms)
    ax.set_ylim(-0.7, len(arms) - 0.3)
    ax.set_xlabel(f"error difference from {reference} (mm), mean and 95% interval")
    ax.set_title(f"Paired difference from {reference} (negative: better)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def case_preview(path, case) -> Path:
    """Axial and coronal MIPs (``_mip``) of a case with its 19 landmarks named; those known absent
    (``case.attributes``) in orange.

    The image is permuted/flipped onto its nearest RAS axes (nibabel, no resampling) and drawn in
    mm along them: world mm for an image stored along RAS axes, the image's own axes when oblique.
    """
    canonical = nib.as_closest_canonical(nib.Nifti1Image(case.image, case.affine))
    affine = canonical.affine
    grid_affine = np.diag(np.append(np.linalg.norm(affine[:3, :3], axis=0), 1.0))
    grid_affine[:3, 3] = affine[:3, 3]
    # World -> canonical voxel -> the drawing's mm (nibabel's affine helper, no data import).
    points = nib.affines.apply_affine(grid_affine @ np.linalg.inv(affine), case.landmarks)
    present = case.attributes["landmarks"] if case.attributes else {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, view in zip(axes, _VIEWS):
        h, v = _mip(ax, np.asarray(canonical.dataobj), grid_affine, view)
        for k, name in enumerate(anatomy.LANDMARKS):
            colour = "lime" if present.get(name, True) else "orange"
            ax.plot(points[k, h], points[k, v], "+", color=colour, ms=9, mew=1.5)
            ax.annotate(name, (points[k, h], points[k, v]), color=colour, fontsize=6.5,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{case.case_id}: {view} MIP", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def registration_overlay(path, fixed, moved, grid_affine, fixed_lm, moved_lm, used,
                         title: str = "") -> Path:
    """Axial and coronal MIPs (``_mip``) of the fixed image (grey) with the moved one (orange) and
    the landmarks used (fixed: cyan circles, moved: magenta crosses).

    fixed, moved: [X, Y, Z] both resampled onto one RAS-aligned grid (``grid_affine``: diag(spacing)
    + origin) in fixed world space; landmarks [19, 3] RAS; used [19] bool.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, view in zip(axes, _VIEWS):
        h, v = _mip(ax, fixed, grid_affine, view, overlay=moved)
        for pts, style in ((fixed_lm, dict(marker="o", mfc="none", mec="cyan", ms=8, mew=1.5)),
                           (moved_lm, dict(marker="+", color="magenta", ms=9, mew=1.5))):
            p = np.asarray(pts)[np.asarray(used, bool)]
            ax.plot(p[:, h], p[:, v], ls="none", **style)
        ax.set_title(f"{view} MIP")
    fig.suptitle(f"{title}\ngrey: fixed, orange: moved; cyan o: fixed landmarks, magenta +: moved")
    return _save(fig, path)


def training_curves(path, records: list[dict]) -> Path:
    """A run's ``metrics.jsonl`` drawn: each loss term (log scale), the effective weight of each
    (``weight_<term>``: constant under "fixed", moving under the dynamic weightings) and the
    validation MRE, against the step."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and r.get("mre_mm") is not None]
    terms = [t for t in ("loss", "heatmap", "segmentation", "landmark_attr", "segment_attr",
                         "consistency") if any(t in r for r in train)]
    weights = sorted({k for r in train for k in r if k.startswith("weight_")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    colour = {t: f"C{i}" for i, t in enumerate(("loss", "heatmap", "segmentation",
                                                 "landmark_attr", "segment_attr", "consistency"))}
    for t in terms:
        axes[0].plot(steps, [abs(r.get(t, np.nan)) for r in train], label=t, color=colour[t],
                     linewidth=2 if t == "loss" else 1)
    axes[0].set_yscale("log")
    axes[0].set_title("loss terms (|total| for the total)")
    for k in weights:
        term = k.removeprefix("weight_")
        axes[1].plot(steps, [r.get(k, np.nan) for r in train], label=term, color=colour.get(term))
    axes[1].set_title("effective weights")
    axes[2].plot([r["step"] for r in val], [r["mre_mm"] for r in val], "o-")
    axes[2].set_title("validation MRE (mm)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)
