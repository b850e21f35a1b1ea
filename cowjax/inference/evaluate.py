"""``--mode=eval``: predict every case with ground truth, score it, write the report and figures.

Per run, under ``RUN/eval/<name>/`` (name: the data directory's basename, or "test" for the run's
own test split from ``RUN/split.json``): ``report.json``, ``report.md``, ``landmark_errors.png``,
and for a few cases ``mip_<case>.png`` (landmarks) and ``segments_<case>.png`` (the predicted labels
in colour beside the truth); with several runs also ``comparison.png`` in the first run's folder.
A case is named by its folder, and by ``<dataset>/<case>`` where two datasets share a case name
(``<dataset>_<case>`` in file names).
Only landmarks with ground truth count; the report says how many. Dice is measured on each image's
own grid, against its ``segments.nii.gz``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cowjax import anatomy, figures, heatmaps, metrics
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.inference.predictor import Ensemble, Predictor, load_predictor

NUM_MIP_CASES = 3
GROUPS = ("all", "complete", "variant")
# How far apart the averaged passes put a landmark (``Prediction.spread_mm``), in bands for the
# report: whether the landmarks they disagree on are the wrong ones, on the user's own cases.
SPREAD_BANDS_MM = (0.0, 0.5, 1.0, 2.0, np.inf)


def _truth_attributes(case: io.Case, part: str, names) -> tuple[np.ndarray, np.ndarray]:
    """(values, known mask) from the case's attributes.json part ("segments"/"landmarks")."""
    given = (case.attributes or {}).get(part, {})
    values = np.array([bool(given.get(n, False)) for n in names])
    return values, np.array([n in given for n in names])


def score_case(predictor: Predictor | Ensemble, case: io.Case, name: str | None = None) -> dict:
    """Predict one case and compare with its ground truth. Arrays per case, NaN where unknown.
    name: the case's name in the report (default ``case.case_id``)."""
    start = time.perf_counter()
    labelled = case.segments is not None  # both labellings are scored against the truth
    pred = predictor.predict(case.image, case.affine, segmentation=labelled,
                             head_segmentation=labelled)
    seconds = time.perf_counter() - start
    seg_true, seg_known = _truth_attributes(case, "segments", anatomy.SEGMENTS)
    lm_true, lm_known = _truth_attributes(case, "landmarks", anatomy.LANDMARKS)
    if not predictor.predicts_presence:     # the prior (all present) alone: nothing to score
        seg_known, lm_known = np.zeros_like(seg_known), np.zeros_like(lm_known)
    variable = anatomy.VARIABLE_SEGMENT_MASK
    complete = bool(seg_true[variable].all()) if seg_known[variable].all() else None
    unknown = np.full(anatomy.NUM_SEGMENTS, np.nan)
    dice = (metrics.dice(pred.segmentation, case.segments, anatomy.NUM_CLASSES)
            if case.segments is not None else unknown)
    head_dice = (metrics.dice(pred.head_segmentation, case.segments, anatomy.NUM_CLASSES)
                 if case.segments is not None else unknown)
    return {
        "case_id": name or case.case_id, "seconds": seconds, "complete": complete,
        "errors_mm": metrics.landmark_errors(pred.landmarks, case.landmarks),
        "dice": dice, "head_dice": head_dice,
        "segment_attr": (pred.present_prob > 0.5, seg_true, seg_known),
        "landmark_attr": (pred.bifurcation_prob > 0.5, lm_true, lm_known),
        "pred_landmarks": pred.landmarks, "confidence": pred.confidence,
        "spread_mm": (np.full(anatomy.NUM_LANDMARKS, np.nan) if pred.spread_mm is None
                      else pred.spread_mm),
        "segmentation": pred.segmentation,
    }


def _nan_to_none(x):
    x = float(x)
    return None if not np.isfinite(x) else x


def error_by_spread(errors, spreads) -> list[dict] | None:
    """Per ``SPREAD_BANDS_MM`` band of the passes' spread: how many landmarks, their MRE and the
    fraction more than 4 mm off (None without spreads: a single pass)."""
    err, spread = np.asarray(errors, np.float64), np.asarray(spreads, np.float64)
    known = np.isfinite(err) & np.isfinite(spread)
    if not known.any():
        return None
    bands = []
    for lo, hi in zip(SPREAD_BANDS_MM[:-1], SPREAD_BANDS_MM[1:]):
        e = err[known & (spread >= lo) & (spread < hi)]
        bands.append({"from_mm": lo, "to_mm": None if np.isinf(hi) else hi, "count": int(e.size),
                      "mre_mm": _nan_to_none(metrics.mre(e)),
                      "over_4mm": _nan_to_none(1.0 - metrics.sdr(e, 4.0))})
    return bands


