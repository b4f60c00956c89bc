"""
The one frame type every source produces: generator, bag reader, nuScenes loader, node.

A frame is one LiDAR sweep paired with the camera image closest in time, plus the
calibration that relates them; a rig with more cameras adds one `CameraView` per further
camera (`Frame.extra_cameras`), the frame's own image being the first (primary) camera.
Everything downstream (projection, segmenter, adaptation, scoring) reads frames and
nothing else.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass
class CameraView:
    """
    One camera's image of a sweep, with its calibration (the fields as in Frame).

    name:             the camera's name (CAM_BACK), for messages and outputs only
    image:            <np.uint8: H, W, 3> RGB, the primary camera's size
    K:                <np.float64: 3, 3> intrinsics of `image`
    T_cam_from_lidar: <np.float64: 4, 4> LiDAR frame -> this camera's optical frame
    stamp_image_ns:   image time, integer nanoseconds
    T_odom_from_cam:  <np.float64: 4, 4> pose of this camera at `stamp_image_ns`, or None
    """

    name: str
    image: np.ndarray
    K: np.ndarray
    T_cam_from_lidar: np.ndarray
    stamp_image_ns: int = 0
    T_odom_from_cam: Optional[np.ndarray] = None


@dataclass
class Frame:
    """
    One LiDAR sweep, the matching camera image and their calibration.

    image:            <np.uint8: H, W, 3> RGB, as the segmenter sees it (already resized)
    points_lidar:     <np.float32: N, 3> x, y, z in the LiDAR frame, metres
    K:                <np.float64: 3, 3> intrinsics of `image` (scaled with any resize)
    T_cam_from_lidar: <np.float64: 4, 4> maps LiDAR-frame points into the camera frame
    stamp_lidar_ns:   LiDAR sweep time, integer nanoseconds
    stamp_image_ns:   image time, integer nanoseconds
    intensity:        <np.float32: N> LiDAR return intensity, or None
    labels:           <np.int64: N> class index into CLASS_NAMES, IGNORE_INDEX where
                      unknown; None for unlabeled target data
    lidar_frame_id:   the LiDAR's frame_id (output clouds are published in it)
    sequence:         name of the sequence / scene the frame comes from
    index:            position of the frame in that sequence
    T_odom_from_lidar: <np.float64: 4, 4> pose of the LiDAR at `stamp_lidar_ns` in a fixed
                      odometry frame (maps LiDAR-frame points into odom), or None where
                      the source has no ego pose (the live node without tf2_ros)
    T_odom_from_cam:  <np.float64: 4, 4> pose of the camera (optical frame) at
                      `stamp_image_ns` in the same odometry frame, or None where unknown;
                      with T_odom_from_lidar it compensates the ego motion between the two
                      stamps (`core.batching.camera_from_lidar`)
    extra_cameras:    further cameras of the rig, synchronised with the same sweep (empty:
                      a one-camera frame, as every source gives by default)
    camera_name:      the name of the primary camera ('' where the source has none)
    """

    image: np.ndarray
    points_lidar: np.ndarray
    K: np.ndarray
    T_cam_from_lidar: np.ndarray
    stamp_lidar_ns: int = 0
    stamp_image_ns: int = 0
    intensity: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    lidar_frame_id: str = 'lidar'
    sequence: str = ''
    index: int = 0
    T_odom_from_lidar: Optional[np.ndarray] = None
    T_odom_from_cam: Optional[np.ndarray] = None
    extra_cameras: Tuple[CameraView, ...] = ()
    camera_name: str = ''

    @property
    def num_cameras(self) -> int:
        """Return the number of cameras: the primary one and the extra ones."""
        return 1 + len(self.extra_cameras)

    def views(self) -> Tuple[CameraView, ...]:
        """Return every camera of the frame as a CameraView, the primary camera first."""
        primary = CameraView(name=self.camera_name, image=self.image, K=self.K,
                             T_cam_from_lidar=self.T_cam_from_lidar,
                             stamp_image_ns=self.stamp_image_ns,
                             T_odom_from_cam=self.T_odom_from_cam)
        return (primary,) + tuple(self.extra_cameras)

    @property
    def image_size(self) -> Tuple[int, int]:
        """Return (width, height) of the image in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    @property
    def num_points(self) -> int:
        """Return the number of LiDAR points."""
        return int(self.points_lidar.shape[0])
