"""
Labels only if required (LabOR, Shin et al., ICCV 2021) in the live loop: ask, match, learn.

Requests: on every `request_every`-th labeled frame, up to `budget` of its in-view points
are asked for, chosen one of three ways (`select_points`):

- point (LabOR's PPL): the uncertain set is where the 2D and the 3D branch disagree
  (LabOR's inconsistent mask; its two classifiers are here the two modalities); per class
  of the 2D+3D prediction, the prototype is the mean feature of the class's uncertain
  points, and the points nearest their class's prototype are asked, classes taking turns
  (LabOR asks one point per class and image). When fewer points disagree than the budget,
  the least confident agreeing points join the uncertain set.
- segment (LabOR's SPL): the disagreement region itself, least confident first.
- random: uniformly among the in-view points (the control: is the selection worth it?).

Answers: points (x, y, z in the LiDAR frame, label) stamped like the sweep they answer.
`LabelLoop.answer` matches an answer to a remembered requested sweep by stamp (within
`stamp_tolerance_s`), each point to the sweep's nearest in-view point (within
`distance_tolerance_m`), and hands what matched to the pipeline, which adds it to the
method's label replay (tta/supervision.py): a supervised step after every adaptation step.
What does not match is rejected, counted by reason. ROS-free: the node and the shift
suite drive the same object.
"""

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np
from scipy.spatial import cKDTree

from mmtta_ros.core.classes import CLASS_NAMES
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.params import LabelParams
from mmtta_ros.sensors.pointcloud import (
    cloud_to_numpy, CloudLayout, FLOAT32, LabeledCloudBuffer, PointFieldSpec, UINT16, UINT8)
from mmtta_ros.sensors.stamps import stamp_to_ns

MODES = ('none', 'point', 'segment', 'random')
# `reason` of a requested point (the request cloud's reason field).
REASONS = {'disagreement': 1, 'prototype': 2, 'random': 3, 'low_confidence': 4}
# Why a whole answer is refused (counted as label_answers_rejected_<reason>).
ANSWER_REJECTIONS = ('no_recent_sweep', 'no_point_matched', 'malformed')
# Why an answered point is dropped (counted as label_points_rejected_<reason>).
POINT_REJECTIONS = ('distance', 'label')
# ~/output/label_requests: the requested points and why (REASONS), in the sweep's frame.
REQUEST_LAYOUT = CloudLayout((PointFieldSpec('x', 0, FLOAT32), PointFieldSpec('y', 4, FLOAT32),
                              PointFieldSpec('z', 8, FLOAT32),
                              PointFieldSpec('reason', 12, UINT8)), 16)
# ~/input/point_labels as the simulated annotator writes it (any integer `label` field
# and any other layout with x, y, z is read as well).
ANSWER_LAYOUT = CloudLayout((PointFieldSpec('x', 0, FLOAT32), PointFieldSpec('y', 4, FLOAT32),
                             PointFieldSpec('z', 8, FLOAT32),
                             PointFieldSpec('label', 12, UINT16)), 16)


@dataclass
class LabelRequest:
    """
    The points of one sweep the node asks labels for.

    stamp_ns:     the sweep's stamp (an answer carries it back)
    frame_id:     the sweep's frame (the points are in it)
    point_index:  <np.int64: K> indices into the sweep's points (frame.points_lidar);
                  -1 in a request read from a message (request_from_cloud)
    points_lidar: <np.float32: K, 3> their x, y, z in the LiDAR frame, metres
    reason:       <np.uint8: K> why each was asked (REASONS)
    pixels:       <np.float32: K, 2> (u, v) in the frame's image (to mark the overlay);
                  NaN in a request read from a message
    """

    stamp_ns: int
    frame_id: str
    point_index: np.ndarray
    points_lidar: np.ndarray
    reason: np.ndarray
    pixels: np.ndarray


