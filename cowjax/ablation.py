"""The paper's ablation (its Fig. 5) as one command: four loss settings x seeds, each trained,
evaluated on the same test cases and compared with the heatmap-only network.

  python launch.py --mode=ablate --config=configs/demo.py --workdir=runs/ablation --seeds=3

Arms, in this order (``config_defaults.ABLATIONS``): ``heatmap_only`` (the landmark heatmaps alone),
``seg`` (+ segmentation), ``seg_attr`` (+ landmark and segment attributes), ``full`` (+ the
self-consistency term). Each arm is the base config (``--config`` with its ``--config.*``
overrides) with the arm's dropped loss weights set to zero; a weight the arm keeps is the base's.
Run ``<arm>_s<s>`` for s in ``range(seeds)`` has ``config.seed = base seed + s`` and is an ordinary
run workdir under the ablation's workdir, trained by ``train.train_and_evaluate``: started again,
a finished run is skipped and an unfinished one resumes. The refinement stage is off in every arm
(``config.refine.num_train_steps = 0``): the ablation measures what the auxiliary tasks do to the
first network, the one they are trained with. For the same reason the attribute accuracies are the
network's own (``presence="network"``), not the presence read off the image that prediction uses by
default; an arm without the segment attribute term has none to score (n/a), and its written
labelling keeps every segment (``Predictor.presence_learned``).

One split for all: the first run (``heatmap_only_s0``, whose seed is the base seed) makes it, it is
kept as ``<workdir>/split.json`` and copied into every run before training, so every arm and seed is
tested on the same cases (the synthetic set and the preprocessing cache are shared too, under
``<workdir>/data`` and ``<workdir>/cache``). ``<workdir>/ablation.json`` records the base config:
started again with another one, the command stops instead of mixing runs.

Written into the workdir (with ``data_dir``: into ``<workdir>/eval/<data_dir's name>/``):
``report.json``, ``report.md``, ``landmark_errors.png`` (per-landmark box plots, the arms side by
side, seeds pooled), ``differences.png`` (each arm's paired difference from heatmap_only), and
``evaluations/<run>.json`` (each run's per-case errors, re-used while newer than its checkpoints).

A sweep's members (``training/sweep.py``) are compared in the same report, each member an arm of
one run: ``evaluate_sweep``, what ``--mode=eval`` does with a sweep's workdir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
from scipy import stats

from cowjax import config_check, config_defaults
from cowjax.errors import CowjaxError, atomic_output
from cowjax import figures, metrics
from cowjax.inference import evaluate
from cowjax.training import checkpoint as ckpt
from cowjax.training import sweep, train

ARMS = tuple(config_defaults.ABLATIONS)       # heatmap_only, seg, seg_attr, full
REFERENCE = ARMS[0]
AUXILIARY_WEIGHTS = tuple(config_defaults.ABLATIONS[REFERENCE])  # the terms the arms switch off
NUM_RESAMPLES = 2000
# The per-run numbers compared (evaluate's summary of all cases): key, label, scale, digits.
METRICS = (("mre_mm", "MRE (mm)", 1, 2), ("median_mm", "median (mm)", 1, 2),
           *((f"sdr_{r}", f"SDR {r} mm (%)", 100, 1) for r in metrics.SDR_RADII_MM),
           ("dice_mean", "Dice", 1, 3), ("head_dice_mean", "Dice, seg. head", 1, 3),
           ("segment_attr_accuracy", "presence acc (%)", 100, 1),
           ("variable_segment_attr_accuracy", "variable presence acc (%)", 100, 1),
           ("landmark_attr_accuracy", "bifurcation acc (%)", 100, 1))
# What each number can be: errors are at least 0, the rest (SDR, Dice, accuracies) fractions.
_RANGE = {"mre_mm": (0.0, np.inf), "median_mm": (0.0, np.inf)}
_FRACTION = (0.0, 1.0)
# Fields that change how a run is watched, not what it learns: free to differ between calls.
_UNCHECKED = {"log_every_steps", "data.num_workers", "train.steps_per_call", "train.distributed",
              "train.keep_checkpoints"}


# ------------------------------------------------------------------------------------- the runs

def run_name(arm: str, s: int) -> str:
    return f"{arm}_s{s}"


def arm_configs(base: ml_collections.ConfigDict, seeds: int) -> dict[str, ml_collections.ConfigDict]:
    """{run name: config} for every seed offset s (outer) and arm (inner, in ``ARMS`` order).

    CowjaxError when ``seeds`` < 1, when the base already has an auxiliary loss weight at zero
    (an ablation variant as the base: some arms would train the same loss under two names), or a
    sweep.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise CowjaxError(f"--seeds={seeds}: the number of seeds per arm must be at least 1")
    if sweep.is_sweep(base):
        raise CowjaxError("--mode=ablate: the base config has a sweep (config.sweep); the "
                          "ablation's arms are its own, leave config.sweep unset")
    zero = [w for w in AUXILIARY_WEIGHTS if not base.loss[w]]
    if zero:
        raise CowjaxError(f"--mode=ablate: the base config has loss.{zero[0]} = 0, so some arms would "
                          f"not differ; start from the full loss (e.g. configs/demo.py, without "
                          f"an ablation argument)")
    runs = {}
    for s in range(seeds):
        for arm in ARMS:
            c = ml_collections.ConfigDict(base.to_dict())
            config_defaults.apply_ablation(c, arm, "--mode=ablate")
            c.seed = base.seed + s
            c.refine.num_train_steps = 0      # the first network alone: see the module docstring
            runs[run_name(arm, s)] = c
    return runs


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"group.field": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_base(root: Path, base) -> None:
    """Record the base config in ``root/ablation.json``; CowjaxError if one recorded differs."""
    record = root / "ablation.json"
    want = ckpt.config_to_dict(base)
    if record.is_file():
        try:
            had = json.loads(record.read_text(encoding="utf-8"))["base_config"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CowjaxError(f"{record}: unreadable ({e}); delete it if the runs are yours")
        had, now = _flat(had), _flat(want)
        diff = sorted(k for k in set(had) | set(now)
                      if k not in _UNCHECKED and had.get(k, "unset") != now.get(k, "unset"))
        if diff:
            k = diff[0]
            more = f" and {len(diff) - 1} more field(s)" if len(diff) > 1 else ""
            raise CowjaxError(f"{root}: its runs were started with another config ({k} = "
                              f"{had.get(k, 'unset')} then, {now.get(k, 'unset')} now{more}); use "
                              f"another --workdir, or delete {root} to start again")
        return
    with atomic_output(record) as tmp:
        tmp.write_text(json.dumps({"base_config": want}, indent=1) + "\n", encoding="utf-8")


def _check_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CowjaxError(f"{path}: exists and is not a directory")


def _share_split(root: Path, runs: dict) -> None:
    """Make the ablation's one split (``root/split.json``) if needed and copy it into every run.

    The first run makes it (its seed is the base seed), so ``prepare_data`` also makes the
    synthetic set on first use where every run finds it. CowjaxError if a run holds another split.
    """
    split_file = root / "split.json"
    if not split_file.is_file():
        from cowjax.data import pipeline
        first = root / next(iter(runs))
        pipeline.prepare_data(runs[first.name], first)
        with atomic_output(split_file) as tmp:
            shutil.copyfile(first / "split.json", tmp)
    text = split_file.read_text(encoding="utf-8")
    for name in runs:
        own = root / name / "split.json"
        if own.is_file():
            if json.loads(own.read_text(encoding="utf-8")) != json.loads(text):
                raise CowjaxError(f"{own}: another split than {split_file}; delete {root / name} "
                                  f"to train it again on the ablation's split")
            continue
        own.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(own) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _steps(workdir: Path, config) -> int:
    """The run's number of steps: its config.json's (as the run resolved it) or the config's."""
    try:
        return int(json.loads((workdir / "config.json").read_text(encoding="utf-8"))["num_train_steps"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return int(config.num_train_steps)


def _latest_step(workdir: Path, config) -> int | None:
    if not (workdir / ckpt.LATEST).is_dir():
        return None
    checkpoints = ckpt.Checkpoints(workdir, config.train.keep_checkpoints)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def _train(workdir: Path, config, tag: str) -> None:
    """Train one run unless it is finished (its latest checkpoint at its last step); one line."""
    step, steps = _latest_step(workdir, config), _steps(workdir, config)
    if step is not None and step >= steps:
        print(f"{tag} {workdir.name}: skip, finished ({step} steps)", flush=True)
        return
    what = f"resume at step {step}" if step else "train"
    print(f"{tag} {workdir.name}: {what} (seed {config.seed}, {steps} steps)", flush=True)
    train.train_and_evaluate(config, workdir)


# -------------------------------------------------------------------------------- evaluation

def _checkpoint_mtime(workdir: Path) -> float:
    """When the run's checkpoints last changed (their folders and step folders)."""
    folders = [workdir / ckpt.BEST, workdir / ckpt.LATEST]
    paths = [p for d in folders if d.is_dir() for p in (d, *d.iterdir())]
    return max((p.stat().st_mtime for p in paths), default=float("inf"))


# Arms are compared on what their networks learned: segment presence read off the image depends on
# the landmarks alone (``Predictor``'s ``presence``).
NETWORK_PRESENCE = "network"


def _evaluation(workdir: Path, data_dir, record_path: Path, tag: str, **inference) -> dict:
    """One run's evaluation record: {"data", "inference", "cases", "errors_mm" [cases, 19] (None
    unknown), "summary" (evaluate's, all cases), "report"}; re-used while newer than the run's
    checkpoints. inference: ``evaluate.evaluate_run``'s keyword arguments (default: its own),
    segment presence always the network's (``NETWORK_PRESENCE``)."""
    inference = {**inference, "presence": NETWORK_PRESENCE}
    data = None if data_dir is None else str(Path(data_dir).resolve())
    if record_path.is_file() and record_path.stat().st_mtime > _checkpoint_mtime(workdir):
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("data") == data and record.get("inference", {}) == inference:
            print(f"{tag} {workdir.name}: evaluation up to date", flush=True)
            return record
    print(f"{tag} {workdir.name}: evaluate", flush=True)
    report, errors, out_dir = evaluate.evaluate_run(workdir, data_dir, **inference)
    record = {"data": data, "inference": inference, "cases": report["cases"],
              "errors_mm": [[float(e) if np.isfinite(e) else None for e in row] for row in errors],
              "summary": report["groups"]["all"], "report": str(out_dir / "report.md")}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(record_path) as tmp:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return record


def _errors(record: dict) -> np.ndarray:
    """[cases, 19] float64 mm, NaN unknown."""
    return np.array(record["errors_mm"], np.float64).reshape(len(record["cases"]), -1)


# -------------------------------------------------------------------------------- statistics

def mean_interval(values, bounds=(-np.inf, np.inf)) -> dict:
    """Mean over seeds and its 95% Student t interval: {"mean", "ci95": [lo, hi] or None, "n"}.

    None or NaN values (a number a run could not measure) are left out; one value has no interval.
    The interval is clipped to ``bounds``, what the number can be: with two or three seeds the t
    interval of an accuracy near 100% would otherwise reach past it.
    """
    v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    lo, hi = bounds
    return {"mean": mean, "ci95": [max(mean - half, lo), min(mean + half, hi)], "n": int(v.size)}


def paired_difference(errors, reference, num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict:
    """``errors - reference`` over the pairs where both are known: mean, 95% bootstrap interval,
    Wilcoxon signed-rank p-value.

    errors, reference: [seeds, cases, 19] or [cases, 19] mm, NaN unknown; entry (s, c, l) of one is
    paired with the same entry of the other. The bootstrap resamples cases (a case's landmarks and
    seeds move together: they are not independent), with a fixed RNG seed. Returns {"mean_mm",
    "ci95_mm": [lo, hi], "p_wilcoxon", "num_pairs", "num_cases"}, values None without pairs.
    """
    a, b = np.asarray(errors, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: shapes differ ({a.shape} vs {b.shape})")
    diff = (a - b).reshape((-1,) + a.shape[-2:])      # [seeds, cases, L], NaN where either unknown
    known = np.isfinite(diff)
    sums = np.where(known, diff, 0.0).sum(axis=(0, 2))  # [cases]
    counts = known.sum(axis=(0, 2))
    sums, counts = sums[counts > 0], counts[counts > 0]
    if counts.size == 0:
        return {"mean_mm": None, "ci95_mm": None, "p_wilcoxon": None, "num_pairs": 0, "num_cases": 0}
    idx = np.random.default_rng(seed).integers(0, counts.size, (num_resamples, counts.size))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    pairs = diff[known]
    # All differences zero (the same network twice): nothing to rank, no evidence of a difference.
    p = float(stats.wilcoxon(pairs).pvalue) if np.any(pairs != 0) else 1.0
    return {"mean_mm": float(sums.sum() / counts.sum()),
            "ci95_mm": [float(v) for v in np.percentile(boot, [2.5, 97.5])],
            "p_wilcoxon": p, "num_pairs": int(counts.sum()), "num_cases": int(counts.size)}


def run_numbers(summary: dict) -> dict:
    """evaluate's summary of one run -> the numbers compared, keyed as ``METRICS``."""
    out = {k: summary.get(k) for k, *_ in METRICS if not k.startswith("sdr_")}
    out.update({f"sdr_{r}": (summary.get("sdr") or {}).get(str(r)) for r in metrics.SDR_RADII_MM})
    return out


def compare(records: dict[str, dict], runs: dict, arms: dict[str, list[str]]) -> dict:
    """Per arm: each run's numbers, their mean and interval over seeds, the pooled MRE, and the
    paired difference from the first arm, the reference (seed s with seed s). records: {run name:
    evaluation}; runs: {run name: config}; arms: {arm: its runs' names, seed s at index s}."""
    cases = next(iter(records.values()))["cases"]
    for name, r in records.items():
        if r["cases"] != cases:
            raise CowjaxError(f"{name}: evaluated on other cases than {next(iter(records))}; "
                              f"delete its evaluations/ record to evaluate it again")
    reference = next(iter(arms))
    errors = {arm: np.stack([_errors(records[n]) for n in names])
              for arm, names in arms.items()}                          # [seeds, cases, 19]
    out = {}
    for arm, names in arms.items():
        numbers = {n: run_numbers(records[n]["summary"]) for n in names}
        out[arm] = {
            "runs": {n: {"seed": runs[n].seed, "report": records[n]["report"],
                         "summary": records[n]["summary"]} for n in names},
            "metrics": {k: mean_interval([numbers[n][k] for n in names], _RANGE.get(k, _FRACTION))
                        for k, *_ in METRICS},
            "pooled_mre_mm": float(metrics.mre(errors[arm])),
            f"difference_from_{reference}": (None if arm == reference else
                                             paired_difference(errors[arm], errors[reference]))}
    return {"cases": cases, "reference": reference, "arms": out, "errors": errors}


# ---------------------------------------------------------------------------------- the report

def _fmt(v, scale=1.0, digits=2) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def _cell(m: dict, scale, digits, interval: bool = True) -> str:
    """'mean [lo, hi]', 'mean (n/a)' without an interval, 'mean' where none is expected."""
    if m["mean"] is None:
        return "n/a"
    if not interval:
        return _fmt(m["mean"], scale, digits)
    ci = m["ci95"]
    interval = "(n/a)" if ci is None else f"[{_fmt(ci[0], scale, digits)}, {_fmt(ci[1], scale, digits)}]"
    return f"{_fmt(m['mean'], scale, digits)} {interval}"


def _terms(weights: dict) -> str:
    """'heatmap + segmentation (0.5) + ...': the terms trained, with a weight other than 1."""
    return " + ".join(k[2:] + ("" if v == 1 else f" ({v:g})") for k, v in weights.items() if v)


def markdown(report: dict) -> str:
    """report.md: how it was made, the table per arm, the paired differences, the figures."""
    reference = report["reference"]
    key = f"difference_from_{reference}"
    seeds = report["seeds"] > 1
    lines = [f"# {report['title']}", "", f"Command: `{report['command']}`", "", report["about"],
             "", "## Per arm", "",
             "Mean over seeds, with the 95% Student t interval over seeds in brackets, clipped to what "
             "the number can be (n/a: one seed)."
             if seeds else "One run per arm (one seed: no interval).",
             "", "| arm | loss | " + " | ".join(label for _, label, *_ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for arm, a in report["arms"].items():
        lines.append(f"| {arm} | {a['loss']} | "
                     + " | ".join(_cell(a["metrics"][k], s, d, seeds) for k, _, s, d in METRICS)
                     + " |")
    lines += ["", f"## Paired difference from {reference}", "",
              f"Error of the arm minus error of {reference} for the same (seed, case, landmark) "
              f"(seed s with seed s; negative: the arm is better). Interval: 95% bootstrap over "
              f"cases ({NUM_RESAMPLES} resamples, RNG seed 0); p: Wilcoxon signed-rank test over "
              f"the pairs.", "",
              "| arm | mean difference (mm) | 95% interval (mm) | Wilcoxon p | pairs |",
              "|---|---|---|---|---|"]
    for arm, a in report["arms"].items():
        d = a[key]
        if d is None or d["mean_mm"] is None:
            continue
        lines.append(f"| {arm} | {d['mean_mm']:+.3f} | [{d['ci95_mm'][0]:+.3f}, "
                     f"{d['ci95_mm'][1]:+.3f}] | {d['p_wilcoxon']:.3g} | {d['num_pairs']} |")
    lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["figures"]]
    # evaluate's table of runs, under this report's heading level; each run's own report follows.
    per_run = {n: r["summary"] for a in report["arms"].values() for n, r in a["runs"].items()}
    lines += ["", evaluate.comparison_markdown(per_run).replace("# Runs compared", "## Per run", 1)]
    lines += [f"- `{n}`: {r['report']}" for a in report["arms"].values() for n, r in a["runs"].items()]
    return "\n".join(lines) + "\n"


def _print_summary(report: dict, out_dir: Path) -> None:
    reference = report["reference"]
    key = f"difference_from_{reference}"
    seeds = report["seeds"] > 1
    print(f"{report['name']}: {report['seeds']} seed(s) x {len(report['arms'])} arms, "
          f"{len(report['cases'])} cases, {report['num_train_steps']} steps per run")
    width = max(13, *(len(a) + 1 for a in report["arms"]))
    print(f"{'arm':<{width}} {'MRE mm' + (' [95% over seeds]' if seeds else ''):<26} "
          f"{'SDR 2 mm %':<20} {'vs ' + reference + ' mm [95%]':<30} p")
    for arm, a in report["arms"].items():
        d = a[key]
        diff, p = "", ""
        if d is not None and d["mean_mm"] is not None:
            diff = f"{d['mean_mm']:+.2f} [{d['ci95_mm'][0]:+.2f}, {d['ci95_mm'][1]:+.2f}]"
            p = f"{d['p_wilcoxon']:.3g}"
        print(f"{arm:<{width}} {_cell(a['metrics']['mre_mm'], 1, 2, seeds):<26} "
              f"{_cell(a['metrics']['sdr_2.0'], 100, 1, seeds):<20} {diff:<30} {p}")
    print(f"  report: {out_dir / 'report.md'} (figures in {out_dir})")


def write_report(out_dir: Path, header: dict, records: dict[str, dict], runs: dict,
                 arms: dict[str, list[str]], described: dict[str, dict]) -> dict:
    """Compare the arms (``compare``), draw the figures, write ``report.json`` and ``report.md``
    into ``out_dir`` and print a summary; returns the report.

    header: the report's "name" (printed), "title", "command", "about" (a paragraph: how the runs
    were made and tested), "seeds", "num_train_steps", and anything else report.json should hold.
    described: per arm, fields for report.json, among them "loss": what its loss is, in a few
    words (the table's "loss" column)."""
    result = compare(records, runs, arms)
    errors = result.pop("errors")
    key = f"difference_from_{result['reference']}"
    for arm, a in result["arms"].items():
        a.update(described[arm])
    figs = [figures.landmark_error_boxes(out_dir / "landmark_errors.png", errors)]
    differences = {arm: a[key] for arm, a in result["arms"].items()
                   if a[key] and a[key]["mean_mm"] is not None}
    if differences:
        figs.append(figures.paired_differences(out_dir / "differences.png", differences,
                                               result["reference"]))
    report = {**header, **result, "figures": [str(f) for f in figs]}
    with atomic_output(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    with atomic_output(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")
    _print_summary(report, out_dir)
    return report


def run_ablation(base: ml_collections.ConfigDict, workdir, seeds: int = 3, data_dir=None,
                 command: str | None = None) -> dict:
    """Train every arm x seed (skipping finished runs), evaluate them on the same cases (the
    shared test split, or ``data_dir``), write the report and figures, print a summary.

    Returns the report (as report.json). User mistakes (``seeds`` < 1, a workdir that is a file, a
    workdir started with another base config) are CowjaxErrors, raised before anything is trained.
    """
    config_check.validate(base)
    root = Path(workdir)
    runs = arm_configs(base, seeds)
    for path in (root, *(root / n for n in runs)):
        _check_folder(path)
    root.mkdir(parents=True, exist_ok=True)
    _check_same_base(root, base)
    _share_split(root, runs)
    for i, (name, config) in enumerate(runs.items()):
        _train(root / name, config, f"[{i + 1}/{len(runs)}]")

    out_dir = root if data_dir is None else root / "eval" / Path(data_dir).name
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {name: _evaluation(root / name, data_dir, out_dir / "evaluations" / f"{name}.json",
                                 f"[{i + 1}/{len(runs)}]")
               for i, name in enumerate(runs)}
    first_name, first = next(iter(runs.items()))
    steps = _steps(root / first_name, first)
    cases = len(next(iter(records.values()))["cases"])
    data = (f"test split of {root / 'split.json'}" if data_dir is None
            else str(Path(data_dir).resolve()))
    header = {
        "name": "ablation",
        "title": "Ablation: what the auxiliary tasks do to the first network (the paper's Fig. 5)",
        "command": command or f"cowjax.ablation.run_ablation(workdir={str(root)!r}, "
                              f"seeds={seeds}, data_dir={data_dir!r})",
        "about": f"{seeds} seed(s) per arm (config.seed {base.seed} + s), {steps} training "
                 f"step(s) per run, first network only (refinement stage off), every run evaluated "
                 f"on the same {cases} case(s) ({data}). Only landmarks with ground truth count.",
        "seeds": int(seeds), "base_seed": int(base.seed), "num_train_steps": steps,
        "refinement": "off (first network only)", "data": data}
    arms = {arm: [run_name(arm, s) for s in range(seeds)] for arm in ARMS}
    weights = {arm: {w: runs[names[0]].loss[w] for w in ("w_heatmap", *AUXILIARY_WEIGHTS)}
               for arm, names in arms.items()}
    return write_report(out_dir, header, records, runs, arms,
                        {arm: {"loss": _terms(w), "loss_weights": w} for arm, w in weights.items()})


def evaluate_sweep(workdir, data_dir=None, command: str | None = None, **inference) -> dict:
    """A sweep's members (``training/sweep.py``) evaluated on the same cases (the sweep's test
    split, or ``data_dir``) and compared as the ablation's arms are, each member an arm of one run,
    the first member the reference: ``report.json``, ``report.md``, ``landmark_errors.png``,
    ``differences.png`` and ``evaluations/<member>.json`` in the sweep's workdir (with
    ``data_dir``: in ``<workdir>/eval/<data_dir's name>/``). inference: ``evaluate.evaluate_run``'s
    keyword arguments (``tta``, ``decode_method``, ``refine``; presence is always the network's).
    Returns the report."""
    root = Path(workdir)
    dirs = sweep.member_dirs(root)
    runs = {}
    for name, d in dirs.items():
        try:
            runs[name] = ckpt.config_from_dict(json.loads((d / "config.json").read_text(
                encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise CowjaxError(f"{d / 'config.json'}: unreadable ({e}); train the sweep first")
    out_dir = root if data_dir is None else root / "eval" / Path(data_dir).name
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {name: _evaluation(d, data_dir, out_dir / "evaluations" / f"{name}.json",
                                 f"[{i + 1}/{len(dirs)}]", **inference)
               for i, (name, d) in enumerate(dirs.items())}
    first = next(iter(runs.values()))
    steps = int(first.num_train_steps)
    cases = len(next(iter(records.values()))["cases"])
    data = (f"test split of {root / 'split.json'}" if data_dir is None
            else str(Path(data_dir).resolve()))
    settings = sweep.read_record(root)["members"]
    header = {
        "name": "sweep", "title": f"Sweep: {len(dirs)} loss settings trained together",
        "command": command or f"cowjax.ablation.evaluate_sweep(workdir={str(root)!r}, "
                              f"data_dir={data_dir!r})",
        "about": f"{len(dirs)} members of one sweep ({root / sweep.RECORD}), each an arm of one "
                 f"run: trained together as one program from config.seed {first.seed}, "
                 f"{steps} training step(s), first network only, every member evaluated on the "
                 f"same {cases} case(s) ({data}). Only landmarks with ground truth count.",
        "seeds": 1, "base_seed": int(first.seed), "num_train_steps": steps,
        "refinement": "off (first network only)", "data": data, "inference": inference}
    described = {n: {"loss": ", ".join(f"{f} {v}" for f, v in settings[n].items()),
                     "settings": settings[n]} for n in dirs}
    return write_report(out_dir, header, records, runs, {n: [n] for n in dirs}, described)
