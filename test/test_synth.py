"""Tests of the synthetic camera + LiDAR benchmark generator (mmtta_ros.synth)."""

import numpy as np
import pytest

from mmtta_ros.core.classes import CLASS_NAMES, IGNORE_INDEX
from mmtta_ros.core.frame import Frame
from mmtta_ros.synth import (
    CameraImage, generate_frames, generate_streams, LidarSweep, project_points, save_previews,
    SequenceConfig, SyntheticSequence)
from mmtta_ros.synth import materials as mat
from mmtta_ros.synth.raycast import (
    BOX, cast_rays, CYLINDER, ELLIPSOID, PlaneGround, Primitives)
from mmtta_ros.synth.sequence import CAMERA_RATE_HZ, LIDAR_PERIOD_NS

SMALL = dict(image_size=(160, 90), lidar_azimuth_steps=360)


def _small(**overrides) -> SequenceConfig:
    return SequenceConfig(**{**dict(num_frames=3, frame_stride=2), **SMALL, **overrides})


@pytest.fixture(scope='module')
def day_frames():
    return list(generate_frames(_small(domain='day', seed=0)))


# --- ray caster -----------------------------------------------------------------------------

def _one(kind, center, size, yaw=0.0, label=4):
    return Primitives.build(kind, [center], size, label, mat.WALL, yaw=yaw)


def _cast(origin, direction, primitives, ground=None, max_distance=np.inf):
    return cast_rays(np.asarray(origin, float), np.asarray([direction], float), primitives,
                     ground, max_distance=max_distance)


def test_ray_hits_box_at_known_distance():
    box = _one(BOX, (10.0, 0.0, 1.0), (1.0, 2.0, 1.0), label=0)
    hits = _cast((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), box)
    assert hits.distance[0] == pytest.approx(9.0)
    np.testing.assert_allclose(hits.point[0], (9.0, 0.0, 1.0))
    np.testing.assert_allclose(hits.normal[0], (-1.0, 0.0, 0.0), atol=1e-12)
    assert hits.label[0] == 0 and hits.primitive[0] == 0
    np.testing.assert_allclose(hits.local[0], (-1.0, 0.0, 0.0), atol=1e-12)
    # Yawed by 90 degrees the box is 2 m deep along x: its face is 1 m nearer.
    yawed = _one(BOX, (10.0, 0.0, 1.0), (1.0, 2.0, 1.0), yaw=np.pi / 2)
    assert _cast((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), yawed).distance[0] == pytest.approx(8.0)
    # A ray passing beside the box misses it; one farther than max_distance is ignored.
    assert not _cast((0.0, 3.0, 1.0), (1.0, 0.0, 0.0), box).hit[0]
    assert not _cast((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), box, max_distance=5.0).hit[0]


def test_ray_hits_sphere_cylinder_and_plane():
    sphere = _one(ELLIPSOID, (0.0, 5.0, 0.0), (1.0, 1.0, 1.0))
    hits = _cast((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), sphere)
    assert hits.distance[0] == pytest.approx(4.0)
    np.testing.assert_allclose(hits.normal[0], (0.0, -1.0, 0.0), atol=1e-12)
    # Off-centre: the chord at lateral offset 0.6 enters at 5 - sqrt(1 - 0.36) = 4.2.
    assert _cast((0.6, 0.0, 0.0), (0.0, 1.0, 0.0), sphere).distance[0] == pytest.approx(4.2)
    cylinder = _one(CYLINDER, (0.0, -6.0, 1.0), (0.5, 0.5, 1.0))
    assert _cast((0.0, 0.0, 1.0), (0.0, -1.0, 0.0), cylinder).distance[0] == pytest.approx(5.5)
    top = _cast((0.0, -6.0, 5.0), (0.0, 0.0, -1.0), cylinder)
    assert top.distance[0] == pytest.approx(3.0)
    np.testing.assert_allclose(top.normal[0], (0.0, 0.0, 1.0), atol=1e-12)
    plane = PlaneGround(height=0.0, label=1, material=mat.ASPHALT)
    hits = _cast((0.0, 0.0, 2.0), (1.0, 0.0, -1.0), Primitives.empty(), plane)
    assert hits.distance[0] == pytest.approx(2.0 * np.sqrt(2.0))
    np.testing.assert_allclose(hits.point[0], (2.0, 0.0, 0.0), atol=1e-12)
    assert hits.label[0] == 1
    # Upward rays never meet the plane.
    assert not _cast((0.0, 0.0, 2.0), (1.0, 0.0, 1.0), Primitives.empty(), plane).hit[0]


