"""
Messages -> Frame: the one place a matched (image, camera_info, cloud[, labels]) becomes a frame.

Duck-typed on message fields, so live rclpy messages (the node) and messages read from a
bag with rosbags (the bag reader) go through the same function and give the same frame.
"""

from typing import Optional, Sequence, Tuple

import numpy as np

from mmtta_ros.core.classes import CLASS_NAMES, IGNORE_INDEX
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import CameraView, Frame
from mmtta_ros.sensors.image import decode_image
from mmtta_ros.sensors.pointcloud import cloud_structured_view, cloud_to_numpy
from mmtta_ros.sensors.stamps import stamp_to_ns


def labels_from_message(labels_msg, valid_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """
    Class indices <np.int64: N> of a labels-topic cloud; IGNORE_INDEX for unlabeled points.

    Values outside CLASS_NAMES (NO_LABEL = 255 included) become IGNORE_INDEX; valid_mask
    <bool: height * width> keeps the points its LiDAR cloud kept (finite coordinates).
    """
    view = cloud_structured_view(labels_msg)
    if 'label' not in (view.dtype.names or ()):
        raise SensorDataError('labels cloud has no field named label')
    wire = view['label'].reshape(-1)
    if valid_mask is not None:
        if valid_mask.shape != wire.shape:
            raise SensorDataError(
                f'labels cloud has {wire.size} points but its LiDAR cloud has '
                f'{valid_mask.size}: they must align point for point')
        wire = wire[valid_mask]
    labels = wire.astype(np.int64)
    labels[(labels < 0) | (labels >= len(CLASS_NAMES))] = IGNORE_INDEX
    return labels


def frame_from_messages(image_msg, info_msg, cloud_msg, *,
                        T_cam_from_lidar: Optional[np.ndarray],
                        image_size: Optional[Tuple[int, int]], raw_image: bool = False,
                        labels_msg=None, sequence: str = '', index: int = 0,
                        T_odom_from_lidar: Optional[np.ndarray] = None,
                        T_odom_from_cam: Optional[np.ndarray] = None,
                        extra_cameras: Sequence[CameraView] = (),
                        camera_name: str = '') -> Frame:
    """
    Decode one matched set into a Frame; SensorDataError says what is wrong with it.

    T_cam_from_lidar: <4, 4> LiDAR -> camera; image_size: (width, height) the image is
    resized to (K scaled alike), None keeps it; raw_image: sensor_msgs/Image rather than
    CompressedImage; labels_msg: optional ground truth aligned with the cloud;
    T_odom_from_lidar: <4, 4> ego pose of the LiDAR at the sweep's stamp, if known;
    T_odom_from_cam: <4, 4> pose of the camera at the image's stamp, if known;
    extra_cameras: further cameras of the sweep (`camera_view_from_messages`);
    camera_name: the primary camera's name.
    """
    if info_msg is None:
        raise SensorDataError('no camera_info received yet: cannot project points')
    if T_cam_from_lidar is None:
        raise SensorDataError('no LiDAR->camera transform: set calibration.T_cam_from_lidar')
    image, K = decode_image(image_msg, info_msg, image_size, raw=raw_image)
    cloud = cloud_to_numpy(cloud_msg)
    labels = None if labels_msg is None else labels_from_message(labels_msg, cloud.valid_mask)
    intensity = cloud.fields.get('intensity')
    # Copies: the decoded arrays are read-only views of the message's buffer, which the
    # frame outlives (a window of frames, a cache).
    return Frame(
        image=image,
        points_lidar=np.array(cloud.points, dtype=np.float32),
        K=K, T_cam_from_lidar=np.array(T_cam_from_lidar, dtype=np.float64),
        stamp_lidar_ns=stamp_to_ns(cloud_msg.header.stamp),
        stamp_image_ns=stamp_to_ns(image_msg.header.stamp),
        intensity=(None if intensity is None
                   else np.array(intensity, dtype=np.float32).reshape(-1)),
        labels=labels, lidar_frame_id=str(cloud_msg.header.frame_id),
        sequence=sequence, index=index,
        T_odom_from_lidar=_pose(T_odom_from_lidar), T_odom_from_cam=_pose(T_odom_from_cam),
        extra_cameras=tuple(extra_cameras), camera_name=str(camera_name))


def camera_view_from_messages(name: str, image_msg, info_msg, *,
                              T_cam_from_lidar: Optional[np.ndarray],
                              image_size: Optional[Tuple[int, int]], raw_image: bool = False,
                              T_odom_from_cam: Optional[np.ndarray] = None) -> CameraView:
    """Decode one further camera's (image, camera_info) of a sweep, as frame_from_messages."""
    if info_msg is None:
        raise SensorDataError(f'no camera_info of camera {name} received yet')
    if T_cam_from_lidar is None:
        raise SensorDataError(f'no LiDAR->camera transform of camera {name}')
    image, K = decode_image(image_msg, info_msg, image_size, raw=raw_image)
    return CameraView(name=str(name), image=image, K=K,
                      T_cam_from_lidar=np.array(T_cam_from_lidar, dtype=np.float64),
                      stamp_image_ns=stamp_to_ns(image_msg.header.stamp),
                      T_odom_from_cam=_pose(T_odom_from_cam))


def _pose(T: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if T is None else np.array(T, dtype=np.float64)
