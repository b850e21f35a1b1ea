"""Whole-volume inference at any input size, and the ``--mode=predict`` command.

An image goes through the training preprocessing (``preprocess.preprocess_case``: canonical RAS grid at
``config.data.spacing``, intensity normalisation), the field of view is found without landmarks
(``preprocess.estimate_fov_center``, in ``preprocess_case``), and the network sees ``config.data.crop_shape`` windows: the one
centred there and, where the volume is larger, its neighbours ``step`` voxels away on each axis. Their
outputs are blended with Gaussian weights (highest at each window's centre) before decoding, and the
decoded voxel coordinates go back to the image's world exactly through the grid affine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cowjax import anatomy
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.inference import decode
from cowjax.model import unet

OUTPUT_SUFFIXES = (".mrk.json", ".json", ".csv")
# Gaussian blending: sigma as a fraction of the window (as nnU-Net's sliding windows).
_BLEND_SIGMA = 1 / 8
# Neighbouring windows sit this fraction of the window away from the central one.
_WINDOW_STEP = 1 / 4


@dataclasses.dataclass
class Prediction:
    """One image's prediction. landmarks: [19, 3] world RAS mm; confidence: [19] (peak height, or
    softmax mass for softmax-trained heatmaps); bifurcation_prob: [19]; present_prob: [20];
    segmentation: None or [X, Y, Z] uint8 labels 0..20 on the input image's grid."""
    landmarks: np.ndarray
    confidence: np.ndarray
    bifurcation_prob: np.ndarray
    present_prob: np.ndarray
    segmentation: np.ndarray | None = None


