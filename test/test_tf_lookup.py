"""TF lookups (ros/tf_lookup.py) against a fake tf2 buffer: transforms used, timeouts, fallback."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.ros.diagnostics import NodeDiagnostics, unaccounted_messages
from mmtta_ros.ros.tf_lookup import (
    EGO_RETRY_S, make_tf_calibration, NoTransformError, TfCalibration)
from mmtta_ros.sensors.projection import rigid_inverse, transform_from_translation_quaternion

CAMERA, LIDAR, ODOM = 'CAM_FRONT', 'LIDAR_TOP', 'odom'
T_LIDAR_NS, T_IMAGE_NS = 1_000_000_000, 1_035_000_000
T_BASE_FROM_LIDAR = transform_from_translation_quaternion((0.9, 0.0, 1.8), (0, 0, 0.7, 0.71))
T_BASE_FROM_CAM = transform_from_translation_quaternion((1.7, 0.0, 1.5), (-0.5, 0.5, -0.5, 0.5))
PARAMETER = np.eye(4)


class FakeTransformError(Exception):
    """What the fake buffer raises for a missing transform (tf2_ros.TransformException)."""


def odom_from_base(stamp_ns):
    """Return the ego pose: it drives along x at 8 m/s and turns at 0.1 rad/s."""
    seconds = stamp_ns * 1e-9
    yaw = 0.1 * seconds
    return transform_from_translation_quaternion(
        (8.0 * seconds, 0.0, 0.0), (0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)))


class FakeBuffer:
    """tf2_ros.Buffer's lookup_transform over a few known chains; records every call."""

    def __init__(self, mounts=True, odometry=True):
        self.mounts, self.odometry = mounts, odometry
        self.calls = []

    def lookup_transform(self, target_frame, source_frame, time, timeout):
        stamp_ns, timeout_ns = time.nanoseconds, timeout.nanoseconds
        self.calls.append((target_frame, source_frame, stamp_ns, timeout_ns))
        mounts = {CAMERA: T_BASE_FROM_CAM, LIDAR: T_BASE_FROM_LIDAR}
        if target_frame == CAMERA and source_frame == LIDAR and self.mounts:
            T = rigid_inverse(T_BASE_FROM_CAM) @ T_BASE_FROM_LIDAR
        elif target_frame == ODOM and source_frame in mounts and self.odometry:
            T = odom_from_base(stamp_ns) @ mounts[source_frame]
        else:
            raise FakeTransformError(f'"{target_frame}" passed to lookupTransform argument '
                                     f'target_frame does not exist.\n(stamp {stamp_ns})')
        return transform_stamped(T)


