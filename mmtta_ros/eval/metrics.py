"""
Confusion-matrix mIoU, as xMUDA scores segmentation (over in-view points, whole sequence).

IoU of a class = TP / (TP + FP + FN), accumulated over every frame before dividing, so a
class absent from one frame still counts through the others. A class that appears in
neither the ground truth nor the predictions of the whole run has no IoU (NaN) and is
left out of the mean; a class that is predicted but never present scores 0.
"""

from typing import Dict, Sequence

import numpy as np

from mmtta_ros.core.classes import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates <int64: C, C> counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        """Add <int: M> ground-truth labels and predictions; IGNORE_INDEX labels are skipped."""
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
        if labels.shape != predictions.shape:
            raise ValueError(
                f'labels {labels.shape} and predictions {predictions.shape} differ in length')
        keep = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < self.num_classes)
        labels, predictions = labels[keep], predictions[keep]
        if np.any((predictions < 0) | (predictions >= self.num_classes)):
            raise ValueError(f'predictions outside [0, {self.num_classes})')
        flat = labels * self.num_classes + predictions
        self.counts += np.bincount(flat, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class IoU <np.float64: C>; NaN for classes absent from labels and predictions."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that have one (NaN if none has)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float('nan')

    def accuracy(self) -> float:
        """Overall point accuracy."""
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float('nan')

    def report(self, class_names: Sequence[str]) -> Dict[str, object]:
        """Plain-type summary: mIoU, accuracy, per-class IoU (None where NaN), point count."""
        return {
            'miou': _none_if_nan(self.miou()),
            'accuracy': _none_if_nan(self.accuracy()),
            'iou': {name: _none_if_nan(v) for name, v in zip(class_names, self.iou())},
            'points': int(self.counts.sum()),
        }


def _none_if_nan(value: float):
    return None if np.isnan(value) else float(value)
