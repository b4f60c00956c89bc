"""Label requests and answers (core/labels.py, core/annotator.py) on generated data."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmtta_ros.core.annotator import SimulatedAnnotator, SweepTruth, truth_at
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.core.labels import (
    answer_cloud, answer_from_cloud, LabelAnswer, LabelLoop, LabelRequest, prototype_rows,
    REASONS, request_cloud, request_from_cloud, select_points, uncertain_rows)
from mmtta_ros.core.params import LabelParams, node_params
from mmtta_ros.sensors.pointcloud import cloud_to_numpy


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------

def test_uncertain_rows_are_the_disagreement_then_the_least_confident():
    pred_2d = np.array([0, 1, 2, 2, 1, 0])
    pred_3d = np.array([0, 1, 1, 2, 1, 3])
    confidence = np.array([0.9, 0.2, 0.5, 0.4, 0.8, 0.1], np.float32)
    assert uncertain_rows(pred_2d, pred_3d, confidence).tolist() == [2, 5]
    # Budget 4: two disagree; the two least confident agreeing rows (1, then 3) join.
    assert uncertain_rows(pred_2d, pred_3d, confidence, at_least=4).tolist() == [2, 5, 1, 3]
    assert sorted(uncertain_rows(pred_2d, pred_3d, confidence, at_least=99)) == list(range(6))


def test_prototype_rows_pick_the_points_nearest_each_class_mean_classes_in_turn():
    # Class 0: four candidates at x = 0, 1, 2, 9 (mean 3: nearest is x = 2, then 1, 0).
    # Class 1: two candidates at y = 10, 12 (mean 11: a tie, the first wins by order).
    features = np.array([[0, 0], [1, 0], [2, 0], [9, 0], [0, 10], [0, 12], [5, 5]],
                        np.float32)
    classes = np.array([0, 0, 0, 0, 1, 1, 0])
    candidates = np.arange(6)  # row 6 is not uncertain: it never counts
    # Turn 1: the bigger class first (class 0: row 2), then class 1 (row 4); turn 2: ...
    assert prototype_rows(features, classes, candidates, 6).tolist() == [2, 4, 1, 5, 0, 3]
    assert prototype_rows(features, classes, candidates, 3).tolist() == [2, 4, 1]
    assert prototype_rows(features, classes, np.zeros(0, np.int64), 3).size == 0


def test_prototype_rows_match_a_per_class_loop_on_random_data():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 5)).astype(np.float32)
    classes = rng.integers(0, 4, 300)
    candidates = np.sort(rng.choice(300, 120, replace=False))
    chosen = prototype_rows(features, classes, candidates, 4)
    # Budget 4 over the 4 classes: exactly the nearest candidate of each class.
    expected = set()
    for c in range(4):
        rows = candidates[classes[candidates] == c]
        prototype = features[rows].mean(axis=0)
        expected.add(int(rows[np.argmin(np.linalg.norm(features[rows] - prototype, axis=1))]))
    assert set(chosen.tolist()) == expected


def test_select_points_modes():
    rng = np.random.default_rng(1)
    m = 200
    pred_2d = rng.integers(0, 3, m)
    pred_3d = np.where(rng.random(m) < 0.2, (pred_2d + 1) % 3, pred_2d)
    prediction = pred_3d.copy()
    confidence = rng.random(m).astype(np.float32)
    features = rng.normal(size=(m, 4)).astype(np.float32)
    disagree = set(np.flatnonzero(pred_2d != pred_3d).tolist())
    args = (pred_2d, pred_3d, prediction, confidence)

    rows, reason = select_points('segment', 10, *args)
    assert len(rows) == 10 and set(rows.tolist()) <= disagree
    assert (reason == REASONS['disagreement']).all()
    # Least confident first: every disagreeing row left out is more confident.
    left = np.array(sorted(disagree - set(rows.tolist())))
    assert confidence[rows].max() <= confidence[left].min()

    rows, reason = select_points('point', 12, *args, features=features)
    assert len(rows) == 12 and set(rows.tolist()) <= disagree
    assert (reason == REASONS['prototype']).all()

    rows, reason = select_points('random', 30, *args, rng=np.random.default_rng(5))
    again, _ = select_points('random', 30, *args, rng=np.random.default_rng(5))
    assert len(set(rows.tolist())) == 30 and rows.max() < m and (rows == again).all()
    assert (reason == REASONS['random']).all()
    assert len(select_points('random', 10 * m, *args, rng=rng)[0]) == m

    with pytest.raises(ValueError, match='features'):
        select_points('point', 5, *args)
    with pytest.raises(ValueError, match='mode'):
        select_points('magic', 5, *args)


# --------------------------------------------------------------------------------------
# The loop: requests out, answers matched and handed to the pipeline
# --------------------------------------------------------------------------------------

class Recorder:
    """Stands in for the pipeline: records what add_supervision receives."""

    def __init__(self):
        self.calls = []

    def add_supervision(self, frame, point_index, labels):
        self.calls.append((frame, np.asarray(point_index), np.asarray(labels)))


def fake_output(stamp_ns, num_points=50, seed=0):
    """Return a FrameOutput-like object: every other point in view, 2D/3D disagreeing on some."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-20, 20, size=(num_points, 3)).astype(np.float32)
    frame = Frame(image=np.zeros((8, 8, 3), np.uint8), points_lidar=points, K=np.eye(3),
                  T_cam_from_lidar=np.eye(4), stamp_lidar_ns=stamp_ns,
                  labels=rng.integers(0, 6, num_points), lidar_frame_id='LIDAR_TOP')
    in_view = np.arange(num_points) % 2 == 0
    m = int(in_view.sum())
    pred_2d = rng.integers(0, 6, m)
    pred_3d = np.where(np.arange(m) % 3 == 0, (pred_2d + 1) % 6, pred_2d)
    return SimpleNamespace(
        frame=frame, in_view=in_view, prediction_2d=pred_2d, prediction_3d=pred_3d,
        prediction=pred_2d, confidence=rng.random(m).astype(np.float32),
        pixels=rng.uniform(0, 8, size=(m, 2)).astype(np.float32),
        features=rng.normal(size=(m, 3)).astype(np.float32))


