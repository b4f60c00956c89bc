"""
Batching: frames and their projections -> the segmenter's input (one place, every caller).

The pipeline, source training and the tests all batch through `frames_to_input`, so the
model module never needs to know what a Frame is.
"""

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.models.segmenter import SegmenterInput
from mmtta_ros.sensors.projection import (
    ego_motion_cam_from_lidar, project_points, Projection)


def camera_from_lidar(frame: Frame, ego_motion: bool = False) -> np.ndarray:
    """
    Return the LiDAR -> camera transform <np.float64: 4, 4> to project `frame` with.

    ego_motion and both poses known (T_odom_from_lidar at the sweep's stamp,
    T_odom_from_cam at the image's): the transform across the car's motion between the
    two stamps (`sensors.projection.ego_motion_cam_from_lidar`); else the static
    frame.T_cam_from_lidar.
    """
    if ego_motion and frame.T_odom_from_lidar is not None and frame.T_odom_from_cam is not None:
        return ego_motion_cam_from_lidar(frame.T_odom_from_lidar, frame.T_odom_from_cam)
    return frame.T_cam_from_lidar


def project_frame(frame: Frame, min_depth: float = 1.0, ego_motion: bool = False) -> Projection:
    """
    Project a frame's LiDAR points into its image (see camera_from_lidar for ego_motion).

    The one projection of frames: the pipeline (node, scorer, suite) passes its
    calibration.ego_motion; training and other callers keep the static transform.
    """
    return project_points(frame.points_lidar, camera_from_lidar(frame, ego_motion), frame.K,
                          frame.image_size, min_depth=min_depth)


def view_frames(frame: Frame) -> List[Frame]:
    """
    Return one one-camera Frame per camera of `frame` (the frame itself for one camera).

    Each shares the sweep (points, intensity, labels, pose) and takes one camera's image,
    intrinsics, extrinsics, stamp and pose; the primary camera comes first.
    """
    if not frame.extra_cameras:
        return [frame]
    return [replace(frame, image=view.image, K=view.K, T_cam_from_lidar=view.T_cam_from_lidar,
                    stamp_image_ns=view.stamp_image_ns, T_odom_from_cam=view.T_odom_from_cam,
                    extra_cameras=(), camera_name=view.name)
            for view in frame.views()]


def project_views(frame: Frame, min_depth: float = 1.0,
                  ego_motion: bool = False) -> List[Projection]:
    """
    Project a frame's points into each of its cameras; each point goes to one camera at most.

    Returns one Projection per camera (view_frames order) whose in_view masks are
    disjoint: a point seen by several cameras stays in view only of the one where it lies
    farthest from the image border (in pixels; ties go to the earlier camera), so every
    point is labeled once, by the view that sees it with the most context around it. One
    camera: [project_frame(frame)], unchanged.
    """
    views = view_frames(frame)
    projections = [project_frame(view, min_depth, ego_motion) for view in views]
    if len(projections) == 1:
        return projections
    width, height = frame.image_size
    margins = np.full((len(views), frame.num_points), -np.inf, dtype=np.float32)
    for row, projection in zip(margins, projections):
        u, v = projection.pixels[:, 0], projection.pixels[:, 1]
        margin = np.minimum(np.minimum(u, width - u), np.minimum(v, height - v))
        row[projection.in_view] = margin[projection.in_view]
    seen = np.isfinite(margins).any(axis=0)
    best = np.argmax(margins, axis=0)  # the first maximum: ties go to the earlier camera
    return [replace(projection, in_view=seen & (best == camera))
            for camera, projection in enumerate(projections)]


def frames_to_input(frames: Sequence[Frame], device: torch.device, min_depth: float = 1.0,
                    projections: Optional[Sequence[Projection]] = None,
                    ego_motion: bool = False) -> Tuple[SegmenterInput, List[np.ndarray]]:
    """Stack the in-view points of frames into one SegmenterInput (projecting if not given)."""
    if projections is None:
        projections = [project_frame(frame, min_depth, ego_motion) for frame in frames]
    in_view_masks = [projection.in_view for projection in projections]
    pixels_list = [projection.pixels for projection in projections]
    inputs = make_segmenter_input(list(frames), in_view_masks, pixels_list, device)
    return inputs, in_view_masks


