"""cowjax.data.topcow: synthetic cases relabelled in TopCoW's 13 classes import back to their cow19
landmarks, segments and presence attributes; bad inputs fail in one line and write nothing."""

import numpy as np
import pytest

from cowjax import anatomy
from cowjax.data import io, synthetic, topcow

# Synthetic cases (seed 0, 1 mm) covering the variants: 2 no right PCoA; 3 left fetal PCA (P1_L
# hypoplastic) and no right PCoA; 8 hypoplastic ACoA, i.e. unlabelled; 9 a complete circle.
INDICES = (2, 3, 8, 9)
# Rows of the landmarks the class interfaces give; the other ten are unknown in TopCoW labels.
INTERFACE_ROWS = np.array([i for i, n in enumerate(anatomy.LANDMARKS)
                           if n == "BA_top" or n[:-2] in ("ICA_PCoA", "ICA_term", "A1_A2", "P1_P2")])


def _to_topcow(segments):
    """cow19 classes [X, Y, Z] -> TopCoW classes (TopCoW labels whole arteries: ICA = C6 + C7, ...)."""
    artery = {"ICA_C6": "ICA", "ICA_C7": "ICA", "M1": "MCA", "M2": "MCA", "A1": "ACA", "A2": "ACA",
              "P1": "PCA", "P2": "PCA", "PCoA": "Pcom"}
    lut = np.zeros(anatomy.NUM_CLASSES, np.uint8)
    for j, name in enumerate(anatomy.SEGMENTS):
        if name in ("BA", "ACoA"):
            lut[j + 1] = topcow.TOPCOW_CLASSES["BA" if name == "BA" else "Acom"]
        else:
            base, side = name.rsplit("_", 1)
            lut[j + 1] = topcow.TOPCOW_CLASSES[f"{side}-{artery[base]}"]
    return lut[segments]


@pytest.fixture(scope="module")
def cases():
    return {i: synthetic.generate_case(0, i, spacing=(1.0, 1.0, 1.0)) for i in INDICES}


def test_landmarks_segments_and_attributes_from_labels(cases):
    others = np.setdiff1d(np.arange(anatomy.NUM_LANDMARKS), INTERFACE_ROWS)
    for i, case in cases.items():
        segments, landmarks, attributes = topcow.convert_labels(_to_topcow(case.segments), case.affine)
        # Presence by TopCoW's rules equals the synthetic truth (hypoplastic = unlabelled = absent).
        assert attributes == case.attributes, i
        # Interface landmarks land near the truth; the rest are unknown, never guessed.
        assert np.isnan(landmarks[others]).all()
        known = np.isfinite(landmarks[:, 0])
        err = np.linalg.norm(landmarks - case.landmarks, axis=1)
        assert (err[known] < 2.5).all(), (i, dict(zip(np.array(anatomy.LANDMARKS)[known], err[known])))
        # Every labelled class overlaps its true segment; M1/M2/C6 are never split from the labels.
        for j, name in enumerate(anatomy.SEGMENTS):
            got, true = segments == j + 1, case.segments == j + 1
            if name.startswith(("M1", "M2", "ICA_C6")):
                assert not got.any()
            elif got.any():
                assert 2 * (got & true).sum() / (got.sum() + true.sum()) > 0.6, (i, name)
        assert segments[case.segments == 0].max() == 0          # nothing outside the arteries
    # Which landmarks are known follows the variants.
    lm = {i: topcow.convert_labels(_to_topcow(c.segments), c.affine)[1] for i, c in cases.items()}
    index = anatomy.LANDMARK_INDEX
    assert np.isnan(lm[2][index["ICA_PCoA_R"]]).all() and np.isnan(lm[2][index["P1_P2_R"]]).all()
    assert np.isfinite(lm[9][INTERFACE_ROWS]).all()                                  # complete circle
    assert np.isnan(lm[8][index["A1_A2_R"]]).all() and np.isnan(lm[8][index["A1_A2_L"]]).all()


