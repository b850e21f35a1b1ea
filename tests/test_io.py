"""cowjax.data.io: image and landmark formats round-trip, world coordinates survive any affine and
any format, bad files fail clearly."""

import gzip
import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from cowjax import anatomy
from cowjax.data import io
from cowjax import errors
from cowjax.errors import CowjaxError


def _landmarks(rng):
    lm = anatomy.TEMPLATE_LANDMARKS + rng.normal(0, 2, (anatomy.NUM_LANDMARKS, 3))
    lm[5] = np.nan  # one unknown landmark must stay unknown
    return lm


def _random_affine(rng):
    """An oblique affine with permuted, flipped axes and anisotropic spacing."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    perm = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
    a = np.eye(4)
    a[:3, :3] = q @ perm @ np.diag(rng.uniform(0.4, 1.5, 3))
    a[:3, 3] = rng.uniform(-50, 50, 3)
    return a


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv", ".csv"])
def test_landmark_formats_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    lm = _landmarks(rng)
    path = tmp_path / f"lm{suffix}"
    io.write_landmarks(path, lm, confidences=rng.uniform(size=anatomy.NUM_LANDMARKS))
    np.testing.assert_allclose(io.read_landmarks(path), lm, atol=1e-9)
    assert np.isnan(io.read_landmarks(path)[5]).all()


def test_mrk_json_is_written_in_lps(tmp_path):
    lm = anatomy.TEMPLATE_LANDMARKS.copy()
    io.write_landmarks(tmp_path / "a.mrk.json", lm)
    markup = json.loads((tmp_path / "a.mrk.json").read_text())["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    point = next(p for p in markup["controlPoints"] if p["label"] == "M1_M2_R")
    np.testing.assert_allclose(point["position"], anatomy.TEMPLATE["M1_M2_R"] * [-1, -1, 1])


def _mrk(system, points):
    markup = {"type": "Fiducial", "controlPoints": [{"label": n, "position": p} for n, p in points]}
    if system:
        markup["coordinateSystem"] = system
    return json.dumps({"markups": [markup]})


@pytest.mark.parametrize("system,sign", [("LPS", [-1, -1, 1]), ("RAS", [1, 1, 1])])
def test_declared_systems_are_honoured(tmp_path, system, sign):
    p = [10.0, 20.0, 30.0]
    (tmp_path / "a.mrk.json").write_text(_mrk(system, [("BA_top", p)]))
    (tmp_path / "a.fcsv").write_text(f"# CoordinateSystem = {system}\n"
                                     f"1,{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,BA_top,,\n")
    legacy = {"RAS": "0", "LPS": "1"}[system]
    (tmp_path / "b.fcsv").write_text(f"# CoordinateSystem = {legacy}\n"
                                     f"1,{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,BA_top,,\n")
    (tmp_path / "a.csv").write_text(f"# coordinate_system = {system}\nname,x,y,z\nBA_top,10,20,30\n")
    (tmp_path / "u.csv").write_text("name,x,y,z\nBA_top,10,20,30\n")
    for path, kw in [("a.mrk.json", {}), ("a.fcsv", {}), ("b.fcsv", {}), ("a.csv", {}),
                     ("u.csv", {"coordinate_system": system})]:
        got = io.read_landmarks(tmp_path / path, **kw)
        np.testing.assert_allclose(got[0], np.multiply(p, sign))
        assert np.isnan(got[1:]).all()


@pytest.mark.parametrize("content,name,message", [
    (_mrk(None, [("BA_top", [0, 0, 0])]), "a.mrk.json", "coordinate system not declared"),
    ("name,x,y,z\nBA_top,1,2,3\n", "a.csv", "coordinate system not declared"),
    ("1,0,0,0,0,0,0,1,1,1,0,BA_top,,\n", "a.fcsv", "coordinate system not declared"),
    (_mrk("LPS", [("Basilar", [0, 0, 0])]), "a.mrk.json", "unknown landmark name 'Basilar'"),
    (_mrk("LPS", [("BA_top", [0, 0, 0]), ("BA_top", [1, 1, 1])]), "a.mrk.json", "duplicate"),
    (_mrk("LPS", [("", [0, 0, 0])]), "a.mrk.json", "has no name"),
    ("# coordinate_system = RAS\nname,x,y,z\nBA_top,1,two,3\n", "a.csv", "non-numeric"),
    ("{not json", "a.mrk.json", "not a Slicer markups JSON"),
    (_mrk("LPS", []), "a.txt", "unknown landmark file type"),
])
def test_bad_landmark_files(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CowjaxError, match=message) as e:
        io.read_landmarks(tmp_path / name)
    assert name in str(e.value)


def test_conflicting_declaration(tmp_path):
    (tmp_path / "a.mrk.json").write_text(_mrk("LPS", [("BA_top", [0, 0, 0])]))
    with pytest.raises(CowjaxError, match="declares LPS"):
        io.read_landmarks(tmp_path / "a.mrk.json", coordinate_system="RAS")


def test_world_coordinates_survive_any_affine(tmp_path):
    """A bright voxel's world position is what the affine says, whatever the storage order."""
    rng = np.random.default_rng(1)
    for trial in range(4):
        affine = _random_affine(rng)
        data = rng.uniform(size=(7, 8, 9)).astype(np.float32)
        io.save_image(tmp_path / f"{trial}.nii.gz", data, affine)
        got, got_affine = io.load_image(tmp_path / f"{trial}.nii.gz")
        np.testing.assert_array_equal(got, data)
        np.testing.assert_allclose(got_affine, affine, atol=1e-5)
        header = nib.load(tmp_path / f"{trial}.nii.gz").header
        np.testing.assert_allclose(header.get_qform(), affine, atol=1e-4)  # rigid+zoom: qform exact
        assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1


