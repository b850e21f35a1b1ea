"""One synthetic case: a subject (``subject``), its arteries (``vessels``), imaged (``render``)."""

from __future__ import annotations

import numpy as np

from cowjax import anatomy
from cowjax.data import io
from cowjax.data.synthetic import render, subject, vessels
from cowjax.errors import CowjaxError

PAPER_SPACING = (0.513, 0.513, 0.8)


def generate_case(seed: int, index: int, spacing=PAPER_SPACING, pathology_fraction: float = 0.3,
                  orientation: tuple[str, str, str] | None = None, return_info: bool = False,
                  cortex: bool = False):
    """One synthetic subject, deterministic in (seed, index) whatever else is generated.

    spacing: (3,) mm voxel size. orientation: axis codes to store the arrays in (default: random,
    RAS, LPS or any other); it changes nothing else. Returns an ``io.Case`` (image [X,Y,Z] float32,
    affine [4,4], landmarks [19,3] RAS mm, vessels uint8, segments uint8 0..20, attributes), and
    with ``return_info`` also a JSON-able dict of the variants and pathology. ``cortex``: the
    cortical branches beyond the terminal ones too (``vessels.grow_cortex``, from a stream of its
    own: the same subject, pose and grid as without).
    """
    if seed < 0 or index < 0:
        raise CowjaxError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    streams = np.random.SeedSequence([seed, index]).spawn(7)
    r_anat, r_path, r_tree, r_pose, r_look, r_orient, r_cortex = (np.random.default_rng(s)
                                                                   for s in streams)

    radius, kind = subject.sample_variants(r_anat)
    lm = subject.sample_landmarks(r_anat)
    pathology = {"aneurysms": [], "stenoses": []}
    if r_path.uniform() < pathology_fraction:
        pathology = subject.sample_pathology(r_path, lm)
    tree = vessels.build_tree(r_tree, lm, radius, kind, pathology["stenoses"])
    if cortex:
        vessels.grow_cortex(tree, r_cortex)
    arteries = dict(tree.vessels, **vessels.aneurysm_vessels(pathology, lm))

    rot = render.rotation(r_pose.uniform(-10, 10, 3))
    shift = r_pose.uniform(-8, 8, 3)

    def to_world(points):                                           # subject frame -> world RAS
        return np.asarray(points) @ rot.T + shift

    world_lm = to_world(np.stack([lm[n] for n in anatomy.LANDMARKS]))
    for a in pathology["aneurysms"]:
        a["centre_world"] = to_world(np.array(a["centre_subject"])).round(3).tolist()
    affine, shape = render.grid(r_pose, np.vstack([world_lm, to_world(lm[anatomy.VBJ])[None]]), spacing)

    canvas = render.Canvas(affine, shape, rot, shift)
    img = render.background(r_look, canvas, spacing, lm)
    edge = 0.3 * float(np.prod(spacing)) ** (1 / 3)
    veins, vein_occ, _, _ = vessels.draw(render.veins(r_look, to_world), affine, shape, edge)
    img = img * (1 - vein_occ) + veins
    # Broad appearance styles: strong or weak background suppression, strong or no saturation.
    img = img * np.float32(r_look.uniform(0.15, 0.5) if r_look.uniform() < 0.15 else 1.0)
    saturation = r_look.uniform(150, 500) if r_look.uniform() < 0.85 else 5000.0
    tubes = [vessels.Tube(to_world(v["points"]), v["radius"], render.arterial_signal(r_look, v, saturation),
                          v["label"])
             for v in arteries.values()]
    lumen, occupancy, vessel_mask, segments = vessels.draw(tubes, affine, shape, edge)
    img = img * (1 - occupancy) + lumen
    img = render.acquire(r_look, img, affine, spacing)

    codes = render.orientation_codes(r_orient) if orientation is None else tuple(orientation)
    (img, vessel_mask, segments), affine = render.reorient([img, vessel_mask.astype(np.uint8), segments],
                                                           affine, codes)

    present = np.array([radius[s] >= anatomy.HYPOPLASTIC_RADIUS for s in anatomy.SEGMENTS])
    attributes = {"segments": anatomy.segment_dict(present),
                  "landmarks": anatomy.landmark_dict(anatomy.landmark_attributes(present))}
    case = io.Case(case_id=f"case_{index:04d}", image=img, affine=affine, landmarks=world_lm,
                   vessels=vessel_mask, segments=segments, attributes=attributes)
    if not return_info:
        return case
    info = dict(seed=seed, index=index, orientation="".join(codes), variants=kind,
                radii_mm={k: round(float(v), 3) for k, v in radius.items()}, **pathology)
    return case, info
