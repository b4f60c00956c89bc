"""
The pipeline: frames in, labeled points, packed cloud and overlay out, adapting as it goes.

One object graph serves the node, the offline scorer, the benchmarks, the demo and the
tests (all built by `core.builder.build_pipeline`): window, method step, collapse guard,
reset, save/load, output packing and palette are the same online and offline, so what
is scored offline is what the node publishes.
"""

from dataclasses import dataclass, replace
import threading
import time
from typing import Optional, Tuple

import numpy as np
import torch

from mmtta_ros.core.batching import frames_to_input, project_frame
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.decode import frame_from_messages
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.core.params import InputParams, OutputParams
from mmtta_ros.core.persist import PathLike
from mmtta_ros.core.window import FrameWindow
from mmtta_ros.sensors.pointcloud import encode_labeled_cloud, LabeledCloudBuffer
from mmtta_ros.sensors.projection import Projection
from mmtta_ros.viz.overlay import draw_points

# Fewer in-view points than this and a frame is rejected (see Pipeline.process).
MIN_POINTS_IN_VIEW = 64


@dataclass
class FrameOutput:
    """
    What the pipeline made of one frame.

    frame:          the frame processed
    in_view:        <bool: N> points that project into the image (the only ones labeled)
    prediction_2d:  <np.int64: M> 2D-branch class per in-view point (M = in_view.sum())
    prediction_3d:  <np.int64: M> 3D-branch class per in-view point
    prediction:     <np.int64: M> 2D+3D class (argmax of the averaged softmaxes)
    confidence:     <np.float32: M> averaged softmax probability of `prediction`
    pixels:         <np.float32: M, 2> (u, v) of the in-view points in the frame's image
    stats:          the adaptation method's numbers for this step (loss, entropy, ...)
    cloud:          the labeled cloud to publish (LiDAR frame, the sweep's stamp)
    overlay:        <np.uint8: H, W, 3> the image with labeled points, or None
    step_seconds:   time of the step (projection, model, adaptation), without packing
    """

    frame: Frame
    in_view: np.ndarray
    prediction_2d: np.ndarray
    prediction_3d: np.ndarray
    prediction: np.ndarray
    confidence: np.ndarray
    pixels: np.ndarray
    stats: dict
    cloud: Optional[LabeledCloudBuffer] = None
    overlay: Optional[np.ndarray] = None
    step_seconds: float = 0.0

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

    def labels_in_view(self) -> Optional[np.ndarray]:
        """Return the frame's ground-truth labels of the in-view points, or None if unlabeled."""
        if self.frame.labels is None:
            return None
        return np.asarray(self.frame.labels)[self.in_view]