def test_labels_keep_dtype(tmp_path):
    labels = np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 21
    io.save_image(tmp_path / "s.nii.gz", labels, np.eye(4))
    assert nib.load(tmp_path / "s.nii.gz").get_data_dtype() == np.uint8


def _case(rng, shape=(10, 11, 12)):
    image = rng.uniform(size=shape).astype(np.float32)
    return io.Case("c", image, _random_affine(rng), _landmarks(rng),
                   vessels=(image > 0.7).astype(np.uint8),
                   segments=(image * 20).astype(np.uint8),
                   attributes={"segments": anatomy.segment_dict(np.ones(20, bool)),
                               "landmarks": anatomy.landmark_dict(np.ones(19, bool))})


def test_case_round_trip(tmp_path):
    case = _case(np.random.default_rng(2))
    io.save_case(tmp_path / "ds" / "c", case)
    got = io.load_case(tmp_path / "ds" / "c")
    np.testing.assert_array_equal(got.image, case.image)
    np.testing.assert_allclose(got.affine, case.affine, atol=1e-5)
    np.testing.assert_allclose(got.landmarks, case.landmarks, atol=1e-9)
    np.testing.assert_array_equal(got.vessels, case.vessels)
    np.testing.assert_array_equal(got.segments, case.segments)
    assert got.segments.dtype == np.uint8 and got.attributes == case.attributes
    assert io.list_cases(tmp_path / "ds") == [tmp_path / "ds" / "c"]


def test_save_case_rejects_mismatched_mask_and_writes_nothing(tmp_path):
    case = _case(np.random.default_rng(3))
    case.vessels = case.vessels[:-1]
    with pytest.raises(CowjaxError, match="differs from the image"):
        io.save_case(tmp_path / "c", case)
    assert not (tmp_path / "c").exists()


def _write_nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_bad_images(tmp_path):
    good = np.random.default_rng(4).uniform(size=(6, 6, 6)).astype(np.float32)
    _write_nifti(tmp_path / "ok.nii.gz", good)
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello, not an image"))
    _write_nifti(tmp_path / "4d.nii.gz", np.stack([good, good], -1))
    _write_nifti(tmp_path / "2d.nii.gz", good[..., 0])
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    _write_nifti(tmp_path / "nan.nii.gz", nan)
    _write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4, 4), np.float32))
    _write_nifti(tmp_path / "zero.nii.gz", np.zeros((0, 4, 4), np.float32))
    for name, message in [("missing.nii.gz", "file not found"), ("trunc.nii.gz", "truncated"),
                          ("text.nii.gz", "not a readable NIfTI"), ("4d.nii.gz", "expected a 3D"),
                          ("2d.nii.gz", "expected a 3D"), ("nan.nii.gz", "1 non-finite"),
                          ("flat.nii.gz", "empty image"), ("zero.nii.gz", "empty image")]:
        with pytest.raises(CowjaxError, match=message) as e:
            io.load_image(tmp_path / name)
        assert name in str(e.value)
    # A trailing singleton 4th dimension is one volume.
    _write_nifti(tmp_path / "4d1.nii.gz", good[..., None])
    assert io.load_image(tmp_path / "4d1.nii.gz")[0].shape == (6, 6, 6)


