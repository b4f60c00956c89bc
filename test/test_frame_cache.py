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


def test_a_changed_domain_never_gets_cached_frames_of_the_old_one(tmp_path, monkeypatch):
    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.synth import SequenceConfig
    from mmtta_ros.synth import domains

    config = SequenceConfig(domain='night', seed=1, num_frames=1, image_size=(32, 18),
                            lidar_azimuth_steps=60)
    normal = synthetic_frames([config], tmp_path)[0]
    assert len(list(tmp_path.iterdir())) == 1
    darker = domains.domain_variant('night', 'night', lighting={'exposure': [0.2, 0.3]})
    monkeypatch.setitem(domains.DOMAINS, 'night', darker)
    modified = synthetic_frames([config], tmp_path)[0]
    assert len(list(tmp_path.iterdir())) == 2  # its own cache entry, not the old one
    assert modified.image.mean() < normal.image.mean()
    np.testing.assert_array_equal(modified.points_lidar, normal.points_lidar)


def test_domain_variants_are_declared_not_patched():
    from mmtta_ros.synth import generate_frames, SequenceConfig
    from mmtta_ros.synth.domains import (
        domain_fingerprint, domain_variant, DOMAINS, register_domain)
    import pytest

    fog = domain_variant('test_fog', 'day', lighting={'haze_distance': [20.0, 30.0]},
                         lidar={'max_range': 30.0, 'clutter': [0.05, 0.05]})
    assert fog.lidar.clutter == (0.05, 0.05) and DOMAINS['day'].lidar.clutter == (0.0, 0.0)
    register_domain(fog)
    register_domain(fog)  # the same again is fine
    with pytest.raises(ValueError, match='already registered'):
        register_domain(domain_variant('test_fog', 'day'))
    with pytest.raises(ValueError, match='no field'):
        domain_variant('bad', 'day', lidar={'fog': 1})
    assert domain_fingerprint('test_fog')['lidar']['max_range'] == 30.0
    config = dict(seed=2, num_frames=1, image_size=(32, 18), lidar_azimuth_steps=120)
    foggy = next(generate_frames(SequenceConfig(domain='test_fog', **config)))
    clear = next(generate_frames(SequenceConfig(domain='day', **config)))
    ranges = np.linalg.norm(foggy.points_lidar, axis=1)
    assert ranges.max() <= 30.5 < np.linalg.norm(clear.points_lidar, axis=1).max()
    # Spurious near returns are there, and labeled as no class.
    assert np.sum(foggy.labels == -100) > 0 and np.all(ranges[foggy.labels == -100] < 40)
    del DOMAINS['test_fog']