def transform_stamped(T):
    """Return a geometry_msgs/TransformStamped-like message of T (quaternion x, y, z, w)."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(T[:3, :3]).as_quat()
    return SimpleNamespace(transform=SimpleNamespace(
        translation=SimpleNamespace(x=T[0, 3], y=T[1, 3], z=T[2, 3]),
        rotation=SimpleNamespace(x=x, y=y, z=z, w=w)))


def calibration(buffer, **kwargs):
    kwargs.setdefault('fallback_T_cam_from_lidar', PARAMETER)
    return TfCalibration(buffer, errors=(FakeTransformError,), odom_frame=ODOM,
                         timeout_s=0.05, **kwargs)


def test_mount_and_ego_poses_come_from_tf_at_the_right_stamps():
    buffer = FakeBuffer()
    tf = calibration(buffer)
    result = tf.lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert result.extrinsics_from == 'tf' and result.problems == ()
    np.testing.assert_allclose(result.T_cam_from_lidar,
                               rigid_inverse(T_BASE_FROM_CAM) @ T_BASE_FROM_LIDAR, atol=1e-9)
    np.testing.assert_allclose(result.T_odom_from_lidar,
                               odom_from_base(T_LIDAR_NS) @ T_BASE_FROM_LIDAR, atol=1e-9)
    np.testing.assert_allclose(result.T_odom_from_cam,
                               odom_from_base(T_IMAGE_NS) @ T_BASE_FROM_CAM, atol=1e-9)
    # Mount at tf2's latest (stamp 0), each pose at its own sensor's stamp, with the timeout.
    assert buffer.calls == [(CAMERA, LIDAR, 0, 50_000_000),
                            (ODOM, LIDAR, T_LIDAR_NS, 50_000_000),
                            (ODOM, CAMERA, T_IMAGE_NS, 50_000_000)]
    # The mount is static: looked up once; the poses every frame.
    buffer.calls.clear()
    tf.lookup(CAMERA, LIDAR, T_IMAGE_NS + 50_000_000, T_LIDAR_NS + 50_000_000)
    assert [call[:2] for call in buffer.calls] == [(ODOM, LIDAR), (ODOM, CAMERA)]
    # Without ego motion: the mount only.
    buffer = FakeBuffer()
    result = calibration(buffer, ego_motion=False).lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert result.T_odom_from_lidar is None and result.T_odom_from_cam is None
    assert [call[:2] for call in buffer.calls] == [(CAMERA, LIDAR)]


def test_the_parameter_is_the_fallback_and_without_it_the_frame_is_rejected_in_one_line():
    tf = calibration(FakeBuffer(mounts=False))
    result = tf.lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert result.extrinsics_from == 'parameter'
    np.testing.assert_array_equal(result.T_cam_from_lidar, PARAMETER)
    assert result.T_odom_from_cam is not None  # the poses do not need the mount lookup
    (problem,) = result.problems
    assert 'CAM_FRONT <- LIDAR_TOP' in problem and 'calibration.T_cam_from_lidar' in problem
    assert '\n' not in problem
    with pytest.raises(NoTransformError) as caught:
        calibration(FakeBuffer(mounts=False), fallback_T_cam_from_lidar=None).lookup(
            CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    message = str(caught.value)
    assert '\n' not in message and 'CAM_FRONT <- LIDAR_TOP' in message
    assert 'calibration.T_cam_from_lidar is not set' in message
    assert isinstance(caught.value, SensorDataError)  # the node's rejection path
    with pytest.raises(SensorDataError, match='rotation'):
        calibration(FakeBuffer(), fallback_T_cam_from_lidar=np.diag([1.0, 1.0, -1.0, 1.0]))


def test_missing_odometry_gives_the_static_projection_and_stops_waiting_for_a_while():
    now = [100.0]
    buffer = FakeBuffer(odometry=False)
    tf = calibration(buffer, clock=lambda: now[0])
    result = tf.lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert result.T_odom_from_lidar is None and result.T_odom_from_cam is None
    assert result.extrinsics_from == 'tf'
    (problem,) = result.problems
    assert 'static projection' in problem and '\n' not in problem
    assert buffer.calls[-1] == (ODOM, LIDAR, T_LIDAR_NS, 50_000_000)
    # Within EGO_RETRY_S the lookups do not wait: no odometry costs no frame a timeout.
    now[0] += EGO_RETRY_S / 2
    tf.lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert buffer.calls[-1][3] == 0
    # Odometry back, after the pause: waited for and used again.
    now[0] += EGO_RETRY_S
    buffer.odometry = True
    result = tf.lookup(CAMERA, LIDAR, T_IMAGE_NS, T_LIDAR_NS)
    assert result.T_odom_from_cam is not None and buffer.calls[-1][3] == 50_000_000


def test_without_tf2_ros_the_node_uses_the_parameter():
    if importlib.util.find_spec('tf2_ros') is not None:
        pytest.skip('tf2_ros is installed: the listener is made (a ROS 2 install)')
    assert make_tf_calibration(object(), fallback_T_cam_from_lidar=PARAMETER,
                               odom_frame=ODOM, timeout_s=0.05, ego_motion=True) is None


class _Logger:
    def __init__(self):
        self.warnings = []

    def warning(self, message, **_):
        self.warnings.append(message)


class _Pipeline:
    def __init__(self):
        self.calls = []

    def frame_from_messages(self, image_msg, info_msg, cloud_msg, **kwargs):
        self.calls.append(kwargs)
        return 'frame'


def _message(frame_id, stamp_ns):
    return SimpleNamespace(header=SimpleNamespace(
        frame_id=frame_id, stamp=SimpleNamespace(sec=stamp_ns // 10**9,
                                                 nanosec=stamp_ns % 10**9)))


def test_the_node_decodes_with_the_transforms_tf_gives_and_counts_what_it_lacked():
    from mmtta_ros.ros.shell import AdaptationShell

    class Shell(AdaptationShell):
        def __init__(self, tf):
            self.tf_calibration, self.pipeline = tf, _Pipeline()
            self.diagnostics, self._camera_info, self.logger = NodeDiagnostics(), 'info', _Logger()

        def get_logger(self):
            return self.logger

    image, cloud = _message(CAMERA, T_IMAGE_NS), _message(LIDAR, T_LIDAR_NS)
    shell = Shell(calibration(FakeBuffer()))
    assert shell._decode(image, cloud) == 'frame'
    (kwargs,) = shell.pipeline.calls
    np.testing.assert_allclose(kwargs['T_odom_from_cam'],
                               odom_from_base(T_IMAGE_NS) @ T_BASE_FROM_CAM, atol=1e-9)
    np.testing.assert_allclose(kwargs['T_cam_from_lidar'],
                               rigid_inverse(T_BASE_FROM_CAM) @ T_BASE_FROM_LIDAR, atol=1e-9)
    assert shell.logger.warnings == []
    shell = Shell(calibration(FakeBuffer(mounts=False, odometry=False)))
    shell._decode(image, cloud)
    values = shell.diagnostics.values()
    assert values['extrinsics_from_parameter'] == 1 and values['frames_without_ego_pose'] == 1
    assert len(shell.logger.warnings) == 2
    np.testing.assert_array_equal(shell.pipeline.calls[0]['T_cam_from_lidar'], PARAMETER)
    assert shell.pipeline.calls[0]['T_odom_from_cam'] is None
    # Without TF (no tf2_ros): the pipeline's own parameter, no poses.
    shell = Shell(None)
    shell._decode(image, cloud)
    assert shell.pipeline.calls == [{}]
    # A pair rejected for want of a transform closes the books like any other outcome.
    diagnostics = NodeDiagnostics()
    for _ in range(2):
        diagnostics.received('image')
        diagnostics.received('points')
    diagnostics.pair_taken()
    diagnostics.pair_done('rejected_no_transform')
    diagnostics.pair_taken()
    diagnostics.pair_done('rejected_frames')
    values = diagnostics.values({'sync_received': 4, 'sync_pending': 0, 'pairs_pending': 0,
                                 'pairs_dropped_stale': 0, **{key: 0 for key in (
                                     'sync_dropped_stale', 'sync_dropped_queue_full',
                                     'sync_dropped_out_of_slop', 'sync_dropped_unmatched',
                                     'sync_dropped_reset')}})
    assert values['rejected_no_transform'] == 1 and unaccounted_messages(values) == 0
