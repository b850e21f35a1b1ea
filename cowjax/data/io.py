"""Cases on disk: images (NIfTI, NRRD, MetaImage, DICOM series), landmark files (.mrk.json / .fcsv /
.csv) and the case folder.

Everything returned is in world RAS millimetres with the file's own affine (voxel -> world, nibabel's
convention: voxel centres at integer indices); LPS appears only inside the files (ITK formats, DICOM,
landmark files). Landmarks are ``[19, 3]`` float64 in ``anatomy.LANDMARKS`` order, a row of NaN where a
landmark is not in the file (never guessed).

A broken or ambiguous input raises ``CowjaxError`` naming the file and the problem; every output is
written through ``errors.atomic_output`` so a failure never leaves a partial file.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from cowjax import anatomy
from cowjax.errors import CowjaxError, atomic_output

# The names save_case writes; load_case also finds image.<any IMAGE_SUFFIXES> (or an image/ DICOM
# folder), and the same for vessels and segments.
IMAGE = "image.nii.gz"
VESSELS = "vessels.nii.gz"
SEGMENTS = "segments.nii.gz"
ATTRIBUTES = "attributes.json"
LANDMARK_FILES = ("landmarks.mrk.json", "landmarks.fcsv", "landmarks.csv")

_SLICER_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
# Legacy .fcsv headers write the coordinate system as a number (vtkMRMLStorageNode: 0 RAS, 1 LPS).
_FCSV_SYSTEMS = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}


# ----------------------------------------------------------------------------------------- images

# Image files by suffix (nibabel reads NIfTI, SimpleITK the rest); a folder holding one DICOM series
# is an image too. Matched case-insensitively, in this order (.nii.gz before .nii).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_ITK_FORMATS = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}
_SUPPORTED = f"{', '.join(IMAGE_SUFFIXES)} or a folder holding one DICOM series"


def image_suffix(path: str | Path) -> str | None:
    """The image suffix of a file name (one of IMAGE_SUFFIXES, lower case), or None."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def image_stem(path: str | Path) -> str:
    """A name for the image: the file name less its image suffix, or a DICOM folder's name."""
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[:-len(suffix)] if suffix and not path.is_dir() else path.name


def _is_dicom_file(path: Path) -> bool:
    # DICOM files (Part 10) carry "DICM" after a 128-byte preamble, whatever they are named.
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files (not looking into sub-folders)."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and _is_dicom_file(p) for p in path.iterdir())


def is_image(path: str | Path) -> bool:
    """Whether ``path`` is an image ``load_image`` reads: a file with one of IMAGE_SUFFIXES or a
    folder holding DICOM files. For listing inputs; it does not check the contents."""
    path = Path(path)
    return (path.is_file() and image_suffix(path) is not None) or is_dicom_dir(path)


def _sitk():
    """SimpleITK, imported on first use: reading NIfTI (and importing io) should not pay for it."""
    import SimpleITK
    return SimpleITK


def _itk_reason(error: Exception) -> str:
    """ITK's multi-line exception text -> its last line (the actual complaint)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR: ") if lines else type(error).__name__


def _from_itk(path: Path, image) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image -> (data [X, Y, Z, ...] stored dtype, affine [4, 4] voxel -> world RAS)."""
    sitk = _sitk()
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CowjaxError(f"{path}: expected a 3D image with one value per voxel, got "
                          f"{image.GetNumberOfComponentsPerPixel()} components")
    # GetArrayFromImage is indexed [z, y, x]; the project's arrays are [x, y, z].
    data = sitk.GetArrayFromImage(image).transpose(tuple(range(dim))[::-1])
    if dim < 3:
        raise CowjaxError(f"{path}: expected a 3D image, got shape {data.shape}")
    direction = np.reshape(image.GetDirection(), (dim, dim))[:3, :3]
    spacing, origin = np.asarray(image.GetSpacing())[:3], np.asarray(image.GetOrigin())[:3]
    # ITK's physical space is LPS; the flip keeps oblique directions as they are.
    affine = np.eye(4)
    affine[:3, :3] = anatomy.LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = anatomy.LPS_TO_RAS @ origin
    return data, affine