def test_requests_every_nth_frame_on_in_view_points():
    params = LabelParams(mode='point', request_every=2, budget=5)
    loop = LabelLoop(params, Recorder())
    outputs = [fake_output(1000 + k, seed=k) for k in range(4)]
    requests = [loop.request(output) for output in outputs]
    assert [r is not None for r in requests] == [True, False, True, False]
    request, output = requests[0], outputs[0]
    assert request.stamp_ns == 1000 and request.frame_id == 'LIDAR_TOP'
    assert len(request.point_index) == 5 and output.in_view[request.point_index].all()
    np.testing.assert_array_equal(request.points_lidar,
                                  output.frame.points_lidar[request.point_index])
    # The pixels are those of the requested in-view points.
    rows = np.searchsorted(np.flatnonzero(output.in_view), request.point_index)
    np.testing.assert_array_equal(request.pixels, output.pixels[rows])
    counters = loop.counters()
    assert counters['label_requests'] == 2 and counters['label_points_requested'] == 10


def test_answers_are_matched_by_stamp_and_nearest_point_or_rejected_with_a_reason():
    params = LabelParams(mode='segment', budget=8, stamp_tolerance_s=0.002,
                         distance_tolerance_m=0.05, history=2)
    recorder = Recorder()
    loop = LabelLoop(params, recorder)
    output = fake_output(5_000_000_000)
    request = loop.request(output)
    labels = np.arange(len(request.point_index)) % 6
    # Within 1 ms of the sweep, points off by 1 cm: accepted, all of them.
    jitter = np.full_like(request.points_lidar, 0.01 / np.sqrt(3))
    outcome = loop.answer(LabelAnswer(request.stamp_ns + 1_000_000,
                                      request.points_lidar + jitter, labels))
    assert outcome.rejected is None and outcome.accepted_points == len(labels)
    frame, point_index, answered = recorder.calls[-1]
    assert frame is output.frame
    np.testing.assert_array_equal(point_index, request.point_index)
    np.testing.assert_array_equal(answered, labels)
    # 3 ms away: no recent sweep.
    outcome = loop.answer(LabelAnswer(request.stamp_ns + 3_000_000, request.points_lidar,
                                      labels))
    assert outcome.rejected == 'no_recent_sweep' and len(recorder.calls) == 1
    # A point 1 m off, a label out of range, a point answered twice (the later wins).
    points = request.points_lidar[:4].copy()
    points[0] += 1.0
    points[3] = points[2]
    outcome = loop.answer(LabelAnswer(request.stamp_ns, points, np.array([1, 7, 2, 4])))
    assert outcome.accepted_points == 1 and outcome.dropped == {'distance': 1, 'label': 1}
    assert recorder.calls[-1][1].tolist() == [request.point_index[2]]
    assert recorder.calls[-1][2].tolist() == [4]
    # Nothing usable: rejected as a whole.
    outcome = loop.answer(LabelAnswer(request.stamp_ns, points[:1], np.array([1])))
    assert outcome.rejected == 'no_point_matched'
    # Only the last `history` requested sweeps are remembered.
    loop.request(fake_output(6_000_000_000, seed=1))
    loop.request(fake_output(7_000_000_000, seed=2))
    assert loop.answer(LabelAnswer(request.stamp_ns, request.points_lidar,
                                   labels)).rejected == 'no_recent_sweep'
    loop.malformed()
    counters = loop.counters()
    assert counters['label_answers'] == 6 and counters['label_answers_accepted'] == 2
    assert counters['label_answers_rejected'] == 4
    assert counters['label_answers_rejected_no_recent_sweep'] == 2
    assert counters['label_answers_rejected_no_point_matched'] == 1
    assert counters['label_answers_rejected_malformed'] == 1
    assert counters['label_points_accepted'] == len(labels) + 1
    assert counters['label_points_rejected_distance'] == 2
    assert counters['label_points_rejected_label'] == 1