@dataclass
class LabelAnswer:
    """
    Labeled points of one sweep.

    stamp_ns:     the stamp of the sweep they belong to
    points_lidar: <np.float32: K, 3> x, y, z in the LiDAR frame, metres
    labels:       <np.int64: K> class index into CLASS_NAMES
    frame_id:     the sweep's frame (what an answer message's header says)
    """

    stamp_ns: int
    points_lidar: np.ndarray
    labels: np.ndarray
    frame_id: str = ''

    def __post_init__(self):
        self.points_lidar = np.asarray(self.points_lidar, dtype=np.float32)
        self.labels = np.asarray(self.labels)
        if self.points_lidar.ndim != 2 or self.points_lidar.shape[1] != 3:
            raise SensorDataError(f'answer points must be (K, 3), got {self.points_lidar.shape}')
        if self.labels.shape != (self.points_lidar.shape[0],):
            raise SensorDataError(f'answer has {self.points_lidar.shape[0]} points but '
                                  f'labels of shape {self.labels.shape}')
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise SensorDataError(f'answer labels must be integers, got {self.labels.dtype}')
        self.labels = self.labels.astype(np.int64)


def _cloud(layout: CloudLayout, points_lidar: np.ndarray, name: str, values: np.ndarray
           ) -> LabeledCloudBuffer:
    records = np.zeros(points_lidar.shape[0], dtype=layout.dtype())
    for axis, coordinate in enumerate('xyz'):
        records[coordinate] = points_lidar[:, axis]
    records[name] = values
    return LabeledCloudBuffer(data=array('B', records.tobytes()), width=records.shape[0],
                              fields=layout.fields, point_step=layout.point_step)


def request_cloud(request: LabelRequest) -> LabeledCloudBuffer:
    """Return the PointCloud2 payload (REQUEST_LAYOUT) of a request."""
    return _cloud(REQUEST_LAYOUT, request.points_lidar, 'reason', request.reason)


def answer_cloud(answer: LabelAnswer) -> LabeledCloudBuffer:
    """Return the PointCloud2 payload (ANSWER_LAYOUT) of an answer."""
    return _cloud(ANSWER_LAYOUT, answer.points_lidar, 'label', answer.labels)


def answer_from_cloud(msg) -> LabelAnswer:
    """Decode a point-labels PointCloud2 (x, y, z, integer label); SensorDataError if bad."""
    cloud = cloud_to_numpy(msg, fields=['label'])
    labels = cloud.fields['label']
    if labels.ndim != 1:
        raise SensorDataError('point labels: the label field must have count 1')
    return LabelAnswer(stamp_to_ns(msg.header.stamp), cloud.points, labels,
                       str(msg.header.frame_id))


def request_from_cloud(msg) -> LabelRequest:
    """Decode a label-request PointCloud2 (what an annotator reads); no indices, pixels."""
    cloud = cloud_to_numpy(msg, fields=['reason'])
    count = cloud.points.shape[0]
    return LabelRequest(stamp_to_ns(msg.header.stamp), str(msg.header.frame_id),
                        np.full(count, -1, np.int64), np.array(cloud.points, np.float32),
                        np.asarray(cloud.fields['reason'], np.uint8),
                        np.full((count, 2), np.nan, np.float32))


# --- selection (pure numpy; rows index the M in-view points of a FrameOutput) ------------

def uncertain_rows(prediction_2d: np.ndarray, prediction_3d: np.ndarray,
                   confidence: np.ndarray, at_least: int = 0) -> np.ndarray:
    """
    Return <np.int64: U> rows where the 2D and 3D classes differ, plus fill-up.

    When fewer than `at_least` rows disagree, the least confident agreeing rows are
    appended until there are `at_least` (or every row is in).
    """
    disagree = prediction_2d != prediction_3d
    rows = np.flatnonzero(disagree)
    missing = at_least - rows.size
    if missing > 0:
        agree = np.flatnonzero(~disagree)
        order = np.argsort(confidence[agree], kind='stable')[:missing]
        rows = np.concatenate([rows, agree[order]])
    return rows


