"""
A simulated annotator: answers label requests from ground truth, late and sometimes wrong.

The shift suite runs it in-process against the frames' labels; `mmtta_ros.tools.annotator`
wraps it in a ROS process that reads the bag's labels topic. Time is counted in ticks
(frames in the suite, requests in the tool): an answer asked at tick t comes out of
`tick()` at tick t + delay.
"""

from collections import deque, OrderedDict
from typing import Any, Deque, List, Optional, Tuple

import numpy as np
from scipy.spatial import cKDTree

from mmtta_ros.core.classes import CLASS_NAMES, IGNORE_INDEX
from mmtta_ros.core.decode import labels_from_message
from mmtta_ros.core.labels import LabelAnswer, LabelRequest
from mmtta_ros.sensors.pointcloud import cloud_to_numpy
from mmtta_ros.sensors.stamps import stamp_to_ns


def truth_at(points_lidar: np.ndarray, sweep_points_lidar: np.ndarray,
             sweep_labels: np.ndarray, tolerance_m: float = 1e-3) -> np.ndarray:
    """
    Return <np.int64: K> the label of each query point's nearest sweep point.

    points_lidar: <float32: K, 3> query points; sweep_points_lidar: <float32: N, 3>;
    sweep_labels: <int: N>. IGNORE_INDEX where the nearest point is farther than
    `tolerance_m` (the request is not about this sweep's points).
    """
    if len(sweep_points_lidar) == 0:
        return np.full(len(points_lidar), IGNORE_INDEX, dtype=np.int64)
    distance, index = cKDTree(sweep_points_lidar).query(points_lidar, k=1)
    labels = np.asarray(sweep_labels, dtype=np.int64)[np.minimum(index, len(sweep_labels) - 1)]
    return np.where(distance <= tolerance_m, labels, IGNORE_INDEX)


class SimulatedAnnotator:
    """
    Answer each request `delay` ticks later with the true labels, a share of them wrong.

    delay:      ticks between a request and its answer (0: out of the next tick)
    error_rate: probability that a point's answer is another class, uniformly chosen
    num_classes: classes an error can pick from
    seed:       of the errors
    Points whose truth is unknown (IGNORE_INDEX) are not answered; a request with no
    known point gets no answer.
    """

    def __init__(self, *, delay: int = 0, error_rate: float = 0.0,
                 num_classes: int = len(CLASS_NAMES), seed: int = 0):
        if delay < 0 or not 0.0 <= error_rate <= 1.0 or num_classes < 2:
            raise ValueError(f'annotator: need delay >= 0, error_rate in [0, 1] and at least '
                             f'2 classes; got {delay}, {error_rate}, {num_classes}')
        self.delay = int(delay)
        self.error_rate = float(error_rate)
        self.num_classes = int(num_classes)
        self._rng = np.random.default_rng(seed)
        self._now = 0
        self._queue: Deque[Tuple[int, LabelAnswer]] = deque()
        self.asked = 0          # requests received
        self.answered = 0       # answers given
        self.points_answered = 0
        self.points_wrong = 0

    def ask(self, request: LabelRequest, truth: np.ndarray) -> None:
        """Queue an answer to `request`; truth: <int: K> true label of each requested point."""
        truth = np.asarray(truth, dtype=np.int64)
        if truth.shape != (request.points_lidar.shape[0],):
            raise ValueError(f'annotator: {truth.shape[0]} labels for '
                             f'{request.points_lidar.shape[0]} requested points')
        self.asked += 1
        known = (truth >= 0) & (truth < self.num_classes)
        if not known.any():
            return
        labels = truth[known].copy()
        wrong = self._rng.random(labels.size) < self.error_rate
        # A wrong answer is any other class: shift by 1..C-1 (mod C).
        labels[wrong] = (labels[wrong] + self._rng.integers(
            1, self.num_classes, size=int(wrong.sum()))) % self.num_classes
        self.points_wrong += int(wrong.sum())
        answer = LabelAnswer(request.stamp_ns, request.points_lidar[known], labels,
                             request.frame_id)
        self._queue.append((self._now + self.delay, answer))

    def tick(self) -> List[LabelAnswer]:
        """Return the answers due now, then advance one tick."""
        due = []
        while self._queue and self._queue[0][0] <= self._now:
            due.append(self._queue.popleft()[1])
        self._now += 1
        self.answered += len(due)
        self.points_answered += sum(answer.labels.size for answer in due)
        return due


class SweepTruth:
    """
    Ground truth of the recent sweeps of a LiDAR topic and its labels topic, by stamp.

    The labels topic (bags/topics.py) is aligned point for point with the LiDAR cloud of
    the same stamp, so both are kept (the last `history` of each) and joined on demand.
    """

    def __init__(self, history: int = 50):
        self.history = int(history)
        self._clouds: 'OrderedDict[int, Any]' = OrderedDict()
        self._labels: 'OrderedDict[int, Any]' = OrderedDict()

    def add_cloud(self, msg) -> None:
        """Keep a LiDAR PointCloud2 (decoded now: its points, and which were finite)."""
        self._keep(self._clouds, stamp_to_ns(msg.header.stamp), cloud_to_numpy(msg, fields=[]))

    def add_labels(self, msg) -> None:
        """Keep a labels-topic PointCloud2 (decoded when asked, with its cloud's mask)."""
        self._keep(self._labels, stamp_to_ns(msg.header.stamp), msg)

    def _keep(self, store: OrderedDict, stamp_ns: int, value: Any) -> None:
        store[stamp_ns] = value
        store.move_to_end(stamp_ns)
        while len(store) > self.history:
            store.popitem(last=False)

    def labels_for(self, request: LabelRequest, tolerance_m: float = 1e-3
                   ) -> Optional[np.ndarray]:
        """Return <np.int64: K> the true label of each requested point, None if unknown."""
        cloud = self._clouds.get(request.stamp_ns)
        labels_msg = self._labels.get(request.stamp_ns)
        if cloud is None or labels_msg is None:
            return None
        labels = labels_from_message(labels_msg, cloud.valid_mask)
        return truth_at(request.points_lidar, cloud.points, labels, tolerance_m)
