"""Whole-volume inference at any input size, and the ``--mode=predict`` command.

An image goes through the training preprocessing (``preprocess.preprocess_case``: canonical RAS grid
at ``config.data.spacing``, intensity normalisation) and the circle is found without landmarks
(``Predictor.locate``: the network scores windows over the whole volume, then re-centres on its own
detections). The network sees ``config.data.crop_shape`` windows: the one centred there and, where the volume is larger, neighbours shifted by a margin on each axis
(by default the training's random translation, ``config.data.augment.translate_mm``, so every window
is placed as some training crop was). Their outputs are blended with Gaussian weights (highest at
each window's centre) before decoding, and the decoded voxel coordinates go back to the image's world
exactly through the grid affine. The attribute heads are read from the central window. A run with
a refinement stage (``<workdir>/refine``) then moves each landmark to its re-detection in a finer
patch around it (``Refiner``). Segment labels, when asked for, are written on the image's own grid:
the lumen from the image at its resolution, the class from the network's blended probabilities
(``segment``).
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
from scipy import special
from tqdm import tqdm

from cowjax import anatomy, devices
from cowjax import heatmaps as heatmaps_lib
from cowjax.data import io, preprocess
from cowjax.errors import CowjaxError, atomic_output
from cowjax.inference import segment
from cowjax.model import unet
from cowjax.registration import intensity

OUTPUT_SUFFIXES = (".mrk.json", ".json", ".csv")
# Gaussian blending: sigma as a fraction of the window (as nnU-Net's sliding windows).
_BLEND_SIGMA = 1 / 8


@dataclasses.dataclass
class Prediction:
    """One image's prediction. landmarks: [19, 3] world RAS mm; confidence: [19] (peak height, or
    softmax mass for softmax-trained heatmaps); bifurcation_prob: [19]; present_prob: [20];
    segmentation: None or [X, Y, Z] uint8 labels 0..20 on the input image's grid (the lumen
    labelled by the predicted landmarks); head_segmentation: the same lumen labelled by the
    network's segmentation head (``segment``)."""
    landmarks: np.ndarray
    confidence: np.ndarray
    bifurcation_prob: np.ndarray
    present_prob: np.ndarray
    segmentation: np.ndarray | None = None
    head_segmentation: np.ndarray | None = None