def summarize(records: list[dict]) -> dict:
    """Metrics over cases: MRE, median, SDR, per landmark; Dice; attribute accuracy; counts; the
    errors by the passes' spread."""
    if not records:
        return {"num_cases": 0}
    err = np.stack([r["errors_mm"] for r in records])            # [N, 19]
    dice = np.stack([r["dice"] for r in records])                 # [N, 20]
    head_dice = np.stack([r["head_dice"] for r in records])
    out = {"num_cases": len(records),
           "num_landmarks": int(np.isfinite(err).sum()),
           "mre_mm": _nan_to_none(metrics.mre(err)),
           "median_mm": _nan_to_none(np.nanmedian(err)) if np.isfinite(err).any() else None,
           "std_mm": _nan_to_none(np.nanstd(err)) if np.isfinite(err).any() else None,
           "sdr": {str(r): _nan_to_none(metrics.sdr(err, r)) for r in metrics.SDR_RADII_MM},
           "per_landmark_mre_mm": {n: _nan_to_none(v)
                                   for n, v in zip(anatomy.LANDMARKS, metrics.mre(err, axis=0))},
           "per_landmark_count": {n: int(c) for n, c in zip(anatomy.LANDMARKS,
                                                           np.isfinite(err).sum(axis=0))},
           "num_cases_with_segments": int(np.isfinite(dice).any(axis=1).sum()),
           "dice_mean": _nan_to_none(np.nanmean(dice)) if np.isfinite(dice).any() else None,
           "dice_per_segment": {n: _nan_to_none(v) for n, v in zip(
               anatomy.SEGMENTS, metrics.mre(dice, axis=0))},  # NaN-ignoring mean
           "head_dice_mean": (_nan_to_none(np.nanmean(head_dice)) if np.isfinite(head_dice).any()
                              else None),
           "head_dice_per_segment": {n: _nan_to_none(v) for n, v in zip(
               anatomy.SEGMENTS, metrics.mre(head_dice, axis=0))},
           "error_by_spread": error_by_spread(err, np.stack([r["spread_mm"] for r in records])),
           "seconds_per_case": float(np.mean([r["seconds"] for r in records]))}
    variable = {"segment_attr": anatomy.VARIABLE_SEGMENT_MASK,
                "landmark_attr": anatomy.VARIABLE_LANDMARK_MASK}
    for key in ("segment_attr", "landmark_attr"):
        pred, true, known = (np.stack([r[key][i] for r in records]) for i in range(3))
        out[f"{key}_accuracy"] = _nan_to_none(metrics.accuracy(pred, true, known))
        out[f"{key}_count"] = int(known.sum())
        # The entries variation can change (the 7 variable segments, the landmarks they end at);
        # the others are always true and a constant answer gets them right.
        known_variable = known & variable[key]
        out[f"variable_{key}_accuracy"] = _nan_to_none(metrics.accuracy(pred, true, known_variable))
    return out


def _group(records, name):
    if name == "all":
        return records
    return [r for r in records if r["complete"] is (name == "complete")]