class Pipeline:
    """
    Runs an adaptation method over a stream of frames, one frame at a time; thread-safe.

    A batch is the last `batch_frames` frames (the online protocol of the paper); the
    method adapts once per call and the prediction returned is the one for the newest
    frame of the batch. One lock serialises everything that touches the adapted state
    (process, reset, save, load), so a service call never sees half a step.
    """

    def __init__(self, method, device: torch.device, *, batch_frames: int = 1,
                 min_depth: float = 1.0, image_size: Optional[Tuple[int, int]] = None,
                 inputs: InputParams = InputParams(), output: OutputParams = OutputParams()):
        self.method = method
        self.device = torch.device(device)
        self.min_depth = float(min_depth)
        self.image_size = None if image_size is None else (int(image_size[0]),
                                                           int(image_size[1]))
        self.inputs = inputs
        self.output = output
        self._lock = threading.Lock()
        # Frames with their projections, so each frame is projected once however many
        # windows it takes part in.
        self._window: FrameWindow[Tuple[Frame, Projection]] = FrameWindow(batch_frames)

    @property
    def method_name(self) -> str:
        """Return the adaptation method's registry name."""
        return self.method.name

    # --- frames ------------------------------------------------------------------------
    def frame_from_messages(self, image_msg, info_msg, cloud_msg, labels_msg=None,
                            T_cam_from_lidar: Optional[np.ndarray] = None) -> Frame:
        """Decode a matched set with this pipeline's image size and calibration."""
        return frame_from_messages(
            image_msg, info_msg, cloud_msg, labels_msg=labels_msg,
            T_cam_from_lidar=(self.inputs.T_cam_from_lidar if T_cam_from_lidar is None
                              else T_cam_from_lidar),
            image_size=self.image_size, raw_image=self.inputs.raw_image)

    def process_messages(self, image_msg, info_msg, cloud_msg) -> FrameOutput:
        """Decode and process one matched set (SensorDataError for bad input)."""
        return self.process(self.frame_from_messages(image_msg, info_msg, cloud_msg))

    def process(self, frame: Frame) -> FrameOutput:
        """
        Adapt on the window ending with `frame`; return its labels, packed cloud and overlay.

        SensorDataError if fewer than MIN_POINTS_IN_VIEW of its points project into the
        image (a covered camera, a wrong extrinsic): batch norm in train mode needs more
        than one value per channel, and so few points say nothing about the scene. A
        rejected frame does not enter the window.
        """
        return self._run(frame, adapt=True)

    def predict(self, frame: Frame) -> FrameOutput:
        """Label `frame` with the method's current state, adapting nothing (no window)."""
        return self._run(frame, adapt=False)

    def prediction_state(self) -> dict:
        """Return a copy of what the method's prediction depends on (never half a step)."""
        with self._lock:
            return self.method.prediction_state()

    def load_prediction_state(self, state: dict) -> None:
        """Load another copy's prediction state between two frames."""
        with self._lock:
            self.method.load_prediction_state(state)

    def _run(self, frame: Frame, adapt: bool) -> FrameOutput:
        started = time.perf_counter()
        projection = project_frame(frame, self.min_depth)
        in_view = int(np.count_nonzero(projection.in_view))
        if in_view < MIN_POINTS_IN_VIEW:
            raise SensorDataError(
                f'only {in_view} LiDAR points project into the image (need '
                f'{MIN_POINTS_IN_VIEW}): camera covered, or T_cam_from_lidar / K wrong?')
        with self._lock:
            if adapt:
                frames, projections = zip(*self._window.push((frame, projection)))
            else:
                frames, projections = (frame,), (projection,)
            inputs, in_view_masks = frames_to_input(frames, self.device,
                                                    projections=projections)
            if adapt:
                prediction = self.method.step(inputs)
                stats = dict(getattr(self.method, 'stats', {}) or {})
            else:
                prediction, stats = self.method.predict(inputs), {}
        newest = inputs.batch_index == len(frames) - 1
        with torch.no_grad():
            probs = prediction.probs_2d3d()[newest]
            confidence, labels = probs.max(dim=1)
            labels_2d = prediction.logits_2d[newest].argmax(dim=1)
            labels_3d = prediction.logits_3d[newest].argmax(dim=1)
        output = FrameOutput(
            frame=frame, in_view=in_view_masks[-1],
            prediction_2d=_numpy(labels_2d), prediction_3d=_numpy(labels_3d),
            prediction=_numpy(labels), confidence=_numpy(confidence).astype(np.float32),
            pixels=_numpy(inputs.pixels[newest]).astype(np.float32), stats=stats)
        output.step_seconds = time.perf_counter() - started
        return self._pack(output)

    def _pack(self, output: FrameOutput) -> FrameOutput:
        """Add the labeled cloud and the overlay, as the output settings say."""
        settings, frame = self.output, output.frame
        if settings.include_out_of_view:
            points, labels = frame.points_lidar, output.labels_full()
            confidence, intensity = output.confidence_full(), frame.intensity
        else:
            points, labels = frame.points_lidar[output.in_view], output.prediction
            confidence = output.confidence
            intensity = None if frame.intensity is None else frame.intensity[output.in_view]
        output.cloud = encode_labeled_cloud(points, labels, confidence, intensity,
                                            settings.palette)
        if settings.publish_overlay:
            colors = settings.palette[np.clip(output.prediction, 0, len(settings.palette) - 1)]
            output.overlay = draw_points(frame.image, output.pixels, colors)
        return output

    def set_output(self, **changes) -> None:
        """Change output settings at run time (include_out_of_view, publish_overlay)."""
        self.output = replace(self.output, **changes)

    # --- adapted state -----------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source model, bit for bit, and an empty window."""
        with self._lock:
            self.method.reset()
            self._window.clear()

    def reset_window(self) -> None:
        """Forget buffered frames (after a time jump: they belong to another stretch)."""
        with self._lock:
            self._window.clear()

    def save_state(self, path: PathLike) -> None:
        """Write the adapted state to `path` atomically."""
        with self._lock:
            self.method.save_state(path)

    def load_state(self, path: PathLike) -> None:
        """Restore an adapted state written by save_state."""
        with self._lock:
            self.method.load_state(path)
            self._window.clear()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