def test_bad_answers_and_modes_fail_with_a_reason():
    with pytest.raises(SensorDataError, match=r'\(K, 3\)'):
        LabelAnswer(0, np.zeros((3, 2)), np.zeros(3, np.int64))
    with pytest.raises(SensorDataError, match='labels of shape'):
        LabelAnswer(0, np.zeros((3, 3)), np.zeros(2, np.int64))
    with pytest.raises(SensorDataError, match='integers'):
        LabelAnswer(0, np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match='labels.mode'):
        LabelLoop(LabelParams(mode='none'), Recorder())


def test_request_and_answer_clouds_round_trip():
    from mmtta_ros.bags.topics import bag_typestore
    from mmtta_ros.sensors.pointcloud import make_pointcloud2

    types = bag_typestore().types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=3, nanosec=25), frame_id='LIDAR_TOP')

    def message(buffer):
        return make_pointcloud2(types['sensor_msgs/msg/PointCloud2'],
                                types['sensor_msgs/msg/PointField'], buffer, header)

    points = np.array([[1.0, 2.0, 3.0], [-4.5, 0.25, 1.0]], np.float32)
    request = LabelRequest(3_000_000_025, 'LIDAR_TOP', np.array([4, 9]), points,
                           np.array([2, 1], np.uint8), np.zeros((2, 2), np.float32))
    decoded = cloud_to_numpy(request_cloud(request))
    np.testing.assert_array_equal(decoded.points, points)
    assert decoded.fields['reason'].tolist() == [2, 1]
    back = request_from_cloud(message(request_cloud(request)))
    assert back.stamp_ns == 3_000_000_025 and back.frame_id == 'LIDAR_TOP'
    np.testing.assert_array_equal(back.points_lidar, points)
    assert back.reason.tolist() == [2, 1] and back.point_index.tolist() == [-1, -1]

    answer = LabelAnswer(3_000_000_025, points, np.array([5, 0]), 'LIDAR_TOP')
    back = answer_from_cloud(message(answer_cloud(answer)))
    assert back.stamp_ns == answer.stamp_ns and back.labels.tolist() == [5, 0]
    np.testing.assert_array_equal(back.points_lidar, points)
    with pytest.raises(SensorDataError, match='label'):
        answer_from_cloud(message(request_cloud(request)))  # no label field


