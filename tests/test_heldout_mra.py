"""The independent held-out generator (benchmarks/heldout_mra.py) writes valid, consistent cases."""

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cowjax import anatomy
from cowjax.data import io
from conftest import benchmark_module


def test_heldout_case_on_disk_landmarks_inside_and_bright(tmp_path):
    mod = benchmark_module("heldout_mra")
    mod.main([str(tmp_path), "--num", "2", "--seed", "3", "--spacing", "2,2,2"])
    dirs = io.list_cases(tmp_path)
    assert len(dirs) == 2
    for d in dirs:
        case = io.load_case(d)
        assert case.image.ndim == 3 and np.all(np.isfinite(case.landmarks))
        assert set(case.attributes["segments"]) == set(anatomy.SEGMENTS)
        vox = (case.landmarks - case.affine[:3, 3]) @ np.linalg.inv(case.affine[:3, :3]).T
        shape = np.array(case.image.shape)
        assert np.all(vox >= 0) and np.all(vox <= shape - 1), "landmark outside the volume"
        bright = np.percentile(case.image, 97)
        for i, p in enumerate(np.round(vox).astype(int)):
            lo, hi = np.maximum(p - 1, 0), np.minimum(p + 2, shape)
            patch = case.image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            assert patch.max() > bright, f"{d.name}: {anatomy.LANDMARKS[i]} not on a bright voxel"
            assert case.vessels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()
    # Deterministic per (seed, index).
    a, _ = mod.generate_case(3, 1, (2.0, 2.0, 2.0))
    b = io.load_case(tmp_path / a.case_id)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-6)
    np.testing.assert_allclose(a.image, b.image, rtol=1e-5, atol=1e-3)
    # Landmarks written in RAS (declared in the Slicer file) read back as the same RAS points.
    mod._write_ras_mrk(tmp_path / "ras.mrk.json", a.landmarks)
    np.testing.assert_allclose(io.read_landmarks(tmp_path / "ras.mrk.json"), a.landmarks, atol=1e-9)


