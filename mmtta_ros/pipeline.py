"""
The ROS-free per-frame pipeline: frames in, per-point labels out, adapting as it goes.

The node, the offline scorer and the tests all drive this one class, so what is scored
offline is exactly what the node publishes.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmtta_ros.errors import SensorDataError
from mmtta_ros.frame import Frame, IGNORE_INDEX
from mmtta_ros.models.segmenter import make_segmenter_input, SegmenterInput
from mmtta_ros.sensors.projection import project_points, Projection
from mmtta_ros.tta.window import FrameWindow


# Fewer in-view points than this and a frame is rejected (see SegmentationPipeline.process).
MIN_POINTS_IN_VIEW = 64


@dataclass
class FrameResult:
    """
    What the pipeline made of one frame.

    in_view:        <bool: N> points that project into the image (the only ones labeled)
    prediction_2d:  <np.int64: M> 2D-branch class per in-view point (M = in_view.sum())
    prediction_3d:  <np.int64: M> 3D-branch class per in-view point
    prediction:     <np.int64: M> 2D+3D class (argmax of the averaged softmaxes)
    confidence:     <np.float32: M> averaged softmax probability of `prediction`
    pixels:         <np.float32: M, 2> (u, v) of the in-view points in the frame's image
    stats:          the adaptation method's numbers for this step (loss, entropy, ...)
    """

    in_view: np.ndarray
    prediction_2d: np.ndarray
    prediction_3d: np.ndarray
    prediction: np.ndarray
    confidence: np.ndarray
    pixels: np.ndarray
    stats: dict

    def labels_full(self) -> np.ndarray:
        """Return <np.int64: N> 2D+3D class per input point, IGNORE_INDEX out of view."""
        labels = np.full(self.in_view.shape, IGNORE_INDEX, dtype=np.int64)
        labels[self.in_view] = self.prediction
        return labels

    def confidence_full(self) -> np.ndarray:
        """Return <np.float32: N> confidence per input point, 0 out of view."""
        confidence = np.zeros(self.in_view.shape, dtype=np.float32)
        confidence[self.in_view] = self.confidence
        return confidence


def project_frame(frame: Frame, min_depth: float = 1.0) -> Projection:
    """Project a frame's LiDAR points into its image."""
    return project_points(frame.points_lidar, frame.T_cam_from_lidar, frame.K,
                          frame.image_size, min_depth=min_depth)


def frames_to_input(frames: Sequence[Frame], device: torch.device, min_depth: float = 1.0,
                    projections: Optional[Sequence[Projection]] = None
                    ) -> Tuple[SegmenterInput, List[np.ndarray]]:
    """Stack the in-view points of frames into one SegmenterInput (projecting if not given)."""
    if projections is None:
        projections = [project_frame(frame, min_depth) for frame in frames]
    in_view_masks = [projection.in_view for projection in projections]
    pixels_list = [projection.pixels for projection in projections]
    inputs = make_segmenter_input(list(frames), in_view_masks, pixels_list, device)
    return inputs, in_view_masks


class SegmentationPipeline:
    """
    Runs an adaptation method over a stream of frames, one frame at a time.

    A batch is the last `batch_frames` frames (the online protocol of the paper); the
    method adapts once per call and the prediction returned is the one for the newest
    frame of the batch.
    """

    def __init__(self, method, device: torch.device, batch_frames: int = 1,
                 min_depth: float = 1.0):
        self.method = method
        self.device = torch.device(device)
        self.min_depth = float(min_depth)
        # Frames with their projections, so each frame is projected once however many
        # windows it takes part in.
        self._window: FrameWindow[Tuple[Frame, Projection]] = FrameWindow(batch_frames)

    def reset_window(self) -> None:
        """Forget buffered frames (after a time jump: they belong to another stretch)."""
        self._window.clear()

    def process(self, frame: Frame) -> FrameResult:
        """
        Adapt on the window ending with `frame` and return the labels of `frame`.

        SensorDataError if fewer than MIN_POINTS_IN_VIEW of its points project into the
        image (a covered camera, a wrong extrinsic): batch norm in train mode needs more
        than one value per channel, and so few points say nothing about the scene. A
        rejected frame does not enter the window.
        """
        projection = project_frame(frame, self.min_depth)
        in_view = int(np.count_nonzero(projection.in_view))
        if in_view < MIN_POINTS_IN_VIEW:
            raise SensorDataError(
                f'only {in_view} LiDAR points project into the image (need '
                f'{MIN_POINTS_IN_VIEW}): camera covered, or T_cam_from_lidar / K wrong?')
        frames, projections = zip(*self._window.push((frame, projection)))
        inputs, in_view_masks = frames_to_input(frames, self.device, projections=projections)
        output = self.method.step(inputs)
        newest = inputs.batch_index == len(frames) - 1
        with torch.no_grad():
            probs = output.probs_2d3d()[newest]
            confidence, prediction = probs.max(dim=1)
            prediction_2d = output.logits_2d[newest].argmax(dim=1)
            prediction_3d = output.logits_3d[newest].argmax(dim=1)
        return FrameResult(
            in_view=in_view_masks[-1],
            prediction_2d=_numpy(prediction_2d),
            prediction_3d=_numpy(prediction_3d),
            prediction=_numpy(prediction),
            confidence=_numpy(confidence).astype(np.float32),
            pixels=_numpy(inputs.pixels[newest]).astype(np.float32),
            stats=dict(getattr(self.method, 'stats', {}) or {}),
        )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def configure_torch(device: str = 'auto', threads: int = 0) -> torch.device:
    """Set torch's CPU threads (0 keeps torch's default) and return the selected device."""
    if threads:
        torch.set_num_threads(int(threads))
    return select_device(device)


def select_device(name: str = 'auto') -> torch.device:
    """Turn 'auto' | 'cuda' | 'cpu' into a torch.device; 'cuda' without a GPU is an error."""
    name = str(name).lower()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError('device cuda requested but torch sees no CUDA device; '
                             'use auto or cpu')
        return torch.device(name)
    if name == 'cpu':
        return torch.device('cpu')
    raise ValueError(f'unknown device {name!r}; use auto, cuda or cpu')


def labels_in_view(frame: Frame, result: FrameResult) -> Optional[np.ndarray]:
    """Return the frame's ground-truth labels of the in-view points, or None if unlabeled."""
    if frame.labels is None:
        return None
    return np.asarray(frame.labels)[result.in_view]
