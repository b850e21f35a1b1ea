"""benchmarks/render_labels.py draws case folders from their labels, on the grid it says."""

import numpy as np

from cowjax import anatomy
from cowjax.data import io
from conftest import benchmark_module


def test_cases_drawn_from_their_labels(tmp_path):
    render = benchmark_module("render_labels")
    benchmark_module("heldout_mra").main([str(tmp_path / "src"), "--num", "1", "--seed", "3",
                                 "--spacing", "2,2,2"])
    source = io.load_case(io.list_cases(tmp_path / "src")[0])
    for style in ("binary", "soft"):
        assert render.main([str(tmp_path / "src"), str(tmp_path / style), "--style", style]) == 0
        drawn = io.load_case(io.list_cases(tmp_path / style)[0])
        np.testing.assert_allclose(drawn.affine, source.affine)
        np.testing.assert_allclose(drawn.landmarks, source.landmarks, atol=1e-4)
        np.testing.assert_array_equal(drawn.segments, source.segments)
        assert drawn.attributes == source.attributes
        circle = source.segments > 0
        if style == "binary":
            np.testing.assert_array_equal(drawn.image, circle.astype(np.float32))
        else:  # the lumen well above the flat, noisy background
            assert np.median(drawn.image[circle]) > np.median(drawn.image[~circle]) + 0.3
    assert render.main([str(tmp_path / "src"), str(tmp_path / "grown"), "--style", "binary",
                        "--labels", "vessels", "--dilate", "1"]) == 0
    grown = io.load_case(io.list_cases(tmp_path / "grown")[0]).image > 0
    assert np.all(grown[source.vessels > 0]) and grown.sum() > (source.vessels > 0).sum()


def test_topcow_grid_keeps_the_world():
    render = benchmark_module("render_labels")
    # Stored with the slice axis first and turned, 1.2 x 1.0 x 1.0 mm voxels.
    affine = np.array([[0.0, 0.0, -1.0, 20.0], [0.0, 1.0, 0.0, -5.0], [1.2, 0.0, 0.0, -30.0],
                       [0, 0, 0, 1]])
    segments = np.zeros((8, 12, 10), np.uint8)
    segments[2:5, 4:8, 3:6] = anatomy.SEGMENT_INDEX["BA"] + 1
    case = io.Case("c", segments.astype(np.float32), affine, np.zeros((anatomy.NUM_LANDMARKS, 3)),
                   vessels=(segments > 0).astype(np.uint8), segments=segments)
    drawn = render.render_case(case, "segments", "binary-topcow", dilate=0)
    np.testing.assert_allclose(np.linalg.norm(drawn.affine[:3, :3], axis=0), [0.6, 0.3, 0.3])
    assert drawn.image.shape == (15, 37, 31) == drawn.segments.shape == drawn.vessels.shape
    np.testing.assert_array_equal(drawn.image, drawn.segments > 0)

    def centre(volume, aff):
        return (aff[:3, :3] @ np.argwhere(volume).mean(axis=0)) + aff[:3, 3]
    np.testing.assert_allclose(centre(drawn.segments, drawn.affine), centre(segments, affine),
                               atol=0.31)  # half a new voxel at most


def test_missing_labels_one_line_no_output(tmp_path, capsys):
    render = benchmark_module("render_labels")
    benchmark_module("heldout_mra").main([str(tmp_path / "src"), "--num", "1", "--seed", "4",
                                 "--spacing", "2,2,2"])
    for f in (tmp_path / "src").glob("*/segments.nii.gz"):
        f.unlink()
    assert render.main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "heldout_s4_0000: no segments label file" in err[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