def prototype_rows(features: np.ndarray, classes: np.ndarray, candidates: np.ndarray,
                   budget: int) -> np.ndarray:
    """
    Return up to `budget` rows of `candidates` nearest their class prototype (LabOR PPL).

    features: <float32: M, F>; classes: <int64: M> class per row; candidates: <int64: U>.
    Prototype of class c = mean feature of the candidates of class c. Classes take turns
    (the nearest of every class, then the second nearest, ...); within a turn the class
    with more candidates goes first.
    """
    if candidates.size == 0 or budget <= 0:
        return np.zeros(0, dtype=np.int64)
    feats = features[candidates].astype(np.float64)
    cls = classes[candidates]
    _, cls, counts = np.unique(cls, return_inverse=True, return_counts=True)
    sums = np.zeros((counts.size, feats.shape[1]))
    np.add.at(sums, cls, feats)
    prototypes = sums / counts[:, None]
    distance = np.linalg.norm(feats - prototypes[cls], axis=1)
    by_class = np.lexsort((distance, cls))  # class by class, nearest first
    sorted_cls = cls[by_class]
    rank = np.arange(by_class.size) - np.searchsorted(sorted_cls, sorted_cls)
    turns = np.lexsort((-counts[sorted_cls], rank))
    return candidates[by_class[turns[:budget]]]