def _to_itk(data: np.ndarray, affine: np.ndarray):
    """(data [X, Y, Z], affine [4, 4] voxel -> world RAS) -> a SimpleITK image (LPS)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    lps = anatomy.LPS_TO_RAS @ np.asarray(affine, np.float64)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).ravel().tolist())
    image.SetOrigin((anatomy.LPS_TO_RAS @ np.asarray(affine, np.float64)[:3, 3]).tolist())
    return image


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CowjaxError(f"{path}: not a NIfTI image ({type(img).__name__})")
        data = np.asanyarray(img.dataobj)
    except CowjaxError:
        raise
    except (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError) as e:
        raise CowjaxError(f"{path}: not a readable NIfTI image (missing, truncated or corrupt: {e})")
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_itk_file(path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = _sitk().ReadImage(str(path))
    except RuntimeError as e:
        raise CowjaxError(f"{path}: not a readable {_ITK_FORMATS[suffix]} image (missing, truncated "
                          f"or corrupt: {_itk_reason(e)})")
    return _from_itk(path, image)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise CowjaxError(f"{folder}: a folder but not an image (no DICOM image series in it; "
                          f"supported: {_SUPPORTED})")
    if len(series) > 1:
        raise CowjaxError(f"{folder}: holds {len(series)} DICOM series ({', '.join(series)}); "
                          f"put each series in its own folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise CowjaxError(f"{folder}: DICOM series not readable ({_itk_reason(e)})")
    return _from_itk(folder, image)


def _load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D volume of any supported format: (data [X, Y, Z] in its stored dtype, affine [4, 4])."""
    path = Path(path)
    if not path.exists():
        raise CowjaxError(f"{path}: file not found")
    suffix = image_suffix(path)
    if path.is_dir():
        data, affine = _read_dicom_series(path)
    elif suffix is None:
        raise CowjaxError(f"{path}: unsupported image format (supported: {_SUPPORTED})")
    elif suffix in NIFTI_SUFFIXES:
        data, affine = _read_nifti(path)
    else:
        data, affine = _read_itk_file(path, suffix)
    shape = data.shape
    if data.size == 0:
        raise CowjaxError(f"{path}: empty image (shape {shape})")
    # A trailing singleton (e.g. [X, Y, Z, 1] from some converters) is still one volume.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CowjaxError(f"{path}: expected a 3D image, got shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CowjaxError(f"{path}: invalid voxel-to-world affine (singular or non-finite)")
    return np.ascontiguousarray(data), affine


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an MRA image: (data [X, Y, Z] float32, affine [4, 4] float64 voxel -> world RAS mm).

    ``path`` is a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series (see
    ``is_image``). Raises CowjaxError for a missing, truncated or unsupported file, a folder of
    several series, a 2D or 4D image (a trailing singleton 4th dimension is squeezed), an empty image
    or non-finite voxels.
    """
    data, affine = _load_volume(path)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise CowjaxError(f"{path}: {bad} non-finite voxel(s) (NaN or inf)")
    if data.max() == data.min():
        raise CowjaxError(f"{path}: empty image (every voxel is {data.flat[0]})")
    return data, affine


def load_labels(path: str | Path, shape: tuple[int, ...], affine: np.ndarray,
                max_label: int) -> np.ndarray:
    """Read a label volume (any image format) that must lie on an image's grid: [X, Y, Z] uint8.

    shape, affine: the image's. Raises CowjaxError naming the file for another shape or affine, or
    labels that are not integers in 0..max_label.
    """
    data, label_affine = _load_volume(path)
    if data.shape != tuple(shape):
        raise CowjaxError(f"{path}: shape {data.shape} differs from the image's {tuple(shape)}")
    if not np.allclose(label_affine, affine, atol=1e-3):
        raise CowjaxError(f"{path}: affine differs from the image's (must be on the image grid)")
    data = np.asarray(data)
    if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data > max_label) \
            or np.any(data != np.round(data)):
        raise CowjaxError(f"{path}: labels must be integers in 0..{max_label}")
    return data.astype(np.uint8)


def _write_itk(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    sitk = _sitk()
    image = _to_itk(data, affine)
    if not path.parent.is_dir():
        raise CowjaxError(f"{path}: output directory {path.parent} does not exist")
    try:
        if image_suffix(path) in (".nrrd", ".mha"):
            with atomic_output(path) as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=True)
            return
        # A detached header (.nhdr, .mhd) names its data file: write both under their final names
        # in a temporary folder, then move the data file first and the header last.
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            sitk.WriteImage(image, str(tmp / path.name), useCompression=True)
            for written in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
                os.replace(written, path.parent / written.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except RuntimeError as e:
        raise CowjaxError(f"{path}: cannot write the image ({_itk_reason(e)})")


def save_image(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write an image by suffix, atomically: NIfTI (.nii.gz, .nii) through nibabel, NRRD (.nrrd,
    .nhdr) and MetaImage (.mha, .mhd) through SimpleITK, compressed.

    data: [X, Y, Z]; affine: [4, 4] voxel -> world RAS. The dtype is kept (uint8 labels stay uint8;
    float64 and float16 are stored as float32, bool as uint8). NIfTI gets sform and qform both set to
    ``affine`` (code 1, scanner) so every reader sees the same world; ITK formats store it in LPS.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise CowjaxError(f"{path}: unsupported image format for writing (supported: "
                          f"{', '.join(IMAGE_SUFFIXES)})")
    data = np.asarray(data)
    if data.dtype == np.float64 or data.dtype == np.float16:
        data = data.astype(np.float32)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if suffix not in NIFTI_SUFFIXES:
        _write_itk(path, data, affine)
        return
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_data_dtype(data.dtype)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


# 3D Slicer reads colour tables (index name R G B A lines) from these.
COLOUR_TABLE_SUFFIXES = (".ctbl", ".txt")


def write_colour_table(path: str | Path) -> None:
    """Write a 3D Slicer colour table (``.ctbl`` / ``.txt``) for segment label maps: lines
    ``index name R G B A`` (0-255), 0 Background (transparent) and the 20 segments in class order,
    coloured as ``figures`` draws them (matplotlib's tab20). Load it in Slicer with the label map
    and pick it as the map's colour node to see the segment names and colours."""
    import matplotlib  # not pyplot: only the colour list is needed, and only here

    path = Path(path)
    if not path.name.lower().endswith(COLOUR_TABLE_SUFFIXES):
        raise CowjaxError(f"{path}: a Slicer colour table must end in "
                          f"{' or '.join(COLOUR_TABLE_SUFFIXES)}")
    colours = np.round(np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(int)
    lines = [f"# Color table file {path.name}", f"# {anatomy.NUM_CLASSES} values",
             "0 Background 0 0 0 0"]
    # Slicer splits on spaces: names must not hold any (the cow19 names do not).
    lines += [f"{c} {name} {r} {g} {b} 255"
              for c, (name, (r, g, b)) in enumerate(zip(anatomy.SEGMENTS, colours), start=1)]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------- landmarks

def _system(path: Path, declared: str | None, argument: str | None) -> str:
    """The coordinate system of a landmark file: declared in the file or by the caller, agreeing."""
    declared = declared.strip().upper() if declared is not None else None
    argument = argument.strip().upper() if argument is not None else None
    for value in (declared, argument):
        if value is not None and value not in ("RAS", "LPS"):
            raise CowjaxError(f"{path}: unknown coordinate system {value!r} (expected LPS or RAS)")
    if declared and argument and declared != argument:
        raise CowjaxError(f"{path}: file declares {declared} but coordinate_system={argument} was given")
    system = declared or argument
    if system is None:
        raise CowjaxError(f"{path}: coordinate system not declared; state it in the file (LPS or RAS) "
                          f"or pass coordinate_system=")
    return system


def _collect(path: Path, entries, system: str) -> np.ndarray:
    """(label, xyz or None) pairs -> [19, 3] RAS, rejecting unknown, unlabelled or duplicate names."""
    out = np.full((anatomy.NUM_LANDMARKS, 3), np.nan)
    seen = set()
    for label, xyz in entries:
        label = (label or "").strip()
        if not label:
            raise CowjaxError(f"{path}: a landmark has no name (label)")
        if label not in anatomy.LANDMARK_INDEX:
            raise CowjaxError(f"{path}: unknown landmark name {label!r} (expected cow19 names, "
                              f"e.g. {anatomy.LANDMARKS[0]}, {anatomy.LANDMARKS[1]})")
        if label in seen:
            raise CowjaxError(f"{path}: duplicate landmark {label!r}")
        seen.add(label)
        if xyz is None:
            continue
        try:
            xyz = np.array([float(v) for v in xyz], dtype=np.float64)
        except (TypeError, ValueError):
            raise CowjaxError(f"{path}: landmark {label!r} has a non-numeric position {xyz!r}")
        if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
            raise CowjaxError(f"{path}: landmark {label!r} has an invalid position {xyz.tolist()}")
        out[anatomy.LANDMARK_INDEX[label]] = xyz
    if system == "LPS":
        out = out @ anatomy.LPS_TO_RAS.T
    return out


def _read_mrk_json(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    try:
        doc = json.loads(text)
        markups = [m for m in doc["markups"] if m.get("type", "Fiducial") == "Fiducial"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CowjaxError(f"{path}: not a Slicer markups JSON file ({e})")
    if len(markups) != 1:
        raise CowjaxError(f"{path}: expected one Fiducial markup, found {len(markups)}")
    markup = markups[0]
    units = markup.get("coordinateUnits", "mm")
    if units != "mm":
        raise CowjaxError(f"{path}: coordinateUnits {units!r} not supported (expected mm)")
    system = _system(path, markup.get("coordinateSystem"), coordinate_system)
    entries = []
    for p in markup.get("controlPoints", []):
        # Slicer keeps unplaced points with positionStatus "missing"/"undefined": unknown, not zero.
        placed = p.get("positionStatus", "defined") in ("defined", "preview")
        entries.append((p.get("label"), p.get("position") if placed else None))
    return _collect(path, entries, system)


def _read_fcsv(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    declared, columns, rows = None, None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip().lower()
            if key == "coordinatesystem":
                value = value.strip().upper()
                if value not in _FCSV_SYSTEMS:
                    raise CowjaxError(f"{path}: unknown CoordinateSystem {value!r}")
                declared = _FCSV_SYSTEMS[value]
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock",
                          "label", "desc", "associatedNodeID"]
    system = _system(path, declared, coordinate_system)
    try:
        ix, iy, iz, il = (columns.index(c) for c in ("x", "y", "z", "label"))
    except ValueError:
        raise CowjaxError(f"{path}: .fcsv columns header lacks x, y, z or label: {columns}")
    entries = []
    for row in csv.reader(rows):
        if len(row) <= max(ix, iy, iz, il):
            raise CowjaxError(f"{path}: malformed row {','.join(row)!r}")
        entries.append((row[il], (row[ix], row[iy], row[iz])))
    return _collect(path, entries, system)


def _read_csv(path: Path, text: str, coordinate_system: str | None) -> np.ndarray:
    declared, lines = None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinate_system":
                declared = value.strip()
        elif line.strip():
            lines.append(line)
    system = _system(path, declared, coordinate_system)
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"name", "x", "y", "z"} <= {f.strip() for f in
                                                                   reader.fieldnames}:
        raise CowjaxError(f"{path}: expected a header 'name,x,y,z', got {reader.fieldnames}")
    entries = []
    for row in reader:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        # An empty position is how a known-missing landmark is written.
        xyz = None if not (row["x"] or row["y"] or row["z"]) else (row["x"], row["y"], row["z"])
        entries.append((row["name"], xyz))
    return _collect(path, entries, system)


def _landmark_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".mrk.json", ".fcsv", ".csv"):
        if name.endswith(suffix):
            return suffix
    raise CowjaxError(f"{path}: unknown landmark file type (expected .mrk.json, .fcsv or .csv)")


def read_landmarks(path: str | Path, coordinate_system: str | None = None) -> np.ndarray:
    """Read a landmark file -> [19, 3] float64 world RAS mm (NaN rows for landmarks not in it).

    ``.mrk.json`` (Slicer markups; ``coordinateSystem`` LPS or RAS), ``.fcsv`` (Slicer legacy;
    ``# CoordinateSystem = LPS|RAS|0|1``) or ``.csv`` (header ``name,x,y,z``; a
    ``# coordinate_system = RAS`` line). ``coordinate_system`` declares it for a file that does not;
    a file that declares a different one is an error, and so is a file with no declaration at all.
    """
    path = Path(path)
    kind = _landmark_format(path)
    if not path.is_file():
        raise CowjaxError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CowjaxError(f"{path}: cannot read landmark file ({e})")
    reader = {".mrk.json": _read_mrk_json, ".fcsv": _read_fcsv, ".csv": _read_csv}[kind]
    return reader(path, text, coordinate_system)


def _confidences(landmarks: np.ndarray, confidences) -> np.ndarray | None:
    if confidences is None:
        return None
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.shape != (landmarks.shape[0],):
        raise ValueError(f"confidences shape {confidences.shape} != ({landmarks.shape[0]},)")
    return confidences


def write_landmarks(path: str | Path, landmarks_ras: np.ndarray, confidences=None) -> None:
    """Write [19, 3] RAS landmarks by suffix, atomically; NaN rows are not positions.

    ``.mrk.json`` is written in LPS as Slicer writes it, unknown points kept with positionStatus
    "missing"; ``.fcsv`` (LPS) and ``.csv`` (RAS, declared in a comment line) leave them out.
    Confidences, if given ([19]), go in each point's description (.mrk.json/.fcsv) or a column (.csv).
    """
    path = Path(path)
    kind = _landmark_format(path)
    ras = np.asarray(landmarks_ras, dtype=np.float64)
    if ras.shape != (anatomy.NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks shape {ras.shape} != ({anatomy.NUM_LANDMARKS}, 3)")
    conf = _confidences(ras, confidences)
    known = np.all(np.isfinite(ras), axis=1)
    lps = ras @ anatomy.LPS_TO_RAS.T

    def desc(i: int) -> str:
        return "" if conf is None else f"confidence={conf[i]:.4f}"

    if kind == ".mrk.json":
        points = []
        for i, name in enumerate(anatomy.LANDMARKS):
            points.append({
                "id": str(i + 1), "label": name, "description": desc(i), "associatedNodeID": "",
                "position": lps[i].tolist() if known[i] else [0.0, 0.0, 0.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True, "locked": False, "visibility": True,
                "positionStatus": "defined" if known[i] else "missing"})
        doc = {"@schema": _SLICER_SCHEMA, "markups": [{
            "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": False,
            "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(points), "controlPoints": points, "measurements": []}]}
        text = json.dumps(doc, indent=2)
    elif kind == ".fcsv":
        lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
        for i, name in enumerate(anatomy.LANDMARKS):
            if known[i]:
                x, y, z = (repr(float(v)) for v in lps[i])
                lines.append(f"{i + 1},{x},{y},{z},0,0,0,1,1,1,0,{name},{desc(i)},")
        text = "\n".join(lines) + "\n"
    else:
        buf = _io.StringIO()
        buf.write("# coordinate_system = RAS\n")
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "x", "y", "z"] + ([] if conf is None else ["confidence"]))
        for i, name in enumerate(anatomy.LANDMARKS):
            if known[i]:
                writer.writerow([name] + [repr(float(v)) for v in ras[i]]
                                + ([] if conf is None else [f"{conf[i]:.4f}"]))
        text = buf.getvalue()
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------ cases

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
