"""cowjax.data.synthetic: landmarks on vessels, labels match attributes, world coordinates honour the
affine in any storage orientation, determinism, and the command line."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cowjax import anatomy
from cowjax.data import io, synthetic
from cowjax.data.synthetic import subject

SEED = 3             # its first cases hold fetal, absent and hypoplastic variants, aneurysms, stenoses
SPACING = (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def cases():
    return [synthetic.generate_case(SEED, i, SPACING, pathology_fraction=0.5, return_info=True)
            for i in range(4)]


def _voxel(case, world):
    inv = np.linalg.inv(case.affine)
    return np.asarray(world) @ inv[:3, :3].T + inv[:3, 3]


def _ball_max(volume, affine, centre_vox, radius_mm):
    """Max of ``volume`` over voxels within ``radius_mm`` of a continuous voxel position."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    reach = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(np.floor(centre_vox).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre_vox).astype(int) + reach + 1, volume.shape)
    idx = np.indices(hi - lo).reshape(3, -1).T + lo
    mm = ((idx - centre_vox) @ affine[:3, :3].T)
    idx = idx[np.linalg.norm(mm, axis=1) <= radius_mm]
    return volume[tuple(idx.T)].max()


def test_fixture_covers_the_variation(cases):
    infos = [info for _, info in cases]
    kinds = {k for info in infos for k in info["variants"].values()}
    assert {"absent", "hypoplastic", "fetal"} <= kinds
    assert any(info["aneurysms"] for info in infos) and any(info["stenoses"] for info in infos)
    assert any(info["orientation"] != "RAS" for info in infos)


def test_case_format(cases):
    for case, _ in cases:
        assert case.image.dtype == np.float32 and case.image.ndim == 3
        assert np.all(np.isfinite(case.image))
        assert case.landmarks.shape == (anatomy.NUM_LANDMARKS, 3)
        assert case.vessels.shape == case.segments.shape == case.image.shape
        assert case.segments.dtype == np.uint8 and case.segments.max() <= anatomy.NUM_SEGMENTS
        # Every labelled segment voxel is a vessel voxel.
        assert np.all(case.vessels[case.segments > 0] == 1)
        assert case.case_id.startswith("case_")


def test_landmarks_inside_the_volume(cases):
    for case, _ in cases:
        vox = _voxel(case, case.landmarks)
        assert np.all(vox >= 0) and np.all(vox <= np.array(case.image.shape) - 1)


def test_every_landmark_lies_on_a_bright_vessel(cases):
    for case, info in cases:
        ranked = np.sort(case.image.ravel())
        vox = _voxel(case, case.landmarks)
        for k, name in enumerate(anatomy.LANDMARKS):
            peak = _ball_max(case.image, case.affine, vox[k], 1.5)
            rank = np.searchsorted(ranked, peak) / ranked.size
            assert rank > 0.9, f"case {info['index']}: {name} not on a bright vessel (rank {rank:.3f})"
            assert _ball_max(case.vessels, case.affine, vox[k], 1.5) == 1, name


def test_attributes_match_the_drawn_vessels(cases):
    for case, info in cases:
        present = np.array([case.attributes["segments"][s] for s in anatomy.SEGMENTS])
        expected = anatomy.landmark_dict(anatomy.landmark_attributes(present))
        assert case.attributes["landmarks"] == expected
        vox = _voxel(case, case.landmarks)
        for j, seg in enumerate(anatomy.SEGMENTS):
            drawn = case.segments == j + 1
            assert drawn.any() == present[j], f"case {info['index']}: {seg}"
            assert present[j] == (info["radii_mm"][seg] >= anatomy.HYPOPLASTIC_RADIUS)
            if present[j]:
                # The segment's voxels reach both of its end landmarks (a thin branch's first own
                # voxels lie outside its parent's lumen, up to an ICA radius away).
                for end in anatomy.SEGMENT_ENDS[seg]:
                    if end != anatomy.VBJ:
                        k = anatomy.LANDMARK_INDEX[end]
                        assert _ball_max(drawn, case.affine, vox[k], 4.0), f"{seg} misses {end}"


def test_every_present_segment_keeps_voxels_on_a_coarse_grid():
    # At 3 mm the short ACoA and ICA_C7 sit inside their wider neighbours' voxels.
    for i in range(6):
        case = synthetic.generate_case(99, i, (3.0, 3.0, 3.0))
        for j, seg in enumerate(anatomy.SEGMENTS):
            assert (case.segments == j + 1).any() == case.attributes["segments"][seg], (i, seg)


def test_aneurysms_are_vessel_voxels(cases):
    found = 0
    for case, info in cases:
        for a in info["aneurysms"]:
            centre = _voxel(case, a["centre_world"])
            assert _ball_max(case.vessels, case.affine, centre, 1.0) == 1
            found += 1
    assert found