def test_split_follows_the_variants(cases):
    segs = {i: topcow.convert_labels(_to_topcow(c.segments), c.affine)[0] for i, c in cases.items()}
    cls = {n: j + 1 for j, n in enumerate(anatomy.SEGMENTS)}
    # Fetal left PCA: all of it is P2.
    assert not (segs[3] == cls["P1_L"]).any()
    assert (segs[3][cases[3].segments == cls["P2_L"]] == cls["P2_L"]).all()
    # No ACoA: the ACAs cannot be split into A1 and A2 and stay unlabelled.
    assert not np.isin(segs[8], [cls[f"{a}_{s}"] for a in ("A1", "A2") for s in "RL"]).any()
    # No right PCoA: the right ICA and PCA cannot be split.
    assert not np.isin(segs[2], [cls["ICA_C7_R"], cls["P1_R"], cls["P2_R"]]).any()
    assert (segs[9] == cls["ICA_C7_R"]).any() and (segs[9] == cls["P1_R"]).any()


def _write_topcow(root, cases):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for n, (i, case) in enumerate(cases.items(), start=1):
        io.save_image(root / "imagesTr" / f"topcow_mr_{n:03d}_0000.nii.gz", case.image, case.affine)
        label = root / "labelsTr" / (f"topcow_mr_{n:03d}" + (".nrrd" if n == 2 else ".nii.gz"))
        io.save_image(label, _to_topcow(case.segments), case.affine)


def test_command_line_import(tmp_path, cases, capsys):
    _write_topcow(tmp_path, cases)
    out = tmp_path / "cow19"
    assert topcow.main([str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), str(out)]) == 0
    assert "wrote 4 cases" in capsys.readouterr().out
    folders = io.list_cases(out)
    assert [p.name for p in folders] == [f"topcow_mr_{n:03d}" for n in range(1, 5)]
    for folder, case in zip(folders, cases.values()):
        got = io.load_case(folder)
        # What the files hold (the affine as NIfTI stores it, in float32) converted in memory.
        segments, landmarks, attributes = topcow.convert_labels(_to_topcow(case.segments), got.affine)
        np.testing.assert_array_equal(got.image, case.image)
        np.testing.assert_array_equal(got.vessels, case.segments > 0)
        np.testing.assert_array_equal(got.segments, segments)
        np.testing.assert_allclose(got.landmarks, landmarks, atol=1e-9)
        assert got.attributes == attributes
    # --glob picks cases; --no-masks leaves out the vessel and segment masks.
    argv = [str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), str(tmp_path / "only"),
            "--glob", "topcow_mr_00[13]_*", "--no-masks"]
    assert topcow.main(argv) == 0
    got = [io.load_case(p) for p in io.list_cases(tmp_path / "only")]
    assert [c.case_id for c in got] == ["topcow_mr_001", "topcow_mr_003"]
    assert all(c.vessels is None and c.segments is None and c.attributes for c in got)


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, cases, capsys):
    two = dict(list(cases.items())[:2])
    _write_topcow(tmp_path, two)
    images, labels, out = tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "out"
    (labels / "topcow_mr_002.nrrd").rename(tmp_path / "aside.nrrd")
    assert topcow.main([str(images), str(labels), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "topcow_mr_002_0000.nii.gz: no label map" in err
    assert not out.exists() or not any(out.iterdir())
    # A label map on another grid: that case fails, and leaves no folder, temporary or not.
    case = cases[INDICES[1]]
    io.save_image(labels / "topcow_mr_002.nii.gz", _to_topcow(case.segments)[:-1], case.affine)
    assert topcow.main([str(images), str(labels), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "topcow_mr_002.nii.gz: shape" in err
    assert [p.name for p in out.iterdir()] == ["topcow_mr_001"]
    # Labels outside TopCoW's classes.
    bad = _to_topcow(case.segments)
    bad[bad == 1] = 13
    io.save_image(labels / "topcow_mr_002.nii.gz", bad, case.affine)
    assert topcow.main([str(images), str(labels), str(out)]) == 2
    assert "are not TopCoW classes" in capsys.readouterr().err
