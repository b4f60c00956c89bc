"""LiDAR-to-camera projection and extrinsics parsing (pure numpy)."""

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.image import check_intrinsics


@dataclass
class Projection:
    """
    LiDAR points seen by a pinhole camera.

    pixels:  <np.float32: N, 2> (u = column, v = row) in pixels; meaningful where in_view
    depth:   <np.float32: N> z in the camera frame, metres (negative: behind the camera)
    in_view: <bool: N> in front of the camera beyond min_depth and inside the image
    """

    pixels: np.ndarray
    depth: np.ndarray
    in_view: np.ndarray


def project_points(points_lidar: np.ndarray, T_cam_from_lidar: np.ndarray, K: np.ndarray,
                   image_size: Tuple[int, int], min_depth: float = 1.0) -> Projection:
    """
    Project <float32: N, 3> LiDAR-frame points into an image of size (width, height).

    T_cam_from_lidar: <4, 4> maps LiDAR-frame points to the camera optical frame
    (x right, y down, z forward). K: <3, 3> intrinsics. A point is in view when its
    depth exceeds min_depth (metres) and its pixel lies in [0, width) x [0, height).
    """
    points_lidar = np.asarray(points_lidar)
    if points_lidar.ndim != 2 or points_lidar.shape[1] != 3:
        raise SensorDataError(f'points have shape {points_lidar.shape}, expected (N, 3)')
    check_intrinsics(K)
    T = check_transform(T_cam_from_lidar)
    width, height = int(image_size[0]), int(image_size[1])
    if width <= 0 or height <= 0:
        raise SensorDataError(f'image size is {width}x{height}')

    # One fused 3x4 matrix: pixel homogeneous coords straight from LiDAR points.
    P = (np.asarray(K, dtype=np.float64) @ T[:3]).astype(np.float32)
    uvw = points_lidar.astype(np.float32, copy=False) @ P[:, :3].T + P[:, 3]
    depth = uvw[:, 2]  # K's last row is (0, 0, 1), so w is the camera-frame z
    in_front = depth > min_depth
    # Dividing by a depth at or behind the camera is meaningless; keep those finite.
    safe_w = np.where(in_front, uvw[:, 2], np.float32(1.0))
    pixels = uvw[:, :2] / safe_w[:, None]
    u, v = pixels[:, 0], pixels[:, 1]
    in_view = in_front & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    return Projection(pixels=pixels, depth=depth, in_view=in_view)


def check_transform(T: np.ndarray) -> np.ndarray:
    """Return T as <np.float64: 4, 4> or raise SensorDataError if it is not a rigid transform."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise SensorDataError(f'transform has shape {T.shape}, expected (4, 4)')
    if not np.all(np.isfinite(T)):
        raise SensorDataError('transform contains NaN or inf')
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0]):
        raise SensorDataError(f'transform last row is {T[3].tolist()}, expected [0, 0, 0, 1]')
    R = T[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise SensorDataError('transform rotation is not a proper rotation matrix')
    return T


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Return the inverse <np.float64: 4, 4> of a rigid transform (R^T, -R^T t), exactly."""
    T = np.asarray(T, dtype=np.float64)
    inverse = np.eye(4)
    inverse[:3, :3] = T[:3, :3].T
    inverse[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return inverse


def ego_motion_cam_from_lidar(T_odom_from_lidar: np.ndarray,
                              T_odom_from_cam: np.ndarray) -> np.ndarray:
    """
    T_cam_from_lidar <np.float64: 4, 4> across the ego motion between two stamps.

    T_odom_from_lidar: <4, 4> the LiDAR's pose at the sweep's stamp; T_odom_from_cam:
    <4, 4> the camera's pose at the image's stamp, both in one fixed (odometry) frame. A
    point goes LiDAR -> odom at the sweep's stamp, then odom -> camera at the image's:
    the nuScenes devkit's chain (LiDAR -> ego at the LiDAR stamp -> global -> ego at the
    image stamp -> camera), whose middle steps are the two poses. SensorDataError if
    either is not a rigid transform.
    """
    T_odom_from_lidar = check_transform(T_odom_from_lidar)
    T_odom_from_cam = check_transform(T_odom_from_cam)
    return rigid_inverse(T_odom_from_cam) @ T_odom_from_lidar


def quaternion_to_matrix(q_xyzw) -> np.ndarray:
    """Rotation <np.float64: 3, 3> from a quaternion (x, y, z, w), ROS order; normalised."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    norm = np.linalg.norm(q)
    if q.shape != (4,) or not np.isfinite(norm) or norm < 1e-9:
        raise SensorDataError(f'quaternion {q.tolist()} is not a usable rotation')
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def transform_from_translation_quaternion(translation, q_xyzw) -> np.ndarray:
    """<np.float64: 4, 4> from a translation (x, y, z) and a quaternion (x, y, z, w)."""
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise SensorDataError(f'translation {np.asarray(translation).tolist()} is not 3 numbers')
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(q_xyzw)
    T[:3, 3] = t
    return T


def parse_extrinsics(value) -> np.ndarray:
    """
    Read T_cam_from_lidar <np.float64: 4, 4> from a YAML / ROS parameter value.

    Accepted forms:
      - 16 numbers (row-major 4x4) or a nested 4x4 list;
      - 7 numbers: translation x, y, z then quaternion x, y, z, w;
      - a mapping {translation: [x, y, z], rotation: [x, y, z, w]} ('quaternion' also accepted).
    """
    if isinstance(value, dict):
        rotation = value.get('rotation', value.get('quaternion'))
        if 'translation' not in value or rotation is None:
            raise SensorDataError(
                f'extrinsics mapping needs keys translation and rotation, got {sorted(value)}')
        return check_transform(
            transform_from_translation_quaternion(value['translation'], rotation))
    try:
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise SensorDataError(f'extrinsics {value!r} are not numbers')
    if flat.size == 16:
        return check_transform(flat.reshape(4, 4))
    if flat.size == 7:
        return check_transform(transform_from_translation_quaternion(flat[:3], flat[3:]))
    raise SensorDataError(
        f'extrinsics have {flat.size} numbers; expected 16 (4x4 row-major) or 7 '
        '(x y z qx qy qz qw)')