def test_nearest_solid_wins_over_farther_ones_and_the_ground():
    solids = Primitives.concatenate([_one(BOX, (20.0, 0.0, 1.0), (1.0, 1.0, 1.0), label=4),
                                     _one(ELLIPSOID, (8.0, 0.0, 1.0), (0.5, 0.5, 0.5), label=5)])
    ground = PlaneGround(height=0.0, label=1)
    hits = _cast((0.0, 0.0, 1.0), (1.0, 0.0, -0.01), solids, ground)
    assert hits.label[0] == 5 and hits.primitive[0] == 1
    assert hits.distance[0] == pytest.approx(7.5, abs=0.01)


def _random_solids(rng, count=120):
    kinds = rng.integers(0, 3, count)
    size = rng.uniform(0.2, 3.0, (count, 3))
    size[kinds == CYLINDER, 1] = size[kinds == CYLINDER, 0]
    parts = [Primitives.build(k, rng.uniform([-40, -40, 0], [40, 40, 8], ((kinds == k).sum(), 3)),
                              size[kinds == k], int(k), mat.WALL,
                              yaw=rng.uniform(0, np.pi, (kinds == k).sum()))
             for k in (BOX, ELLIPSOID, CYLINDER)]
    return Primitives.concatenate(parts)


def test_accelerated_bundles_match_brute_force():
    rng = np.random.default_rng(3)
    solids = _random_solids(rng)
    ground = PlaneGround(height=0.0)
    dirs = rng.normal(size=(3000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = np.array([0.5, -0.3, 1.7])
    # Shared origin (azimuth/elevation grid) against distinct origins (all pairs).
    grid = cast_rays(origin, dirs, solids, ground, max_distance=60.0)
    jittered = np.tile(origin, (dirs.shape[0], 1))
    jittered[0, 0] += 1e-9
    brute = cast_rays(jittered, dirs, solids, ground, max_distance=60.0)
    assert 0.3 < grid.hit.mean() < 1.0
    np.testing.assert_allclose(grid.distance, brute.distance, atol=1e-6)
    np.testing.assert_array_equal(grid.label, brute.label)
    # Parallel rays (grid across the direction) against the same rays slightly tilted.
    origins = rng.uniform([-30, -30, 0], [30, 30, 0.1], (3000, 3))
    sun = np.array([0.3, 0.2, 0.8]) / np.linalg.norm([0.3, 0.2, 0.8])
    parallel = cast_rays(origins, np.tile(sun, (3000, 1)), solids, None, max_distance=60.0)
    tilted = np.tile(sun, (3000, 1))
    tilted[0] += 1e-9
    brute = cast_rays(origins, tilted, solids, None, max_distance=60.0)
    assert 0.05 < parallel.hit.mean() < 1.0
    np.testing.assert_allclose(parallel.distance, brute.distance, atol=1e-6)


def test_street_ground_has_road_curb_and_raised_sidewalk():
    sequence = SyntheticSequence(_small(domain='day', seed=0))
    ground, section = sequence.scene.ground, sequence.scene.ground.section
    ego = sequence.scene.ego_pose(0.0)
    origin = ego[:3, 3] + (0.0, 0.0, 1.5)
    # Rays fanning to the right of the car, down to the ground at growing lateral distances.
    lateral = np.linspace(0.5, section.road_half_width + 6.0, 400)
    targets = ego[:3, 3] + np.outer(lateral, -ego[:3, 1]) + np.outer(lateral * 0.5, ego[:3, 0])
    dirs = targets - origin
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    hits = cast_rays(origin, dirs, Primitives.empty(), ground)
    assert hits.hit.all()
    s, d = sequence.scene.centerline.to_street(hits.point[:, :2])
    road = np.abs(d) < section.road_half_width - 1e-3
    assert np.all(hits.label[road] == 1) and np.allclose(hits.point[road, 2], 0.0)
    raised = np.abs(d) > section.road_half_width + 1e-3
    assert np.all(np.isin(hits.label[raised], (2, 3))) and np.allclose(hits.point[raised, 2],
                                                                       0.15)
    curb = hits.material == mat.CURB
    assert curb.any(), 'some ray should meet the vertical curb face'
    assert np.all(np.abs(hits.normal[curb, 2]) < 1e-9)
    assert np.all((hits.point[curb, 2] >= -1e-9) & (hits.point[curb, 2] <= 0.15 + 1e-9))


# --- frames and streams ---------------------------------------------------------------------

def test_frame_fields_have_documented_shapes_and_dtypes(day_frames):
    assert len(day_frames) == 3
    for number, frame in enumerate(day_frames):
        assert isinstance(frame, Frame)
        assert frame.image.shape == (90, 160, 3) and frame.image.dtype == np.uint8
        n = frame.num_points
        assert 5000 < n <= 32 * 360
        assert frame.points_lidar.shape == (n, 3) and frame.points_lidar.dtype == np.float32
        assert frame.intensity.shape == (n,) and frame.intensity.dtype == np.float32
        assert frame.labels.shape == (n,) and frame.labels.dtype == np.int64
        assert frame.K.shape == (3, 3) and frame.T_cam_from_lidar.shape == (4, 4)
        assert frame.lidar_frame_id == 'lidar' and frame.sequence == 'day-s0'
        assert frame.index == number
        assert np.all((frame.intensity >= 0) & (frame.intensity <= 255))
        assert np.array_equal(frame.intensity, np.round(frame.intensity))
        assert np.all(np.linalg.norm(frame.points_lidar, axis=1) < 81.0)
        assert isinstance(frame.stamp_lidar_ns, int) and isinstance(frame.stamp_image_ns, int)


def test_sequence_labels_cover_all_six_classes(day_frames):
    labels = np.concatenate([f.labels for f in day_frames])
    assert set(np.unique(labels)) == set(range(len(CLASS_NAMES)))
    assert not np.any(labels == IGNORE_INDEX)


def test_same_seed_is_bit_identical_and_other_seeds_differ(day_frames):
    again = list(generate_frames(_small(domain='day', seed=0)))
    for a, b in zip(day_frames, again):
        for name in ('image', 'points_lidar', 'intensity', 'labels', 'K', 'T_cam_from_lidar'):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.stamp_lidar_ns, a.stamp_image_ns) == (b.stamp_lidar_ns, b.stamp_image_ns)
    other = next(generate_frames(_small(domain='day', seed=1)))
    assert not np.array_equal(other.image, day_frames[0].image)
    assert other.num_points != day_frames[0].num_points or not np.array_equal(
        other.points_lidar, day_frames[0].points_lidar)


def test_streams_are_time_ordered_at_20_and_12_hz_and_frames_pair_nearest():
    config = _small(domain='day', seed=2, num_frames=4, frame_stride=3, image_size=(48, 27))
    samples = list(generate_streams(config))
    stamps = [s.stamp_ns for s in samples]
    assert stamps == sorted(stamps)
    sweeps = [s for s in samples if isinstance(s, LidarSweep)]
    images = [s for s in samples if isinstance(s, CameraImage)]
    assert len(sweeps) == (4 - 1) * 3 + 1
    assert set(np.diff([s.stamp_ns for s in sweeps])) == {LIDAR_PERIOD_NS}
    image_gaps = np.diff([s.stamp_ns for s in images])
    assert np.all(np.abs(image_gaps - 1e9 / CAMERA_RATE_HZ) <= 1)
    assert sweeps[0].ring.dtype == np.int32 and sweeps[0].ring.max() == 31
    frames = list(generate_frames(config))
    image_stamps = np.array([s.stamp_ns for s in images])
    for number, frame in enumerate(frames):
        sweep = sweeps[number * 3]
        assert frame.stamp_lidar_ns == sweep.stamp_ns
        np.testing.assert_array_equal(frame.points_lidar, sweep.points_lidar)
        # The paired image is a stream image, the nearest one in time (within half a period).
        gaps = np.abs(image_stamps - frame.stamp_lidar_ns)
        assert frame.stamp_image_ns == image_stamps[np.argmin(gaps)]
        assert abs(frame.stamp_image_ns - frame.stamp_lidar_ns) <= 1e9 / CAMERA_RATE_HZ / 2
        np.testing.assert_array_equal(frame.image, images[int(np.argmin(gaps))].image)


def _label_agreement(sweep, camera_image, sequence):
    """
    Measure how many in-view LiDAR points land on a pixel of their class.

    Returns the share over all in-view points, the share over the points the camera sees
    (pixel depth = point distance, so parallax cannot hide them), the share of points seen
    and the number of in-view points.
    """
    height, width = camera_image.labels.shape
    pixels, index = project_points(sweep.points_lidar, sequence.K, sequence.T_cam_from_lidar,
                                   (width, height))
    px = pixels.astype(np.int64)
    pixel_label = camera_image.labels[px[:, 1], px[:, 0]]
    agree = pixel_label == sweep.labels[index]
    points_cam = sweep.points_lidar[index].astype(np.float64) @ \
        sequence.T_cam_from_lidar[:3, :3].T + sequence.T_cam_from_lidar[:3, 3]
    seen = np.abs(camera_image.depth[px[:, 1], px[:, 0]] - np.linalg.norm(points_cam, axis=1))
    seen = seen < 0.1 + 0.02 * np.linalg.norm(points_cam, axis=1)
    return agree.mean(), agree[seen].mean(), seen.mean(), index.size


def _road_depth_error(sweep, camera_image, sequence):
    """
    Compare LiDAR road points with the rendered road under their projected pixels.

    On a plane the inverse z-depth is affine in pixel coordinates, so interpolating it
    bilinearly between pixel centres is exact: what remains is range noise, unless the
    projection (K, pixel-centre convention, extrinsics) disagrees with the renderer.
    Returns the median relative z-depth error of road points among road pixels.
    """
    height, width = camera_image.labels.shape
    pixels, index = project_points(sweep.points_lidar, sequence.K, sequence.T_cam_from_lidar,
                                   (width, height))
    points_cam = sweep.points_lidar[index].astype(np.float64) @ \
        sequence.T_cam_from_lidar[:3, :3].T + sequence.T_cam_from_lidar[:3, 3]
    v, u = np.mgrid[0:height, 0:width]
    K = sequence.K
    rays = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1],
                     np.ones((height, width))], axis=-1)
    inverse_z = np.linalg.norm(rays, axis=-1) / camera_image.depth
    x, y = pixels[:, 0] - 0.5, pixels[:, 1] - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 < width - 1) & (y0 < height - 1)
    x, y, x0, y0 = x[inside], y[inside], x0[inside], y0[inside]
    points_cam, labels = points_cam[inside], sweep.labels[index][inside]
    fx, fy = x - x0, y - y0
    corners = [(0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy),
               (1, 1, fx * fy)]
    road = (labels == 1) & np.all([camera_image.labels[y0 + dy, x0 + dx] == 1
                                   for dy, dx, _ in corners], axis=0)
    interpolated = sum(w * inverse_z[y0 + dy, x0 + dx] for dy, dx, w in corners)
    assert road.sum() > 100
    return np.median(np.abs(1.0 / interpolated[road] - points_cam[road, 2]) /
                     points_cam[road, 2])


