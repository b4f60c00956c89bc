"""
How far the static and the ego-motion compensated projections land from a reference.

The reference is the same points' pixels by another route: the nuScenes devkit's chain
through the ego poses at both stamps, or a synthetic drive's true poses. Errors are over
the points the reference sees (in front beyond min_depth and inside the image); a point
the projection puts in view and the reference does not, or the other way round, counts
as changing in or out of view.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import numpy as np

from mmtta_ros.core.batching import project_frame
from mmtta_ros.core.frame import Frame
from mmtta_ros.sensors.projection import check_transform

HOW = {'static': False, 'compensated': True}


@dataclass(frozen=True)
class ProjectionError:
    """
    A projection against the reference, over every frame given.

    median_px, max_px: pixel distance over the points the reference sees (and the
                       projection puts in front of the camera)
    changed_view:      points whose in-view status differs from the reference's, as a
                       share of the points the reference sees
    points:            points the reference sees
    """

    median_px: float
    max_px: float
    changed_view: float
    points: int

    def line(self) -> str:
        """Return the figures as one line."""
        return (f'median {self.median_px:.3f} px, max {self.max_px:.3f} px, '
                f'{100 * self.changed_view:.2f} % of {self.points} in-view points change view')


def exact_projection(points_lidar: np.ndarray, T_cam_from_lidar: np.ndarray, K: np.ndarray,
                     image_size: Tuple[int, int],
                     min_depth: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return reference pixels <np.float64: N, 2> and in-view mask <bool: N>, all float64.

    The rule of `sensors.projection.project_points` (depth > min_depth, pixel inside
    [0, width) x [0, height)) without its float32 rounding.
    """
    T = check_transform(T_cam_from_lidar)
    points_cam = np.asarray(points_lidar, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]
    uvw = points_cam @ np.asarray(K, dtype=np.float64).T
    depth = points_cam[:, 2]
    in_front = depth > min_depth
    pixels = uvw[:, :2] / np.where(in_front, depth, 1.0)[:, None]
    width, height = image_size
    in_view = (in_front & (pixels[:, 0] >= 0) & (pixels[:, 0] < width)
               & (pixels[:, 1] >= 0) & (pixels[:, 1] < height))
    return pixels, in_view


def projection_errors(cases: Iterable[Tuple[Frame, np.ndarray, np.ndarray]],
                      min_depth: float = 1.0) -> Dict[str, ProjectionError]:
    """
    Return {'static': ..., 'compensated': ...} over (frame, reference pixels, in-view) cases.

    Reference pixels <N, 2> and in-view mask <bool: N> are per point of the frame's
    points_lidar. 'compensated' projects through the frame's two ego poses
    (`core.batching.project_frame` with ego_motion, as the pipeline does).
    """
    errors = {name: [] for name in HOW}
    changed = {name: 0 for name in HOW}
    seen_total = 0
    for frame, reference_pixels, reference_in_view in cases:
        reference_in_view = np.asarray(reference_in_view, dtype=bool)
        seen_total += int(reference_in_view.sum())
        for name, ego_motion in HOW.items():
            if ego_motion and (frame.T_odom_from_lidar is None or frame.T_odom_from_cam is None):
                raise ValueError(f'frame {frame.index} of {frame.sequence!r} has no ego poses: '
                                 'nothing to compensate with')
            projection = project_frame(frame, min_depth, ego_motion=ego_motion)
            both = reference_in_view & (projection.depth > min_depth)
            errors[name].append(np.linalg.norm(
                projection.pixels[both].astype(np.float64) - reference_pixels[both], axis=1))
            changed[name] += int(np.count_nonzero(projection.in_view != reference_in_view))
    if seen_total == 0:
        raise ValueError('the reference sees no point: nothing to compare')
    result = {}
    for name in HOW:
        distances = np.concatenate(errors[name])
        result[name] = ProjectionError(
            median_px=float(np.median(distances)), max_px=float(distances.max()),
            changed_view=changed[name] / seen_total, points=seen_total)
    return result


def label_agreement(frame: Frame, label_image: np.ndarray, ego_motion: bool,
                    min_depth: float = 1.0) -> Tuple[int, int]:
    """
    Return (agreeing, compared): in-view points whose label is the image's at their pixel.

    label_image: <np.int64: H, W> the class of each pixel of the frame's image (a
    renderer's ground truth); points or pixels without a class (< 0) are not compared.
    An independent check of a projection: the true label under the point, not a formula.
    """
    if frame.labels is None:
        raise ValueError(f'frame {frame.index} of {frame.sequence!r} has no labels')
    projection = project_frame(frame, min_depth, ego_motion=ego_motion)
    height, width = label_image.shape
    pixels = np.clip(np.rint(projection.pixels[projection.in_view]).astype(np.int64), 0,
                     [width - 1, height - 1])
    point_labels = np.asarray(frame.labels)[projection.in_view]
    image_labels = label_image[pixels[:, 1], pixels[:, 0]]
    compared = (point_labels >= 0) & (image_labels >= 0)
    return (int(np.count_nonzero(point_labels[compared] == image_labels[compared])),
            int(np.count_nonzero(compared)))
