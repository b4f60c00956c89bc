"""
Synthetic day/night camera + LiDAR street sequences with ground truth, pure numpy.

A seeded procedural street (six classes of `mmtta_ros.core.classes.CLASS_NAMES`) is ray cast by a
32-beam spinning LiDAR and rendered by a front pinhole camera, under domain families: `day`
(source), `night`, `city_b` and `lidar16`. Typical use::

    from mmtta_ros.synth import SequenceConfig, generate_frames
    for frame in generate_frames(SequenceConfig(domain='night', seed=3, num_frames=10)):
        ...
"""

from mmtta_ros.synth.domains import DOMAINS
from mmtta_ros.synth.sequence import (
    CameraImage, generate_frames, generate_streams, GENERATOR_VERSION, LidarSweep,
    project_points, save_previews, SensorSample, SequenceConfig, SyntheticSequence,
    T_CAM_FROM_LIDAR, T_EGO_FROM_CAM, T_EGO_FROM_LIDAR)

__all__ = [
    'CameraImage', 'DOMAINS', 'generate_frames', 'generate_streams', 'GENERATOR_VERSION',
    'LidarSweep',
    'project_points', 'save_previews', 'SensorSample', 'SequenceConfig', 'SyntheticSequence',
    'T_CAM_FROM_LIDAR', 'T_EGO_FROM_CAM', 'T_EGO_FROM_LIDAR',
]