@pytest.mark.parametrize('domain', ['day', 'night', 'city_b', 'lidar16'])
def test_lidar_points_project_onto_pixels_of_the_same_class(domain):
    sequence = SyntheticSequence(SequenceConfig(domain=domain, seed=1, num_frames=3,
                                                image_size=(200, 113), frame_stride=10,
                                                lidar_azimuth_steps=540))
    same_time, paired, counts = [], [], []
    for number in range(3):
        sweep = sequence.lidar_sweep(number * 10)
        # Same instant: only LiDAR/camera parallax (occlusion) and pixel edges disagree.
        image = sequence.render_camera_at(sweep.stamp_ns)
        # The calibration is the relative pose of the two sensors as the generator moved them.
        np.testing.assert_allclose(
            np.linalg.inv(image.T_world_from_cam) @ sweep.T_world_from_lidar,
            sequence.T_cam_from_lidar, atol=1e-9)
        assert _road_depth_error(sweep, image, sequence) < 0.004
        agree, agree_seen, seen, count = _label_agreement(sweep, image, sequence)
        assert count > 300 and seen > 0.8
        assert agree_seen > 0.99, f'calibration: {agree_seen:.4f} of visible points agree'
        # The paired image, shot up to 42 ms away, adds the ego-motion misalignment.
        image = sequence.camera_image(sequence.nearest_camera_index(sweep.stamp_ns))
        same_time.append(agree)
        paired.append(_label_agreement(sweep, image, sequence)[0])
        counts.append(count)
    assert np.average(same_time, weights=counts) > 0.95
    assert np.average(paired, weights=counts) > 0.95