def select_points(mode: str, budget: int, prediction_2d: np.ndarray,
                  prediction_3d: np.ndarray, prediction: np.ndarray, confidence: np.ndarray,
                  features: Optional[np.ndarray] = None,
                  rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return (<np.int64: K> rows to ask, <np.uint8: K> reason per row), K <= budget.

    prediction_2d / prediction_3d / prediction: <int64: M> classes of the in-view points
    (2D, 3D, 2D+3D); confidence: <float32: M> of `prediction`; features: <float32: M, F>
    (point mode only); rng: random mode only.
    """
    if mode == 'point':
        if features is None:
            raise ValueError('point selection needs per-point features')
        candidates = uncertain_rows(prediction_2d, prediction_3d, confidence, budget)
        rows = prototype_rows(features, prediction, candidates, budget)
        reason = np.full(rows.size, REASONS['prototype'], np.uint8)
    elif mode == 'segment':
        region = np.flatnonzero(prediction_2d != prediction_3d)
        rows = region[np.argsort(confidence[region], kind='stable')[:budget]]
        reason = np.full(rows.size, REASONS['disagreement'], np.uint8)
    elif mode == 'random':
        rng = np.random.default_rng() if rng is None else rng
        count = min(budget, prediction.size)
        rows = np.sort(rng.choice(prediction.size, size=count, replace=False)).astype(np.int64)
        reason = np.full(rows.size, REASONS['random'], np.uint8)
    else:
        raise ValueError(f'label selection mode must be one of {MODES[1:]}, got {mode!r}')
    return rows.astype(np.int64), reason


# --- the loop: requests out, answers in ---------------------------------------------------

@dataclass
class _Sweep:
    frame: Any
    in_view_index: np.ndarray  # <int64: M> sweep point index of each in-view row
    tree: Optional[cKDTree] = None

    def nearest(self, points_lidar: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if self.tree is None:
            self.tree = cKDTree(self.frame.points_lidar[self.in_view_index])
        distance, rows = self.tree.query(points_lidar, k=1)
        return distance, rows


@dataclass
class AnswerOutcome:
    """What became of one answer: points used (0 if rejected) and the reason if rejected."""

    accepted_points: int = 0
    rejected: Optional[str] = None
    dropped: Dict[str, int] = field(default_factory=dict)


class LabelLoop:
    """
    Ask for labels on the pipeline's outputs and feed the answers back; thread-safe.

    pipeline:    what answers go to: anything with `add_supervision(frame, point_index,
                 labels)` (core.pipeline.Pipeline, core.realtime.SplitPipeline)
    num_classes: labels outside 0..num_classes-1 are dropped
    """

    def __init__(self, params: LabelParams, pipeline, num_classes: int = len(CLASS_NAMES)):
        if not params.enabled:
            raise ValueError('LabelLoop needs labels.mode point, segment or random')
        self.params = params
        self.pipeline = pipeline
        self.num_classes = int(num_classes)
        self._rng = np.random.default_rng(params.seed)
        self._lock = threading.Lock()
        self._sweeps: 'OrderedDict[int, _Sweep]' = OrderedDict()
        self._frames_seen = 0
        self._counters = {name: 0 for name in (
            'label_requests', 'label_points_requested', 'label_answers',
            'label_answers_accepted', 'label_points_accepted', 'label_answers_rejected',
            *(f'label_answers_rejected_{r}' for r in ANSWER_REJECTIONS),
            *(f'label_points_rejected_{r}' for r in POINT_REJECTIONS))}

    def request(self, output) -> Optional[LabelRequest]:
        """Return the request for a FrameOutput (every request_every-th frame), else None."""
        with self._lock:
            due = self._frames_seen % self.params.request_every == 0
            self._frames_seen += 1
        if not due or output.prediction.size == 0:
            return None
        rows, reason = select_points(
            self.params.mode, self.params.budget, output.prediction_2d, output.prediction_3d,
            output.prediction, output.confidence, getattr(output, 'features', None),
            self._rng)
        if rows.size == 0:
            return None
        frame = output.frame
        in_view_index = np.flatnonzero(output.in_view)
        point_index = in_view_index[rows]
        request = LabelRequest(
            stamp_ns=int(frame.stamp_lidar_ns), frame_id=frame.lidar_frame_id,
            point_index=point_index, points_lidar=frame.points_lidar[point_index],
            reason=reason, pixels=output.pixels[rows])
        with self._lock:
            self._sweeps[request.stamp_ns] = _Sweep(frame, in_view_index)
            self._sweeps.move_to_end(request.stamp_ns)
            while len(self._sweeps) > self.params.history:
                self._sweeps.popitem(last=False)
            self._counters['label_requests'] += 1
            self._counters['label_points_requested'] += int(rows.size)
        return request

    def answer(self, answer: LabelAnswer) -> AnswerOutcome:
        """Match an answer to a requested sweep and hand its points to the pipeline."""
        with self._lock:
            self._counters['label_answers'] += 1
            sweep = self._find(answer.stamp_ns)
            if sweep is None:
                return self._reject('no_recent_sweep')
            distance, rows = sweep.nearest(answer.points_lidar)
        near = distance <= self.params.distance_tolerance_m
        known = (answer.labels >= 0) & (answer.labels < self.num_classes)
        keep = near & known
        dropped = {'distance': int(np.count_nonzero(~near)),
                   'label': int(np.count_nonzero(near & ~known))}
        point_index = sweep.in_view_index[rows[keep]]
        labels = answer.labels[keep]
        # One label per sweep point: of points answered twice, the later answer wins.
        _, last = np.unique(point_index[::-1], return_index=True)
        pick = np.sort(point_index.size - 1 - last)  # in the answer's order
        point_index, labels = point_index[pick], labels[pick]
        with self._lock:
            for reason, count in dropped.items():
                self._counters[f'label_points_rejected_{reason}'] += count
            if point_index.size == 0:
                outcome = self._reject('no_point_matched')
                outcome.dropped = dropped
                return outcome
            self._counters['label_answers_accepted'] += 1
            self._counters['label_points_accepted'] += int(point_index.size)
        self.pipeline.add_supervision(sweep.frame, point_index, labels)
        return AnswerOutcome(int(point_index.size), None, dropped)

    def malformed(self) -> None:
        """Count an answer that could not be decoded at all."""
        with self._lock:
            self._counters['label_answers'] += 1
            self._reject('malformed')

    def _find(self, stamp_ns: int) -> Optional[_Sweep]:
        if stamp_ns in self._sweeps:
            return self._sweeps[stamp_ns]
        tolerance = int(round(self.params.stamp_tolerance_s * 1e9))
        best = min(self._sweeps, key=lambda stamp: abs(stamp - stamp_ns), default=None)
        if best is None or abs(best - stamp_ns) > tolerance:
            return None
        return self._sweeps[best]

    def _reject(self, reason: str) -> AnswerOutcome:
        self._counters['label_answers_rejected'] += 1
        self._counters[f'label_answers_rejected_{reason}'] += 1
        return AnswerOutcome(0, reason)

    def counters(self) -> Dict[str, int]:
        """Return the request and answer figures by name (for /diagnostics and the suite)."""
        with self._lock:
            return dict(self._counters)