def test_same_subject_in_any_orientation_has_the_same_world_content():
    stored = {codes: synthetic.generate_case(SEED, 7, (1.5, 1.5, 1.5), orientation=codes)
              for codes in [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R")]}
    ras = stored[("R", "A", "S")]
    for codes, case in stored.items():
        np.testing.assert_array_equal(case.landmarks, ras.landmarks)
        assert nib.orientations.aff2axcodes(case.affine) == codes
        values = [ndimage.map_coordinates(c.image, _voxel(c, c.landmarks).T, order=1) for c in (ras, case)]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-5)
        (back, back_seg), affine = synthetic.reorient([case.image, case.segments], case.affine, ("R", "A", "S"))
        np.testing.assert_allclose(affine, ras.affine, atol=1e-9)
        assert back.tobytes() == ras.image.tobytes() and back_seg.tobytes() == ras.segments.tobytes()
    assert not np.array_equal(stored[("L", "P", "S")].affine, ras.affine)


def test_deterministic_per_seed_and_index():
    a = synthetic.generate_case(11, 2, (2.0, 2.0, 2.0))
    b = synthetic.generate_case(11, 2, (2.0, 2.0, 2.0))
    for x, y in [(a.image, b.image), (a.segments, b.segments), (a.vessels, b.vessels), (a.affine, b.affine)]:
        assert x.tobytes() == y.tobytes()
    assert a.attributes == b.attributes
    c = synthetic.generate_case(11, 3, (2.0, 2.0, 2.0))
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert not np.allclose(c.landmarks, a.landmarks)


def test_cortex_adds_unlabelled_branches_inside_the_brain_and_changes_nothing_else():
    """``cortex=True``: the same subject, pose and grid, the segment labels untouched, more vessel
    voxels (beyond the segments); the branches unlabelled, at least 0.25 mm, ending inside the
    brain."""
    from cowjax.data.synthetic import vessels
    for index in range(2):
        plain = synthetic.generate_case(SEED, index, SPACING)
        rich = synthetic.generate_case(SEED, index, SPACING, cortex=True)
        np.testing.assert_array_equal(rich.landmarks, plain.landmarks)
        np.testing.assert_array_equal(rich.affine, plain.affine)
        assert rich.attributes == plain.attributes
        # A thin branch may cross a segment's edge voxel: the labels stay all but equal.
        assert np.mean(rich.segments != plain.segments) < 1e-4
        added = (rich.vessels > 0) & (plain.vessels == 0)
        assert added.sum() > 0.1 * (plain.vessels > 0).sum()
        assert not (added & (rich.segments > 0)).any()

    streams = np.random.SeedSequence([SEED, 0]).spawn(7)
    r_anat, r_tree, r_cortex = (np.random.default_rng(streams[i]) for i in (0, 2, 6))
    radius, kind = subject.sample_variants(r_anat)
    tree = vessels.build_tree(r_tree, subject.sample_landmarks(r_anat), radius, kind, [])
    before = set(tree.vessels)
    vessels.grow_cortex(tree, r_cortex)
    new = {k: v for k, v in tree.vessels.items() if k not in before}
    assert len(new) >= 10
    for v in new.values():
        assert v["label"] == 0 and v["radius"][0] >= 0.25
        assert np.sum(((v["points"][-1] - vessels.BRAIN_CENTRE) / vessels.BRAIN_AXES) ** 2) <= 1.05


def test_no_pathology_when_the_fraction_is_zero():
    for i in range(3):
        _, info = synthetic.generate_case(2, i, (3.0, 3.0, 3.0), pathology_fraction=0.0, return_info=True)
        assert info["aneurysms"] == [] and info["stenoses"] == []


def test_variant_frequencies_follow_cow19():
    rng = np.random.default_rng(0)
    kinds = [subject.sample_variants(rng)[1] for _ in range(3000)]
    share = lambda cond: np.mean([cond(k) for k in kinds])          # noqa: E731
    small = ("absent", "hypoplastic")
    assert 0.38 < share(lambda k: k["PCoA_R"] in small) < 0.52
    assert 0.10 < share(lambda k: k["PCoA_L"] == "fetal") < 0.18
    assert 0.01 < share(lambda k: k["A1_R"] in small) < 0.10
    assert 0.03 < share(lambda k: k["ACoA"] == "absent") < 0.10
    # A fetal PCA always has its PCoA; an A1 deficit always has its ACoA.
    assert all(k["P1_R"] == "normal" or k["PCoA_R"] == "fetal" for k in kinds)
    assert all(k["ACoA"] != "absent" for k in kinds if k["A1_R"] != "normal" or k["A1_L"] != "normal")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cowjax.data.synthetic", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def test_cli_writes_complete_cases_equal_to_generate_case(tmp_path):
    # Four cases: on two or more cores they are made by worker processes.
    out = tmp_path / "set"
    run = _cli(out, "--num", 4, "--seed", 5, "--spacing", "2.5,2.5,2.5", "--preview", "--pathology", 1.0)
    assert run.returncode == 0, run.stderr
    assert "s per case" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"case_000{i}" for i in range(4)]  # no temp leftovers
    for name in ["image.nii.gz", "landmarks.mrk.json", "vessels.nii.gz", "segments.nii.gz",
                 "attributes.json", "preview.png"]:
        assert (out / "case_0003" / name).is_file(), name
    loaded = io.load_case(out / "case_0003")
    made = synthetic.generate_case(5, 3, (2.5, 2.5, 2.5), pathology_fraction=1.0)
    np.testing.assert_array_equal(loaded.image, made.image)
    np.testing.assert_allclose(loaded.affine, made.affine, atol=1e-5)
    np.testing.assert_allclose(loaded.landmarks, made.landmarks, atol=1e-4)
    np.testing.assert_array_equal(loaded.segments, made.segments)
    assert loaded.attributes == made.attributes


@pytest.mark.parametrize("args", [["--num", 0], ["--num", 1, "--spacing", "1,2"],
                                  ["--num", 1, "--spacing", "a,b,c"], ["--num", 1, "--seed", -1],
                                  ["--num", 1, "--pathology", 2], ["--num", "x"],
                                  ["--num", 1, "--spacing", "0.001,1,1"]])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args):
    try:
        code = synthetic.main([str(tmp_path / "x"), *map(str, args)])
    except SystemExit as e:                                          # argparse errors exit directly
        code = e.code
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "case_0000").exists()


def test_cli_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    run = _cli(tmp_path / "x", "--num", 1, "--spacing", "0,1,1")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: --spacing")