# --------------------------------------------------------------------------------------
# The simulated annotator
# --------------------------------------------------------------------------------------

def _request(stamp_ns, count):
    points = np.arange(3 * count, dtype=np.float32).reshape(count, 3)
    return LabelRequest(stamp_ns, 'lidar', np.arange(count), points,
                        np.ones(count, np.uint8), np.zeros((count, 2), np.float32))


def test_annotator_answers_late_with_the_truth_and_skips_unknown_points():
    annotator = SimulatedAnnotator(delay=2)
    truth = np.array([3, IGNORE_INDEX, 1, 0])
    annotator.ask(_request(10, 4), truth)
    assert annotator.tick() == [] and annotator.tick() == []
    [answer] = annotator.tick()
    assert answer.stamp_ns == 10 and answer.frame_id == 'lidar'
    assert answer.labels.tolist() == [3, 1, 0] and len(answer.points_lidar) == 3
    annotator.ask(_request(11, 2), np.array([IGNORE_INDEX, IGNORE_INDEX]))
    assert all(annotator.tick() == [] for _ in range(4))
    assert (annotator.asked, annotator.answered, annotator.points_answered) == (2, 1, 3)
    with pytest.raises(ValueError, match='labels for'):
        annotator.ask(_request(12, 3), np.array([1, 2]))


def test_annotator_errors_are_other_classes_at_the_given_rate():
    truth = np.random.default_rng(0).integers(0, 6, 4000)
    request = _request(1, truth.size)
    always = SimulatedAnnotator(error_rate=1.0, seed=3)
    always.ask(request, truth)
    [answer] = always.tick()
    assert (answer.labels != truth).all() and set(answer.labels.tolist()) <= set(range(6))
    sometimes = SimulatedAnnotator(error_rate=0.2, seed=3)
    sometimes.ask(request, truth)
    [answer] = sometimes.tick()
    wrong = np.mean(answer.labels != truth)
    assert 0.17 < wrong < 0.23 and sometimes.points_wrong == int(np.sum(answer.labels != truth))
    never = SimulatedAnnotator(error_rate=0.0)
    never.ask(request, truth)
    assert (never.tick()[0].labels == truth).all()


def test_truth_comes_from_the_nearest_sweep_point_of_the_same_stamp():
    from mmtta_ros.bags.writer import labels_cloud_message, lidar_cloud_message

    rng = np.random.default_rng(2)
    points = rng.uniform(-30, 30, (500, 3)).astype(np.float32)
    labels = rng.integers(0, 6, 500)
    labels[7] = IGNORE_INDEX
    query = points[[3, 7, 11]]
    got = truth_at(query + 1e-4, points, labels)
    assert got.tolist() == [labels[3], IGNORE_INDEX, labels[11]]
    assert truth_at(query + 1.0, points, labels).tolist() == [IGNORE_INDEX] * 3

    truth = SweepTruth(history=2)
    stamp = 2_000_000_000
    truth.add_cloud(lidar_cloud_message(points, np.zeros(500), np.zeros(500, np.int64), stamp))
    request = _request(stamp, 3)
    request.points_lidar = query
    assert truth.labels_for(request) is None  # labels not there yet
    truth.add_labels(labels_cloud_message(labels, stamp))
    assert truth.labels_for(request).tolist() == [labels[3], IGNORE_INDEX, labels[11]]
    request.stamp_ns = stamp + 1
    assert truth.labels_for(request) is None


