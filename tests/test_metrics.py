"""Metrics against values computed by hand."""

import numpy as np
import pytest

from cowjax import metrics

NAN = np.nan


def test_landmark_errors_and_mre_skip_unknown_truth():
    true = np.array([[[0, 0, 0], [1, 1, 1], [NAN, NAN, NAN]],
                     [[0, 0, 0], [0, 0, 0], [2, 0, 0]]], float)
    pred = np.array([[[3, 4, 0], [1, 1, 2], [9, 9, 9]],
                     [[0, 0, 0], [0, 6, 8], [2, 0, 1]]], float)
    err = metrics.landmark_errors(pred, true)
    np.testing.assert_allclose(err, [[5, 1, NAN], [0, 10, 1]])
    assert metrics.mre(err) == pytest.approx((5 + 1 + 0 + 10 + 1) / 5)
    np.testing.assert_allclose(metrics.mre(err, axis=0), [2.5, 5.5, 1.0])
    np.testing.assert_allclose(metrics.mre(err, axis=1), [3.0, 11 / 3])
    assert np.isnan(metrics.mre([NAN, NAN]))


def test_sdr_counts_known_errors_within_radius():
    err = np.array([0.5, 2.0, 2.4, 3.0, 5.0, NAN])
    assert metrics.sdr(err, 2.0) == pytest.approx(2 / 5)
    assert metrics.sdr(err, 2.5) == pytest.approx(3 / 5)
    assert metrics.sdr(err, 4.0) == pytest.approx(4 / 5)
    assert np.isnan(metrics.sdr([NAN], 2.0))


def test_dice_per_class():
    true = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    pred = np.array([0, 1, 1, 0, 2, 3, 3, 0])
    d = metrics.dice(pred, true, num_classes=5)
    # class 1: |P|=2 |T|=3 |P&T|=2 -> 4/5; class 2: 1,2,1 -> 2/3; class 3: 2,0,0 -> 0; class 4: absent.
    np.testing.assert_allclose(d, [0.8, 2 / 3, 0.0, NAN])
    with pytest.raises(ValueError, match="differ"):
        metrics.dice(pred[:3], true, num_classes=5)


def test_accuracy_with_mask():
    pred = np.array([True, False, True, True])
    true = np.array([True, True, False, True])
    assert metrics.accuracy(pred, true) == pytest.approx(0.5)
    assert metrics.accuracy(pred, true, mask=[True, True, False, False]) == pytest.approx(0.5)
    assert metrics.accuracy(pred, true, mask=[True, False, False, True]) == pytest.approx(1.0)
    assert np.isnan(metrics.accuracy(pred, true, mask=[False] * 4))