def test_appearance_figure_sets_a_real_image_beside_both_generators(tmp_path):
    """benchmarks/appearance.py: one column for the real image and one per generated case."""
    import matplotlib.image

    mod = benchmark_module("appearance")
    affine = np.diag([1.2, 1.2, 1.5, 1.0])
    affine[:3, 3] = [-20.0, -15.0, -10.0]
    image = np.random.default_rng(0).random((36, 30, 16)).astype(np.float32)
    io.save_image(tmp_path / "real.mha", image, affine)
    widths = []
    for cases in (1, 2):
        out = tmp_path / f"cases{cases}.png"
        assert mod.main([str(tmp_path / "real.mha"), str(out), "--cases", str(cases)]) == 0
        widths.append(matplotlib.image.imread(out).shape[1])
    assert 1.5 < widths[1] / widths[0] < 1.8           # 5 columns against 3
    assert mod.main([str(tmp_path / "missing.mha"), str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()


def test_a_whole_head_field_of_view_shows_the_same_subject():
    """``generate_case(fov_mm=...)``: the same landmarks, a RAS-aligned grid of that extent holding
    them, and the vessels they lie on drawn alike."""
    mod = benchmark_module("heldout_mra")
    spacing = (2.0, 2.0, 2.0)
    own, _ = mod.generate_case(5, 0, spacing)
    head, meta = mod.generate_case(5, 0, spacing, fov_mm=(160.0, 190.0, 140.0))
    np.testing.assert_array_equal(head.landmarks, own.landmarks)
    np.testing.assert_allclose(head.affine[:3, :3], np.diag(spacing))
    np.testing.assert_allclose((np.array(head.image.shape) - 1) * spacing, [160, 190, 140])
    vox = (head.landmarks - head.affine[:3, 3]) / spacing
    assert np.all(vox >= 0) and np.all(vox <= np.array(head.image.shape) - 1)
    assert head.image.size > own.image.size
    for case in (own, head):
        inv = np.linalg.inv(case.affine)
        p = np.round(case.landmarks @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        assert case.vessels[tuple(p.T)].mean() > 0.8      # landmarks on the drawn vessels


def test_field_of_view_benchmark_refuses_a_bad_box_in_one_line(capsys):
    mod = benchmark_module("field_of_view")
    for flag, value in (("--box", "44,38"), ("--below", "-5"), ("--below", "ten")):
        assert mod.main(["models/ready", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag}") and "\n" not in err


def test_a_slab_keeps_the_voxels_above_its_edge_where_they_were():
    """``field_of_view._slab`` on an oblique grid: what it keeps lies at or above the edge, every
    voxel above the edge is kept, at the same world position with the same value."""
    mod = benchmark_module("field_of_view")
    rng = np.random.default_rng(0)
    image = rng.uniform(1.0, 2.0, (20, 18, 16)).astype(np.float32)
    turn = Rotation.from_euler("xyz", [8, -5, 12], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = turn * [0.6, 0.6, 0.8], [-5.0, 3.0, -4.0]
    edge = (affine @ [10, 9, 8, 1])[2]                     # through the middle voxel
    slab, moved = mod._slab(image, affine, edge)

    def world(shape, a):
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        return ijk @ a[:3, :3].T + a[:3, 3]

    assert slab.size < image.size and np.all(world(slab.shape, moved)[slab > 0][:, 2] >= edge)
    kept = image[world(image.shape, affine)[..., 2] >= edge]
    np.testing.assert_array_equal(np.sort(slab[slab > 0]), np.sort(kept))
    ijk = np.argwhere(slab > 0)
    source = np.linalg.solve(affine[:3, :3], (ijk @ moved[:3, :3].T + moved[:3, 3]
                                              - affine[:3, 3]).T).T
    np.testing.assert_array_equal(image[tuple(np.round(source).astype(int).T)], slab[slab > 0])


def test_real_crop_landmarks_are_circle_junctions_and_a_missing_image_is_one_line(tmp_path, capsys):
    """benchmarks/real_crop.py: the placed landmarks are cow19 junctions (bifurcations whatever
    the variant) of a crop of the circle; a missing image is refused before any model loads."""
    mod = benchmark_module("real_crop")
    names, world = mod.read_truth()
    assert len(set(names)) == len(names) == 9 and set(names) <= set(anatomy.LANDMARKS)
    assert not any(n.startswith(("M2_end", "A2_end", "P2_end")) for n in names)
    assert np.ptp(world, axis=0).max() < 44.0          # all inside a 44 x 38 x 21 mm crop
    assert mod.main(["models/ready", "--image", str(tmp_path / "none.mha")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "none.mha" in err and "\n" not in err


def test_real_crop_perturbations_keep_the_anatomy_where_their_world_puts_it():
    """benchmarks/real_crop.py --perturb: in every view (turned, resampled, re-contrasted, noised,
    cut) a bright blob is found where the view's ``turn`` puts it, through the view's affine; a
    wrong grid centre, cut origin or turn direction moves it by millimetres."""
    mod = benchmark_module("real_crop")
    turn = Rotation.from_euler("xyz", [4, -3, 6], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = turn * [0.3, 0.3, 0.6], [-12.0, -10.0, -9.0]
    shape = (80, 70, 36)
    blob = np.array([41.0, 33.0, 19.0])                    # voxel, away from every cut
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d2 = (((ijk - blob) * [0.3, 0.3, 0.6]) ** 2).sum(-1)
    rng = np.random.default_rng(1)
    image = (100 + 1000 * np.exp(-d2 / (2 * 1.2 ** 2)) + rng.normal(0, 5, shape)).astype(np.float32)
    world = affine[:3, :3] @ blob + affine[:3, 3]
    views = list(mod.perturbations(image, affine, world + [3.0, -2.0, 1.0]))
    assert len({label for label, *_ in views}) == len(views) >= 10
    for label, im, af, view_turn in views:
        smooth = ndimage.gaussian_filter(im.astype(np.float64), 1.0)
        peak = np.array(np.unravel_index(np.argmax(smooth), im.shape), np.float64)
        found = af[:3, :3] @ peak + af[:3, 3]
        expected = view_turn[:3, :3] @ world + view_turn[:3, 3]
        assert np.linalg.norm(found - expected) < 0.7, label


def test_a_turn_about_r_lifts_the_front_about_the_centre_and_bad_turns_are_one_line(capsys):
    """The benchmarks' turn (real_crop.turn_about, field_of_view.py --turn): a positive turn about
    R lifts what lies anterior of the centre and keeps the centre; --turn with the whole-head views
    is refused before any model loads."""
    mod = benchmark_module("field_of_view")
    centre = np.array([3.0, -4.0, 10.0])
    turn = benchmark_module("real_crop").turn_about(0, 15.0, centre)
    front = turn[:3, :3] @ (centre + [0, 10, 0]) + turn[:3, 3]
    np.testing.assert_allclose(turn[:3, :3] @ centre + turn[:3, 3], centre, atol=1e-12)
    np.testing.assert_allclose(front - centre, [0, 10 * np.cos(np.pi / 12), 10 * np.sin(np.pi / 12)],
                               atol=1e-12)
    for bad in (["--turn", "15", "--whole-head"], ["--turn", "x"]):
        assert mod.main(["models/ready", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --turn") and "\n" not in err
