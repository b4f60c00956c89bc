"""The confusion-matrix mIoU against hand-computed examples."""

import numpy as np
import pytest

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.eval.metrics import ConfusionMatrix


def test_miou_hand_computed_over_two_frames_with_absent_classes():
    matrix = ConfusionMatrix(4)
    # Frame 1: classes 0 and 1 only.  gt: 0 0 0 1 1  pred: 0 0 1 1 1
    matrix.update(np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 1]))
    # Frame 2: class 2 only, one point predicted as 0; an ignored point predicted as 3.
    matrix.update(np.array([2, 2, IGNORE_INDEX]), np.array([2, 0, 3]))
    # class 0: TP 2, FP 1 (frame 2), FN 1 -> 2/4.  class 1: TP 2, FP 1, FN 0 -> 2/3.
    # class 2: TP 1, FP 0, FN 1 -> 1/2.  class 3: never present nor predicted -> NaN.
    iou = matrix.iou()
    np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 0.5])
    assert np.isnan(iou[3])
    assert matrix.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert matrix.accuracy() == pytest.approx(5 / 7)
    report = matrix.report(['a', 'b', 'c', 'd'])
    assert report['iou']['d'] is None and report['points'] == 7


def test_predicted_but_absent_class_scores_zero():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([0, 0]), np.array([0, 2]))
    np.testing.assert_allclose(matrix.iou(), [0.5, np.nan, 0.0])
    assert matrix.miou() == pytest.approx(0.25)


def test_empty_and_bad_inputs():
    matrix = ConfusionMatrix(2)
    matrix.update(np.zeros(0, int), np.zeros(0, int))
    assert np.isnan(matrix.miou())
    with pytest.raises(ValueError, match='differ'):
        matrix.update(np.zeros(2, int), np.zeros(3, int))
    with pytest.raises(ValueError, match='outside'):
        matrix.update(np.zeros(1, int), np.array([5]))
