"""Import TopCoW cases (a TOF-MRA image and its 13-class Circle of Willis labels) as cow19 case folders.

  python -m cowjax.data.topcow IMAGES LABELS OUT [--glob 'topcow_mr_*'] [--no-masks]

Files are matched by case name, nnU-Net style as TopCoW releases them: ``IMAGES/<case>_0000.nii.gz``
and ``LABELS/<case>.nii.gz`` (any image format of ``io.IMAGE_SUFFIXES``); each case becomes
``OUT/<case>/`` with the image, ``vessels.nii.gz`` (label > 0), ``segments.nii.gz``,
``landmarks.mrk.json`` and ``attributes.json``.

What the TopCoW labels give, and what they do not (never guessed):
- Segments: BA, ACoA and the PCoAs map one to one. The rest are split where a junction is labelled:
  the ICA at the PCoA origin (distal part -> ICA_C7; the proximal part is 0, since C6's lower end,
  the ophthalmic origin, is not in the labels), the ACA at the ACoA into A1/A2 and the PCA at the
  PCoA into P1/P2 (all A2 / all P2 where A1 / P1 is absent). The MCA (M1 and M2 in one class), an
  ACA without ACoA, a PCA without PCoA, an ICA without PCoA and TopCoW's 3rd-A2 stay 0.
  NOTE: the case format has no "vessel of unknown segment" value, so those voxels read as
  background in segments.nii.gz (vessels.nii.gz still marks them); ``--no-masks`` writes neither
  mask, for training whose segmentation loss would take them as background.
- Landmarks: the centre of the voxels where two classes touch: BA_top (BA/PCA), ICA_PCoA (ICA/Pcom),
  ICA_term (ICA/MCA+ACA), A1_A2 (ACA/Acom), P1_P2 (PCA/Pcom). ICA_prox, M1_M2, M2_end, A2_end and
  P2_end are not in the labels: NaN (unknown).
- Attributes, by TopCoW's own rules (topcow24_eval graph_classification): ACoA / PCoA present when
  labelled, A1 present when the ACA touches the ICA, P1 when the PCA touches the BA (a hypoplastic
  but labelled vessel counts as present); the other segments are always present; landmark
  attributes follow ``anatomy.landmark_attributes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from tqdm import tqdm

from cowjax import anatomy
from cowjax.data import io
from cowjax.errors import ArgumentParser, CowjaxError, atomic_output_dir

# TopCoW's multiclass labels (topcow24_eval/constants.py MUL_CLASS_LABEL_MAP; 13 and 14 unused).
TOPCOW_CLASSES = {"BA": 1, "R-PCA": 2, "L-PCA": 3, "R-ICA": 4, "R-MCA": 5, "L-ICA": 6, "L-MCA": 7,
                  "R-Pcom": 8, "L-Pcom": 9, "Acom": 10, "R-ACA": 11, "L-ACA": 12, "3rd-A2": 15}
# nnU-Net's channel suffix on image names: topcow_mr_001_0000.nii.gz is case topcow_mr_001.
_CHANNEL = "_0000"
_CUBE = np.ones((3, 3, 3), bool)  # 26-neighbourhood, as TopCoW's touch criteria use


def _box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """The bounding box of a mask grown by ``margin`` voxels (clipped at the low end), or None."""
    spans = [np.flatnonzero(mask.any(axis=tuple(k for k in range(3) if k != axis))) for axis in range(3)]
    if not spans[0].size:
        return None
    return tuple(slice(max(int(s[0]) - margin, 0), int(s[-1]) + 1 + margin) for s in spans)


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxels of mask ``a`` with a 26-neighbour in mask ``b``."""
    out = np.zeros_like(a)
    box = _box(b)  # dilate around b only: one artery is a small part of the labelled box
    if box is not None:
        out[box] = a[box] & ndimage.binary_dilation(b[box], _CUBE)
    return out


