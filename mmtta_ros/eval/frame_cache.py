"""
Sequences of frames for training and scoring: generated, cached on disk, reloaded.

The cache is a plain .npz (no pickle): images stacked, points concatenated with offsets.
Files written before frames had ego poses lack `T_odom_from_lidar` and
`T_odom_from_cam`; for synthetic sequences the poses are recomputed from the generator's
trajectory at the stamps the file holds (no rendering), so those caches stay valid.
"""

from dataclasses import asdict, replace
import hashlib
import json
import os
from pathlib import Path
import tempfile
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from mmtta_ros.core.frame import Frame

PathLike = Union[str, os.PathLike]


def save_frames(path: PathLike, frames: Sequence[Frame]) -> None:
    """Write frames (same image size) to one .npz, atomically."""
    if not frames:
        raise ValueError('no frames to save')
    if any(f.extra_cameras for f in frames):
        raise ValueError('the frame cache holds one camera per frame; these frames have more')
    counts = np.array([f.num_points for f in frames], dtype=np.int64)
    has_labels = all(f.labels is not None for f in frames)
    has_intensity = all(f.intensity is not None for f in frames)
    has_poses = all(f.T_odom_from_lidar is not None for f in frames)
    has_camera_poses = all(f.T_odom_from_cam is not None for f in frames)
    arrays = {
        'images': np.stack([f.image for f in frames]),
        'points_lidar': np.concatenate([f.points_lidar for f in frames]).astype(np.float32),
        'offsets': np.concatenate([[0], np.cumsum(counts)]),
        'K': np.stack([f.K for f in frames]).astype(np.float64),
        'T_cam_from_lidar': np.stack([f.T_cam_from_lidar for f in frames]).astype(np.float64),
        'stamp_lidar_ns': np.array([f.stamp_lidar_ns for f in frames], dtype=np.int64),
        'stamp_image_ns': np.array([f.stamp_image_ns for f in frames], dtype=np.int64),
        'lidar_frame_id': np.array([f.lidar_frame_id for f in frames]),
        'sequence': np.array([f.sequence for f in frames]),
        'index': np.array([f.index for f in frames], dtype=np.int64),
    }
    if has_labels:
        arrays['labels'] = np.concatenate([f.labels for f in frames]).astype(np.int64)
    if has_intensity:
        arrays['intensity'] = np.concatenate([f.intensity for f in frames]).astype(np.float32)
    if has_poses:
        arrays['T_odom_from_lidar'] = np.stack(
            [f.T_odom_from_lidar for f in frames]).astype(np.float64)
    if has_camera_poses:
        arrays['T_odom_from_cam'] = np.stack(
            [f.T_odom_from_cam for f in frames]).astype(np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(suffix='.npz', dir=path.parent)
    try:
        with os.fdopen(handle, 'wb') as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def load_frames(path: PathLike) -> List[Frame]:
    """Read frames written by save_frames."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    offsets = arrays['offsets']
    frames = []
    for i in range(len(arrays['images'])):
        span = slice(int(offsets[i]), int(offsets[i + 1]))
        frames.append(Frame(
            image=arrays['images'][i],
            points_lidar=arrays['points_lidar'][span],
            K=arrays['K'][i],
            T_cam_from_lidar=arrays['T_cam_from_lidar'][i],
            stamp_lidar_ns=int(arrays['stamp_lidar_ns'][i]),
            stamp_image_ns=int(arrays['stamp_image_ns'][i]),
            intensity=arrays['intensity'][span] if 'intensity' in arrays else None,
            labels=arrays['labels'][span] if 'labels' in arrays else None,
            lidar_frame_id=str(arrays['lidar_frame_id'][i]),
            sequence=str(arrays['sequence'][i]),
            index=int(arrays['index'][i]),
            T_odom_from_lidar=(arrays['T_odom_from_lidar'][i]
                               if 'T_odom_from_lidar' in arrays else None),
            T_odom_from_cam=(arrays['T_odom_from_cam'][i]
                             if 'T_odom_from_cam' in arrays else None),
        ))
    return frames


def _with_generator_poses(frames: List[Frame], config) -> List[Frame]:
    """Fill the poses of frames from a cache file older than poses, from the trajectory."""
    from mmtta_ros.synth import SyntheticSequence

    if all(frame.T_odom_from_lidar is not None and frame.T_odom_from_cam is not None
           for frame in frames):
        return frames
    # Building the scene takes ~0.1 s; no sensor is simulated. The camera's pose is taken
    # at the image stamp the file holds: the stamp the image was rendered at.
    sequence = SyntheticSequence(config)
    return [replace(frame,
                    T_odom_from_lidar=(sequence.frame_pose(frame.index)
                                       if frame.T_odom_from_lidar is None
                                       else frame.T_odom_from_lidar),
                    T_odom_from_cam=(sequence.camera_pose(frame.stamp_image_ns)
                                     if frame.T_odom_from_cam is None
                                     else frame.T_odom_from_cam))
            for frame in frames]


def synthetic_frames(configs: Iterable, cache_dir: Optional[PathLike] = None) -> List[Frame]:
    """
    Frames of synthetic sequences, generated once and then read from `cache_dir`.

    configs: `mmtta_ros.synth.SequenceConfig`s; each is cached under a name derived from
    its values, every parameter of its domain (a variant is never served another's frames)
    and the generator version, so a changed generator never serves stale data.
    """
    from mmtta_ros.synth import generate_frames, GENERATOR_VERSION
    from mmtta_ros.synth.domains import domain_fingerprint

    frames: List[Frame] = []
    for config in configs:
        values = asdict(config)
        if not values.get('extra_cameras', True):
            # One camera: the key it had before configs could name more, so caches stay valid.
            del values['extra_cameras']
        key = json.dumps({'config': values, 'version': GENERATOR_VERSION,
                          'domain': domain_fingerprint(config.domain)},
                         sort_keys=True, default=str)
        name = f'{config.domain}-s{config.seed}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz'
        path = Path(cache_dir) / name if cache_dir is not None else None
        if config.extra_cameras:
            path = None  # the cache holds one camera per frame: several are generated
        if path is not None and path.is_file():
            frames.extend(_with_generator_poses(load_frames(path), config))
            continue
        generated = list(generate_frames(config))
        if path is not None:
            save_frames(path, generated)
        frames.extend(generated)
    return frames