def test_night_is_darker_and_noisier_than_day_for_the_same_seed():
    stats = {}
    for domain in ('day', 'night'):
        sequence = SyntheticSequence(_small(domain=domain, seed=4))
        stamp = sequence.lidar_stamp(0)
        # Two shots of the same instant differ only by sensor noise (and exposure jitter).
        first = sequence.render_camera_at(stamp, index=0).image.astype(np.float64)
        second = sequence.render_camera_at(stamp, index=1).image.astype(np.float64)
        difference = first - second
        stats[domain] = (first.mean(), (difference - difference.mean()).std() / np.sqrt(2))
        sweep = sequence.lidar_sweep(0)
        stats[domain] += (sweep.intensity.mean(), sweep.points_lidar.shape[0])
    day_mean, day_noise, day_intensity, day_points = stats['day']
    night_mean, night_noise, night_intensity, night_points = stats['night']
    assert night_mean < 0.5 * day_mean
    assert night_noise > 2.0 * day_noise
    # Same street, same LiDAR geometry; lower intensity and fewer returns at night.
    assert night_intensity < 0.9 * day_intensity
    assert night_points < day_points


def test_night_colour_cast_varies_between_sequences():
    casts = []
    for seed in range(4):
        sequence = SyntheticSequence(_small(domain='night', seed=seed))
        image = sequence.camera_image(0).image.reshape(-1, 3).astype(np.float64)
        lit = image.sum(axis=1) > 60
        mean = image[lit].mean(axis=0)
        casts.append(mean / mean.sum())
    assert np.ptp(np.array(casts), axis=0).max() > 0.03


