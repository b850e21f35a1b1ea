"""The predictor: one image of any size and orientation -> landmarks, attributes, segment labels.

An image goes through the training preprocessing (``preprocess.network_grid`` and
``preprocess.preprocess_image``: RAS grid at ``config.data.spacing``, in template space for a run
that registers, intensity normalisation) and the circle is found without landmarks
(``Predictor.locate``: the network scores windows over the whole volume, then re-centres on its own
detections). A run that does not register its images is registered by the landmarks found there:
rigidly onto the template's, and the grid is then RAS-aligned in template space (``align``). The
network sees ``config.data.crop_shape`` windows: the one centred there and, where
the volume is larger, neighbours shifted by a margin on each axis (by default the training's random
translation, ``config.data.augment.translate_mm``, so every window is placed as some training crop
was). Their outputs are blended (``windows``) before decoding, and the decoded voxel coordinates go
back to the image's world exactly through the grid affine. The attribute heads are read from the
central window. A run with a refinement stage (``<workdir>/refine``) then moves each landmark to its
re-detection in a finer patch around it (``refiner``). Segment labels, when asked for, are made on
the image's own grid: the lumen from the image at its resolution, the class from the predicted
landmarks or from the network's blended probabilities (``segment``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
from scipy import special

from cowjax import anatomy, devices, heatmaps
from cowjax.data import preprocess
from cowjax.errors import CowjaxError
from cowjax.inference import segment, windows
from cowjax.inference.refiner import Refiner
from cowjax.model import unet
from cowjax.registration import intensity
from cowjax.registration import landmarks as landmark_registration

# The mirror image (flip test-time augmentation): the same voxels with the world's x negated.
MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])
# Where segment presence comes from (``Predictor``'s ``presence``).
PRESENCE = ("image", "network")
# Landmarks further than this (RMS, mm) from the template fitted to them fix no pose: true
# landmarks of both generators' subjects are 2.9-6.2 mm from it, the template's own spread about
# its centroid is 25 mm (2026-12-03).
POSE_MAX_RESIDUAL_MM = 12.0
# Each landmark is decoded within this distance (mm) of where the template puts it once fitted to
# the landmarks found in the search for the circle (``Predictor.gate_mm``): a second peak further
# away is not taken. True landmarks of the held-out generator's 156 subjects lie at most 13.1 mm
# from the template fitted to them, our generator's 32 at most 9.0 mm (2026-12-07).
GATE_MM = 30.0


@dataclasses.dataclass
class Prediction:
    """One image's prediction. landmarks: [19, 3] world RAS mm; confidence: [19] (peak height, or
    softmax mass for softmax-trained heatmaps); present_prob: [20] (of each variable segment from
    the image, ``segment.presence_probability`` of ``segment_radius_mm``, where the image shows
    both its ends; otherwise, and with ``presence="network"``, the segment branch's, or 1.0 where
    that branch was never trained);
    segment_radius_mm: [20], the radius the image shows (``segment.presence_radii``; NaN where not
    measured); bifurcation_prob: [19], implied by ``present_prob`` through the cow19 rule
    (``anatomy.landmark_attributes`` on presence > 0.5: it measured better than the landmark
    branch on our validation split, 91.8% against 88.3%, and on held-out cases, BENCHMARKS.md);
    bifurcation_branch_prob: [19], the landmark attribute branch's own output;
    segmentation: None or [X, Y, Z] uint8 labels 0..20 on the input image's grid (the lumen
    labelled by the predicted landmarks, without the variable segments ``present_prob`` calls
    absent, ``segment.drop_absent``); head_segmentation: None or the same lumen labelled by the
    network's segmentation head (``segment``);
    spread_mm: None or [19], how far the passes that were averaged into ``landmarks`` (the image
    and its mirror, for each member of an ensemble) lie from it, root mean square in mm; None
    after a single pass. A landmark the passes disagree on is more often wrong (BENCHMARKS.md,
    2026-12-07 15:16): the one to check by hand."""
    landmarks: np.ndarray
    confidence: np.ndarray
    bifurcation_branch_prob: np.ndarray
    present_prob: np.ndarray
    spread_mm: np.ndarray | None = None
    segment_radius_mm: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    head_segmentation: np.ndarray | None = None

    @property
    def bifurcation_prob(self) -> np.ndarray:
        # The rule as a fuzzy AND (the least likely of the variable segments the landmark needs;
        # the others always exist): above 0.5 exactly where the hard rule on presence > 0.5 holds.
        p = np.where(anatomy.VARIABLE_SEGMENT_MASK, self.present_prob, 1.0)
        return np.where(anatomy.LANDMARK_DEPENDS, p, 1.0).min(axis=-1)


@functools.partial(devices.jit, static_argnums=(0, 1))
def _network(model, kind, params, images):
    """The default ``Predictor.forward``. Module-level so Predictors of one model share the
    compilation."""
    out = model.apply({"params": params}, images)
    maps = out["heatmaps"]
    if kind == "logits":
        # Each window's spatial softmax is normalised on its own: blend log-probabilities.
        b, *_, c = maps.shape
        maps = jax.nn.log_softmax(maps.reshape(b, -1, c), axis=1).reshape(maps.shape)
    seg = out["segmentation"]
    if seg.shape[1:4] != images.shape[1:4]:  # half-resolution segmentation: upsample the logits
        seg = jax.image.resize(seg, images.shape[:4] + seg.shape[-1:], "linear")
    return {"heatmaps": maps, "segmentation": seg,
            "bifurcation_prob": jax.nn.sigmoid(out["landmark_attr"]),
            "present_prob": jax.nn.sigmoid(out["segment_attr"])}


def pose_to_template(landmarks: np.ndarray) -> np.ndarray | None:
    """[4, 4] world -> template world: the least-squares rigid fit of ``landmarks`` [19, 3] (world
    RAS mm, found in an image) onto ``anatomy.TEMPLATE_LANDMARKS``; None when they fix no pose
    (on a line or a point) or do not look like a circle of Willis (RMS distance from the fitted
    template above ``POSE_MAX_RESIDUAL_MM``)."""
    try:
        fit = landmark_registration.fit_transform(anatomy.TEMPLATE_LANDMARKS, landmarks)
    except CowjaxError:
        return None
    residuals = landmark_registration.residuals(anatomy.TEMPLATE_LANDMARKS, landmarks, fit)
    return fit if np.sqrt(np.nanmean(residuals ** 2)) <= POSE_MAX_RESIDUAL_MM else None


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


class Predictor:
    """A trained (or freshly initialised) network turned into ``predict(image, affine)``.

    batch_size: windows per forward call, split over this process's devices (default: one per CPU
      device, i.e. per core; 8 on an accelerator).
    margin_mm: how far the neighbouring windows are shifted from the central one (at most half a
      window); the region covered is the window plus this margin on each side. Default: the
      training's random crop translation. 0: the central window only.
    flip: also predict on the left-right mirror image and average (test-time augmentation).
    refiner: the refinement stage (``Refiner``) that moves each landmark found, or None.
    decode_method: how the heatmaps are read (``heatmaps.METHODS``: "argmax" as the paper, or the
      default sub-voxel fit).
    presence: where variable segments' presence comes from (``PRESENCE``): "image" (default; the
      lumen between the predicted landmarks, ``segment.presence_radii``) or "network" (the segment
      attribute branch, as the paper).
    align: for a run that does not register its images, the windows are placed on a grid aligned
      to the template by the landmarks found in the search for the circle (``_predict_pass``; the
      paper's images were registered to a template beforehand). False: on the image's own axes.
    gate_mm: with ``align``, each landmark's heatmap is read only within this distance of its
      position in the template fitted to the landmarks of that search (default ``GATE_MM``); None:
      over the whole region, as the paper's argmax.
    forward: the network, ``(params, images [B, X, Y, Z, 1]) -> {"heatmaps": [B, x, y, z, 19]
      (log-probabilities for a spatial-softmax model), "segmentation": [B, X, Y, Z, 21] logits,
      "bifurcation_prob": [B, 19], "present_prob": [B, 20]}``. Default: the config's model
      (jitted); a stand-in network goes here.
    """

    def __init__(self, config, params, batch_size: int | None = None,
                 margin_mm: float | None = None, flip: bool = True, refiner: Refiner | None = None,
                 decode_method: str = heatmaps.DEFAULT_METHOD, presence: str = "image",
                 align: bool = True, gate_mm: float | None = GATE_MM, forward=None):
        if decode_method not in heatmaps.METHODS:
            raise CowjaxError(f"decode {decode_method!r}: expected one of {heatmaps.METHODS}")
        if presence not in PRESENCE:
            raise CowjaxError(f"presence {presence!r}: expected one of {PRESENCE}")
        self.presence = presence
        # Whether the segment attribute branch was trained (its loss term on). An untrained
        # branch's presence is noise: the segments it alone would decide are taken as present,
        # the cow19 prior, so it cuts nothing from the written labelling (an ablation arm
        # without the term).
        self.presence_learned = bool(config.loss.w_segment_attr)
        self.align = align
        self.gate_mm = gate_mm
        self.config = config
        self.flip = flip
        self.decode_method = decode_method
        self.batch_size = batch_size or devices.window_batch()
        self.mesh = devices.data_mesh(self.batch_size, local=True)
        self.params = jax.device_put(params, devices.replicated(self.mesh))
        self.window = tuple(int(n) for n in config.data.crop_shape)
        self.stride = int(config.model.heatmap_stride)
        self.kind = heatmaps.kind_for(config)
        if margin_mm is None:
            margin_mm = config.data.augment.translate_mm
        margin = np.round(margin_mm / np.asarray(config.data.spacing, np.float64)).astype(int)
        self.step = np.minimum(margin, np.array(self.window) // 2)
        if margin_mm > 0:  # a shift below the heatmap stride would be rounded away
            self.step = np.maximum(self.step, self.stride)
        self.forward = forward or functools.partial(_network, unet.build_model(config), self.kind)
        # The run's registration (None without): images go onto the grid training used. Both
        # stages are trained on one data config (``refine_config``): one registration serves both.
        self.to_template = intensity.template_registration(config.data)
        if refiner is not None and refiner.to_template != self.to_template:
            raise CowjaxError("the refinement stage registers images differently from the first "
                              f"stage ({refiner.to_template} vs {self.to_template})")
        self.refiner = refiner

    @classmethod
    def from_workdir(cls, workdir, refine: bool = True, tta: bool = True,
                     decode_method: str = heatmaps.DEFAULT_METHOD, **kwargs) -> "Predictor":
        """The run's best checkpoint (``checkpoint.load_for_inference``); CowjaxError if none. With
        ``refine``, the refinement stage's too where the run has one (``<workdir>/refine``).
        ``tta=False`` turns test-time augmentation off (no mirror image, no shifted refinement
        patches); with ``decode_method="argmax"`` and ``presence="network"`` too, a run is scored
        as the paper did."""
        from cowjax.training import checkpoint
        config, params = _with_template(*checkpoint.load_for_inference(workdir), workdir)
        devices.use_matmul_precision(config)
        refiner = None
        refine_dir = Path(workdir) / checkpoint.REFINE_DIR
        if refine and checkpoint.has_checkpoint(refine_dir):
            refiner = Refiner(*_with_template(*checkpoint.load_for_inference(refine_dir), workdir),
                              tta_shift_mm=None if tta else 0.0, decode_method=decode_method)
        return cls(config, params, refiner=refiner, flip=tta, decode_method=decode_method,
                   **kwargs)

    @property
    def predicts_presence(self) -> bool:
        """Whether ``present_prob`` holds a prediction (read off the image, or a trained branch's)
        rather than the prior alone."""
        return self.presence == "image" or self.presence_learned

    @property
    def aligns(self) -> bool:
        """Whether images are registered by their landmarks (``align``, and the run registers none
        of its own)."""
        return self.align and self.to_template is None

    def predict(self, image, affine, segmentation: bool = False,
                head_segmentation: bool = False) -> Prediction:
        """Landmarks of one image. image: [X, Y, Z] (any orientation, any size); affine: [4, 4]
        voxel -> world RAS mm. ``segmentation``: also the lumen labelled by the landmarks,
        ``head_segmentation``: by the segmentation head (both on the input grid). With
        ``presence="image"`` the variable segments' presence is then read off the image."""
        image, affine = np.asarray(image, np.float32), np.asarray(affine, np.float64)
        pred, head_probabilities = self.network_prediction(image, affine, head_segmentation)
        return self.read_image(image, affine, pred, head_probabilities, segmentation,
                               head_segmentation)

    def network_prediction(self, image, affine, head_segmentation: bool = False):
        """What the networks find in one image, before anything is read off it: (prediction
        without segment labels and, with ``presence="image"``, without the image's presence; the
        segmentation head's (class probabilities, their grid affine) or None).

        With ``flip`` the image is also seen mirrored left-right (``MIRROR``), so the network meets
        a mirror image of the patient; its landmarks are mirrored back (x negated, _R and _L
        channels swapped) and averaged in."""
        pred, head_probabilities = self._predict_pass(image, affine, head_segmentation)
        if self.flip:
            m, _ = self._predict_pass(image, MIRROR @ affine, False)
            lm, seg_idx = anatomy.MIRROR_LANDMARKS, anatomy.MIRROR_SEGMENTS
            mirrored = m.landmarks[lm] * [-1.0, 1.0, 1.0]
            pred = dataclasses.replace(
                pred, landmarks=(pred.landmarks + mirrored) / 2,
                spread_mm=np.linalg.norm(pred.landmarks - mirrored, axis=-1) / 2,
                confidence=(pred.confidence + m.confidence[lm]) / 2,
                bifurcation_branch_prob=(pred.bifurcation_branch_prob
                                         + m.bifurcation_branch_prob[lm]) / 2,
                present_prob=(pred.present_prob + m.present_prob[seg_idx]) / 2)
        if not self.presence_learned:
            pred.present_prob = np.ones_like(pred.present_prob)
        return pred, head_probabilities

    def read_image(self, image, affine, pred: Prediction, head_probabilities,
                   segmentation: bool = False, head_segmentation: bool = False) -> Prediction:
        """``pred`` (``network_prediction``'s, possibly combined with others') completed from the
        image at its own resolution: with ``presence="image"`` each variable segment's presence
        (``segment.presence_radii`` between the predicted landmarks), and the labellings asked
        for (``segment``)."""
        maps = None
        if self.presence == "image":
            maps = segment.contrast(image, affine)
            radii = segment.presence_radii(image, affine, pred.landmarks, maps)
            measured = np.isfinite(radii)
            pred.segment_radius_mm = radii
            pred.present_prob = np.where(measured, segment.presence_probability(radii),
                                         pred.present_prob)
        if segmentation or head_segmentation:
            lumen = segment.vessel_mask(image, affine, maps=maps)
            if segmentation:
                pred.segmentation = segment.drop_absent(
                    segment.label_by_landmarks(lumen, affine, pred.landmarks), pred.present_prob)
            if head_segmentation:
                pred.head_segmentation = segment.label_lumen(lumen, affine, *head_probabilities)
        return pred

    def _predict_pass(self, image, affine, head_segmentation: bool):
        """Both stages on one image, registered once for both -> (prediction without segment
        labels, the segmentation head's (class probabilities [X', Y', Z', 21], their grid affine)
        or None).

        Without a registration (``config.data.registration`` "none") and with ``align``, the
        image is registered by its landmarks: the circle is found on the image's own axes
        (``locate_landmarks``, the landmarks of one window), a least-squares rigid fit of those
        onto the template's (``anatomy.TEMPLATE_LANDMARKS``) gives the transform, and the first
        stage's windows are placed on a grid aligned to the template, centred on them; the
        refinement stage's patches are cut on that grid too. A head turned further than training
        saw is then seen upright (BENCHMARKS.md, 2026-12-03).

        The mirror image is registered in its own pass. The original's registration T gives it
        T @ MIRROR, a reflection mapping it back onto the template unmirrored (the network would
        see the original's voxels again); the proper rotation MIRROR @ T @ MIRROR fits only a
        template symmetric about x = 0. The rendered one is, exactly, yet on 3 synthetic cases
        (2026-12-01) the mirror image's own registration differed from it by 0.9-1.5 mm on average
        (4 mm at most): the registration samples random template points, which the mirror does
        not map onto themselves. A training-sample template is not symmetric at all."""
        to_template = None if self.to_template is None else self.to_template(image, affine)
        centre = None
        if self.aligns:
            grid = preprocess.network_grid(affine, image.shape, self.config.data.spacing)
            prep = preprocess.preprocess_image(image, affine, *grid)
            found = preprocess.voxel_to_world(
                self.locate_landmarks(prep["image"], prep["fov_centre"]), prep["affine"])
            centre = found.mean(axis=0)
            to_template = pose_to_template(found)
        prior = None
        if self.aligns and self.gate_mm and to_template is not None:
            prior = landmark_registration.apply_transform(np.linalg.inv(to_template),
                                                          anatomy.TEMPLATE_LANDMARKS)
        pred, head = self._first_stage(image, affine, to_template, head_segmentation, centre,
                                       prior)
        if self.refiner is not None:
            pred.landmarks = self.refiner.refine(image, affine, pred.landmarks, to_template)
        return pred, head

    def _first_stage(self, image, affine, to_template, head_segmentation: bool,
                     centre: np.ndarray | None = None, prior: np.ndarray | None = None):
        """The first network on the image's grid (RAS-aligned in template space with
        ``to_template``): (prediction, head probabilities or None) as ``_predict_pass``. The
        windows are centred on ``centre`` (world RAS mm) or, when None, where ``locate`` finds
        the circle. With ``prior`` (world RAS mm [19, 3]) each landmark is read within
        ``gate_mm`` of its row."""
        grid = preprocess.network_grid(affine, image.shape, self.config.data.spacing, to_template)
        prep = preprocess.preprocess_image(image, affine, *grid)
        volume, grid_affine = prep["image"], prep["affine"]
        if centre is None:
            centre = self.locate(volume, prep["fov_centre"])
        else:
            centre = preprocess.world_to_voxel(np.asarray(centre)[None], grid_affine)[0]
        starts, central = windows.sliding_windows(centre, volume.shape, self.window, self.step,
                                                  self.stride)
        origin = starts.min(axis=0)                 # region start on the grid, a multiple of stride
        region = starts.max(axis=0) - origin + self.window
        s = self.stride
        maps = windows.Blend(region // s, tuple(n // s for n in self.window),
                             anatomy.NUM_LANDMARKS)
        seg = windows.Blend(region, self.window, anatomy.NUM_CLASSES) if head_segmentation else None
        keys = ["heatmaps", "bifurcation_prob", "present_prob"] + (["segmentation"] if seg else [])
        for i, out in self._window_outputs(volume, starts, keys):
            maps.add(out["heatmaps"], (starts[i] - origin) // s)
            if seg is not None:
                seg.add(out["segmentation"], starts[i] - origin)
            if i == central:
                attributes = out
        blended = maps.result()
        # Windows hanging over the volume's edge see zero padding there: no landmark can be there.
        centres = [heatmaps.from_grid(np.arange(n), s) + o
                   for n, o in zip(blended.shape[:3], origin)]
        inside = functools.reduce(np.multiply.outer, [(c >= -0.5) & (c <= n - 0.5) for c, n in
                                                      zip(centres, volume.shape)])
        keep = inside[..., None]
        if prior is not None:
            gated = keep & self._gate(centres, preprocess.world_to_voxel(prior, grid_affine))
            keep = np.where(gated.any(axis=(0, 1, 2)), gated, keep)  # none in reach: ungated
        # Out of reach = the heatmaps' lowest value: a spatial-softmax model's confidence is then in
        # effect the probability mass near the peak among the voxels within reach.
        blended = np.where(keep, blended, blended.min())
        coords, confidence = heatmaps.decode(blended[None], self.decode_method, stride=s,
                                             kind=self.kind)
        landmarks = preprocess.voxel_to_world(np.asarray(coords[0], np.float64) + origin,
                                              grid_affine)
        head = None
        if seg is not None:
            # Over the region, which may stick out of the volume: a grid of its own.
            region_affine = grid_affine.copy()
            region_affine[:3, 3] = preprocess.voxel_to_world(origin, grid_affine)
            head = special.softmax(seg.result(), axis=-1), region_affine
        return Prediction(landmarks=landmarks, confidence=np.asarray(confidence[0], np.float64),
                          bifurcation_branch_prob=attributes["bifurcation_prob"].astype(np.float64),
                          present_prob=attributes["present_prob"].astype(np.float64)), head

    def _gate(self, centres, prior_vox) -> np.ndarray:
        """[x, y, z, 19] bool: the heatmap voxels (their ``centres`` on the grid, one array per
        axis) within ``gate_mm`` of each landmark's ``prior_vox`` [19, 3] (grid voxels)."""
        spacing = np.asarray(self.config.data.spacing, np.float64)
        d2 = sum(((c[..., None] - prior_vox[:, a]) * spacing[a]) ** 2
                 for a, c in enumerate(np.ix_(*centres)))
        return d2 <= self.gate_mm ** 2

    def _window_outputs(self, volume, starts, keys):
        """Yield (window index, {key: output}) for each window start [3] of ``volume`` (zero
        outside). Batches have a fixed size (the last one zero-padded): one compiled shape."""
        cut = windows.cut_windows(volume, starts, self.window)
        for i in range(0, len(starts), self.batch_size):
            chunk = cut[i:i + self.batch_size]
            crops = np.zeros((self.batch_size,) + self.window + (1,), np.float32)
            crops[:len(chunk)] = chunk
            out = self.forward(self.params, jax.device_put(crops, devices.split(self.mesh)))
            out = jax.device_get({k: out[k] for k in keys})
            for j in range(len(chunk)):
                yield i + j, {k: v[j] for k, v in out.items()}

    def _detect(self, volume, centres):
        """Windows centred at ``centres`` [N, 3] (grid voxels) -> (landmarks [N, 19, 3] grid voxels,
        mean landmark confidence [N]), each window decoded on its own."""
        starts = windows.centred_starts(centres, self.window, self.stride)
        coords, scores = np.zeros((len(starts), anatomy.NUM_LANDMARKS, 3)), np.zeros(len(starts))
        for i, out in self._window_outputs(volume, starts, ["heatmaps"]):
            c, conf = heatmaps.decode(out["heatmaps"][None], self.decode_method,
                                      stride=self.stride, kind=self.kind)
            coords[i] = np.asarray(c[0]) + starts[i]
            scores[i] = float(np.mean(conf))
        return coords, scores

    def locate(self, volume, first_guess, recentre: int = 2) -> np.ndarray:
        """The centre of the circle on the grid (voxel coords [3]), found without landmarks: the
        centroid of ``locate_landmarks``."""
        return self.locate_landmarks(volume, first_guess, recentre).mean(axis=0)

    def locate_landmarks(self, volume, first_guess, recentre: int = 2) -> np.ndarray:
        """The landmarks [19, 3] (grid voxels) of one window on the circle, found without landmarks.

        The image-based estimate can be far off (bright structures, a wide or off-centre field of
        view), so the network itself searches: windows at that estimate and on a half-window lattice
        over the whole volume are scored by their mean landmark confidence; the best one's predicted
        landmarks give a centre, re-detected there ``recentre`` times. Training crops are centred
        on the landmarks' centroid, so the final windows are placed as training saw them.
        """
        candidates = np.concatenate([np.asarray(first_guess, np.float64)[None],
                                     windows.lattice_centres(volume.shape, self.window)])
        coords, scores = self._detect(volume, candidates)
        found = coords[np.argmax(scores)]
        for _ in range(recentre):
            coords, _ = self._detect(volume, found.mean(axis=0)[None])
            found = coords[0]
        return found


class Ensemble:
    """Several trained runs as one predictor (``predict`` as ``Predictor.predict``). Each member
    finds the landmarks its own way (``Predictor.network_prediction``: its registration, mirror
    image and refinement stage); their world positions, confidences and attribute branch outputs
    are averaged, and what is read off the image (segment presence, the labellings) is read once,
    from the averaged landmarks. The segmentation head's labelling is the first member's."""

    def __init__(self, members: list[Predictor]):
        if len(members) < 2:
            raise CowjaxError(f"an ensemble needs at least two members (got {len(members)})")
        settings = {(m.presence, m.flip, m.decode_method, m.align, m.gate_mm) for m in members}
        if len(settings) > 1:
            raise CowjaxError("the members of an ensemble must predict the same way "
                              "(presence, test-time mirror, decoding, alignment, gate)")
        self.members = members

    @property
    def config(self):
        """The first member's config (the members may differ in anything but how they predict)."""
        return self.members[0].config

    @property
    def predicts_presence(self) -> bool:
        return any(m.predicts_presence for m in self.members)

    def predict(self, image, affine, segmentation: bool = False,
                head_segmentation: bool = False) -> Prediction:
        image, affine = np.asarray(image, np.float32), np.asarray(affine, np.float64)
        found = [m.network_prediction(image, affine, head_segmentation and i == 0)
                 for i, m in enumerate(self.members)]
        preds = [p for p, _ in found]
        mean = Prediction(**{f: np.mean([getattr(p, f) for p in preds], axis=0)
                             for f in ("landmarks", "confidence", "bifurcation_branch_prob",
                                       "present_prob")})
        # Every member made as many passes, so the spread of all passes about the mean is each
        # member's own spread and its distance from the mean, in quadrature, averaged.
        mean.spread_mm = np.sqrt(np.mean(
            [(0.0 if p.spread_mm is None else np.square(p.spread_mm))
             + np.sum(np.square(p.landmarks - mean.landmarks), axis=-1) for p in preds], axis=0))
        return self.members[0].read_image(image, affine, mean, found[0][1], segmentation,
                                          head_segmentation)


def load_predictor(workdir, **kwargs) -> Predictor | Ensemble:
    """The predictor of a run (``Predictor.from_workdir``, whose keyword arguments all apply) or,
    where ``workdir`` holds an ensemble manifest (``checkpoint.ENSEMBLE_FILE``: the folders of
    its members, as ``checkpoint.export_ensemble`` writes it), the ``Ensemble`` of those runs."""
    from cowjax.training import checkpoint
    members = checkpoint.ensemble_members(workdir)
    if members is None:
        return Predictor.from_workdir(workdir, **kwargs)
    return Ensemble([Predictor.from_workdir(m, **kwargs) for m in members])