# --------------------------------------------------------------------------------------
# Through the real pipeline: the builder, the replay, the split
# --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def frames():
    from mmtta_ros.synth import generate_frames, SequenceConfig

    config = SequenceConfig(domain='night', seed=9, num_frames=5, image_size=(64, 36),
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


def _pipeline(**values):
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny'))
    params = node_params({'device': 'cpu', 'model.image_width': 64, 'model.image_height': 36,
                          **values})
    return build_pipeline(params.pipeline, model=model), params


def test_answered_points_join_the_replay_with_the_rows_of_their_points(frames):
    pipeline, params = _pipeline(**{'labels.mode': 'point', 'labels.budget': 12,
                                    'labels.replay_frames': 2})
    loop = LabelLoop(params.pipeline.labels, pipeline)
    annotator = SimulatedAnnotator(delay=0)
    supervised = []
    for frame in frames:
        output = pipeline.process(frame)
        # 2D and 3D features, each of unit length, side by side.
        assert output.features.shape[0] == output.prediction.size
        np.testing.assert_allclose(np.linalg.norm(output.features, axis=1), np.sqrt(2),
                                   rtol=1e-5)
        supervised.append(output.stats.get('supervised_points', 0))
        request = loop.request(output)
        annotator.ask(request, frame.labels[request.point_index])
        for answer in annotator.tick():
            assert loop.answer(answer).accepted_points > 0
    # Answers join at the start of the next step; the replay holds the last two frames
    # answered before the last step (the newest answer waits for the next one).
    assert supervised[0] == 0 and supervised[1] > 0 and max(supervised) <= 24
    replay = pipeline.method.supervision
    assert len(replay) == 2 and replay.capacity == 2
    for entry, frame in zip(replay.entries, frames[-3:-1]):
        # The rows pick the answered points out of that frame's model input.
        labels_by_xyz = {tuple(p): label for p, label in zip(frame.points_lidar.tolist(),
                                                             frame.labels.tolist())}
        xyz = entry.inputs.points[entry.rows].tolist()
        assert [labels_by_xyz[tuple(p)] for p in xyz] == entry.labels.tolist()
    pipeline.reset()
    assert len(replay) == 0


def test_without_labels_nothing_changes_and_a_non_learning_method_is_refused(frames):
    pipeline, _ = _pipeline()
    assert pipeline.method.supervision is None and not pipeline.keep_features
    output = pipeline.process(frames[0])
    assert output.features is None and 'supervised_points' not in output.stats
    with pytest.raises(ValueError, match='no label replay'):
        pipeline.add_supervision(frames[0], np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match='learns by gradient'):
        _pipeline(**{'adaptation.method': 'bn_stats', 'labels.mode': 'random'})


def test_the_split_pipeline_hands_answers_to_the_adapter(frames):
    from mmtta_ros.core.realtime import SplitPipeline

    pipeline, params = _pipeline(**{'labels.mode': 'random', 'labels.budget': 8,
                                    'adaptation.fallback': True})
    split = SplitPipeline(pipeline)
    loop = LabelLoop(params.pipeline.labels, split)
    output = split.predict(frames[0])
    assert output.features is None  # random selection needs none
    request = loop.request(output)
    loop.answer(LabelAnswer(request.stamp_ns, request.points_lidar,
                            frames[0].labels[request.point_index]))
    stats = split.adapt(frames[1])
    assert stats['supervised_points'] == np.count_nonzero(
        frames[0].labels[request.point_index] >= 0)
    assert len(split.adapter.method.supervision) == 1
    assert len(split.predictor.method.supervision) == 0


def test_requested_points_are_marked_on_the_overlay():
    from mmtta_ros.viz.overlay import mark_requests, REQUEST_COLOR

    image = np.zeros((20, 30, 3), np.uint8)
    marked = mark_requests(image, np.array([[5.0, 4.0], [29.0, 19.0]], np.float32))
    assert (image == 0).all()  # a copy
    assert tuple(marked[4, 5]) == REQUEST_COLOR and tuple(marked[6, 7]) == REQUEST_COLOR
    assert tuple(marked[19, 29]) == REQUEST_COLOR and (marked[10, 15] == 0).all()
    # 5x5 squares, clipped at the border: 25 + 9 pixels.
    assert (marked.any(axis=2)).sum() == 25 + 9
