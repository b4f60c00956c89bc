"""
The synthetic day -> night benchmark: which generated sequences train, and which score.

Kept in one place so the trainer, the scorer, the demo and the README table agree.
Source (day) and target sequences never share a seed, so no scene is seen twice.
"""

from typing import List, Optional, Tuple

from mmtta_ros.synth import SequenceConfig

# (width, height) of the images the segmenter sees; xMUDA uses 400x225 for nuScenes.
IMAGE_SIZE: Tuple[int, int] = (400, 225)
SOURCE_SEEDS = tuple(range(8))
# LiDAR sweeps are 20 Hz; a stride of 5 keeps 4 frames a second of each drive.
SOURCE_FRAMES, SOURCE_STRIDE = 30, 5
TARGET_SEEDS = (100, 101, 102)
TARGET_FRAMES, TARGET_STRIDE = 60, 2
# Unlabeled target frames of offline UDA (`mmtta_train --uda`): their own seeds, never a
# seed of labeled training (0-7), of `mmtta_evaluate` (100-102) or of a shift-suite stream
# (segment k of stream s uses 10 * s + k: 1000-1603 for the streams 100-160).
UDA_TARGET_SEEDS = tuple(range(200, 208))


def source_configs(domain: str = 'day', image_size=IMAGE_SIZE, seeds=SOURCE_SEEDS,
                   num_frames: int = SOURCE_FRAMES,
                   lidar_azimuth_steps: Optional[int] = None) -> List[SequenceConfig]:
    """Return the labeled source sequences the source model trains on."""
    return [SequenceConfig(domain=domain, seed=seed, num_frames=num_frames,
                           image_size=tuple(image_size), frame_stride=SOURCE_STRIDE,
                           lidar_azimuth_steps=lidar_azimuth_steps)
            for seed in seeds]


def uda_target_configs(domain: str, image_size=IMAGE_SIZE, seeds=UDA_TARGET_SEEDS,
                       num_frames: int = SOURCE_FRAMES,
                       lidar_azimuth_steps: Optional[int] = None) -> List[SequenceConfig]:
    """Return the target sequences offline UDA trains on (their labels are never read)."""
    return source_configs(domain, image_size, seeds, num_frames, lidar_azimuth_steps)


def target_config(domain: str, seed: int, image_size=IMAGE_SIZE,
                  num_frames: int = TARGET_FRAMES) -> SequenceConfig:
    """Return one target stream (adapted on and scored, in order)."""
    return SequenceConfig(domain=domain, seed=seed, num_frames=num_frames,
                          image_size=tuple(image_size), frame_stride=TARGET_STRIDE)
