"""Cases on disk, one file per concern: ``images`` (NIfTI, NRRD, MetaImage, DICOM series; the Slicer
colour table), ``landmarks`` (.mrk.json / .fcsv / .csv) and ``cases`` (the case folder).

Everything returned is in world RAS millimetres with the file's own affine (voxel -> world,
nibabel's convention: voxel centres at integer indices); LPS appears only inside the files. A broken
or ambiguous input raises ``CowjaxError`` naming the file and the problem; every output is written
through ``errors.atomic_output``, so a failure never leaves a partial file. Import the package
(``from cowjax.data import io``): its names are these.
"""

from cowjax.data.io.cases import (ATTRIBUTES, IMAGE, LANDMARK_FILES, SEGMENTS, VESSELS, Case,
                                  case_image, list_cases, load_case, save_case)
from cowjax.data.io.images import (COLOUR_TABLE_SUFFIXES, IMAGE_SUFFIXES, ITK_SUFFIXES,
                                   NIFTI_SUFFIXES, image_stem, image_suffix, is_dicom_dir, is_image,
                                   load_image, load_labels, save_image, write_colour_table)
from cowjax.data.io.landmarks import SLICER_SCHEMA, read_landmarks, write_landmarks

__all__ = ["ATTRIBUTES", "IMAGE", "LANDMARK_FILES", "SEGMENTS", "VESSELS", "Case", "case_image",
           "list_cases", "load_case", "save_case", "COLOUR_TABLE_SUFFIXES", "IMAGE_SUFFIXES",
           "ITK_SUFFIXES", "NIFTI_SUFFIXES", "image_stem", "image_suffix", "is_dicom_dir",
           "is_image", "load_image", "load_labels", "save_image", "write_colour_table",
           "SLICER_SCHEMA", "read_landmarks", "write_landmarks"]