def _window_starts(centre, size, window, step, align):
    """Window starts along one axis, all multiples of ``align`` (the heatmap stride).

    The window centred on ``centre`` and, where the volume is larger than a window, the two shifted
    by ``step`` either way; each kept inside the volume (a volume smaller than the window gets one
    window holding all of it). Returns (sorted starts, index of the central window).
    """
    lo, hi = min(0, size - window), max(0, size - window)
    central = int(np.clip(np.round(centre - (window - 1) / 2), lo, hi))
    shifts = (-step, 0, step) if step and size > window else (0,)
    starts = sorted({align * (int(np.clip(central + k, lo, hi)) // align) for k in shifts})
    return starts, starts.index(align * (central // align))


def _blend_weights(shape):
    """Separable Gaussian [X, Y, Z] peaking at the window centre, floored so edges still count."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (_BLEND_SIGMA * n)) ** 2) for n in shape]
    w = functools.reduce(np.multiply.outer, axes)
    return np.maximum(w, 1e-3).astype(np.float32)


class _Blend:
    """Running Gaussian-weighted average of window outputs [x, y, z, C] over a region (x, y, z)."""

    def __init__(self, region, window, channels):
        self.weight = _blend_weights(window)
        self.total = np.zeros(tuple(region) + (channels,), np.float32)
        self.norm = np.zeros(tuple(region), np.float32)

    def add(self, output, start):
        sl = tuple(slice(s, s + n) for s, n in zip(start, self.weight.shape))
        self.total[sl] += output * self.weight[..., None]
        self.norm[sl] += self.weight

    def result(self):
        # The windows tile the region (a full product of starts), so norm > 0 wherever it matters.
        return self.total / np.maximum(self.norm, 1e-12)[..., None]


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
    seg = out["segmentation"]
    if seg.shape[1:4] != images.shape[1:4]:  # half-resolution segmentation: upsample the logits
        seg = jax.image.resize(seg, images.shape[:4] + seg.shape[-1:], "linear")
    return {"heatmaps": heat, "segmentation": seg,
            "bifurcation_prob": jax.nn.sigmoid(out["landmark_attr"]),
            "present_prob": jax.nn.sigmoid(out["segment_attr"])}


def _cut_windows(volume, starts, window) -> np.ndarray:
    """Windows of ``volume`` [X, Y, Z] at ``starts`` [N, 3] (zero outside) -> [N, *window, 1]."""
    window = tuple(int(w) for w in window)
    lo = np.maximum(0, -starts.min(axis=0))
    hi = np.maximum(0, starts.max(axis=0) + window - np.array(volume.shape))
    padded = np.pad(volume, list(zip(lo, hi)))
    out = np.zeros((len(starts), *window, 1), np.float32)
    for i, st in enumerate(starts + lo):
        out[i, ..., 0] = padded[tuple(slice(a, a + w) for a, w in zip(st, window))]
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _refine_coords(model, method, params, patches, channels, centres, sigma_vox):
    """Patches [B, X, Y, Z, 1] -> the refined voxel coordinates [B, 3] of landmark ``channels [B]``,
    each patch's logits plus the log of a Gaussian prior (``sigma_vox [3]``) around its first
    estimate ``centres [B, 3]`` (patch voxels)."""
    heat = model.apply({"params": params}, patches)["heatmaps"]
    logits = jnp.take_along_axis(heat, channels[:, None, None, None, None], axis=-1)
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in heat.shape[1:4]],
                                  indexing="ij"), axis=-1)                      # [X, Y, Z, 3]
    z = (grid[None] - centres[:, None, None, None]) / sigma_vox
    log_prior = -0.5 * jnp.sum(z * z, axis=-1, keepdims=True)
    return heatmaps_lib.decode(logits + log_prior, method, kind="logits")[0][:, 0]


def _with_template(config, params, workdir):
    """(config, params) with ``data.template`` pointing into ``workdir`` when the recorded path is
    gone (a run moved or copied elsewhere keeps its ``template.nii.gz``)."""
    from cowjax.data import pipeline
    template = config.data.get("template", "")
    moved = pipeline.template_path(workdir)
    if template and not Path(template).is_file() and moved.is_file():
        config = config.copy_and_resolve_references()
        config.data.template = str(moved.resolve())
    return config, params


class Refiner:
    """The refinement stage (``config.refine``): each landmark re-detected in a patch at a finer
    spacing centred on its first estimate.

    The image is preprocessed onto the refinement grid; patch k's heatmap k (spatial-softmax
    logits) plus a Gaussian log-prior of ``prior_sigma_mm`` around the first estimate is decoded
    (argmax and quadratic refinement). The prior keeps the small patch network from jumping to a
    similar bifurcation nearby, such as the other side's A2 end or a further M2/P2 branching.
    With ``tta_shift_mm`` (test-time augmentation) the same is done with the estimate moved by
    +-shift along each axis, patch and prior together, and the seven results are averaged.
    config: the refinement stage's own config (``config_defaults.refine_config``); the two
    keywords default to its ``refine`` group. decode_method: how each refined heatmap is read
    (``heatmaps_lib.METHODS``).
    """

    def __init__(self, config, params, prior_sigma_mm: float | None = None,
                 tta_shift_mm: float | None = None, decode_method: str = heatmaps_lib.DEFAULT_METHOD):
        self.config = config
        self.decode_method = decode_method
        self.window = np.array(config.data.crop_shape)
        self.model = unet.build_model(config)
        self.mesh = devices.data_mesh(devices.window_batch(), local=True)
        self.params = jax.device_put(params, devices.replicated(self.mesh))
        self.prior_sigma_mm = float(config.refine.prior_sigma_mm if prior_sigma_mm is None
                                    else prior_sigma_mm)
        self.sigma_vox = np.float32(self.prior_sigma_mm) / np.asarray(config.data.spacing,
                                                                      np.float32)
        shift = config.refine.get("tta_shift_mm", 0.0) if tta_shift_mm is None else tta_shift_mm
        self.shifts_mm = np.zeros((1, 3))
        if shift:
            self.shifts_mm = np.concatenate([self.shifts_mm, shift * np.eye(3), -shift * np.eye(3)])

    def refine(self, image, affine, landmarks) -> np.ndarray:
        """image [X, Y, Z], affine [4, 4], first estimates [19, 3] world RAS mm -> refined [19, 3]."""
        to_template = intensity.template_registration(self.config.data)
        matrix = None if to_template is None else to_template(image, affine)
        grid = preprocess.network_grid(affine, image.shape, self.config.data.spacing, matrix)
        prep = preprocess.preprocess_image(image, affine, *grid, fov=False)
        volume, grid_affine = prep["image"], prep["affine"]
        n = anatomy.NUM_LANDMARKS
        shifts_vox = self.shifts_mm / np.asarray(self.config.data.spacing, np.float64)
        # [shifts, 19, 3] patch centres and starts on the grid.
        centres = preprocess.world_to_voxel(landmarks, grid_affine)[None] + shifts_vox[:, None]
        starts = np.round(centres - (self.window - 1) / 2).astype(int)
        cut = _cut_windows(volume, starts.reshape(-1, 3), self.window).reshape(
            *starts.shape[:2], *self.window, 1)
        batch = -(-n // self.mesh.size) * self.mesh.size   # a multiple of the devices
        split = devices.split(self.mesh)
        channels = jax.device_put(np.arange(batch) % n, split)
        coords = np.zeros(centres.shape)
        for j in range(len(centres)):  # one call per shift: 19 patches, memory stays small
            patches = np.zeros((batch, *self.window, 1), np.float32)
            patches[:n] = cut[j]
            prior = np.zeros((batch, 3), np.float32)
            prior[:n] = centres[j] - starts[j]
            c = _refine_coords(self.model, self.decode_method, self.params,
                               jax.device_put(patches, split), channels,
                               jax.device_put(prior, split), self.sigma_vox)
            coords[j] = np.asarray(c, np.float64)[:n] + starts[j]
        return preprocess.voxel_to_world(coords.mean(axis=0), grid_affine)


class Predictor:
    """A trained (or freshly initialised) network turned into ``predict(image, affine)``.

    batch_size: windows per forward call, split over this process's devices (default: one per CPU
      device, i.e. per core; 8 on an accelerator).
    margin_mm: how far the neighbouring windows are shifted from the central one (at most half a
      window); the region covered is the window plus this margin on each side. Default: the
      training's random crop translation. 0: the central window only.
    flip: also predict on the left-right mirror image and average (test-time augmentation).
    refiner: a ``Refiner`` that moves each landmark found to its refined position, or None.
    decode_method: how the heatmaps are read (``heatmaps_lib.METHODS``: "argmax" as the paper, or the
      default sub-voxel fit).
    """

    def __init__(self, config, params, batch_size: int | None = None,
                 margin_mm: float | None = None, flip: bool = True,
                 refiner: Refiner | None = None, decode_method: str = heatmaps_lib.DEFAULT_METHOD):
        if decode_method not in heatmaps_lib.METHODS:
            raise CowjaxError(f"decode {decode_method!r}: expected one of {heatmaps_lib.METHODS}")
        self.config = config
        self.flip = flip
        self.decode_method = decode_method
        self.refiner = refiner
        self.batch_size = batch_size or devices.window_batch()
        self.mesh = devices.data_mesh(self.batch_size, local=True)
        self.params = jax.device_put(params, devices.replicated(self.mesh))
        self.window = tuple(int(n) for n in config.data.crop_shape)
        self.stride = int(config.model.heatmap_stride)
        self.kind = heatmaps_lib.kind_for(config)
        if margin_mm is None:
            margin_mm = config.data.augment.translate_mm
        margin = np.round(margin_mm / np.asarray(config.data.spacing, np.float64)).astype(int)
        self.step = np.minimum(margin, np.array(self.window) // 2)
        if margin_mm > 0:  # a shift below the heatmap stride would be rounded away
            self.step = np.maximum(self.step, self.stride)
        self.model = unet.build_model(config)
        self._forward = functools.partial(_apply, self.model, self.kind)
        # The run's registration (None without): images go onto the grid training used.
        self.to_template = intensity.template_registration(config.data)

    @classmethod
    def from_workdir(cls, workdir, refine: bool = True, tta: bool = True,
                     decode_method: str = heatmaps_lib.DEFAULT_METHOD, **kwargs) -> "Predictor":
        """The run's best checkpoint (``checkpoint.load_for_inference``); CowjaxError if none. With
        ``refine``, the refinement stage's too where the run has one (``<workdir>/refine``).
        ``tta=False`` turns test-time augmentation off (no mirror image, no shifted refinement
        patches); with ``decode_method="argmax"`` too, a run is scored as the paper did."""
        from cowjax.training import checkpoint
        config, params = _with_template(*checkpoint.load_for_inference(workdir), workdir)
        refiner = None
        refine_dir = Path(workdir) / checkpoint.REFINE_DIR
        if refine and checkpoint.has_checkpoint(refine_dir):
            refiner = Refiner(*_with_template(*checkpoint.load_for_inference(refine_dir), workdir),
                              tta_shift_mm=None if tta else 0.0, decode_method=decode_method)
        return cls(config, params, refiner=refiner, flip=tta, decode_method=decode_method,
                   **kwargs)

    def _window_outputs(self, volume, starts, keys):
        """Yield (window index, {key: output}) for each window start [3] of ``volume`` (zero
        outside). Batches have a fixed size (the last one zero-padded): one compiled shape."""
        cut = _cut_windows(volume, starts, self.window)
        for i in range(0, len(starts), self.batch_size):
            chunk = cut[i:i + self.batch_size]
            crops = np.zeros((self.batch_size,) + self.window + (1,), np.float32)
            crops[:len(chunk)] = chunk
            out = self._forward(self.params, jax.device_put(crops, devices.split(self.mesh)))
            out = jax.device_get({k: out[k] for k in keys})
            for j in range(len(chunk)):
                yield i + j, {k: v[j] for k, v in out.items()}

    def _detect(self, volume, centres):
        """Windows centred at ``centres`` [N, 3] (grid voxels) -> (landmarks [N, 19, 3] grid voxels,
        mean landmark confidence [N]), each window decoded on its own."""
        w = np.array(self.window)
        starts = self.stride * (np.round(np.asarray(centres) - (w - 1) / 2).astype(int)
                                // self.stride)
        coords, scores = np.zeros((len(starts), anatomy.NUM_LANDMARKS, 3)), np.zeros(len(starts))
        for i, out in self._window_outputs(volume, starts, ["heatmaps"]):
            c, conf = heatmaps_lib.decode(out["heatmaps"][None], self.decode_method,
                                             stride=self.stride,
                                             kind=self.kind)
            coords[i] = np.asarray(c[0]) + starts[i]
            scores[i] = float(np.mean(conf))
        return coords, scores

    def locate(self, volume, first_guess, refinements: int = 2) -> np.ndarray:
        """The centre of the circle on the grid (voxel coords [3]), found without landmarks.

        The image-based estimate can be far off (bright structures, a wide or off-centre field of
        view), so the network itself searches: windows at that estimate and on a half-window lattice
        over the whole volume are scored by their mean landmark confidence; the best one's predicted
        landmarks give a centre, refined by re-detecting there. Training crops are centred on the
        landmarks' centroid, so the final windows are placed as training saw them.
        """
        w = np.array(self.window, np.float64)
        axes = [[(n - 1) / 2] if n <= k else
                np.linspace((k - 1) / 2, n - 1 - (k - 1) / 2, int(np.ceil((n - k) / (k / 2))) + 1)
                for n, k in zip(volume.shape, w)]
        candidates = np.concatenate([np.asarray(first_guess, np.float64)[None],
                                     np.array(list(itertools.product(*axes)))])
        coords, scores = self._detect(volume, candidates)
        centre = coords[np.argmax(scores)].mean(axis=0)
        for _ in range(refinements):
            coords, _ = self._detect(volume, centre[None])
            centre = coords[0].mean(axis=0)
        return centre

    def predict(self, image, affine, segmentation: bool = False) -> Prediction:
        """Landmarks of one image. image: [X, Y, Z] (any orientation, any size); affine: [4, 4]
        voxel -> world RAS mm. ``segmentation=True`` also returns segment labels on the input grid.

        With ``flip`` (test-time augmentation) the image is also seen mirrored left-right: the same
        voxels with the world's x negated, so the network meets a mirror image of the patient; its
        landmarks are mirrored back (x negated, _R and _L channels swapped) and averaged in."""
        pred, lumen = self._predict_once(image, affine, segmentation)
        if self.flip:
            mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
            m, _ = self._predict_once(image, mirror @ np.asarray(affine, np.float64), False)
            lm, seg_idx = anatomy.MIRROR_LANDMARKS, anatomy.MIRROR_SEGMENTS
            pred = dataclasses.replace(
                pred, landmarks=(pred.landmarks + m.landmarks[lm] * [-1.0, 1.0, 1.0]) / 2,
                confidence=(pred.confidence + m.confidence[lm]) / 2,
                bifurcation_prob=(pred.bifurcation_prob + m.bifurcation_prob[lm]) / 2,
                present_prob=(pred.present_prob + m.present_prob[seg_idx]) / 2)
        if segmentation:
            # The lumen labelled by the final landmarks (``segment``).
            pred.segmentation = segment.label_by_landmarks(lumen, np.asarray(affine, np.float64),
                                                           pred.landmarks)
        return pred

    def _predict_once(self, image, affine,
                      segmentation: bool) -> tuple[Prediction, np.ndarray | None]:
        """One pass of the network (and the refiner) -> (prediction without the landmark-labelled
        segmentation, the image's lumen mask or None)."""
        image, affine = np.asarray(image, np.float32), np.asarray(affine, np.float64)
        matrix = None if self.to_template is None else self.to_template(image, affine)
        grid = preprocess.network_grid(affine, image.shape, self.config.data.spacing, matrix)
        prep = preprocess.preprocess_image(image, affine, *grid)
        volume, grid_affine = prep["image"], prep["affine"]
        centre = self.locate(volume, prep["fov_centre"])
        per_axis = [_window_starts(c, n, w, st, self.stride) for c, n, w, st in
                    zip(centre, volume.shape, self.window, self.step)]
        starts = np.array(list(itertools.product(*(s for s, _ in per_axis))))
        central = int(np.ravel_multi_index([i for _, i in per_axis], [len(s) for s, _ in per_axis]))

        origin = starts.min(axis=0)                 # region start on the grid, a multiple of stride
        region = starts.max(axis=0) - origin + self.window
        s = self.stride
        heat = _Blend(region // s, tuple(n // s for n in self.window), anatomy.NUM_LANDMARKS)
        seg = _Blend(region, self.window, anatomy.NUM_CLASSES) if segmentation else None
        keys = ["heatmaps", "bifurcation_prob", "present_prob"] + (["segmentation"] if seg else [])
        for i, out in self._window_outputs(volume, starts, keys):
            heat.add(out["heatmaps"], (starts[i] - origin) // s)
            if seg is not None:
                seg.add(out["segmentation"], starts[i] - origin)
            if i == central:
                attributes = out
        heatmaps = heat.result()
        # Windows hanging over the volume's edge see zero padding there: no landmark can be there.
        centres = [heatmaps_lib.from_grid(np.arange(n), s) + o for n, o in zip(heatmaps.shape[:3], origin)]
        inside = functools.reduce(np.multiply.outer, [(c >= -0.5) & (c <= n - 0.5) for c, n in
                                                      zip(centres, volume.shape)])
        heatmaps = np.where(inside[..., None], heatmaps, heatmaps.min())
        coords, confidence = heatmaps_lib.decode(heatmaps[None], self.decode_method, stride=s,
                                                  kind=self.kind)
        landmarks = preprocess.voxel_to_world(np.asarray(coords[0], np.float64) + origin, grid_affine)
        if self.refiner is not None:
            landmarks = self.refiner.refine(image, affine, landmarks)

        lumen = head_labels = None
        if seg is not None:
            # The lumen from the image, labelled here by the segmentation head (its class
            # probabilities over the region, which may stick out of the volume, on a grid of their
            # own) and by ``predict`` with the final landmarks.
            lumen = segment.vessel_mask(image, affine)
            prob = special.softmax(seg.result(), axis=-1)
            region_affine = grid_affine.copy()
            region_affine[:3, 3] = preprocess.voxel_to_world(origin, grid_affine)
            head_labels = segment.label_lumen(lumen, affine, prob, region_affine)
        return Prediction(landmarks=landmarks, confidence=np.asarray(confidence[0], np.float64),
                          bifurcation_prob=attributes["bifurcation_prob"].astype(np.float64),
                          present_prob=attributes["present_prob"].astype(np.float64),
                          head_segmentation=head_labels), lumen


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


def run_predict(workdir, input, output, save_segmentation: bool = False, tta: bool = True,
                decode_method: str = heatmaps_lib.DEFAULT_METHOD, refine: bool = True) -> list[Path]:
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
    predictor = Predictor.from_workdir(workdir, refine=refine, tta=tta,
                                       decode_method=decode_method)
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