def test_load_case_errors(tmp_path):
    case = _case(np.random.default_rng(5))
    io.save_case(tmp_path / "c", case)
    _write_nifti(tmp_path / "c" / "vessels.nii.gz", np.zeros((3, 3, 3), np.uint8), case.affine)
    with pytest.raises(CowjaxError, match="vessels.nii.gz: shape"):
        io.load_case(tmp_path / "c")
    (tmp_path / "c" / "vessels.nii.gz").unlink()
    io.write_landmarks(tmp_path / "c" / "landmarks.csv", case.landmarks)
    with pytest.raises(CowjaxError, match="several landmark files"):
        io.load_case(tmp_path / "c")
    (tmp_path / "c" / "landmarks.csv").unlink()
    (tmp_path / "c" / "attributes.json").write_text('{"segments": {"Ba": true}}')
    with pytest.raises(CowjaxError, match="unknown segment name 'Ba'"):
        io.load_case(tmp_path / "c")
    (tmp_path / "c" / "image.nii.gz").unlink()
    with pytest.raises(CowjaxError, match="has landmarks but no image"):
        io.list_cases(tmp_path)


# ------------------------------------------------------------------------- other image formats

def _oblique_affine():
    """Oblique, anisotropic, right-handed (a DICOM series can only store right-handed slices)."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 0.9, 1.3])
    affine[:3, 3] = [10.5, -20.25, 33.0]
    return affine


def _write_dicom_series(folder, data, affine):
    """Write [X, Y, Z] int16 data as one DICOM series, one file per slice, with the tags that carry
    the geometry (after SimpleITK's DicomSeriesFromArray example)."""
    import SimpleITK as sitk

    folder.mkdir()
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).ravel().tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.7.1"
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        s.SetMetaData("0008|0060", "MR")
        s.SetMetaData("0020|000d", series + ".1")                                # study
        s.SetMetaData("0020|000e", series)                                       # series
        s.SetMetaData("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))))
        s.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0013", str(k + 1))                                   # instance number
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd", "v.nhdr", "v.mha", "v.mhd", "dicom"])
def test_image_formats_round_trip(tmp_path, name):
    """The same volume in every format loads back with the same voxels and the same affine."""
    data = np.random.default_rng(6).integers(0, 1000, (12, 10, 8)).astype(np.int16)
    affine = _oblique_affine()
    path = tmp_path / name
    if name == "dicom":
        _write_dicom_series(path, data, affine)
    else:
        io.save_image(path, data, affine)
    assert io.is_image(path) and io.image_stem(path) == name.split(".")[0]
    got, got_affine = io.load_image(path)
    assert got.dtype == np.float32 and got.shape == data.shape
    np.testing.assert_array_equal(got, data)
    np.testing.assert_allclose(got_affine, affine, atol=1e-4)
    # A point's world position: the brightest voxel lands at the same place in every format.
    ijk = np.unravel_index(np.argmax(got), got.shape)
    np.testing.assert_allclose(got_affine @ [*ijk, 1], affine @ [*np.unravel_index(np.argmax(data),
                                                                                    data.shape), 1],
                               atol=1e-4)
    # No temporary file or folder is left beside the output.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_keep_label_dtype_and_world(tmp_path, suffix):
    """uint8 labels stay uint8, and an LPS-stored file matches the NIfTI world, voxel by voxel."""
    import SimpleITK as sitk

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 21, (7, 8, 9)).astype(np.uint8)
    affine = _random_affine(rng)                              # any handedness, permuted axes
    io.save_image(tmp_path / f"s{suffix}", labels, affine)
    assert sitk.ReadImage(str(tmp_path / f"s{suffix}")).GetPixelID() == sitk.sitkUInt8
    io.save_image(tmp_path / "s.nii.gz", labels, affine)
    a, a_affine = io.load_image(tmp_path / f"s{suffix}")
    b, b_affine = io.load_image(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a_affine, b_affine, atol=1e-5)
    # ITK's own world (LPS) for voxel (1, 2, 3) is the RAS point with x and y negated.
    lps = sitk.ReadImage(str(tmp_path / f"s{suffix}")).TransformIndexToPhysicalPoint((1, 2, 3))
    np.testing.assert_allclose(np.multiply(lps, [-1, -1, 1]), (affine @ [1, 2, 3, 1])[:3], atol=1e-5)


