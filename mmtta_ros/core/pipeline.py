"""
The pipeline: frames in, labeled points, packed cloud and overlay out, adapting as it goes.

One object graph serves the node, the offline scorer, the benchmarks, the demo and the
tests (all built by `core.builder.build_pipeline`): window, method step, collapse guard,
reset, save/load, output packing and palette are the same online and offline, so what
is scored offline is what the node publishes.
"""

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mmtta_ros.core.batching import frames_to_input, project_views, view_frames
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.decode import camera_view_from_messages, frame_from_messages
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import CameraView, Frame
from mmtta_ros.core.params import InputParams, OutputParams
from mmtta_ros.core.persist import PathLike
from mmtta_ros.core.window import FrameWindow
from mmtta_ros.models.segmenter import fuse_2d3d, SegmenterInput
from mmtta_ros.sensors.pointcloud import encode_labeled_cloud, LabeledCloudBuffer
from mmtta_ros.sensors.projection import Projection
from mmtta_ros.tta.norm import norm_layers
from mmtta_ros.tta.source_branch import branch_skipped
from mmtta_ros.viz.overlay import draw_points

# Fewer in-view points than this and a frame is rejected (see Pipeline.process).
MIN_POINTS_IN_VIEW = 64
# Arithmetic of the forward passes (model.precision).
PRECISIONS = ('fp32', 'bf16')


