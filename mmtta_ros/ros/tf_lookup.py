"""
Extrinsics and ego poses from TF, with calibration.T_cam_from_lidar as the fallback.

Narrow on purpose: `TfCalibration` needs only an object with tf2_ros.Buffer's
`lookup_transform(target_frame, source_frame, time, timeout)` and the exception types it
raises, so it is tested without tf2_ros (a fake buffer); `make_tf_calibration(node, ...)`
is the only code that imports tf2_ros, and returns None where it is not importable
(rclpy from PyPI has no tf2_ros: no tf2_msgs wheel), in which case the node uses the
parameter and no ego poses.

Per frame, with the messages' frame ids and stamps:
- camera frame <- LiDAR frame, latest (sensor mounts are static); kept once found. Missing:
  the parameter if set, else the frame is rejected with one line saying what is missing;
- with ego motion: odom <- LiDAR frame at the sweep's stamp and odom <- camera frame at
  the image's stamp (tf2 chains odom -> base_link with the mounts). Missing: no poses,
  the frame is projected with the static transform.
"""

from dataclasses import dataclass
import time
from typing import Callable, Optional, Tuple, Type

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.projection import check_transform, transform_from_translation_quaternion

# After a failed ego-pose lookup, lookups do not wait for the next this many seconds: a
# stack without odometry must not cost every frame two timeouts.
EGO_RETRY_S = 1.0


class NoTransformError(SensorDataError):
    """TF has no camera <- LiDAR transform and calibration.T_cam_from_lidar is not set."""


@dataclass(frozen=True)
class FrameCalibration:
    """
    What one frame is projected with, and where it came from.

    T_cam_from_lidar:  <np.float64: 4, 4> static LiDAR -> camera (TF, else the parameter)
    T_odom_from_lidar: <np.float64: 4, 4> LiDAR pose at the sweep's stamp, or None
    T_odom_from_cam:   <np.float64: 4, 4> camera pose at the image's stamp, or None
    extrinsics_from:   'tf' or 'parameter'
    problems:          one line per lookup that failed (for a throttled warning)
    """

    T_cam_from_lidar: np.ndarray
    T_odom_from_lidar: Optional[np.ndarray]
    T_odom_from_cam: Optional[np.ndarray]
    extrinsics_from: str
    problems: Tuple[str, ...] = ()


def matrix_from_transform_stamped(stamped) -> np.ndarray:
    """<np.float64: 4, 4> T_parent_from_child of a geometry_msgs/TransformStamped-like message."""
    t, q = stamped.transform.translation, stamped.transform.rotation
    return transform_from_translation_quaternion((t.x, t.y, t.z), (q.x, q.y, q.z, q.w))


def _ros_time(stamp_ns: int):
    from rclpy.time import Time
    return Time(nanoseconds=int(stamp_ns))


def _ros_duration(seconds: float):
    from rclpy.duration import Duration
    return Duration(nanoseconds=int(round(seconds * 1e9)))