def make_segmenter_input(frames: Sequence[Frame], in_view_masks: Sequence[np.ndarray],
                         pixels_list: Sequence[np.ndarray], device) -> SegmenterInput:
    """
    Batch frames for the segmenter: stack images, keep in-view points, round pixels.

    frames:        B frames whose images all have the same size
    in_view_masks: per frame <bool: N> points that project into the image
    pixels_list:   per frame <float32: N, 2> projected (u, v), pixel centres at integers
    Pixels are rounded to the nearest pixel and clipped into the image. The frames' poses
    T_odom_from_lidar become <float64: B, 4, 4>, or None when any frame lacks one. Raises
    SensorDataError (a ValueError) for mismatched sizes or shapes.
    """
    if not frames:
        raise ValueError('make_segmenter_input needs at least one frame')
    if not len(frames) == len(in_view_masks) == len(pixels_list):
        raise ValueError(f'got {len(frames)} frames, {len(in_view_masks)} masks and '
                         f'{len(pixels_list)} pixel arrays; need one of each per frame')
    image_shape = frames[0].image.shape
    if len(image_shape) != 3 or image_shape[2] != 3:
        raise SensorDataError(f'images must be (H, W, 3) RGB, got {image_shape}')
    height, width = image_shape[:2]
    pixels_kept, points_kept = [], []
    for i, (frame, mask, pixels) in enumerate(zip(frames, in_view_masks, pixels_list)):
        if frame.image.shape != image_shape:
            raise SensorDataError(
                f'frame {i} image is {frame.image.shape}, frame 0 image is {image_shape}: '
                'a batch needs images of one size (resize them first)')
        num_points = frame.points_lidar.shape[0]
        mask = np.asarray(mask)
        pixels = np.asarray(pixels)
        if mask.shape != (num_points,) or mask.dtype != np.bool_:
            raise SensorDataError(f'frame {i}: in-view mask must be bool ({num_points},), got '
                                  f'{mask.dtype} {mask.shape}')
        if pixels.shape != (num_points, 2):
            raise SensorDataError(f'frame {i}: pixels must be ({num_points}, 2), '
                                  f'got {pixels.shape}')
        pixels_in_view = pixels[mask]
        if not np.isfinite(pixels_in_view).all():
            raise SensorDataError(f'frame {i}: non-finite pixel coordinates of in-view points')
        pixels_kept.append(np.clip(np.rint(pixels_in_view), 0, [width - 1, height - 1]))
        points_kept.append(frame.points_lidar[mask])
    batch_index = np.repeat(np.arange(len(frames), dtype=np.int64),
                            [p.shape[0] for p in points_kept])
    images = np.stack([frame.image for frame in frames])
    # Move the uint8 images and convert there: 4x less to copy to a GPU.
    images = _to_device(images, device).permute(0, 3, 1, 2).float().div(255)
    return SegmenterInput(
        images=images.contiguous(),
        pixels=_to_device(np.concatenate(pixels_kept).astype(np.int64), device),
        batch_index=_to_device(batch_index, device),
        points=_to_device(np.concatenate(points_kept).astype(np.float32), device),
        T_odom_from_lidar=_batch_poses(frames, device),
    )


def _to_device(array: np.ndarray, device) -> torch.Tensor:
    """Return `array` on `device`; to a GPU from page-locked memory, without a host sync."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type != 'cuda':
        return tensor.to(device)
    # A pinned source lets the copy run asynchronously on the stream; the kernels that
    # read it are queued behind it, so nothing waits on the host.
    return tensor.pin_memory().to(device, non_blocking=True)


def _batch_poses(frames: Sequence[Frame], device) -> Optional[torch.Tensor]:
    """Return <float64: B, 4, 4> the frames' T_odom_from_lidar, None if any frame has none."""
    poses = [frame.T_odom_from_lidar for frame in frames]
    if any(pose is None for pose in poses):
        return None
    for i, pose in enumerate(poses):
        if np.shape(pose) != (4, 4) or not np.isfinite(pose).all():
            raise SensorDataError(f'frame {i}: T_odom_from_lidar must be a finite 4 x 4 '
                                  f'matrix, got shape {np.shape(pose)}')
    # float64: odometry coordinates run to kilometres, where float32 keeps only millimetres.
    return _to_device(np.stack(poses).astype(np.float64), device)