@dataclass
class FrameOutput:
    """
    What the pipeline made of one frame.

    frame:          the frame processed
    in_view:        <bool: N> points that project into an image (labeled by both branches);
                    with several cameras, into the image of the camera assigned to them
                    (`core.batching.project_views`)
    prediction_2d:  <np.int64: M> 2D-branch class per in-view point (M = in_view.sum())
    prediction_3d:  <np.int64: M> 3D-branch class per in-view point
    prediction:     <np.int64: M> 2D+3D class (argmax of the averaged softmaxes)
    confidence:     <np.float32: M> averaged softmax probability of `prediction`
    pixels:         <np.float32: M, 2> (u, v) of the in-view points in their camera's image
    stats:          the adaptation method's numbers for this step (loss, entropy, ...)
    cloud:          the labeled cloud to publish (LiDAR frame, the sweep's stamp)
    overlay:        <np.uint8: H, W, 3> the image with labeled points, or None
    step_seconds:   time of the step (projection, model, adaptation), without packing
    stage_seconds:  that time and the packing by stage: project (LiDAR -> image), model
                    (the method's forward, and its update in a step, and the fusion),
                    encode (the labeled cloud and the overlay)
    features:       <np.float32: M, F> per in-view point (2D and 3D features, each of
                    unit length, side by side), kept only for label requests, else None
    camera:         <np.int64: M> camera of each in-view point (0: the primary camera, k:
                    frame.extra_cameras[k - 1]); None for a one-camera frame
    unseen_prediction: <np.int64: N - M> 3D-branch class of each point no camera sees
                    (`output.label_unseen_3d`), else None
    unseen_confidence: <np.float32: N - M> its 3D softmax probability, else None
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
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    features: Optional[np.ndarray] = None
    camera: Optional[np.ndarray] = None
    unseen_prediction: Optional[np.ndarray] = None
    unseen_confidence: Optional[np.ndarray] = None

    def labels_full(self) -> np.ndarray:
        """
        Return <np.int64: N> class per input point: 2D+3D in view, else IGNORE_INDEX.

        Points no camera sees take their 3D-only class where it was computed
        (unseen_prediction).
        """
        labels = np.full(self.in_view.shape, IGNORE_INDEX, dtype=np.int64)
        labels[self.in_view] = self.prediction
        if self.unseen_prediction is not None:
            labels[~self.in_view] = self.unseen_prediction
        return labels

    def confidence_full(self) -> np.ndarray:
        """Return <np.float32: N> confidence per input point, 0 out of view (or 3D-only)."""
        confidence = np.zeros(self.in_view.shape, dtype=np.float32)
        confidence[self.in_view] = self.confidence
        if self.unseen_confidence is not None:
            confidence[~self.in_view] = self.unseen_confidence
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
    keep_features: put per-point features in each FrameOutput (label requests need them).
    Answered labels (`add_supervision`, from any thread) wait in a short queue and join
    the method's label replay at the start of the next adaptation step.
    """

    def __init__(self, method, device: torch.device, *, batch_frames: int = 1,
                 min_depth: float = 1.0, image_size: Optional[Tuple[int, int]] = None,
                 inputs: InputParams = InputParams(), output: OutputParams = OutputParams(),
                 precision: str = 'fp32', keep_features: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(PRECISIONS)}, got {precision!r}')
        self.method = method
        self.device = torch.device(device)
        self.precision = precision
        self.min_depth = float(min_depth)
        self.image_size = None if image_size is None else (int(image_size[0]),
                                                           int(image_size[1]))
        self.inputs = inputs
        self.output = output
        self.keep_features = bool(keep_features)
        self._lock = threading.Lock()
        replay = getattr(method, 'supervision', None)
        # More answers than the replay holds would push each other out before any step.
        self._answers: Deque[Tuple[Frame, np.ndarray, np.ndarray]] = deque(
            maxlen=replay.capacity if replay is not None else 1)
        self._answers_lock = threading.Lock()
        # Frames with their projections (one per camera), so each frame is projected once
        # however many windows it takes part in.
        self._window: FrameWindow[Tuple[Frame, List[Projection]]] = FrameWindow(batch_frames)

    @property
    def method_name(self) -> str:
        """Return the adaptation method's registry name."""
        return self.method.name

    # --- frames ------------------------------------------------------------------------
    def frame_from_messages(self, image_msg, info_msg, cloud_msg, labels_msg=None,
                            T_cam_from_lidar: Optional[np.ndarray] = None,
                            T_odom_from_lidar: Optional[np.ndarray] = None,
                            T_odom_from_cam: Optional[np.ndarray] = None,
                            extra_cameras: Sequence[CameraView] = (),
                            camera_name: str = '') -> Frame:
        """
        Decode a matched set with this pipeline's image size and calibration.

        T_cam_from_lidar: <4, 4> (from TF), else calibration.T_cam_from_lidar;
        T_odom_from_lidar, T_odom_from_cam: <4, 4> ego poses at the sweep's and the
        image's stamps, where known (see Frame); extra_cameras: the set's further
        cameras (`camera_view_from_messages`), camera_name: the primary camera's name.
        """
        return frame_from_messages(
            image_msg, info_msg, cloud_msg, labels_msg=labels_msg,
            T_cam_from_lidar=(self.inputs.T_cam_from_lidar if T_cam_from_lidar is None
                              else T_cam_from_lidar),
            image_size=self.image_size, raw_image=self.inputs.raw_image,
            T_odom_from_lidar=T_odom_from_lidar, T_odom_from_cam=T_odom_from_cam,
            extra_cameras=extra_cameras, camera_name=camera_name)

    def camera_view_from_messages(self, name: str, image_msg, info_msg,
                                  T_cam_from_lidar: Optional[np.ndarray],
                                  T_odom_from_cam: Optional[np.ndarray] = None) -> CameraView:
        """Decode a further camera's image of a set with this pipeline's image size."""
        return camera_view_from_messages(
            name, image_msg, info_msg, T_cam_from_lidar=T_cam_from_lidar,
            image_size=self.image_size, raw_image=self.inputs.raw_image,
            T_odom_from_cam=T_odom_from_cam)

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

        A frame with extra cameras enters the batch as one entry per camera (each with
        the points assigned to it, `core.batching.project_views`), so the method adapts
        on all its images and points as on that many frames; its labels are scattered
        back into the sweep's point order.
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
        # The one place frames are projected online and offline: ego motion compensated
        # where inputs.ego_motion asks for it and the frame has both poses.
        projections = project_views(frame, self.min_depth, ego_motion=self.inputs.ego_motion)
        projected = time.perf_counter()
        in_view = sum(int(np.count_nonzero(p.in_view)) for p in projections)
        if in_view < MIN_POINTS_IN_VIEW:
            where = 'the image' if len(projections) == 1 else 'any of the images'
            raise SensorDataError(
                f'only {in_view} LiDAR points project into {where} (need '
                f'{MIN_POINTS_IN_VIEW}): camera covered, or T_cam_from_lidar / K wrong?')
        label_unseen = self.output.include_out_of_view and self.output.label_unseen_3d
        with self._lock:
            if adapt:
                self._take_answers()
                entries = self._window.push((frame, projections))
            else:
                entries = [(frame, projections)]
            # Each camera of each frame is one entry of the batch (one image, its points).
            frames = [view for entry, _ in entries for view in view_frames(entry)]
            inputs, in_view_masks = frames_to_input(
                frames, self.device, projections=[p for _, ps in entries for p in ps])
            with self._autocast():
                if adapt:
                    prediction = self.method.step(inputs)
                    stats = dict(getattr(self.method, 'stats', {}) or {})
                else:
                    prediction, stats = self.method.predict(inputs), {}
            num_views = len(projections)
            masks = in_view_masks[len(frames) - num_views:]
            unseen = None
            if label_unseen:
                seen = np.logical_or.reduce(masks)
                unseen = self._label_unseen(frame, frame.points_lidar[~seen])
        newest = inputs.batch_index >= len(frames) - num_views
        if self.precision != 'fp32':
            prediction = _float32(prediction)
        with torch.no_grad():
            probs = fuse_2d3d(prediction.logits_2d[newest], prediction.logits_3d[newest],
                              self.output.fusion)
            confidence, labels = probs.max(dim=1)
            labels_2d = prediction.logits_2d[newest].argmax(dim=1)
            labels_3d = prediction.logits_3d[newest].argmax(dim=1)
            features = (_numpy(point_features(prediction, newest)) if self.keep_features
                        else None)
        output = FrameOutput(
            frame=frame, in_view=masks[0],
            prediction_2d=_numpy(labels_2d), prediction_3d=_numpy(labels_3d),
            prediction=_numpy(labels), confidence=_numpy(confidence).astype(np.float32),
            pixels=_numpy(inputs.pixels[newest]).astype(np.float32), stats=stats,
            features=features)
        if num_views > 1:
            output = _in_sweep_order(output, masks)
        if unseen is not None:
            output.unseen_prediction, output.unseen_confidence = unseen
        finished = time.perf_counter()
        output.step_seconds = finished - started
        output = self._pack(output)
        output.stage_seconds = {'project': projected - started, 'model': finished - projected,
                                'encode': time.perf_counter() - finished}
        return output

    def _label_unseen(self, frame: Frame, points: np.ndarray
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """
        Return (class, confidence) <int64: U>, <float32: U> of points no camera sees, 3D only.

        The method's own prediction (its adapted or teacher model) with the 2D branch
        switched off: one more forward of the sparse 3D branch on these points alone, as one
        frame; adapts nothing. None where there are no such points.
        """
        if not points.shape[0]:
            return None
        width, height = frame.image_size
        pose = frame.T_odom_from_lidar
        inputs = SegmenterInput(
            # Never read: the 2D branch is skipped; only its shape (one frame) counts.
            images=torch.zeros((1, 3, height, width), device=self.device),
            pixels=torch.zeros((points.shape[0], 2), dtype=torch.int64, device=self.device),
            batch_index=torch.zeros(points.shape[0], dtype=torch.int64, device=self.device),
            points=torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)
                                    ).to(self.device),
            T_odom_from_lidar=(None if pose is None else torch.from_numpy(
                np.asarray(pose, dtype=np.float64)[None]).to(self.device)))
        models = _all_models(self.method)
        # Batch norm in train mode records these points' statistics: put them back, so the
        # extra forward leaves the method exactly as the step left it.
        with branch_skipped(models, '2d'), _norm_buffers_kept(models), self._autocast():
            prediction = self.method.predict(inputs)
        with torch.no_grad():
            confidence, labels = prediction.logits_3d.float().softmax(dim=1).max(dim=1)
        return _numpy(labels), _numpy(confidence).astype(np.float32)

    def _autocast(self):
        """Return the autocast context of `precision` (a no-op for fp32)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == 'bf16')

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
            pixels = output.pixels
            if output.camera is not None:
                # The overlay is the primary camera's image: its points only.
                primary = output.camera == 0
                pixels, colors = pixels[primary], colors[primary]
            output.overlay = draw_points(frame.image, pixels, colors)
        return output

    def set_output(self, **changes) -> None:
        """Change output settings at run time (include_out_of_view, publish_overlay, ...)."""
        self.output = replace(self.output, **changes)

    # --- answered labels ---------------------------------------------------------------
    def add_supervision(self, frame: Frame, point_index: np.ndarray, labels: np.ndarray
                        ) -> None:
        """
        Queue labeled points of a frame for the method's label replay (any thread).

        point_index: <int: L> indices into frame.points_lidar, all in view of the camera;
        labels: <int: L> their classes. They join at the start of the next adaptation step.
        """
        if getattr(self.method, 'supervision', None) is None:
            raise ValueError(f'{self.method_name} has no label replay: set labels.mode and '
                             'use a method that learns by gradient')
        point_index = np.asarray(point_index, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if point_index.shape != labels.shape or point_index.ndim != 1:
            raise ValueError(f'point_index {point_index.shape} and labels {labels.shape} '
                             'must be the same (L,)')
        with self._answers_lock:
            self._answers.append((frame, point_index, labels))

    def _take_answers(self) -> None:
        """Move queued answers into the method's replay (under the step lock)."""
        with self._answers_lock:
            answers, self._answers = list(self._answers), deque(maxlen=self._answers.maxlen)
        for frame, point_index, labels in answers:
            inputs, (in_view,) = frames_to_input([frame], self.device, self.min_depth)
            kept = in_view[point_index]
            if not kept.any():
                continue
            rows = (np.cumsum(in_view) - 1)[point_index[kept]]
            self.method.supervision.add(inputs, torch.from_numpy(rows).to(self.device),
                                        torch.from_numpy(labels[kept]).to(self.device))

    # --- adapted state -----------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source model, bit for bit, and an empty window (labels forgotten)."""
        with self._lock:
            self.method.reset()
            self._window.clear()
            with self._answers_lock:
                self._answers.clear()

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