def test_bad_image_formats(tmp_path):
    data = np.random.default_rng(8).uniform(size=(6, 6, 6)).astype(np.float32)
    io.save_image(tmp_path / "ok.nrrd", data, np.eye(4))
    raw = (tmp_path / "ok.nrrd").read_bytes()
    (tmp_path / "trunc.nrrd").write_bytes(raw[: len(raw) - 40])
    (tmp_path / "junk.mha").write_text("not an image at all\n")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("x")
    for name, message in [("scan.png", "unsupported image format.*.nii.gz.*.mha.*DICOM"),
                          ("trunc.nrrd", "not a readable NRRD image"),
                          ("junk.mha", "not a readable MetaImage image"),
                          ("missing.mha", "file not found"),
                          ("empty_dir", "no DICOM image series")]:
        with pytest.raises(CowjaxError, match=message) as e:
            io.load_image(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    assert not io.is_image(tmp_path / "scan.png") and not io.is_image(tmp_path / "empty_dir")
    with pytest.raises(CowjaxError, match="unsupported image format for writing"):
        io.save_image(tmp_path / "out.png", data, np.eye(4))
    assert not (tmp_path / "out.png").exists()


def test_dicom_folder_with_two_series(tmp_path):
    import SimpleITK as sitk

    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    _write_dicom_series(tmp_path / "a", data, _oblique_affine())
    _write_dicom_series(tmp_path / "b", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for f in (tmp_path / "b").iterdir():                      # b's slices, as another series, into a
        img = sitk.ReadImage(str(f))
        img.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.7.2")
        writer.SetFileName(str(tmp_path / "a" / f"b_{f.name}"))
        writer.Execute(img)
    with pytest.raises(CowjaxError, match="holds 2 DICOM series .*7.1.*7.2") as e:
        io.load_image(tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value)


def test_case_folder_with_other_formats(tmp_path):
    case = _case(np.random.default_rng(9))
    io.save_case(tmp_path / "c", case)
    for stem in ("image", "segments"):
        (tmp_path / "c" / f"{stem}.nii.gz").unlink()
    io.save_image(tmp_path / "c" / "image.mha", case.image, case.affine)
    io.save_image(tmp_path / "c" / "segments.nrrd", case.segments, case.affine)
    got = io.load_case(tmp_path / "c")
    np.testing.assert_array_equal(got.image, case.image)
    np.testing.assert_array_equal(got.segments, case.segments)
    np.testing.assert_allclose(got.affine, case.affine, atol=1e-5)
    assert io.case_image(tmp_path / "c") == tmp_path / "c" / "image.mha"
    assert io.list_cases(tmp_path) == [tmp_path / "c"]
    io.save_image(tmp_path / "c" / "image.nii.gz", case.image, case.affine)
    with pytest.raises(CowjaxError, match="several image images.*image.nii.gz.*image.mha"):
        io.load_case(tmp_path / "c")


def test_colour_table(tmp_path):
    io.write_colour_table(tmp_path / "cow19.ctbl")
    lines = [line.split() for line in (tmp_path / "cow19.ctbl").read_text().splitlines()
             if not line.startswith("#")]
    assert len(lines) == anatomy.NUM_CLASSES == 21
    assert lines[0] == ["0", "Background", "0", "0", "0", "0"]
    assert [line[1] for line in lines[1:]] == list(anatomy.SEGMENTS)
    values = np.array([[int(v) for v in line[2:]] for line in lines])
    assert [int(line[0]) for line in lines] == list(range(21))
    assert values.min() >= 0 and values.max() <= 255 and (values[1:, 3] == 255).all()
    assert len({tuple(v) for v in values[1:, :3]}) == 20               # 20 distinct colours
    with pytest.raises(CowjaxError, match="must end in .ctbl or .txt"):
        io.write_colour_table(tmp_path / "cow19.csv")


def test_outputs_appear_whole_and_with_the_mode_open_would_give(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    assert errors.FILE_MODE == 0o666 & ~umask and errors.DIR_MODE == 0o777 & ~umask
    with errors.atomic_output(tmp_path / "a.mrk.json") as tmp:
        assert tmp.name.endswith(".mrk.json")
        tmp.write_text("{}")
    with pytest.raises(RuntimeError):
        with errors.atomic_output(tmp_path / "b.csv") as tmp:
            tmp.write_text("half of it")
            raise RuntimeError("interrupted")
    with errors.atomic_output_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    # No partial or temporary file left; the outputs readable as any file the user writes
    # (temporary files start 0600).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrk.json", "folder"]
    assert stat.S_IMODE((tmp_path / "a.mrk.json").stat().st_mode) == errors.FILE_MODE
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == errors.DIR_MODE
