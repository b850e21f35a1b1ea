"""Image files: NIfTI through nibabel; NRRD, MetaImage and a folder of one DICOM series through
SimpleITK (ITK's LPS physical space turned into the project's RAS world, oblique directions kept);
the 3D Slicer colour table of the 20 segments.

Every image is ``(data [X, Y, Z], affine [4, 4])``: voxel -> world RAS mm, nibabel's convention
(voxel centres at integer indices). A broken, unsupported or ambiguous file raises ``CowjaxError``
naming it; every output goes through ``errors.atomic_output``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from cowjax import anatomy
from cowjax.errors import CowjaxError, atomic_output

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
