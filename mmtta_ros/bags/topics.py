"""
Topic names, frame ids, QoS profiles and message helpers shared by the bag tools.

Names follow the nuScenes -> ROS 2 bag converters (method brief section 3). The labels
topic is this project's own: a PointCloud2 aligned point-for-point with `/LIDAR_TOP`
(same header, height and width) holding one uint8 field `label`, the class index into
`mmtta_ros.core.classes.CLASS_NAMES`, with NO_LABEL (255) for points that have no label.
Nothing here imports rclpy.
"""

from dataclasses import dataclass
import functools
from typing import Tuple

import numpy as np
from rosbags.interfaces import (
    Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime)
from rosbags.typesys import get_typestore, Stores

from mmtta_ros.sensors.pointcloud import CloudLayout, PointFieldSpec, UINT8
from mmtta_ros.sensors.stamps import ns_to_sec_nanosec, stamp_to_ns  # noqa: F401 (re-exported)

# Frame ids as the nuScenes converters write them.
BASE_FRAME = 'base_link'
# nuScenes ego poses are in a fixed world frame per log; ROS calls such a frame odom
# (odom -> base_link on /tf).
ODOM_FRAME = 'odom'
LIDAR_FRAME = 'LIDAR_TOP'
CAMERA_FRAME = 'CAM_FRONT'
# Where the offline scorer writes its labeled output clouds.
LABELED_POINTS_TOPIC = '/mmtta/labeled_points'
# `label` of a point without ground truth on the labels topic.
NO_LABEL = 255
LABELS_LAYOUT = CloudLayout((PointFieldSpec('label', 0, UINT8),), 1)

IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
RAW_IMAGE_TYPE = 'sensor_msgs/msg/Image'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
CLOUD_TYPE = 'sensor_msgs/msg/PointCloud2'
TF_TYPE = 'tf2_msgs/msg/TFMessage'


@dataclass(frozen=True)
class BagTopics:
    """Topic names of a camera + LiDAR bag; the defaults are the nuScenes converters'."""

    image: str = '/CAM_FRONT/image_rect_compressed'
    camera_info: str = '/CAM_FRONT/camera_info'
    lidar: str = '/LIDAR_TOP'
    labels: str = '/LIDAR_TOP/labels'
    tf_static: str = '/tf_static'
    tf: str = '/tf'  # some converters put the sensor mounts here instead
    # Cameras besides `image`'s, by name: each on camera_topics(name), frame id its name.
    extra_cameras: Tuple[str, ...] = ()


def camera_topics(name: str) -> Tuple[str, str]:
    """Return the (image, camera_info) topics of camera `name`, as the nuScenes converters."""
    return f'/{name}/image_rect_compressed', f'/{name}/camera_info'


def make_qos(reliable: bool, transient_local: bool, depth: int) -> Qos:
    """Build a keep-last rosbags Qos with default deadline, lifespan and liveliness."""
    unset = QosTime(0, 0)  # rosbag2 writes 0 for "not set": the rmw default
    return Qos(
        history=QosHistory.KEEP_LAST, depth=int(depth),
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=(QosDurability.TRANSIENT_LOCAL if transient_local
                    else QosDurability.VOLATILE),
        deadline=unset, lifespan=unset, liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=unset, avoid_ros_namespace_conventions=False)


# What a sensor driver offers (rclpy qos_profile_sensor_data: best effort, volatile, depth 5).
SENSOR_QOS = make_qos(reliable=False, transient_local=False, depth=5)
# What tf2_ros' StaticTransformBroadcaster offers: late joiners still get the transforms.
TF_STATIC_QOS = make_qos(reliable=True, transient_local=True, depth=1)
# What tf2_ros' TransformBroadcaster offers (/tf).
TF_QOS = make_qos(reliable=True, transient_local=False, depth=100)
# Results for RViz, which subscribes reliable by default.
RESULT_QOS = make_qos(reliable=True, transient_local=False, depth=10)


@functools.lru_cache(maxsize=1)
def bag_typestore():
    """Return the rosbags typestore of the project's ROS 2 distro (Kilted, as its wheels)."""
    return get_typestore(Stores.ROS2_KILTED)


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """Quaternion <np.float64: 4> (x, y, z, w), w >= 0, of a rotation <3, 3>."""
    R = np.asarray(R, dtype=np.float64)
    # Shepperd's method: take the largest of the four squared components as the pivot so
    # the division below never goes through a small number.
    squares = 0.25 * np.array([
        1 + R[0, 0] - R[1, 1] - R[2, 2], 1 - R[0, 0] + R[1, 1] - R[2, 2],
        1 - R[0, 0] - R[1, 1] + R[2, 2], 1 + R[0, 0] + R[1, 1] + R[2, 2]])
    pivot = int(np.argmax(squares))
    big = np.sqrt(squares[pivot])
    # Off-diagonal sums and differences: 4 * products of quaternion components.
    xy, xz, yz = R[0, 1] + R[1, 0], R[0, 2] + R[2, 0], R[1, 2] + R[2, 1]
    wx, wy, wz = R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]
    products = (
        (4 * squares[0], xy, xz, wx), (xy, 4 * squares[1], yz, wy),
        (xz, yz, 4 * squares[2], wz), (wx, wy, wz, 4 * squares[3]))[pivot]
    q = np.asarray(products) / (4 * big)
    return q if q[3] >= 0 else -q


def labels_to_wire(labels: np.ndarray) -> np.ndarray:
    """Class indices <int: N> to labels-topic values <np.uint8: N>; others become NO_LABEL."""
    labels = np.asarray(labels)
    wire = np.full(labels.shape, NO_LABEL, dtype=np.uint8)
    known = (labels >= 0) & (labels < NO_LABEL)
    wire[known] = labels[known]
    return wire