def _interface_centre(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxel coordinates [3] of the centre of the voxels where masks a and b touch; NaN if they do not."""
    where = _touching(a, b) | _touching(b, a)
    return np.array(ndimage.center_of_mass(where)) if where.any() else np.full(3, np.nan)


def _geodesic(mask: np.ndarray, seeds: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Shortest 26-connected path length (mm) inside ``mask`` from any ``seeds`` voxel: [X, Y, Z],
    inf outside the mask or where unreachable. Along a vessel this orders voxels from its start
    however the vessel curves (the carotid siphon), which a cutting plane would not."""
    node = np.full(mask.shape, -1, np.int64)
    ijk = np.argwhere(mask)
    node[tuple(ijk.T)] = np.arange(len(ijk))
    rows, cols, lengths = [], [], []
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
    for off in offsets[14:]:  # one of each +- pair (the graph is undirected), 13 in all
        nbr = ijk + off
        inside = np.all((nbr >= 0) & (nbr < mask.shape), axis=1)
        j = np.full(len(ijk), -1)
        j[inside] = node[tuple(nbr[inside].T)]
        ok = j >= 0
        rows.append(np.flatnonzero(ok))
        cols.append(j[ok])
        lengths.append(np.full(ok.sum(), np.linalg.norm(affine[:3, :3] @ off)))
    graph = sparse.csr_matrix((np.concatenate(lengths), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(len(ijk), len(ijk)))
    out = np.full(mask.shape, np.inf)
    sources = node[seeds & mask]
    if len(ijk) and len(sources):
        out[tuple(ijk.T)] = csgraph.dijkstra(graph, directed=False, indices=sources, min_only=True)
    return out


def _split(vessel: np.ndarray, start: np.ndarray, branch: np.ndarray, affine: np.ndarray):
    """Split a vessel mask where ``branch`` joins it: (before, after) masks, by the path length from
    the voxels ``start`` (where the vessel begins) compared with that of the junction voxels.
    Voxels not connected to ``start`` are in neither (unknown, not guessed)."""
    before, after = np.zeros_like(vessel), np.zeros_like(vessel)
    junction = _touching(vessel, branch)
    box = _box(vessel)
    if box is None or not junction.any():
        return before, after
    d = _geodesic(vessel[box], start[box], affine)
    cut = np.median(d[junction[box]])
    if np.isfinite(cut):
        before[box] = vessel[box] & (d < cut)
        after[box] = vessel[box] & np.isfinite(d) & (d >= cut)
    return before, after


def convert_labels(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """TopCoW labels -> cow19 (segments, landmarks, attributes), as the module docstring describes.

    labels: [X, Y, Z] int TopCoW classes; affine: [4, 4] voxel -> world RAS.
    Returns segments [X, Y, Z] uint8 0..20, landmarks [19, 3] world RAS mm (NaN unknown) and
    attributes {"segments": {name: bool}, "landmarks": {name: bool}}.
    """
    labels = np.asarray(labels)
    segments = np.zeros(labels.shape, np.uint8)
    landmarks = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    present = np.ones(anatomy.NUM_SEGMENTS, bool)
    box = _box(labels > 0, margin=0)  # work in the labelled box: the CoW is a small part of the image
    if box is None:
        return segments, landmarks, _attributes(present)
    lo = np.array([b.start for b in box])
    sub = labels[box]
    m = {name: sub == value for name, value in TOPCOW_CLASSES.items()}
    pca = m["R-PCA"] | m["L-PCA"]
    out = np.zeros(sub.shape, np.uint8)
    found = {}  # landmark name -> voxel coordinates in the box

    def label(mask, segment):
        out[mask] = anatomy.SEGMENT_INDEX[segment] + 1

    label(m["BA"], "BA")
    label(m["Acom"], "ACoA")
    present[anatomy.SEGMENT_INDEX["ACoA"]] = m["Acom"].any()
    found["BA_top"] = _interface_centre(m["BA"], pca)
    for s in ("R", "L"):
        ica, mca, aca = m[f"{s}-ICA"], m[f"{s}-MCA"], m[f"{s}-ACA"]
        pcom, pca_s = m[f"{s}-Pcom"], m[f"{s}-PCA"]
        label(pcom, f"PCoA_{s}")
        has = {"PCoA": pcom.any(), "A1": _touching(aca, ica).any(),
               "P1": _touching(pca_s, m["BA"]).any()}
        for seg, value in has.items():
            present[anatomy.SEGMENT_INDEX[f"{seg}_{s}"]] = value
        found[f"ICA_PCoA_{s}"] = _interface_centre(ica, pcom)
        found[f"ICA_term_{s}"] = _interface_centre(ica, mca | aca)
        found[f"A1_A2_{s}"] = _interface_centre(aca, m["Acom"])
        found[f"P1_P2_{s}"] = _interface_centre(pca_s, pcom)
        if has["PCoA"]:
            # C7 runs from the terminus down to the PCoA; below it C6's lower end is not labelled.
            label(_split(ica, _touching(ica, mca | aca), pcom, affine)[0], f"ICA_C7_{s}")
            if has["P1"]:
                p1, p2 = _split(pca_s, _touching(pca_s, m["BA"]), pcom, affine)
                label(p1, f"P1_{s}")
                label(p2, f"P2_{s}")
            else:  # fetal PCA: fed by the PCoA alone, all of it is P2
                label(pca_s, f"P2_{s}")
        if m["Acom"].any():
            if has["A1"]:
                a1, a2 = _split(aca, _touching(aca, ica), m["Acom"], affine)
                label(a1, f"A1_{s}")
                label(a2, f"A2_{s}")
            else:  # no A1: the A2 is fed across the ACoA
                label(aca, f"A2_{s}")
    segments[box] = out
    for name, ijk in found.items():
        landmarks[anatomy.LANDMARK_INDEX[name]] = affine[:3, :3] @ (ijk + lo) + affine[:3, 3]
    return segments, landmarks, _attributes(present)


def _attributes(present: np.ndarray) -> dict:
    return {"segments": anatomy.segment_dict(present),
            "landmarks": anatomy.landmark_dict(anatomy.landmark_attributes(present))}


def find_cases(images_dir: str | Path, labels_dir: str | Path, pattern: str = "*"
               ) -> list[tuple[str, Path, Path]]:
    """(case name, image, label map) for every image in ``images_dir`` matching ``pattern``.

    A missing or doubled label map is a CowjaxError naming the image, before anything is written.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise CowjaxError(f"{d}: directory not found")
    labels: dict[str, list[Path]] = {}
    for p in sorted(labels_dir.iterdir()):
        if io.is_image(p):
            labels.setdefault(io.image_stem(p), []).append(p)
    cases = []
    for image in sorted(p for p in images_dir.glob(pattern) if io.is_image(p)):
        name = io.image_stem(image).removesuffix(_CHANNEL)
        found = labels.get(name, [])
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
            raise CowjaxError(f"{image}: {what} label map named {name}.<image suffix> in {labels_dir}")
        cases.append((name, image, found[0]))
    if not cases:
        raise CowjaxError(f"{images_dir}: no images matching {pattern!r} (supported: "
                          f"{', '.join(io.IMAGE_SUFFIXES)} or DICOM folders)")
    return cases


def import_case(name: str, image_path: Path, label_path: Path, out_dir: Path, masks: bool = True
                ) -> Path:
    """Read one TopCoW case, check it and write ``out_dir/name`` atomically (never half a folder);
    ``masks=False`` leaves out vessels.nii.gz and segments.nii.gz (see ``main``'s --no-masks)."""
    image, affine = io.load_image(image_path)
    labels = io.load_labels(label_path, image.shape, affine, max(TOPCOW_CLASSES.values()))
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *TOPCOW_CLASSES.values()})
    if unknown:
        raise CowjaxError(f"{label_path}: labels {unknown} are not TopCoW classes "
                          f"(expected {sorted(TOPCOW_CLASSES.values())})")
    segments, landmarks, attributes = convert_labels(labels, affine)
    case = io.Case(name, image, affine, landmarks, attributes=attributes)
    if masks:
        case.vessels, case.segments = (labels > 0).astype(np.uint8), segments
    with atomic_output_dir(out_dir / name) as tmp:
        io.save_case(tmp, case)
    return out_dir / name


def import_dataset(images_dir, labels_dir, out_dir, pattern: str = "*", masks: bool = True,
                   progress: bool = True) -> list[Path]:
    """Import every case of ``find_cases``; returns the case folders written under ``out_dir``."""
    cases = find_cases(images_dir, labels_dir, pattern)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CowjaxError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [import_case(name, image, label, out_dir, masks)
            for name, image, label in tqdm(cases, desc="TopCoW cases", unit="case",
                                           disable=not progress, leave=False)]


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m cowjax.data.topcow",
                     description="Import TopCoW TOF-MRA cases as cow19 case folders.")
    parser.add_argument("images", help="folder of images, e.g. imagesTr (topcow_mr_001_0000.nii.gz)")
    parser.add_argument("labels", help="folder of multiclass label maps, e.g. cow_seg_labelsTr "
                                       "(topcow_mr_001.nii.gz)")
    parser.add_argument("out", help="output dataset folder (one case folder per case)")
    parser.add_argument("--glob", default="*", help="only images matching this, e.g. 'topcow_mr_*'")
    parser.add_argument("--no-masks", action="store_true",
                        help="write neither vessels nor segments: a segmentation loss that masks "
                             "whole cases would read the unsplit arteries (segment 0) as background")
    args = parser.parse_args(argv)
    try:
        dirs = import_dataset(args.images, args.labels, args.out, args.glob, not args.no_masks)
    except CowjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(dirs)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
