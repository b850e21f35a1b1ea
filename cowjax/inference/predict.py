"""``--mode=predict``: a trained run's predictions for one image or a folder of them, as files.

Inputs: one image file, a folder of NIfTI images, or a folder of case folders (``io.list_cases``).
Outputs by suffix (``write_prediction``): ``.mrk.json`` (3D Slicer markups, LPS), ``.json``
(``prediction_dict``), ``.csv`` (name,x,y,z RAS); segment labels as ``<name>_segments.nii.gz`` on
the input grid; with ``figure``, MIPs of the image with the prediction as ``<name>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tqdm import tqdm

from cowjax import anatomy, heatmaps
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.inference.predictor import Prediction, load_predictor

OUTPUT_SUFFIXES = (".mrk.json", ".json", ".csv")


def _output_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise CowjaxError(f"{path}: unknown output type (expected one of {', '.join(OUTPUT_SUFFIXES)})")


def prediction_dict(pred: Prediction) -> dict:
    """The ``.json`` output: landmarks with position, confidence, the passes' spread (mm, where
    several passes were averaged), bifurcation probability; segments with presence probability
    and, where the image measured it, their radius (mm)."""
    radius = (pred.segment_radius_mm if pred.segment_radius_mm is not None
              else np.full(anatomy.NUM_SEGMENTS, np.nan))
    return {
        "landmarks": {name: {"position_ras_mm": [float(v) for v in pred.landmarks[i]],
                             "confidence": float(pred.confidence[i]),
                             **({} if pred.spread_mm is None else
                                {"spread_mm": float(pred.spread_mm[i])}),
                             "bifurcation_prob": float(pred.bifurcation_prob[i]),
                             "bifurcation_branch_prob": float(pred.bifurcation_branch_prob[i])}
                      for i, name in enumerate(anatomy.LANDMARKS)},
        "segments": {name: {"present_prob": float(pred.present_prob[j]),
                            **({"radius_mm": float(radius[j])} if np.isfinite(radius[j]) else {})}
                     for j, name in enumerate(anatomy.SEGMENTS)},
    }


def write_prediction(path, pred: Prediction) -> None:
    """Write by suffix: ``.mrk.json`` (Slicer, LPS), ``.json`` (``prediction_dict``), ``.csv``
    (name,x,y,z RAS)."""
    path = Path(path)
    if _output_kind(path) == ".json":
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(prediction_dict(pred), indent=1), encoding="utf-8")
    else:
        io.write_landmarks(path, pred.landmarks, confidences=pred.confidence,
                           spreads_mm=pred.spread_mm)


def write_figure(path, name: str, image: np.ndarray, affine: np.ndarray, pred: Prediction) -> Path:
    """Axial and coronal MIPs of the image (on a RAS-aligned grid at its finest spacing) with the
    predicted landmarks named, the variable segments read as absent in the title, and the
    segment labels in colour where the prediction has them (``figures.prediction_mips``)."""
    from cowjax import figures  # matplotlib: only loaded when a figure is asked for
    grid_affine, grid_shape = preprocess.finest_canonical_grid(affine, image.shape)
    grid_image = preprocess.resample(np.asarray(image, np.float32), affine, grid_affine,
                                     grid_shape, order=1)
    labels = (None if pred.segmentation is None else
              preprocess.resample(pred.segmentation, affine, grid_affine, grid_shape, order=0))
    absent = [s for j, s in enumerate(anatomy.SEGMENTS)
              if s in anatomy.VARIABLE_SEGMENTS and pred.present_prob[j] <= 0.5]
    title = f"{name}: variable segments absent: {', '.join(absent) or 'none'}"
    return figures.prediction_mips(path, grid_image, grid_affine, pred.landmarks, title, labels)


def _inputs(input_path: Path) -> list[tuple[str, Path]]:
    """(case name, image path) for one image (a file, or a DICOM series folder), a folder of
    images, or a folder of cases."""
    if input_path.is_file() or io.is_image(input_path):
        return [(io.image_stem(input_path), input_path)]
    if not input_path.is_dir():
        raise CowjaxError(f"{input_path}: input not found")
    images = sorted(p for p in input_path.iterdir() if io.is_image(p))
    if images:
        return [(io.image_stem(p), p) for p in images]
    return [(d.name, io.case_image(d)) for d in io.list_cases(input_path)]


def run_predict(workdir, input, output, save_segmentation: bool = False, tta: bool = True,
                decode_method: str = heatmaps.DEFAULT_METHOD, refine: bool = True,
                presence: str = "image", figure: bool = False, align: bool = True) -> list[Path]:
    """Predict landmarks for one image (``output`` is a file: .mrk.json, .json or .csv) or a
    directory of cases / images in any format ``io.load_image`` reads (``output`` is a directory:
    ``<case>.mrk.json`` and ``<case>.json`` each).

    ``save_segmentation`` also writes segment labels on the input grid (``<case>_segments.nii.gz``,
    or ``<output stem>_segments.nii.gz`` next to a single output file) and their 3D Slicer colour
    table (``segments.ctbl``, ``<output stem>_segments.ctbl``); ``figure`` a PNG of the image's
    MIPs with the prediction (``<case>.png``, ``<output stem>.png``: ``write_figure``). ``tta``,
    ``decode_method``, ``refine``, ``presence`` and ``align`` as ``Predictor.from_workdir``.
    Returns the written paths.
    """
    input_path, output = Path(input), Path(output)
    single = input_path.is_file() or io.is_image(input_path)
    if single:
        kind = _output_kind(output)
        stem = output.name[:-len(kind)]
        if not output.parent.is_dir():
            raise CowjaxError(f"{output}: output directory {output.parent} does not exist")
    else:
        if output.exists() and not output.is_dir():
            raise CowjaxError(f"{output}: input is a directory, so the output must be a directory")
        if not output.parent.is_dir():
            raise CowjaxError(f"{output}: parent directory {output.parent} does not exist")
    items = _inputs(input_path)
    predictor = load_predictor(workdir, refine=refine, tta=tta, decode_method=decode_method,
                               presence=presence, align=align)
    if not single:
        output.mkdir(exist_ok=True)
    written = []
    for name, image_path in tqdm(items, desc="predict", unit="case", disable=single):
        image, affine = io.load_image(image_path)
        pred = predictor.predict(image, affine, segmentation=save_segmentation)
        if single:
            targets = [output]
            seg_path = output.parent / f"{stem}_segments.nii.gz"
            figure_path = output.parent / f"{stem}.png"
        else:
            targets = [output / f"{name}.mrk.json", output / f"{name}.json"]
            seg_path = output / f"{name}_segments.nii.gz"
            figure_path = output / f"{name}.png"
        for t in targets:
            write_prediction(t, pred)
        written += targets
        if save_segmentation:
            io.save_image(seg_path, pred.segmentation, affine)
            written.append(seg_path)
        if figure:
            written.append(write_figure(figure_path, name, image, affine, pred))
    if save_segmentation:  # the segments' names and colours for 3D Slicer, beside the label maps
        table = (output.parent / f"{stem}_segments.ctbl" if single
                 else output / "segments.ctbl")
        io.write_colour_table(table)
        written.append(table)
    where = output if single else f"{output}/ ({len(items)} cases)"
    print(f"predictions written to {where}")
    return written
