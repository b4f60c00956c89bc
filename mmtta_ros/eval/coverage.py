"""
Camera coverage: the share of sweep points some camera sees, so the node labels them.

With one camera most of a spinning LiDAR's sweep lies outside the image and is published
as 65535 (or labeled by the 3D branch alone, `output.label_unseen_3d`); each further camera
labels what it sees. Counted with the node's own projection and assignment
(`core.batching.project_views`).
"""

from dataclasses import dataclass, field, replace
from typing import Iterable, List, Sequence

import numpy as np

from mmtta_ros.core.batching import project_views
from mmtta_ros.core.frame import Frame


@dataclass
class Coverage:
    """
    Points of a set of sweeps and how many a camera labels.

    frames:     sweeps counted
    points:     their points
    labeled:    points in view of some camera (labeled by 2D+3D, not 65535)
    per_camera: points assigned to each camera, primary first
    """

    frames: int = 0
    points: int = 0
    labeled: int = 0
    per_camera: List[int] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Return labeled / points (0 for no points)."""
        return self.labeled / self.points if self.points else 0.0


def coverage(frames: Iterable[Frame], num_cameras: int = 0, min_depth: float = 1.0,
             ego_motion: bool = True) -> Coverage:
    """
    Count the labeled points of `frames` using their first `num_cameras` cameras (0: all).

    min_depth, ego_motion: the node's (min_depth, calibration.ego_motion).
    """
    result = Coverage()
    for frame in frames:
        if num_cameras:
            frame = replace(frame, extra_cameras=tuple(frame.extra_cameras[:num_cameras - 1]))
        masks = [p.in_view for p in project_views(frame, min_depth, ego_motion)]
        counts = [int(np.count_nonzero(mask)) for mask in masks]
        if not result.per_camera:
            result.per_camera = [0] * len(counts)
        result.per_camera = [a + b for a, b in zip(result.per_camera, counts)]
        result.frames += 1
        result.points += frame.num_points
        result.labeled += sum(counts)
    return result


def coverage_table(frames: Sequence[Frame], min_depth: float = 1.0,
                   ego_motion: bool = True) -> List[str]:
    """Return one line per camera count (1 .. all the frames have): share of points labeled."""
    if not frames:
        raise ValueError('no frames to count')
    names = [view.name or f'camera {k}' for k, view in enumerate(frames[0].views())]
    lines = []
    for count in range(1, len(names) + 1):
        result = coverage(frames, count, min_depth, ego_motion)
        lines.append(f'{count} camera(s) ({", ".join(names[:count])}): {result.labeled} of '
                     f'{result.points} points labeled ({100 * result.share:.1f} %) over '
                     f'{result.frames} sweeps')
    return lines
