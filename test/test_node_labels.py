"""The node's label loop in-process over DDS: requests out, answers in, counted and used."""

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import PointCloud2, PointField  # noqa: E402

from mmtta_ros.core.labels import answer_cloud, LabelAnswer, REASONS  # noqa: E402
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, make_pointcloud2  # noqa: E402
from test_node import Harness, send_and_wait  # noqa: E402

pytestmark = pytest.mark.dds
NS = '/mmtta_adapt'
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope='module')
def frames():
    from mmtta_ros.synth import generate_frames, SequenceConfig

    config = SequenceConfig(domain='night', seed=3, num_frames=6, image_size=(128, 72),
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


def _answer_msg(answer, frame_id='LIDAR_TOP'):
    header = PointCloud2().header
    header.stamp.sec, header.stamp.nanosec = divmod(answer.stamp_ns, 1_000_000_000)
    header.frame_id = frame_id
    return make_pointcloud2(PointCloud2, PointField, answer_cloud(answer), header)


def test_the_node_asks_for_labels_and_learns_from_the_answers(frames):
    harness = Harness(frames, **{'labels.mode': 'point', 'labels.budget': 15,
                                 'worker.split': False})
    try:
        requests = []
        harness.peer.create_subscription(PointCloud2, f'{NS}/output/label_requests',
                                         requests.append, RELIABLE)
        answers = harness.peer.create_publisher(PointCloud2, f'{NS}/input/point_labels',
                                                RELIABLE)
        assert harness.spin_until(lambda: answers.get_subscription_count() > 0, 10.0)
        assert send_and_wait(harness, frames[:3], expected=2)
        assert harness.spin_until(lambda: len(requests) >= 2, 10.0)
        by_stamp = {f.stamp_lidar_ns: f for f in frames}
        request = requests[0]
        stamp = request.header.stamp.sec * 10**9 + request.header.stamp.nanosec
        frame = by_stamp[stamp]
        assert request.header.frame_id == 'LIDAR_TOP' and request.width == 15
        decoded = cloud_to_numpy(request)
        assert (decoded.fields['reason'] == REASONS['prototype']).all()
        # The requested points are points of that sweep: answer them from its labels.
        index = np.flatnonzero((np.abs(frame.points_lidar[None] - decoded.points[:, None])
                                .max(axis=2) == 0).any(axis=0))
        assert len(index) == 15
        known = frame.labels[index] >= 0
        answers.publish(_answer_msg(LabelAnswer(stamp, frame.points_lidar[index][known],
                                                frame.labels[index][known])))
        # An answer about a sweep never requested is rejected with its reason.
        answers.publish(_answer_msg(LabelAnswer(stamp + 123_456_789,
                                                frame.points_lidar[:3], np.array([0, 1, 2]))))
        assert harness.spin_until(
            lambda: harness.node.diagnostics_values()['label_answers'] == 2, 10.0)
        values = harness.node.diagnostics_values()
        assert values['label_answers_accepted'] == 1
        assert values['label_points_accepted'] == int(known.sum())
        assert values['label_answers_rejected_no_recent_sweep'] == 1
        # The next adaptation steps train on the answered points too.
        assert send_and_wait(harness, frames[3:6], expected=4)
        values = harness.node.diagnostics_values()
        assert values['label_supervised_steps'] >= 1
        assert values['adaptation_supervised_points'] == int(known.sum())
        assert values['label_requests'] >= 4
    finally:
        harness.close()
