"""The case folder of ``shared/cow19.md``: ``image.<suffix>``, a landmark file, optional
``vessels.<suffix>``, ``segments.<suffix>`` and ``attributes.json``; read into a ``Case``, written
back, listed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cowjax import anatomy
from cowjax.errors import CowjaxError, atomic_output
from cowjax.data.io.images import IMAGE_SUFFIXES, is_dicom_dir, load_image, load_labels, save_image
from cowjax.data.io.landmarks import read_landmarks, write_landmarks


# The names save_case writes; load_case also finds image.<any IMAGE_SUFFIXES> (or an image/ DICOM
# folder), and the same for vessels and segments.
IMAGE = "image.nii.gz"
VESSELS = "vessels.nii.gz"
SEGMENTS = "segments.nii.gz"
ATTRIBUTES = "attributes.json"
LANDMARK_FILES = ("landmarks.mrk.json", "landmarks.fcsv", "landmarks.csv")


@dataclasses.dataclass
class Case:
    """One case on its own grid.

    image: [X, Y, Z] float32; affine: [4, 4] voxel -> world RAS mm; landmarks: [19, 3] RAS mm (NaN
    unknown); vessels: [X, Y, Z] uint8 {0, 1} or None; segments: [X, Y, Z] uint8 0..20 or None;
    attributes: {"segments": {name: bool}, "landmarks": {name: bool}} or None.
    """
    case_id: str
    image: np.ndarray
    affine: np.ndarray
    landmarks: np.ndarray
    vessels: np.ndarray | None = None
    segments: np.ndarray | None = None
    attributes: dict | None = None


def _check_attributes(path: Path, attributes) -> dict:
    """Validate {"segments": {name: bool}, "landmarks": {name: bool}} (either part may be absent)."""
    if not isinstance(attributes, dict) or not set(attributes) <= {"segments", "landmarks"}:
        raise CowjaxError(f"{path}: expected {{\"segments\": {{...}}, \"landmarks\": {{...}}}}")
    names = {"segments": anatomy.SEGMENT_INDEX, "landmarks": anatomy.LANDMARK_INDEX}
    for part, values in attributes.items():
        if not isinstance(values, dict):
            raise CowjaxError(f"{path}: {part!r} must map names to true/false")
        for name, value in values.items():
            if name not in names[part]:
                raise CowjaxError(f"{path}: unknown {part[:-1]} name {name!r}")
            if not isinstance(value, bool):
                raise CowjaxError(f"{path}: {part}.{name} must be true or false, got {value!r}")
    return attributes


def _case_volume(case_dir: Path, stem: str) -> Path | None:
    """The one ``<stem>.<image suffix>`` file (or ``<stem>/`` DICOM folder) in a case folder, or None."""
    found = [case_dir / f"{stem}{s}" for s in IMAGE_SUFFIXES if (case_dir / f"{stem}{s}").is_file()]
    if is_dicom_dir(case_dir / stem):
        found.append(case_dir / stem)
    if len(found) > 1:
        raise CowjaxError(f"{case_dir}: several {stem} images ({', '.join(p.name for p in found)}); "
                          f"keep one")
    return found[0] if found else None


def case_image(case_dir: str | Path) -> Path | None:
    """A case folder's image: ``image.<any of IMAGE_SUFFIXES>`` or an ``image/`` DICOM folder; None
    when there is none, CowjaxError when there are several."""
    return _case_volume(Path(case_dir), "image")


def _find_landmark_file(case_dir: Path) -> Path:
    found = [case_dir / n for n in LANDMARK_FILES if (case_dir / n).is_file()]
    if not found:
        raise CowjaxError(f"{case_dir}: no landmark file (one of {', '.join(LANDMARK_FILES)})")
    if len(found) > 1:
        raise CowjaxError(f"{case_dir}: several landmark files ({', '.join(p.name for p in found)}); "
                          f"keep one")
    return found[0]


def load_case(case_dir: str | Path) -> Case:
    """Read a case folder (cow19.md's on-disk format) into a Case, checking every file.

    Images may be in any supported format: ``image.<suffix>`` (or an ``image/`` DICOM folder), and
    likewise ``vessels.<suffix>`` and ``segments.<suffix>``; two candidates for one is an error.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise CowjaxError(f"{case_dir}: case directory not found")
    image_path = case_image(case_dir)
    if image_path is None:
        raise CowjaxError(f"{case_dir}: no image (image.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}> "
                          f"or an image/ DICOM folder)")
    image, affine = load_image(image_path)
    landmarks = read_landmarks(_find_landmark_file(case_dir))
    vessels = segments = attributes = None
    if (path := _case_volume(case_dir, "vessels")) is not None:
        vessels = (load_labels(path, image.shape, affine, 255) > 0).astype(np.uint8)
    if (path := _case_volume(case_dir, "segments")) is not None:
        segments = load_labels(path, image.shape, affine, anatomy.NUM_SEGMENTS)
    if (case_dir / ATTRIBUTES).exists():
        try:
            attributes = json.loads((case_dir / ATTRIBUTES).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CowjaxError(f"{case_dir / ATTRIBUTES}: not valid JSON ({e})")
        attributes = _check_attributes(case_dir / ATTRIBUTES, attributes)
    return Case(case_dir.name, image, affine, landmarks, vessels, segments, attributes)


def save_case(case_dir: str | Path, case: Case) -> None:
    """Write a case folder: image, landmarks.mrk.json, optional vessels/segments (uint8), attributes.

    Everything is checked before the first file is written; each file is atomic and attributes.json
    comes last, so a folder with attributes.json is complete.
    """
    case_dir = Path(case_dir)
    shape = np.shape(case.image)
    if len(shape) != 3 or np.size(case.image) == 0:
        raise CowjaxError(f"{case_dir}: case image must be a non-empty 3D array, got shape {shape}")
    if not np.all(np.isfinite(case.image)):
        raise CowjaxError(f"{case_dir}: case image has non-finite voxels")
    if np.shape(case.landmarks) != (anatomy.NUM_LANDMARKS, 3):
        raise CowjaxError(f"{case_dir}: landmarks must be [{anatomy.NUM_LANDMARKS}, 3], "
                          f"got {np.shape(case.landmarks)}")
    for name, mask in ((VESSELS, case.vessels), (SEGMENTS, case.segments)):
        if mask is not None and np.shape(mask) != shape:
            raise CowjaxError(f"{case_dir / name}: shape {np.shape(mask)} differs from the image's "
                              f"{shape}")
    if case.attributes is not None:
        _check_attributes(case_dir / ATTRIBUTES, case.attributes)
    case_dir.mkdir(parents=True, exist_ok=True)
    save_image(case_dir / IMAGE, np.asarray(case.image, dtype=np.float32), case.affine)
    write_landmarks(case_dir / LANDMARK_FILES[0], case.landmarks)
    if case.vessels is not None:
        save_image(case_dir / VESSELS, (np.asarray(case.vessels) > 0).astype(np.uint8), case.affine)
    if case.segments is not None:
        save_image(case_dir / SEGMENTS, np.asarray(case.segments).astype(np.uint8), case.affine)
    if case.attributes is not None:
        with atomic_output(case_dir / ATTRIBUTES) as tmp:
            tmp.write_text(json.dumps(case.attributes, indent=1), encoding="utf-8")


def list_cases(dataset_dir: str | Path) -> list[Path]:
    """Sorted case folders under ``dataset_dir`` (sub-folders holding an image, see ``case_image``,
    or a landmark file).

    A folder with landmarks but no image is an error rather than silently skipped.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise CowjaxError(f"{dataset_dir}: dataset directory not found")
    cases = []
    for d in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        has_image = case_image(d) is not None
        if not has_image and any((d / n).is_file() for n in LANDMARK_FILES):
            raise CowjaxError(f"{d}: has landmarks but no image (image.nii.gz or another format)")
        if has_image:
            cases.append(d)
    if not cases:
        raise CowjaxError(f"{dataset_dir}: no cases (sub-folders with an image, e.g. {IMAGE})")
    return cases
