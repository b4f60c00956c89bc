"""
The node's ROS-free core: matched messages -> Frame -> pipeline -> labeled outputs.

Everything the node does between receiving a matched (image, camera_info, cloud) set and
publishing lives here, duck-typed on message fields, so it is tested without DDS and
the offline tools can drive it too. The node only syncs, calls `process_messages`, and
publishes what comes back.
"""

from dataclasses import dataclass
import time
from typing import Optional, Tuple

import numpy as np

from mmtta_ros.errors import SensorDataError
from mmtta_ros.frame import Frame
from mmtta_ros.overlay import draw_points
from mmtta_ros.pipeline import FrameResult, SegmentationPipeline
from mmtta_ros.sensors.image import decode_image
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, encode_labeled_cloud, LabeledCloudBuffer
from mmtta_ros.sensors.stamps import stamp_to_ns


@dataclass
class CoreOutput:
    """
    What one processed frame gives the node to publish.

    cloud:    the labeled cloud payload (LiDAR frame, input stamp)
    overlay:  <np.uint8: H, W, 3> image with labeled points, or None
    result:   the pipeline's FrameResult
    frame:    the Frame that was processed
    step_seconds: time spent in the pipeline step (projection, model, adaptation)
    """

    cloud: LabeledCloudBuffer
    overlay: Optional[np.ndarray]
    result: FrameResult
    frame: Frame
    step_seconds: float


class AdaptationCore:
    """Builds frames from messages, runs the pipeline, packs the outputs."""

    def __init__(self, pipeline: SegmentationPipeline, image_size: Tuple[int, int],
                 palette: np.ndarray, T_cam_from_lidar: Optional[np.ndarray],
                 compressed: bool = True, include_out_of_view: bool = True,
                 publish_overlay: bool = True):
        self.pipeline = pipeline
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.T_cam_from_lidar = T_cam_from_lidar
        self.compressed = compressed
        self.include_out_of_view = include_out_of_view
        self.publish_overlay = publish_overlay

    def frame_from_messages(self, image_msg, info_msg, cloud_msg) -> Frame:
        """Decode one matched set into a Frame; SensorDataError says what is wrong."""
        if info_msg is None:
            raise SensorDataError('no camera_info received yet: cannot project points')
        if self.T_cam_from_lidar is None:
            raise SensorDataError('no LiDAR->camera transform: set calibration.T_cam_from_lidar')
        image, K = decode_image(image_msg, info_msg, self.image_size, raw=not self.compressed)
        cloud = cloud_to_numpy(cloud_msg)
        intensity = cloud.fields.get('intensity')
        return Frame(
            image=image,
            points_lidar=np.ascontiguousarray(cloud.points),
            K=K, T_cam_from_lidar=self.T_cam_from_lidar,
            stamp_lidar_ns=stamp_to_ns(cloud_msg.header.stamp),
            stamp_image_ns=stamp_to_ns(image_msg.header.stamp),
            intensity=None if intensity is None else np.asarray(intensity, np.float32).reshape(-1),
            lidar_frame_id=str(cloud_msg.header.frame_id))

    def process_frame(self, frame: Frame) -> CoreOutput:
        """Run the pipeline on a frame and pack the labeled cloud and overlay."""
        started = time.perf_counter()
        result = self.pipeline.process(frame)
        step_seconds = time.perf_counter() - started
        if self.include_out_of_view:
            points, labels = frame.points_lidar, result.labels_full()
            confidence = result.confidence_full()
            intensity = frame.intensity
        else:
            points, labels = frame.points_lidar[result.in_view], result.prediction
            confidence = result.confidence
            intensity = None if frame.intensity is None else frame.intensity[result.in_view]
        cloud = encode_labeled_cloud(points, labels, confidence, intensity, self.palette)
        overlay = None
        if self.publish_overlay:
            colors = self.palette[np.clip(result.prediction, 0, len(self.palette) - 1)]
            overlay = draw_points(frame.image, result.pixels, colors)
        return CoreOutput(cloud=cloud, overlay=overlay, result=result, frame=frame,
                          step_seconds=step_seconds)

    def process_messages(self, image_msg, info_msg, cloud_msg) -> CoreOutput:
        """Decode and process one matched set (SensorDataError for bad input)."""
        return self.process_frame(self.frame_from_messages(image_msg, info_msg, cloud_msg))