class TfCalibration:
    """The transforms of each frame from a tf2 buffer, the parameter as the fallback."""

    def __init__(self, buffer, *, errors: Tuple[Type[BaseException], ...],
                 fallback_T_cam_from_lidar: Optional[np.ndarray] = None,
                 odom_frame: str = 'odom', timeout_s: float = 0.05, ego_motion: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        """
        Check the settings; look nothing up yet.

        buffer: a tf2_ros.Buffer (or an object with its lookup_transform); errors: what its
        lookups raise when a transform is missing (tf2_ros.TransformException);
        fallback_T_cam_from_lidar: <4, 4> calibration.T_cam_from_lidar, None if not set;
        odom_frame: fixed frame of the ego poses; timeout_s: how long a lookup waits;
        ego_motion: also look up the two ego poses (calibration.ego_motion).
        """
        if timeout_s < 0:
            raise ValueError(f'timeout_s must be >= 0, got {timeout_s}')
        self.buffer = buffer
        self.errors = tuple(errors)
        self.fallback = (None if fallback_T_cam_from_lidar is None
                         else check_transform(fallback_T_cam_from_lidar))
        self.odom_frame = str(odom_frame)
        self.timeout_s = float(timeout_s)
        self.ego_motion = bool(ego_motion)
        self._clock = clock
        self._mounts = {}  # (camera frame, LiDAR frame) -> T_cam_from_lidar, once found
        self._ego_wait_after = float('-inf')

    def lookup(self, camera_frame: str, lidar_frame: str, stamp_image_ns: int,
               stamp_lidar_ns: int) -> FrameCalibration:
        """
        Return the transforms of a frame from its sensors' frame ids and stamps.

        NoTransformError if TF lacks camera <- LiDAR and calibration.T_cam_from_lidar is
        not set: the frame cannot be projected.
        """
        problems = []
        key = (str(camera_frame), str(lidar_frame))
        T_cam_from_lidar, source = self._mounts.get(key), 'tf'
        if T_cam_from_lidar is None:
            # Zero stamp: tf2's latest, which is the mount's for static transforms.
            found, error = self._lookup(key[0], key[1], 0, self.timeout_s)
            if found is not None:
                self._mounts[key] = T_cam_from_lidar = found
            elif self.fallback is None:
                raise NoTransformError(
                    f'no transform {key[0]} <- {key[1]} in TF after {self.timeout_s} s '
                    f'({error}) and calibration.T_cam_from_lidar is not set')
            else:
                T_cam_from_lidar, source = self.fallback, 'parameter'
                problems.append(f'no transform {key[0]} <- {key[1]} in TF ({error}): '
                                'using calibration.T_cam_from_lidar')
        T_odom_from_lidar = T_odom_from_cam = None
        if self.ego_motion:
            T_odom_from_lidar, T_odom_from_cam, problem = self._ego_poses(
                key[0], key[1], stamp_image_ns, stamp_lidar_ns)
            if problem:
                problems.append(problem)
        return FrameCalibration(T_cam_from_lidar, T_odom_from_lidar, T_odom_from_cam, source,
                                tuple(problems))

    def _ego_poses(self, camera_frame: str, lidar_frame: str, stamp_image_ns: int,
                   stamp_lidar_ns: int):
        # Waits only while lookups succeed (the odometry may trail the sensors a little);
        # after a failure, none for EGO_RETRY_S.
        now = self._clock()
        timeout = self.timeout_s if now >= self._ego_wait_after else 0.0
        T_odom_from_lidar, error = self._lookup(self.odom_frame, lidar_frame, stamp_lidar_ns,
                                                timeout)
        T_odom_from_cam = None
        if T_odom_from_lidar is not None:
            T_odom_from_cam, error = self._lookup(self.odom_frame, camera_frame,
                                                  stamp_image_ns, timeout)
        if T_odom_from_lidar is None or T_odom_from_cam is None:
            self._ego_wait_after = now + EGO_RETRY_S
            return None, None, (f'no ego pose {self.odom_frame} <- {lidar_frame} / '
                                f'{camera_frame} at the frame\'s stamps in TF ({error}): '
                                'static projection')
        return T_odom_from_lidar, T_odom_from_cam, ''

    def _lookup(self, target_frame: str, source_frame: str, stamp_ns: int, timeout_s: float):
        """Return (T_target_from_source or None, the error's one line)."""
        try:
            stamped = self.buffer.lookup_transform(target_frame, source_frame,
                                                   _ros_time(stamp_ns), _ros_duration(timeout_s))
        except self.errors as error:
            return None, ' '.join(str(error).split()) or type(error).__name__
        try:
            return check_transform(matrix_from_transform_stamped(stamped)), ''
        except SensorDataError as error:
            return None, f'unusable transform: {error}'


def make_tf_calibration(node, *, fallback_T_cam_from_lidar: Optional[np.ndarray],
                        odom_frame: str, timeout_s: float,
                        ego_motion: bool) -> Optional[TfCalibration]:
    """Return TF lookups on a tf2_ros Buffer and listener of `node`; None without tf2_ros."""
    try:
        import tf2_ros
    except ImportError:
        return None
    buffer = tf2_ros.Buffer()
    # Kept on the calibration: the listener must live as long as its buffer is read.
    listener = tf2_ros.TransformListener(buffer, node)
    calibration = TfCalibration(buffer, errors=(tf2_ros.TransformException,),
                                fallback_T_cam_from_lidar=fallback_T_cam_from_lidar,
                                odom_frame=odom_frame, timeout_s=timeout_s,
                                ego_motion=ego_motion)
    calibration.listener = listener
    return calibration