def _fmt(v, scale=1.0, digits=2):
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def markdown(run: str, data_name: str, report: dict) -> str:
    """report.md: the summary table per group, then per-landmark MRE and per-segment Dice."""
    groups = report["groups"]
    lines = [f"# Evaluation of `{run}` on `{data_name}`", "",
             f"Checkpoint config heatmap loss: {report['heatmap_loss']}; decode: {report['decode']}.",
             "Only landmarks with ground truth count. Complete circle = all 7 variable segments "
             "present (from attributes.json); variant = at least one absent. Cases without a "
             f"landmark file (not scored): {len(report['cases_without_ground_truth'])}.", "",
             "| | " + " | ".join(GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    rows = [("cases", lambda g: str(g["num_cases"])),
            ("landmarks with ground truth", lambda g: str(g.get("num_landmarks", 0))),
            ("MRE ± sd (mm)", lambda g: "n/a" if g.get("mre_mm") is None
             else f"{_fmt(g['mre_mm'])} ± {_fmt(g['std_mm'])}"),
            ("median error (mm)", lambda g: _fmt(g.get("median_mm")))]
    rows += [(f"SDR {r} mm (%)", lambda g, r=r: _fmt((g.get("sdr") or {}).get(str(r)), 100, 1))
             for r in metrics.SDR_RADII_MM]
    rows += [("Dice, mean over segments", lambda g: _fmt(g.get("dice_mean"), 1, 3)),
             ("  the segmentation head's own labelling",
              lambda g: _fmt(g.get("head_dice_mean"), 1, 3)),
             ("segment presence accuracy (%)",
              lambda g: _fmt(g.get("segment_attr_accuracy"), 100, 1)),
             ("  of the 7 variable segments (%)",
              lambda g: _fmt(g.get("variable_segment_attr_accuracy"), 100, 1)),
             ("landmark bifurcation accuracy (%)",
              lambda g: _fmt(g.get("landmark_attr_accuracy"), 100, 1)),
             ("  of the 9 landmarks variation can change (%)",
              lambda g: _fmt(g.get("variable_landmark_attr_accuracy"), 100, 1)),
             ("seconds per case", lambda g: _fmt(g.get("seconds_per_case")))]
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(f(groups[k]) for k in GROUPS) + " |")
    overall = groups["all"]
    lines += ["", "## Per landmark (all cases)", "", "| landmark | MRE (mm) | n |", "|---|---|---|"]
    for n in anatomy.LANDMARKS:
        lines.append(f"| {n} | {_fmt(overall['per_landmark_mre_mm'][n])} | "
                     f"{overall['per_landmark_count'][n]} |")
    if overall.get("error_by_spread"):
        lines += ["", "## Errors by the passes' spread (all cases)", "",
                  "How far the passes averaged into each landmark (the image and its mirror, for "
                  "each member of an ensemble) lie from it, root mean square; predict writes it "
                  "as `spread_mm`. A landmark the passes disagree on is the one to check.", "",
                  "| spread (mm) | landmarks | MRE (mm) | more than 4 mm off (%) |",
                  "|---|---|---|---|"]
        for b in overall["error_by_spread"]:
            band = (f"{b['from_mm']:g}-{b['to_mm']:g}" if b["to_mm"] is not None
                    else f"{b['from_mm']:g} or more")
            lines.append(f"| {band} | {b['count']} | {_fmt(b['mre_mm'])} | "
                         f"{_fmt(b['over_4mm'], 100, 1)} |")
    lines += ["", "## Dice per segment (all cases)", "",
              "On the image's own grid. Written labelling: the image's lumen labelled by the "
              "predicted landmarks; head: the same lumen labelled by the network's segmentation "
              "head.", "", "| segment | Dice | head |", "|---|---|---|"]
    for n in anatomy.SEGMENTS:
        lines.append(f"| {n} | {_fmt(overall['dice_per_segment'][n], 1, 3)} | "
                     f"{_fmt(overall['head_dice_per_segment'][n], 1, 3)} |")
    lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["figures"]]
    return "\n".join(lines) + "\n"


def comparison_markdown(summaries: dict[str, dict]) -> str:
    """One row per run: cases, MRE, median, SDR, Dice, attribute accuracies."""
    radii = metrics.SDR_RADII_MM
    lines = ["# Runs compared", "",
             "| run | cases | MRE (mm) | median (mm) | " + " | ".join(f"SDR {r} mm (%)" for r in radii)
             + " | Dice | presence acc (%) | bifurcation acc (%) |",
             "|---|" + "---|" * (6 + len(radii))]
    for run, g in summaries.items():
        lines.append(f"| {run} | {g['num_cases']} | {_fmt(g['mre_mm'])} | {_fmt(g['median_mm'])} | "
                     + " | ".join(_fmt(g["sdr"][str(r)], 100, 1) for r in radii)
                     + f" | {_fmt(g['dice_mean'], 1, 3)} | {_fmt(g['segment_attr_accuracy'], 100, 1)}"
                     f" | {_fmt(g['landmark_attr_accuracy'], 100, 1)} |")
    return "\n".join(lines) + "\n"