def test_lidar16_domain_has_16_rings_and_the_default_32():
    sweep16 = SyntheticSequence(_small(domain='lidar16', seed=0)).lidar_sweep(0)
    assert set(np.unique(sweep16.ring)) == set(range(16))
    sweep32 = SyntheticSequence(_small(domain='day', seed=0)).lidar_sweep(0)
    assert set(np.unique(sweep32.ring)) == set(range(32))
    assert sweep16.points_lidar.shape[0] < 0.75 * sweep32.points_lidar.shape[0]
    # Elevation of each point follows its ring: HDL-32E spans -30.67 to +10.67 degrees.
    p = sweep32.points_lidar.astype(np.float64)
    elevation = np.degrees(np.arctan2(p[:, 2], np.hypot(p[:, 0], p[:, 1])))
    expected = -30.67 + sweep32.ring * (41.34 / 31)
    assert np.max(np.abs(elevation - expected)) < 0.05


def test_city_b_is_a_different_street_from_day():
    day = SyntheticSequence(_small(domain='day', seed=0)).scene
    city_b = SyntheticSequence(_small(domain='city_b', seed=0)).scene
    assert city_b.ground.section.road_half_width != day.ground.section.road_half_width
    # Left-hand traffic: the ego car drives left of the centre line.
    assert city_b.ego.lane_offset > 0 > day.ego.lane_offset


def test_bad_configs_fail_with_a_clear_message():
    with pytest.raises(ValueError, match='unknown domain'):
        SyntheticSequence(SequenceConfig(domain='dusk'))
    with pytest.raises(ValueError, match='num_frames'):
        SyntheticSequence(SequenceConfig(num_frames=0))


def test_save_previews_writes_images_and_overlays(tmp_path):
    written = save_previews(tmp_path, domains=('day', 'night'), image_size=(64, 36))
    assert sorted(p.name for p in written) == [
        'day.png', 'day_lidar.png', 'night.png', 'night_lidar.png']
    assert all(p.stat().st_size > 100 for p in written)
