"""Report figures as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cowjax import anatomy  # noqa: E402
from cowjax.errors import atomic_output  # noqa: E402
from cowjax.inference import metrics  # noqa: E402


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