def _case_dirs(workdir: Path, data_dir) -> tuple[str, list[Path]]:
    """(evaluation name, case folders): ``data_dir``'s cases, or the run's test split."""
    if data_dir is not None:
        return Path(data_dir).name, io.list_cases(data_dir)
    split = workdir / "split.json"
    if not split.is_file():
        raise CowjaxError(f"{split}: not found; pass --data_dir to evaluate on cases with "
                          f"ground truth")
    try:
        recorded = json.loads(split.read_text(encoding="utf-8"))
        test = recorded["test"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CowjaxError(f"{split}: no test split ({e})")
    if not test:
        raise CowjaxError(f"{split}: the test split is empty")
    # Entries are case folder names under the recorded data_dir (absolute paths stay as they are).
    root = Path(recorded.get("data_dir", workdir))
    return "test", [root / d for d in test]


def _case_names(case_dirs) -> list[str]:
    """The cases' names in reports and figure files: each folder's name, or ``<dataset>/<case>``
    (its parent folder's too) where cases of two datasets share a name."""
    names = [Path(d).name for d in case_dirs]
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{Path(d).parent.name}/{n}" if n in repeated else n for d, n in zip(case_dirs, names)]


def _mip_figures(out_dir: Path, case: io.Case, record: dict) -> list[Path]:
    """MIPs of the case on a RAS-aligned grid at its finest spacing: true and predicted landmarks
    (``mip_<case>.png``) and, where the case has segment labels, the true and predicted labelling
    in colour (``segments_<case>.png``)."""
    grid_affine, grid_shape = preprocess.finest_canonical_grid(case.affine, case.image.shape)
    image = preprocess.resample(case.image, case.affine, grid_affine, grid_shape, order=1)
    mre = metrics.mre(record["errors_mm"])
    name = record["case_id"]
    stem = name.replace("/", "_")
    paths = [figures.landmark_mips(out_dir / f"mip_{stem}.png", image, grid_affine,
                                   case.landmarks, record["pred_landmarks"],
                                   f"{name}: MRE {float(mre):.2f} mm")]
    if case.segments is not None and record.get("segmentation") is not None:
        rows = {row: preprocess.resample(np.asarray(labels, np.uint8), case.affine, grid_affine,
                                         grid_shape, order=0)
                for row, labels in (("truth", case.segments),
                                     ("predicted", record["segmentation"]))}
        paths.append(figures.segment_mips(
            out_dir / f"segments_{stem}.png", image, grid_affine, rows,
            f"{name}: Dice {float(np.nanmean(record['dice'])):.3f} (mean over segments)"))
    return paths


def _decode_description(predictor: Predictor | Ensemble) -> str:
    if isinstance(predictor, Ensemble):
        return (f"the mean of {len(predictor.members)} runs' landmarks, each run: "
                + _decode_description(predictor.members[0]))
    method = predictor.decode_method
    text = f"{predictor.kind} heatmaps, " + ("argmax" if method == "argmax"
                                              else f"argmax and {method} sub-voxel fit")
    if predictor.aligns:
        text += ("; the grid aligned to the template by the landmarks found in the search for "
                 "the circle")
    text += "; test-time mirror image" if predictor.flip else "; no test-time augmentation"
    if predictor.refiner is not None:
        r = predictor.refiner
        text += (f"; refinement stage: {'x'.join(map(str, r.config.data.crop_shape))} patches at "
                 f"{'x'.join(f'{s:g}' for s in r.config.data.spacing)} mm, prior sigma "
                 f"{r.prior_sigma_mm:g} mm, {len(r.shifts_mm)} patch position(s) averaged")
    text += ("; segment presence from the image (the lumen between the predicted landmarks)"
             if predictor.presence == "image" else "; segment presence from the network")
    return text


def _json_default(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    raise TypeError(type(v))


def evaluate_run(workdir, data_dir=None, tta: bool = True,
                 decode_method: str = heatmaps.DEFAULT_METHOD, refine: bool = True,
                 presence: str = "image", align: bool = True) -> tuple[dict, dict, Path]:
    """Evaluate one run: (report dict, per-landmark errors [N, 19], output folder). ``tta``,
    ``decode_method``, ``refine``, ``presence`` and ``align`` as ``Predictor.from_workdir`` (False,
    "argmax", False, "network": scored as the paper did)."""
    workdir = Path(workdir)
    name, case_dirs = _case_dirs(workdir, data_dir)
    names = dict(zip(case_dirs, _case_names(case_dirs)))
    # Only cases with ground truth are scored (a folder may hold just an image).
    scored = [d for d in case_dirs if any((Path(d) / f).is_file() for f in io.LANDMARK_FILES)]
    if not scored:
        raise CowjaxError(f"{data_dir or workdir / 'split.json'}: no case has a landmark file "
                          f"({', '.join(io.LANDMARK_FILES)}) to evaluate against")
    predictor = load_predictor(workdir, refine=refine, tta=tta, decode_method=decode_method,
                               presence=presence, align=align)
    out_dir = workdir / "eval" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    records, figs = [], []
    for i, d in enumerate(tqdm(scored, desc=f"eval {workdir.name}", unit="case")):
        case = io.load_case(d)
        records.append(score_case(predictor, case, names[d]))
        if i < NUM_MIP_CASES:
            figs += _mip_figures(out_dir, case, records[-1])
        records[-1].pop("segmentation", None)  # a volume per case: keep only the scores
    errors = np.stack([r["errors_mm"] for r in records])
    figs.insert(0, figures.landmark_error_bars(out_dir / "landmark_errors.png",
                                               {workdir.name: errors}))
    report = {"run": str(workdir), "data": name, "cases": [r["case_id"] for r in records],
              "cases_without_ground_truth": [names[d] for d in case_dirs if d not in scored],
              "heatmap_loss": predictor.config.loss.heatmap,
              "decode": _decode_description(predictor),
              "groups": {g: summarize(_group(records, g)) for g in GROUPS},
              "per_case_mre_mm": {r["case_id"]: _nan_to_none(metrics.mre(r["errors_mm"]))
                                  for r in records},
              "figures": [str(f) for f in figs]}
    with atomic_output(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=_json_default), encoding="utf-8")
    with atomic_output(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(workdir.name, name, report), encoding="utf-8")
    return report, errors, out_dir


def run_eval(workdirs, data_dir=None, tta: bool = True,
             decode_method: str = heatmaps.DEFAULT_METHOD, refine: bool = True,
             presence: str = "image", align: bool = True) -> dict[str, dict]:
    """Evaluate each run on ``data_dir`` (cases with ground truth) or, when None, on its own test
    split; print the summaries and where the reports are. Returns {workdir: report}."""
    names = [Path(w).name for w in workdirs]
    if len(set(names)) < len(names):
        names = [str(w) for w in workdirs]
    reports, errors, dirs = {}, {}, []
    for w, name in zip(workdirs, names):
        report, errors[name], out_dir = evaluate_run(w, data_dir, tta, decode_method, refine,
                                                     presence, align)
        reports[str(w)] = report
        dirs.append(out_dir)
        g = report["groups"]["all"]
        sdr = " ".join(f"{r}mm {_fmt(g['sdr'][str(r)], 100, 1)}%" for r in metrics.SDR_RADII_MM)
        print(f"{w}: {g['num_cases']} cases, {g['num_landmarks']} landmarks with ground truth: "
              f"MRE {_fmt(g['mre_mm'])} mm (median {_fmt(g['median_mm'])}), SDR {sdr}, "
              f"Dice {_fmt(g['dice_mean'], 1, 3)}, segment presence acc "
              f"{_fmt(g['segment_attr_accuracy'], 100, 1)}% (variable segments "
              f"{_fmt(g['variable_segment_attr_accuracy'], 100, 1)}%), bifurcation acc "
              f"{_fmt(g['landmark_attr_accuracy'], 100, 1)}%")
        print(f"  report: {out_dir / 'report.md'} (figures in {out_dir})")
    if len(workdirs) > 1:
        summaries = {n: r["groups"]["all"] for n, r in zip(names, reports.values())}
        comp = figures.compare_runs(dirs[0] / "comparison.png", summaries)
        figures.landmark_error_bars(dirs[0] / "landmark_errors_runs.png", errors)
        with atomic_output(dirs[0] / "comparison.md") as tmp:
            tmp.write_text(comparison_markdown(summaries), encoding="utf-8")
        print(f"comparison of {len(workdirs)} runs: {dirs[0] / 'comparison.md'}, {comp}")
    return reports
