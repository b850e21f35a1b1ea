"""Report figures as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from cowjax import anatomy  # noqa: E402
from cowjax.errors import atomic_output  # noqa: E402
from cowjax import metrics  # noqa: E402


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


def landmark_mips(path, image, grid_affine, true_ras, pred_ras, title: str) -> Path:
    """Axial and coronal maximum intensity projections with true (green) and predicted (red) points.

    image: [X, Y, Z] on a RAS-aligned grid (``grid_affine`` diagonal + origin); landmarks [19, 3] RAS.
    """
    spacing, origin = np.diag(grid_affine)[:3], grid_affine[:3, 3]
    lo = origin - spacing / 2
    hi = origin + (np.array(image.shape) - 0.5) * spacing
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (proj, (a, b)) in zip(axes, [(2, (0, 1)), (1, (0, 2))]):
        ax.imshow(image.max(axis=proj).T, origin="lower", cmap="gray",
                  extent=(lo[a], hi[a], lo[b], hi[b]), aspect="equal")
        for pts, colour, label in ((true_ras, "lime", "true"), (pred_ras, "red", "predicted")):
            ax.scatter(pts[:, a], pts[:, b], s=22, facecolors="none", edgecolors=colour,
                       linewidths=1.3, label=label)
        for t, p in zip(true_ras, pred_ras):
            if np.all(np.isfinite(t)):
                ax.plot([t[a], p[a]], [t[b], p[b]], color="yellow", linewidth=0.6)
        ax.set_xlabel("x (mm, +R)")
        ax.set_ylabel("y (mm, +A)" if b == 1 else "z (mm, +S)")
        ax.set_title("axial MIP" if proj == 2 else "coronal MIP")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# One colour per segment (class 1 + j gets SEGMENT_COLOURS[j]): matplotlib's 20 qualitative colours.
SEGMENT_COLOURS = np.array(plt.get_cmap("tab20").colors)


def _label_mip(image, labels, axis):
    """The label of the brightest labelled voxel along each ray (0 where the ray meets none)."""
    score = np.where(labels > 0, image, -np.inf)
    idx = np.expand_dims(np.argmax(score, axis=axis), axis)
    return np.where(np.isfinite(np.take_along_axis(score, idx, axis)),
                    np.take_along_axis(labels, idx, axis), 0).squeeze(axis)


def segment_mips(path, image, grid_affine, labels_by_row: dict[str, np.ndarray], title: str) -> Path:
    """Axial and coronal MIPs with segment labels in colour, one row per labelling (e.g. truth and
    prediction), and a legend of the 20 segments.

    image and each labelling: [X, Y, Z] on one RAS-aligned grid (``grid_affine`` diagonal + origin).
    A ray's colour is the label of its brightest labelled voxel, as the grey MIP shows that voxel.
    """
    spacing, origin = np.diag(grid_affine)[:3], grid_affine[:3, 3]
    lo = origin - spacing / 2
    hi = origin + (np.array(image.shape) - 0.5) * spacing
    rows = len(labels_by_row)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.6 * rows), squeeze=False)
    colours = np.concatenate([np.zeros((1, 3)), SEGMENT_COLOURS])
    for r, (name, labels) in enumerate(labels_by_row.items()):
        for ax, (proj, (a, b)) in zip(axes[r], [(2, (0, 1)), (1, (0, 2))]):
            extent = (lo[a], hi[a], lo[b], hi[b])
            ax.imshow(image.max(axis=proj).T, origin="lower", cmap="gray", extent=extent,
                      aspect="equal")
            mip = _label_mip(image, labels, proj).T
            rgba = np.concatenate([colours[mip], (mip > 0)[..., None] * 0.85], axis=-1)
            ax.imshow(rgba, origin="lower", extent=extent, aspect="equal", interpolation="nearest")
            ax.set_title(f"{name}: {'axial' if proj == 2 else 'coronal'} MIP")
            ax.set_xlabel("x (mm, +R)")
            ax.set_ylabel("y (mm, +A)" if b == 1 else "z (mm, +S)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SEGMENT_COLOURS]
    fig.legend(handles, anatomy.SEGMENTS, loc="center right", fontsize=7, frameon=False)
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
    """Axial and coronal maximum intensity projections of a case with its 19 landmarks.

    Radiological convention: patient right on the image left, anterior (axial) and superior
    (coronal) up. The image is permuted/flipped to the nearest RAS axes first (no resampling);
    landmarks known absent (``case.attributes``) are orange.
    """
    canonical = nib.as_closest_canonical(nib.Nifti1Image(case.image, case.affine))
    img, affine = np.asarray(canonical.dataobj), canonical.affine
    inv = np.linalg.inv(affine)
    vox = case.landmarks @ inv[:3, :3].T + inv[:3, 3]
    present = case.attributes["landmarks"] if case.attributes else {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, (drop, (h, v), title) in zip(axes, [(2, (0, 1), "axial MIP (anterior up)"),
                                                (1, (0, 2), "coronal MIP (superior up)")]):
        mip = img.max(axis=drop)
        lo, hi = np.percentile(mip, [20, 99.8])
        sp = np.linalg.norm(affine[:3, :3], axis=0)
        ax.imshow(mip.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=sp[v] / sp[h])
        ax.invert_xaxis()                                           # patient right on the left
        for k, name in enumerate(anatomy.LANDMARKS):
            colour = "lime" if present.get(name, True) else "orange"
            ax.plot(vox[k, h], vox[k, v], "+", color=colour, ms=9, mew=1.5)
            ax.annotate(name, (vox[k, h], vox[k, v]), color=colour, fontsize=6.5,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{case.case_id}: {title}; R on the left", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)
