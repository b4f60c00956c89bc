"""The frame cache round trip (no pickle)."""

import numpy as np

from mmtta_ros.eval.frame_cache import load_frames, save_frames
from mmtta_ros.core.frame import Frame


def _frame(index, num_points, labeled=True):
    rng = np.random.default_rng(index)
    return Frame(
        image=rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
        points_lidar=rng.normal(size=(num_points, 3)).astype(np.float32),
        K=np.array([[5.0, 0, 4], [0, 5.0, 3], [0, 0, 1]]),
        T_cam_from_lidar=np.eye(4),
        stamp_lidar_ns=1_000_000_000 + index, stamp_image_ns=999_000_000 + index,
        intensity=rng.random(num_points).astype(np.float32),
        labels=rng.integers(0, 6, num_points) if labeled else None,
        lidar_frame_id='LIDAR_TOP', sequence='night-s3', index=index)


def test_save_load_round_trip(tmp_path):
    frames = [_frame(0, 5), _frame(1, 0), _frame(2, 7)]
    save_frames(tmp_path / 'seq.npz', frames)
    loaded = load_frames(tmp_path / 'seq.npz')
    assert len(loaded) == 3
    for original, copy in zip(frames, loaded):
        for name in ('image', 'points_lidar', 'K', 'T_cam_from_lidar', 'intensity', 'labels'):
            np.testing.assert_array_equal(getattr(copy, name), getattr(original, name))
        assert (copy.stamp_lidar_ns, copy.stamp_image_ns, copy.index) == (
            original.stamp_lidar_ns, original.stamp_image_ns, original.index)
        assert copy.sequence == 'night-s3' and copy.lidar_frame_id == 'LIDAR_TOP'
    assert list(tmp_path.iterdir()) == [tmp_path / 'seq.npz']  # no temp file left behind


def test_unlabeled_frames_stay_unlabeled(tmp_path):
    save_frames(tmp_path / 'u.npz', [_frame(0, 4, labeled=False)])
    assert load_frames(tmp_path / 'u.npz')[0].labels is None
