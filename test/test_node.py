"""The node in-process over real DDS (loopback): outputs, bad inputs, services, parameters."""

import io
import time

import numpy as np
from PIL import Image as PILImage
import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import (  # noqa: E402
    CameraInfo, CompressedImage, Image, PointCloud2, PointField)
from std_srvs.srv import Trigger  # noqa: E402

from mmtta_ros.ros.node import MMTTANode  # noqa: E402
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, NUSCENES_LAYOUT, UNLABELED  # noqa: E402
from mmtta_ros.synth import generate_frames, SequenceConfig  # noqa: E402

IMAGE_SIZE = (128, 72)
pytestmark = pytest.mark.dds


@pytest.fixture(scope='module')
def frames():
    config = SequenceConfig(domain='night', seed=3, num_frames=6, image_size=IMAGE_SIZE,
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


def _header(msg, stamp_ns, frame_id):
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def cloud_msg(frame):
    records = np.zeros(frame.num_points, dtype=NUSCENES_LAYOUT.dtype())
    for axis, name in enumerate('xyz'):
        records[name] = frame.points_lidar[:, axis]
    records['intensity'] = frame.intensity
    msg = _header(PointCloud2(), frame.stamp_lidar_ns, 'LIDAR_TOP')
    msg.height, msg.width = 1, frame.num_points
    msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                  for f in NUSCENES_LAYOUT.fields]
    msg.point_step = NUSCENES_LAYOUT.point_step
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = True
    msg.data = records.tobytes()
    return msg


def image_msg(frame):
    buffer = io.BytesIO()
    PILImage.fromarray(frame.image).save(buffer, format='JPEG', quality=90)
    msg = _header(CompressedImage(), frame.stamp_image_ns, 'CAM_FRONT')
    msg.format, msg.data = 'jpeg', buffer.getvalue()
    return msg


def info_msg(frame):
    msg = _header(CameraInfo(), frame.stamp_image_ns, 'CAM_FRONT')
    msg.width, msg.height = frame.image_size
    msg.k = [float(v) for v in frame.K.reshape(-1)]
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    return msg