def _in_sweep_order(output: FrameOutput, masks) -> FrameOutput:
    """
    Return `output` of a several-camera frame with its points in the sweep's order.

    masks: per camera <bool: N>, disjoint; the per-point arrays of `output` come camera
    by camera (the batch's order), each camera's points in sweep order.
    """
    order = np.concatenate([np.flatnonzero(mask) for mask in masks])
    cameras = np.repeat(np.arange(len(masks), dtype=np.int64),
                        [int(np.count_nonzero(mask)) for mask in masks])
    to_sweep = np.argsort(order, kind='stable')
    return replace(
        output, in_view=np.logical_or.reduce(masks),
        prediction_2d=output.prediction_2d[to_sweep],
        prediction_3d=output.prediction_3d[to_sweep],
        prediction=output.prediction[to_sweep], confidence=output.confidence[to_sweep],
        pixels=output.pixels[to_sweep], camera=cameras[to_sweep],
        features=None if output.features is None else output.features[to_sweep])


def _all_models(method) -> List[torch.nn.Module]:
    """Return every segmenter a (wrapped) method holds: adapted, slow, source copies."""
    models: List[torch.nn.Module] = []
    while method is not None:
        for value in vars(method).values():
            if isinstance(value, torch.nn.Module) and all(value is not m for m in models):
                models.append(value)
        method = getattr(method, 'method', None)
    return models


