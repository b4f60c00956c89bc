"""The frame cache round trip (no pickle)."""

from dataclasses import replace

import numpy as np

from mmtta_ros.eval.frame_cache import load_frames, save_frames
from mmtta_ros.core.frame import Frame
from mmtta_ros.synth import SyntheticSequence


def _frame(index, num_points, labeled=True, posed=True):
    rng = np.random.default_rng(index)
    return Frame(
        image=rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
        points_lidar=rng.normal(size=(num_points, 3)).astype(np.float32),
        K=np.array([[5.0, 0, 4], [0, 5.0, 3], [0, 0, 1]]),
        T_cam_from_lidar=np.eye(4),
        stamp_lidar_ns=1_000_000_000 + index, stamp_image_ns=999_000_000 + index,
        intensity=rng.random(num_points).astype(np.float32),
        labels=rng.integers(0, 6, num_points) if labeled else None,
        lidar_frame_id='LIDAR_TOP', sequence='night-s3', index=index,
        T_odom_from_lidar=np.diag([1.0, 1.0, 1.0, 1.0]) + index if posed else None,
        T_odom_from_cam=np.diag([1.0, 1.0, 1.0, 1.0]) - index if posed else None)


def test_save_load_round_trip(tmp_path):
    frames = [_frame(0, 5), _frame(1, 0), _frame(2, 7)]
    save_frames(tmp_path / 'seq.npz', frames)
    loaded = load_frames(tmp_path / 'seq.npz')
    assert len(loaded) == 3
    for original, copy in zip(frames, loaded):
        for name in ('image', 'points_lidar', 'K', 'T_cam_from_lidar', 'intensity', 'labels',
                     'T_odom_from_lidar', 'T_odom_from_cam'):
            np.testing.assert_array_equal(getattr(copy, name), getattr(original, name))
        assert (copy.stamp_lidar_ns, copy.stamp_image_ns, copy.index) == (
            original.stamp_lidar_ns, original.stamp_image_ns, original.index)
        assert copy.sequence == 'night-s3' and copy.lidar_frame_id == 'LIDAR_TOP'
    assert list(tmp_path.iterdir()) == [tmp_path / 'seq.npz']  # no temp file left behind


def test_unlabeled_frames_stay_unlabeled(tmp_path):
    save_frames(tmp_path / 'u.npz', [_frame(0, 4, labeled=False)])
    assert load_frames(tmp_path / 'u.npz')[0].labels is None


def test_frames_without_poses_stay_without(tmp_path):
    save_frames(tmp_path / 'p.npz', [_frame(0, 4), _frame(1, 3, posed=False)])
    assert all(f.T_odom_from_lidar is None and f.T_odom_from_cam is None
               for f in load_frames(tmp_path / 'p.npz'))


def test_cached_frames_have_the_generators_poses_even_from_files_older_than_poses(tmp_path):
    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.synth import generate_frames, SequenceConfig

    config = SequenceConfig(domain='night', seed=4, num_frames=3, image_size=(32, 18),
                            lidar_azimuth_steps=60, frame_stride=2)
    fresh = list(generate_frames(config))
    assert synthetic_frames([config], tmp_path)  # writes the cache
    (path,) = tmp_path.iterdir()
    with np.load(path) as data:
        # New files store both poses.
        assert {'T_odom_from_lidar', 'T_odom_from_cam'} <= set(data.files)
    # Cache files written before frames had poses (data/cache: neither pose), and before
    # they had the camera's: the same frames, without those arrays.
    sequence = SyntheticSequence(config)
    for stripped in ({'T_odom_from_lidar': None, 'T_odom_from_cam': None},
                     {'T_odom_from_cam': None}):
        save_frames(path, [replace(f, **stripped) for f in fresh])
        with np.load(path) as data:
            assert not set(stripped) & set(data.files)
        old_bytes = path.read_bytes()
        cached = synthetic_frames([config], tmp_path)
        assert path.read_bytes() == old_bytes  # the old file is read, never rewritten
        for number, (old, new) in enumerate(zip(cached, fresh)):
            np.testing.assert_array_equal(old.points_lidar, new.points_lidar)
            np.testing.assert_array_equal(old.T_odom_from_lidar, new.T_odom_from_lidar)
            np.testing.assert_array_equal(old.T_odom_from_cam, new.T_odom_from_cam)
            # The pose of sweep number * frame_stride, the one the points were cast from,
            # and the camera's at the stamp its image was rendered at.
            np.testing.assert_array_equal(
                new.T_odom_from_lidar, sequence.lidar_sweep(2 * number).T_world_from_lidar)
            image = sequence.camera_image(sequence.nearest_camera_index(new.stamp_lidar_ns))
            assert image.stamp_ns == new.stamp_image_ns != new.stamp_lidar_ns
            np.testing.assert_array_equal(new.T_odom_from_cam, image.T_world_from_cam)
    assert not np.allclose(fresh[0].T_odom_from_lidar, fresh[1].T_odom_from_lidar)


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