def _window_starts(center, size, window, step, align):
    """Start voxels along one axis: the window centred on ``center`` and its neighbours ``step``
    away, kept overlapping the volume as much as possible; multiples of ``align`` (heatmap stride).
    Returns (starts, index of the central window)."""
    lo, hi = min(0, size - window), max(0, size - window)
    central = int(np.clip(np.round(center - (window - 1) / 2), lo, hi))
    # Neighbours only where the volume extends beyond one window.
    ks = (-1, 0, 1) if step and size > window else (0,)
    raw = [int(np.clip(central + k * step, lo, hi)) for k in ks]
    starts = sorted({align * (s // align) for s in raw})
    return starts, starts.index(align * (central // align))


def _blend_weights(shape):
    """Separable Gaussian [X, Y, Z] peaking at the window centre, floored so edges still count."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (_BLEND_SIGMA * n)) ** 2) for n in shape]
    w = functools.reduce(np.multiply.outer, axes)
    return np.maximum(w, 1e-3).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(model, kind, params, images):
    """One batch of windows -> heatmaps (log-probabilities for spatial-softmax models), segmentation
    logits, attribute probabilities. Module-level so Predictors of one model share the compilation."""
    out = model.apply({"params": params}, images)
    heat = out["heatmaps"]
    if kind == "logits":
        # Each window's spatial softmax is normalised on its own: blend log-probabilities.
        b, *_, c = heat.shape
        heat = jax.nn.log_softmax(heat.reshape(b, -1, c), axis=1).reshape(heat.shape)
    return {"heatmaps": heat, "segmentation": out["segmentation"],
            "bifurcation_prob": jax.nn.sigmoid(out["landmark_attr"]),
            "present_prob": jax.nn.sigmoid(out["segment_attr"])}


class Predictor:
    """A trained (or freshly initialised) network turned into ``predict(image, affine)``."""

    def __init__(self, config, params, batch_size: int = 1):
        self.config = config
        self.params = params
        self.batch_size = batch_size
        self.window = tuple(int(n) for n in config.data.crop_shape)
        self.stride = int(config.model.heatmap_stride)
        self.kind = "logits" if config.loss.heatmap == "softmax_ce" else "gaussian"
        self.model = unet.build_model(config)
        self._forward = functools.partial(_apply, self.model, self.kind)

    @classmethod
    def from_workdir(cls, workdir, batch_size: int = 1) -> "Predictor":
        """The run's best checkpoint (``checkpoint.load_for_inference``); CowjaxError if none."""
        from cowjax.training import checkpoint
        config, params = checkpoint.load_for_inference(workdir)
        return cls(config, params, batch_size=batch_size)

    def _run_windows(self, volume, starts):
        """Forward every window (start voxels [W, 3]) of ``volume`` [X, Y, Z] (zero outside).

        Returns the stacked outputs, leading axis W."""
        lo = np.maximum(0, -starts.min(axis=0))
        hi = np.maximum(0, starts.max(axis=0) + self.window - volume.shape)
        padded = np.pad(volume, list(zip(lo, hi)))
        crops = np.stack([padded[tuple(slice(s, s + n) for s, n in zip(st + lo, self.window))]
                          for st in starts])[..., None]
        # A fixed batch (last one zero-padded) keeps a single compiled shape.
        pad = -len(crops) % self.batch_size
        crops = np.concatenate([crops, np.zeros((pad,) + crops.shape[1:], crops.dtype)])
        outs = [jax.device_get(self._forward(self.params, jnp.asarray(crops[i:i + self.batch_size])))
                for i in range(0, len(crops), self.batch_size)]
        return {k: np.concatenate([o[k] for o in outs])[:len(starts)] for k in outs[0]}

    def predict(self, image, affine, segmentation: bool = False) -> Prediction:
        """Landmarks of one image. image: [X, Y, Z] (any orientation, any size); affine: [4, 4]
        voxel -> world RAS mm. ``segmentation=True`` also returns segment labels on the input grid."""
        image = np.asarray(image, np.float32)
        case = io.Case("predict", image, np.asarray(affine, np.float64),
                       np.full((anatomy.NUM_LANDMARKS, 3), np.nan))
        prep = preprocess.preprocess_case(case, self.config)
        volume, grid_affine = prep["image"], prep["affine"]
        per_axis = [_window_starts(c, n, w, int(w * _WINDOW_STEP), self.stride)
                    for c, n, w in zip(prep["fov_center"], volume.shape, self.window)]
        starts = np.array(list(itertools.product(*(s for s, _ in per_axis))))
        central = int(np.ravel_multi_index([i for _, i in per_axis], [len(s) for s, _ in per_axis]))
        out = self._run_windows(volume, starts)

        origin = starts.min(axis=0)                       # region start on the grid, multiple of stride
        region = tuple(starts.max(axis=0) - origin + self.window)
        heat = _blend(out["heatmaps"], (starts - origin) // self.stride,
                      tuple(n // self.stride for n in region))
        coords, confidence = decode.decode_heatmaps(heat[None], stride=self.stride, kind=self.kind)
        grid_vox = np.asarray(coords[0], np.float64) + origin
        landmarks = preprocess.voxel_to_world(grid_vox, grid_affine)

        labels = None
        if segmentation:
            logits = _blend(out["segmentation"], starts - origin, region)
            grid_labels = np.zeros(volume.shape, np.uint8)
            # The region may stick out of the volume (padding): keep the part inside.
            src = tuple(slice(max(0, -o), min(r, n - o)) for o, r, n in zip(origin, region, volume.shape))
            dst = tuple(slice(max(0, o), min(o + r, n)) for o, r, n in zip(origin, region, volume.shape))
            grid_labels[dst] = np.argmax(logits[src], axis=-1).astype(np.uint8)
            labels = preprocess.resample(grid_labels, grid_affine, case.affine, image.shape,
                                         order=0).astype(np.uint8)
        return Prediction(landmarks=landmarks, confidence=np.asarray(confidence[0], np.float64),
                          bifurcation_prob=out["bifurcation_prob"][central].astype(np.float64),
                          present_prob=out["present_prob"][central].astype(np.float64),
                          segmentation=labels)


def _blend(windows, starts, region):
    """Gaussian-weighted average of window outputs [W, x, y, z, C] placed at ``starts`` [W, 3] in a
    ``region`` (x, y, z) -> [x, y, z, C]."""
    shape = windows.shape[1:4]
    weight = _blend_weights(shape)
    total = np.zeros(region + windows.shape[-1:], np.float32)
    norm = np.zeros(region, np.float32)
    for win, st in zip(windows, starts):
        sl = tuple(slice(s, s + n) for s, n in zip(st, shape))
        total[sl] += win * weight[..., None]
        norm[sl] += weight
    # The windows tile the region (a full product of starts), so norm > 0 wherever it matters.
    return total / np.maximum(norm, 1e-12)[..., None]


# ------------------------------------------------------------------------------------ run_predict

def _output_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise CowjaxError(f"{path}: unknown output type (expected one of {', '.join(OUTPUT_SUFFIXES)})")


def prediction_dict(pred: Prediction) -> dict:
    """The ``.json`` output: landmarks with position, confidence, bifurcation probability; segments
    with presence probability."""
    return {
        "landmarks": {name: {"position_ras_mm": [float(v) for v in pred.landmarks[i]],
                             "confidence": float(pred.confidence[i]),
                             "bifurcation_prob": float(pred.bifurcation_prob[i])}
                      for i, name in enumerate(anatomy.LANDMARKS)},
        "segments": {name: {"present_prob": float(pred.present_prob[j])}
                     for j, name in enumerate(anatomy.SEGMENTS)},
    }


def write_prediction(path, pred: Prediction) -> None:
    """Write by suffix: ``.mrk.json`` (Slicer, LPS), ``.json`` (everything), ``.csv`` (name,x,y,z RAS)."""
    path = Path(path)
    if _output_kind(path) == ".json":
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(prediction_dict(pred), indent=1))
    else:
        io.write_landmarks(path, pred.landmarks, confidences=pred.confidence)


def _inputs(input_path: Path) -> list[tuple[str, Path]]:
    """(case name, image path) for a case directory, a directory of images, or one image."""
    if input_path.is_file():
        return [(_image_stem(input_path), input_path)]
    if not input_path.is_dir():
        raise CowjaxError(f"{input_path}: input not found")
    images = sorted(p for p in input_path.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if images:
        return [(_image_stem(p), p) for p in images]
    return [(d.name, d / io.IMAGE) for d in io.list_cases(input_path)]


def _image_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def run_predict(workdir, input, output, save_segmentation: bool = False) -> list[Path]:
    """Predict landmarks for one image (``output`` is a file: .mrk.json, .json or .csv) or a directory
    of cases / NIfTI images (``output`` is a directory: ``<case>.mrk.json`` and ``<case>.json`` each).

    ``save_segmentation`` also writes segment labels on the input grid (``<case>_segments.nii.gz``,
    or ``<output stem>_segments.nii.gz`` next to a single output file). Returns the written paths.
    """
    input_path, output = Path(input), Path(output)
    single = input_path.is_file()
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
    predictor = Predictor.from_workdir(workdir)
    if not single:
        output.mkdir(exist_ok=True)
    written = []
    for name, image_path in tqdm(items, desc="predict", unit="case", disable=single):
        image, affine = io.load_image(image_path)
        pred = predictor.predict(image, affine, segmentation=save_segmentation)
        if single:
            targets = [output]
            seg_path = output.parent / f"{stem}_segments.nii.gz"
        else:
            targets = [output / f"{name}.mrk.json", output / f"{name}.json"]
            seg_path = output / f"{name}_segments.nii.gz"
        for t in targets:
            write_prediction(t, pred)
        written += targets
        if save_segmentation:
            io.save_image(seg_path, pred.segmentation, affine)
            written.append(seg_path)
    where = output if single else f"{output}/ ({len(items)} cases)"
    print(f"predictions written to {where}")
    return written