@contextmanager
def _norm_buffers_kept(models: List[torch.nn.Module]) -> Iterator[None]:
    """Within the block, forwards may touch norm-layer buffers; restore them on exit."""
    kept = [(layer, {key: tensor.clone() for key, tensor in layer.state_dict().items()})
            for model in models for _, layer in norm_layers(model)]
    try:
        yield
    finally:
        for layer, state in kept:
            layer.load_state_dict(state)


def _float32(prediction):
    """Return a prediction dataclass with its floating-point tensors in float32."""
    changes = {f.name: getattr(prediction, f.name).float() for f in fields(prediction)
               if torch.is_tensor(getattr(prediction, f.name))
               and getattr(prediction, f.name).is_floating_point()}
    return replace(prediction, **changes)


def point_features(prediction: Any, rows: torch.Tensor) -> torch.Tensor:
    """
    Return <float32: M, F> features of the selected points, for label-request prototypes.

    The 2D and 3D features, each scaled to unit length (neither branch's scale dominates),
    side by side; a prediction without features gives its 2D+3D class probabilities.
    """
    features_2d = getattr(prediction, 'features_2d', None)
    features_3d = getattr(prediction, 'features_3d', None)
    if torch.is_tensor(features_2d) and torch.is_tensor(features_3d):
        return torch.cat([F.normalize(features_2d[rows].float(), dim=1),
                          F.normalize(features_3d[rows].float(), dim=1)], dim=1)
    return prediction.probs_2d3d()[rows]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