class Harness:
    """The node under test plus a peer node that feeds it and records what it publishes."""

    def __init__(self, frames, **overrides):
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context)
        T = [float(v) for v in frames[0].T_cam_from_lidar.reshape(-1)]
        params = {'calibration.T_cam_from_lidar': T, 'model.image_width': IMAGE_SIZE[0],
                  'model.image_height': IMAGE_SIZE[1], 'diagnostics_period': 0.2,
                  'device': 'cpu', **overrides}
        self.node = MMTTANode(context=self.context, parameter_overrides=[
            Parameter(name, value=value) for name, value in params.items()])
        self.peer = rclpy.create_node('peer', context=self.context)
        ns = '/mmtta_adapt'
        self.image_pub = self.peer.create_publisher(
            CompressedImage, f'{ns}/input/image', qos_profile_sensor_data)
        self.info_pub = self.peer.create_publisher(
            CameraInfo, f'{ns}/input/camera_info', qos_profile_sensor_data)
        self.cloud_pub = self.peer.create_publisher(
            PointCloud2, f'{ns}/input/points', qos_profile_sensor_data)
        self.clouds, self.overlays, self.diagnostics = [], [], []
        self.peer.create_subscription(PointCloud2, f'{ns}/output/labeled_points',
                                      self.clouds.append, 10)
        self.peer.create_subscription(Image, f'{ns}/output/overlay', self.overlays.append, 10)
        self.peer.create_subscription(DiagnosticArray, '/diagnostics',
                                      self.diagnostics.append, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.spin_until(lambda: self.image_pub.get_subscription_count() > 0, 10.0)

    def spin_until(self, condition, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            self.executor.spin_once(timeout_sec=0.05)
        return condition()

    def send(self, frame, image=None, cloud=None, info=True):
        if info:
            self.info_pub.publish(info_msg(frame))
        self.spin_until(lambda: False, 0.05)
        self.cloud_pub.publish(cloud or cloud_msg(frame))
        self.image_pub.publish(image or image_msg(frame))

    def call(self, service, timeout=20.0):
        client = self.peer.create_client(Trigger, f'/mmtta_adapt/{service}')
        assert self.spin_until(client.service_is_ready, 10.0)
        future = client.call_async(Trigger.Request())
        assert self.spin_until(future.done, timeout)
        return future.result()

    def close(self):
        self.node.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture
def harness(frames, tmp_path):
    h = Harness(frames, **{'state.save_path': str(tmp_path / 'state.pt')})
    yield h
    h.close()


def counts(harness):
    """Return the node's /diagnostics figures now (counters by reason)."""
    return harness.node.diagnostics_values()


def _stamp(msg):
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def send_and_wait(harness, frames, expected, timeout=60.0):
    """
    Send frames one by one, letting the node finish each; wait for `expected` clouds.

    A set is final once a later message arrives on every input, so the last frame sent
    is not matched yet.
    """
    for frame in frames:
        harness.send(frame)
        harness.spin_until(lambda: harness.node.mailbox.pending, 1.0)
        harness.spin_until(lambda: not harness.node.mailbox.pending, timeout)
    return harness.spin_until(lambda: len(harness.clouds) >= expected, timeout)


def test_labeled_clouds_overlay_and_diagnostics(harness, frames):
    assert send_and_wait(harness, frames[:4], expected=3), harness.node.sync.stats
    by_stamp = {f.stamp_lidar_ns: f for f in frames}
    cloud = harness.clouds[-1]
    # The output carries the input stamp and the LiDAR frame, one point per input point.
    frame = by_stamp[_stamp(cloud)]
    assert cloud.header.frame_id == 'LIDAR_TOP' and cloud.width == frame.num_points
    decoded = cloud_to_numpy(cloud)
    np.testing.assert_allclose(decoded.points, frame.points_lidar)
    labels = decoded.fields['label']
    assert set(np.unique(labels)) <= set(range(6)) | {UNLABELED}
    assert (labels != UNLABELED).sum() > 0
    assert harness.spin_until(lambda: len(harness.overlays) >= 3, 5.0)
    assert (harness.overlays[-1].width, harness.overlays[-1].height) == IMAGE_SIZE

    def latest_diagnostics():
        return {kv.key: kv.value for kv in harness.diagnostics[-1].status[0].values} \
            if harness.diagnostics else {}
    assert harness.spin_until(
        lambda: int(latest_diagnostics().get('frames_processed', 0)) >= 3, 5.0)
    # worker.split (default): the adapter reports its stats once it has stepped.
    assert harness.spin_until(lambda: 'adaptation_entropy' in latest_diagnostics(), 30.0)
    values = latest_diagnostics()
    assert float(values['latency_ms']) > 0 and float(values['points_rate_hz']) > 0
    assert int(values['rejected_frames']) == 0 and int(values['adaptation_steps']) >= 1
    for stage in ('decode_ms', 'label_ms', 'project_ms', 'model_ms', 'encode_ms', 'publish_ms',
                  'adapt_ms'):
        assert float(values[stage]) > 0, stage
    # CPU seconds of the worker and adapter threads, within the process's.
    worker, adapter = float(values['cpu_worker_s']), float(values['cpu_adapter_s'])
    assert 0 < worker and 0 < adapter and worker + adapter <= float(values['cpu_process_s'])


def test_bad_inputs_are_counted_and_the_node_keeps_going(harness, frames):
    def rejected():
        return counts(harness)['rejected_frames']

    # A pair is final once a later message arrives on every input: each bad frame is
    # followed by another one, which completes it.
    harness.send(frames[0], info=False)
    harness.send(frames[1], info=False)
    assert harness.spin_until(lambda: rejected() == 1, 30.0), \
        'no camera_info yet must be rejected'
    broken = cloud_msg(frames[2])
    broken.data = bytes(broken.data)[:100]  # shorter than row_step says
    harness.send(frames[2], cloud=broken)
    harness.send(frames[3])
    assert harness.spin_until(lambda: rejected() == 2, 30.0), \
        'a malformed cloud must be rejected'
    bad_image = image_msg(frames[4])
    bad_image.format = 'tiff'
    harness.send(frames[4], image=bad_image)
    harness.send(frames[5])
    assert harness.spin_until(lambda: rejected() == 3, 30.0), \
        'an unknown image format must be rejected'
    # Between the bad ones, good frames were labeled: the node kept going.
    assert harness.spin_until(lambda: counts(harness)['frames_processed'] >= 1, 30.0)
    assert len(harness.clouds) == counts(harness)['frames_processed']
    # Every pair the worker took is accounted for: labeled or rejected with a reason.
    values = counts(harness)
    assert values['pairs_taken'] == values['frames_processed'] + values['rejected_frames']


def test_services_and_parameters(harness, frames, tmp_path):
    assert send_and_wait(harness, frames[:2], expected=1)
    response = harness.call('save_state')
    assert response.success and (tmp_path / 'state.pt').is_file()
    response = harness.call('reset')
    assert response.success and counts(harness)['resets'] == 1
    # A runtime parameter is checked; a read-only one cannot change.
    results = harness.node.set_parameters([Parameter('sync.slop', value=-1.0)])
    assert not results[0].successful
    results = harness.node.set_parameters([Parameter('sync.slop', value=0.08)])
    assert results[0].successful and harness.node.params.sync.slop_s == 0.08
    assert harness.node.sync.slop_ns == 80_000_000
    results = harness.node.set_parameters([Parameter('output.publish_overlay', value=False)])
    assert results[0].successful and not harness.node.pipeline.output.publish_overlay
    results = harness.node.set_parameters([Parameter('adaptation.method', value='tent')])
    assert not results[0].successful
    # Parameters rclpy owns are not refused by the node's checks.
    results = harness.node.set_parameters([Parameter('use_sim_time', value=True)])
    assert results[0].successful


def test_invalid_start_parameters_are_refused(frames):
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        with pytest.raises(ValueError, match='calibration.T_cam_from_lidar'):
            MMTTANode(context=context, parameter_overrides=[
                Parameter('calibration.T_cam_from_lidar', value=[1.0, 2.0, 3.0])])
    finally:
        rclpy.try_shutdown(context=context)


def test_far_stamps_rejected_and_time_jump_clears_queues(frames, tmp_path):
    from dataclasses import replace

    harness = Harness(frames, **{'max_stamp_skew': 5.0, 'reset.on_time_jump': True})
    try:
        # The generator's stamps are far from this machine's clock: rejected, counted.
        harness.send(frames[0])
        harness.send(frames[1])
        assert harness.spin_until(lambda: counts(harness)['rejected_stamp_skew'] >= 1, 30.0)
        assert counts(harness)['frames_processed'] == 0
        # A stamp 10 s older than the newest: a looping bag. Queues clear, adaptation resets.
        back = replace(frames[2], stamp_lidar_ns=frames[2].stamp_lidar_ns - 10 ** 10,
                       stamp_image_ns=frames[2].stamp_image_ns - 10 ** 10)
        harness.send(back)
        assert harness.spin_until(lambda: counts(harness)['time_jumps'] >= 1, 30.0)
        assert counts(harness)['resets'] >= 1
    finally:
        harness.close()


def test_a_frame_with_almost_nothing_in_view_is_rejected_not_fatal(frames):
    from dataclasses import replace

    harness = Harness(frames)
    try:
        # Three points in front of the camera only: batch norm cannot train on that.
        few = replace(frames[0], points_lidar=np.array(
            [[10.0, 0.0, 0.0], [10.1, 0.0, 0.0], [10.2, 0.1, 0.0]], np.float32),
            intensity=np.zeros(3, np.float32))
        harness.send(few)
        harness.send(frames[1])
        assert harness.spin_until(lambda: counts(harness)['rejected_frames'] == 1, 30.0)
        assert send_and_wait(harness, frames[2:4], expected=1)
        assert counts(harness)['step_failures'] == 0 and harness.node._worker.is_alive()
    finally:
        harness.close()
