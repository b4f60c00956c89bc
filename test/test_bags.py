"""Tests of the rosbag2 tools: demo-bag writer, bag -> Frames reader, playback and player."""

import io
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image as PILImage
import pytest
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import Reader, Writer

from mmtta_ros.bags.playback import play, PlaybackOptions, PlaybackStats, read_topics, TopicInfo
from mmtta_ros.bags.reader import BagFrameReader, read_clouds, read_frames
from mmtta_ros.bags.topics import (
    bag_typestore, BagTopics, LABELED_POINTS_TOPIC, labels_to_wire, make_qos,
    matrix_to_quaternion, NO_LABEL, SENSOR_QOS, stamp_to_ns, TF_STATIC_QOS)
from mmtta_ros.bags.transforms import build_tree, lookup_transform, PoseTrack, slerp
from mmtta_ros.bags.writer import (
    labels_cloud_message, sensor_samples, STORAGES, tf_message, write_demo_bag,
    write_labeled_clouds)
from mmtta_ros.core.decode import labels_from_message
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.params import SyncParams
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.sensors.image import scale_intrinsics
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, encode_labeled_cloud, UNLABELED
from mmtta_ros.sensors.projection import (
    quaternion_to_matrix, transform_from_translation_quaternion)
from mmtta_ros.synth import (
    CameraImage, LidarSweep, SequenceConfig, SyntheticSequence, T_CAM_FROM_LIDAR,
    T_EGO_FROM_CAM, T_EGO_FROM_LIDAR)
from mmtta_ros.tools import make_demo_bag
from test_sync import reference_matches

TOPICS = BagTopics()
NUM_SWEEPS = 8
IMAGE_SIZE = (160, 90)
DEMO = dict(domain='night', seed=3, num_sweeps=NUM_SWEEPS, image_size=IMAGE_SIZE,
            render_size=None, lidar_azimuth_steps=90)
LATENCY_MS = (1.0, 6.0)


def _config() -> SequenceConfig:
    return SequenceConfig(domain='night', seed=3, num_frames=NUM_SWEEPS, image_size=IMAGE_SIZE,
                          lidar_azimuth_steps=90)


@pytest.fixture(scope='module')
def generated():
    """Return the generator's sweeps and images of the demo bags, by stamp."""
    samples = list(sensor_samples(_config()))
    sweeps = {s.stamp_ns: s for s in samples if isinstance(s, LidarSweep)}
    images = {s.stamp_ns: s for s in samples if isinstance(s, CameraImage)}
    return sweeps, images


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    """One demo bag per storage plugin: {'mcap': path, 'sqlite3': path}."""
    root = tmp_path_factory.mktemp('bags')
    paths = {}
    for storage in STORAGES:
        paths[storage] = root / f'demo_{storage}'
        summary = write_demo_bag(paths[storage], storage=storage, latency_ms=LATENCY_MS, **DEMO)
        assert summary.num_sweeps == NUM_SWEEPS
        assert summary.size_bytes > 0
    return paths


def _messages(path, topic):
    """[(log_ns, msg)] of one topic."""
    typestore = bag_typestore()
    with Reader(path) as bag:
        connections = [c for c in bag.connections if c.topic == topic]
        return [(log_ns, typestore.deserialize_cdr(raw, c.msgtype))
                for c, log_ns, raw in bag.messages(connections=connections)]


def _copy_bag(src, dst, keep=lambda topic, msg: True, rename=None, convert=None):
    """
    Copy a bag, keeping the messages for which keep(topic, msg) is true.

    rename: {old topic: new topic}; convert: {topic: (new msgtype, function msg -> new msg)}.
    """
    typestore = bag_typestore()
    rename, convert = rename or {}, convert or {}
    with Reader(src) as reader, Writer(dst, version=9) as writer:
        out = {}
        for c in reader.connections:
            msgtype = convert[c.topic][0] if c.topic in convert else c.msgtype
            out[c.id] = writer.add_connection(rename.get(c.topic, c.topic), msgtype,
                                              typestore=typestore,
                                              offered_qos_profiles=c.ext.offered_qos_profiles)
        for c, log_ns, raw in reader.messages():
            msg = typestore.deserialize_cdr(raw, c.msgtype)
            if not keep(c.topic, msg):
                continue
            if c.topic in convert:
                msgtype, function = convert[c.topic]
                raw = typestore.serialize_cdr(function(msg), msgtype)
            writer.write(out[c.id], log_ns, raw)


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    encoded = io.BytesIO()
    PILImage.fromarray(image).save(encoded, format='JPEG', quality=90)
    return np.asarray(PILImage.open(io.BytesIO(encoded.getvalue())).convert('RGB'))


# --- small pieces ---------------------------------------------------------------------------

def test_matrix_to_quaternion_inverts_quaternion_to_matrix():
    rng = np.random.default_rng(0)
    for q in [*rng.normal(size=(200, 4)), (0, 0, 0, 1), (1, 0, 0, 0), (0, 1, 0, 0),
              (0, 0, 1, 0), (0.5, -0.5, 0.5, -0.5)]:
        R = quaternion_to_matrix(q)
        q_back = matrix_to_quaternion(R)
        assert q_back[3] >= 0 and np.linalg.norm(q_back) == pytest.approx(1.0)
        np.testing.assert_allclose(quaternion_to_matrix(q_back), R, atol=1e-12)


def test_labels_wire_format_and_decoding():
    labels = np.array([0, 5, IGNORE_INDEX, 3, 254, 300, -1])
    wire = labels_to_wire(labels)
    assert wire.dtype == np.uint8
    np.testing.assert_array_equal(wire, [0, 5, NO_LABEL, 3, 254, NO_LABEL, NO_LABEL])
    msg = labels_cloud_message(labels, 5, 'LIDAR_TOP')
    assert [f.name for f in msg.fields] == ['label'] and msg.point_step == 1
    # Values outside the six classes (254 and 255 included) read back as IGNORE_INDEX.
    np.testing.assert_array_equal(labels_from_message(msg), [0, 5, -100, 3, -100, -100, -100])
    keep = np.array([True, False, True, True, False, False, True])
    np.testing.assert_array_equal(labels_from_message(msg, keep), [0, -100, 3, -100])
    with pytest.raises(SensorDataError, match='align point for point'):
        labels_from_message(msg, np.ones(3, dtype=bool))


def test_transform_tree_composes_and_reports_missing_frames():
    tree = build_tree([tf_message([('base_link', 'LIDAR_TOP', T_EGO_FROM_LIDAR),
                                   ('base_link', 'CAM_FRONT', T_EGO_FROM_CAM)], 0)])
    np.testing.assert_allclose(lookup_transform(tree, 'CAM_FRONT', 'LIDAR_TOP'),
                               T_CAM_FROM_LIDAR, atol=1e-12)
    np.testing.assert_allclose(lookup_transform(tree, '/base_link', 'CAM_FRONT'),
                               T_EGO_FROM_CAM, atol=1e-12)
    np.testing.assert_allclose(lookup_transform(tree, 'LIDAR_TOP', 'LIDAR_TOP'), np.eye(4))
    # A deeper chain: the camera mounted on a bracket on the car.
    T_bracket = np.eye(4)
    T_bracket[:3, 3] = (0.1, 0.2, 0.3)
    deep = build_tree([tf_message([('base_link', 'LIDAR_TOP', T_EGO_FROM_LIDAR),
                                   ('base_link', 'bracket', T_bracket),
                                   ('bracket', 'CAM_FRONT', np.linalg.inv(T_bracket)
                                    @ T_EGO_FROM_CAM)], 0)])
    np.testing.assert_allclose(lookup_transform(deep, 'CAM_FRONT', 'LIDAR_TOP'),
                               T_CAM_FROM_LIDAR, atol=1e-12)
    with pytest.raises(SensorDataError, match="no transform between 'CAM_BACK'"):
        lookup_transform(tree, 'CAM_BACK', 'LIDAR_TOP')


def _optimal_pairs(sweeps, images, slop_ns):
    """(sweep, image) stamps of the optimal one-to-one matching (test_sync's brute force)."""
    return [(sweep, image) for image, sweep in reference_matches([images, sweeps], slop_ns)]


# --- demo bags ------------------------------------------------------------------------------

@pytest.mark.parametrize('storage', sorted(STORAGES))
def test_demo_bag_topics_types_qos_and_rates(bags, generated, storage):
    sweeps, images = generated
    with Reader(bags[storage]) as bag:
        topics = bag.topics
        expected_types = {
            TOPICS.image: 'sensor_msgs/msg/CompressedImage',
            TOPICS.camera_info: 'sensor_msgs/msg/CameraInfo',
            TOPICS.lidar: 'sensor_msgs/msg/PointCloud2',
            TOPICS.labels: 'sensor_msgs/msg/PointCloud2',
            TOPICS.tf_static: 'tf2_msgs/msg/TFMessage'}
        assert {name: info.msgtype for name, info in topics.items()} == expected_types
        counts = {name: info.msgcount for name, info in topics.items()}
        assert counts == {TOPICS.image: len(images), TOPICS.camera_info: len(images),
                          TOPICS.lidar: NUM_SWEEPS, TOPICS.labels: NUM_SWEEPS,
                          TOPICS.tf_static: 1}
        log_times = [log_ns for _, log_ns, _ in bag.messages()]
    assert log_times == sorted(log_times), 'a recorder writes in log-time order'
    # The metadata keeps the offered QoS, as ros2 bag record writes it.
    topics = read_topics(bags[storage])
    for name in (TOPICS.image, TOPICS.camera_info, TOPICS.lidar, TOPICS.labels):
        (qos,) = topics[name].offered_qos
        assert qos.reliability == QosReliability.BEST_EFFORT
        assert qos.durability == QosDurability.VOLATILE
    (qos,) = topics[TOPICS.tf_static].offered_qos
    assert (qos.reliability, qos.durability) == (QosReliability.RELIABLE,
                                                 QosDurability.TRANSIENT_LOCAL)
    assert (Path(bags[storage]) / 'metadata.yaml').read_text().count('transient_local') == 1
    # Header stamps are the sensor times: LiDAR at 20 Hz, camera at 12 Hz; log times lag
    # them by the configured latency.
    lidar = _messages(bags[storage], TOPICS.lidar)
    lidar_stamps = [stamp_to_ns(m.header.stamp) for _, m in lidar]
    assert lidar_stamps == sorted(sweeps)
    assert set(np.diff(lidar_stamps)) == {50_000_000}
    camera = _messages(bags[storage], TOPICS.image)
    camera_stamps = [stamp_to_ns(m.header.stamp) for _, m in camera]
    assert camera_stamps == sorted(images)
    assert set(np.diff(camera_stamps)) <= {83_333_333, 83_333_334}
    latencies = np.array([log - stamp_to_ns(m.header.stamp) for log, m in lidar + camera])
    assert latencies.min() >= LATENCY_MS[0] * 1e6 and latencies.max() <= LATENCY_MS[1] * 1e6
    assert len(set(latencies.tolist())) > len(latencies) // 2, 'latency should jitter'
    info = _messages(bags[storage], TOPICS.camera_info)
    assert [stamp_to_ns(m.header.stamp) for _, m in info] == camera_stamps
    assert {m.header.frame_id for _, m in info + camera} == {'CAM_FRONT'}
    assert {m.header.frame_id for _, m in lidar} == {'LIDAR_TOP'}
    cloud = lidar[0][1]
    assert [(f.name, f.offset, f.datatype) for f in cloud.fields] == [
        ('x', 0, 7), ('y', 4, 7), ('z', 8, 7), ('intensity', 12, 7), ('ring', 16, 7)]
    assert cloud.point_step == 20
    first_info = info[0][1]
    assert (first_info.width, first_info.height) == IMAGE_SIZE
    assert first_info.distortion_model == 'plumb_bob' and not np.any(first_info.d)
    assert all(m.format == 'jpeg' for _, m in camera)


@pytest.mark.parametrize('storage', sorted(STORAGES))
def test_reader_gives_the_generator_frames(bags, generated, storage):
    sweeps, images = generated
    sequence = SyntheticSequence(_config())
    reader = BagFrameReader(bags[storage], image_size=None)
    frames = list(reader)
    # The node's pairing: one image per sweep and one sweep per image, tightest first.
    pairs = _optimal_pairs(sorted(sweeps), sorted(images), 50_000_000)
    assert [(f.stamp_lidar_ns, f.stamp_image_ns) for f in frames] == pairs
    assert reader.stats.frames == len(images) == len(pairs) and reader.stats.sweeps == NUM_SWEEPS
    assert reader.stats.unpaired_sweeps == NUM_SWEEPS - len(pairs)
    assert reader.stats.rejected_messages == 0
    for index, frame in enumerate(frames):
        sweep = sweeps[frame.stamp_lidar_ns]
        image = images[frame.stamp_image_ns]
        # Each image went to its nearest sweep.
        assert frame.stamp_lidar_ns == min(sweeps, key=lambda s: abs(s - frame.stamp_image_ns))
        assert sequence.camera_stamp(sequence.nearest_camera_index(
            frame.stamp_lidar_ns)) == frame.stamp_image_ns
        np.testing.assert_array_equal(frame.points_lidar, sweep.points_lidar)
        assert frame.points_lidar.dtype == np.float32 and frame.points_lidar.flags.writeable
        np.testing.assert_array_equal(frame.intensity, sweep.intensity)
        np.testing.assert_array_equal(frame.labels, sweep.labels)
        assert frame.labels.dtype == np.int64
        np.testing.assert_allclose(frame.K, image.K, rtol=1e-12)
        np.testing.assert_allclose(frame.T_cam_from_lidar, T_CAM_FROM_LIDAR, atol=1e-9)
        # The image is the jpeg the writer made of the generator's image, bit for bit.
        np.testing.assert_array_equal(frame.image, _jpeg_round_trip(image.image))
        assert np.abs(frame.image.astype(int) - image.image).mean() < 15
        assert frame.lidar_frame_id == 'LIDAR_TOP'
        assert frame.sequence == f'demo_{storage}' and frame.index == index


def test_reader_resizes_image_and_scales_k(bags, generated):
    _, images = generated
    frames = list(read_frames(bags['mcap'], image_size=(80, 45)))
    assert len(frames) == len(images)
    for frame in frames:
        assert frame.image.shape == (45, 80, 3) and frame.image_size == (80, 45)
        K_expected = scale_intrinsics(images[frame.stamp_image_ns].K, IMAGE_SIZE, (80, 45))
        np.testing.assert_allclose(frame.K, K_expected, rtol=1e-12)
        # Half-size decoding keeps the picture: compare with a plain downscale.
        reference = np.asarray(PILImage.fromarray(images[frame.stamp_image_ns].image).resize(
            (80, 45), PILImage.BILINEAR))
        assert np.abs(frame.image.astype(int) - reference).mean() < 15


def test_reader_on_a_bag_without_labels_or_tf(bags, generated, tmp_path):
    sweeps, _ = generated
    unlabeled = tmp_path / 'unlabeled'
    _copy_bag(bags['mcap'], unlabeled, lambda topic, msg: topic != TOPICS.labels)
    num_pairs = len(list(read_frames(bags['mcap'], image_size=None)))
    frames = list(read_frames(unlabeled, image_size=None))
    assert len(frames) == num_pairs and all(f.labels is None for f in frames)
    # Without /tf_static the transform must be given.
    no_tf = tmp_path / 'no_tf'
    _copy_bag(bags['mcap'], no_tf, lambda topic, msg: topic != TOPICS.tf_static)
    with pytest.raises(SensorDataError, match='T_cam_from_lidar'):
        list(read_frames(no_tf))
    T = np.eye(4)
    T[:3, 3] = (1.0, 2.0, 3.0)
    frames = list(read_frames(no_tf, T_cam_from_lidar=T, image_size=None))
    assert len(frames) == num_pairs
    np.testing.assert_array_equal(frames[0].T_cam_from_lidar, T)
    np.testing.assert_array_equal(frames[0].labels, sweeps[frames[0].stamp_lidar_ns].labels)
    # Topic names are configurable; a missing one says which.
    with pytest.raises(SensorDataError, match="no image topic '/CAM_BACK/image'"):
        list(read_frames(unlabeled, topics=BagTopics(image='/CAM_BACK/image')))


def test_reader_takes_raw_images_and_mounts_from_tf(bags, generated, tmp_path):
    _, images = generated
    Image = bag_typestore().types['sensor_msgs/msg/Image']

    def to_raw_bgr(msg):
        # A raw camera driver's bgr8 Image, with 4 bytes of row padding.
        rgb = np.asarray(PILImage.open(io.BytesIO(msg.data.tobytes())).convert('RGB'))
        height, width = rgb.shape[:2]
        rows = np.zeros((height, width * 3 + 4), dtype=np.uint8)
        rows[:, :width * 3] = rgb[:, :, ::-1].reshape(height, -1)
        return Image(header=msg.header, height=height, width=width, encoding='bgr8',
                     is_bigendian=0, step=width * 3 + 4, data=rows.reshape(-1))

    raw = tmp_path / 'raw'
    _copy_bag(bags['mcap'], raw, rename={TOPICS.tf_static: '/tf'},
              convert={TOPICS.image: ('sensor_msgs/msg/Image', to_raw_bgr)})
    frames = list(read_frames(raw, image_size=None))
    assert len(frames) == len(images)
    for frame in frames:
        np.testing.assert_array_equal(frame.image,
                                      _jpeg_round_trip(images[frame.stamp_image_ns].image))
        # The mounts came from /tf, as some converters write them.
        np.testing.assert_allclose(frame.T_cam_from_lidar, T_CAM_FROM_LIDAR, atol=1e-9)


def test_pose_track_interpolates_and_never_extrapolates():
    track = PoseTrack()
    half = np.sqrt(0.5)
    track.add(2_000, (2.0, 0.0, 0.0), (0.0, 0.0, half, half))  # yaw 90 deg
    track.add(1_000, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))    # out of order is fine
    np.testing.assert_allclose(track.at(1_000), np.eye(4), atol=1e-12)
    middle = track.at(1_500)
    np.testing.assert_allclose(middle[:3, 3], (1.0, 0.0, 0.0), atol=1e-12)
    yaw = np.arctan2(middle[1, 0], middle[0, 0])
    assert yaw == pytest.approx(np.pi / 4, abs=1e-9)  # slerp: half the angle at half time
    quarter = track.at(1_250)
    assert np.arctan2(quarter[1, 0], quarter[0, 0]) == pytest.approx(np.pi / 8, abs=1e-9)
    assert track.at(999) is None and track.at(2_001) is None
    # q and -q are one rotation: the short way round, not a full turn.
    assert slerp((0, 0, 0, 1), (0, 0, -half, -half), 0.5) == pytest.approx(
        (0, 0, np.sin(np.pi / 8), np.cos(np.pi / 8)), abs=1e-9)
    assert PoseTrack().at(0) is None


@pytest.fixture(scope='module')
def tf_bag(tmp_path_factory):
    """Write a demo bag with the ego pose on /tf (odom -> base_link at every sensor stamp)."""
    path = tmp_path_factory.mktemp('tf_bag') / 'demo_tf'
    write_demo_bag(path, storage='mcap', latency_ms=LATENCY_MS, with_tf=True, **DEMO)
    return path


def test_reader_poses_from_tf_are_the_generators(tf_bag, generated, bags, tmp_path):
    sweeps, images = generated
    with Reader(tf_bag) as bag:
        assert bag.topics[TOPICS.tf].msgcount == len(sweeps) + len(images)
    reader = BagFrameReader(tf_bag, image_size=None)
    frames = list(reader)
    assert frames and reader.stats.frames_without_pose == 0
    for frame in frames:
        # The bag has odometry at every sweep stamp: the pose is exact, but for the
        # quaternions' float64 round trip.
        np.testing.assert_allclose(frame.T_odom_from_lidar,
                                   sweeps[frame.stamp_lidar_ns].T_world_from_lidar, atol=1e-9)
        # The camera's pose at its image's stamp, as the image was rendered.
        np.testing.assert_allclose(frame.T_odom_from_cam,
                                   images[frame.stamp_image_ns].T_world_from_cam, atol=1e-9)
    assert reader.stats.frames_without_camera_pose == 0
    # An override of the extrinsics: the camera sits where the override puts it relative to
    # the LiDAR, so the compensated transform is the override's wherever the car stands.
    override = transform_from_translation_quaternion((0.1, -0.2, 0.3), (0.5, -0.5, 0.5, -0.5))
    for frame in BagFrameReader(tf_bag, image_size=None, T_cam_from_lidar=override):
        T_odom_from_lidar_at_image = (images[frame.stamp_image_ns].T_world_from_cam
                                      @ T_CAM_FROM_LIDAR)
        np.testing.assert_allclose(frame.T_odom_from_cam,
                                   T_odom_from_lidar_at_image @ np.linalg.inv(override),
                                   atol=1e-9)
    # Odometry at the camera stamps only: poses interpolated at the sweeps' stamps (the ego
    # drives smoothly, so within a millimetre), none before the first or after the last.
    sparse = tmp_path / 'camera_stamps_only'
    _copy_bag(tf_bag, sparse, lambda topic, msg: not (
        topic == TOPICS.tf and stamp_to_ns(msg.transforms[0].header.stamp) in sweeps))
    reader = BagFrameReader(sparse, image_size=None)
    interpolated = list(reader)
    inside = {f.stamp_lidar_ns for f in interpolated
              if min(images) <= f.stamp_lidar_ns <= max(images)}
    assert len(inside) >= 2
    assert reader.stats.frames_without_pose == len(interpolated) - len(inside)
    for frame in interpolated:
        if frame.stamp_lidar_ns not in inside:
            assert frame.T_odom_from_lidar is None
            continue
        truth = sweeps[frame.stamp_lidar_ns].T_world_from_lidar
        assert frame.stamp_lidar_ns not in images  # really interpolated, not read
        np.testing.assert_allclose(frame.T_odom_from_lidar[:3, 3], truth[:3, 3], atol=1e-3)
        np.testing.assert_allclose(frame.T_odom_from_lidar[:3, :3], truth[:3, :3], atol=1e-4)
    # A bag without odometry: no poses, every frame counted.
    reader = BagFrameReader(bags['mcap'], image_size=None)
    frames = list(reader)
    assert all(f.T_odom_from_lidar is None and f.T_odom_from_cam is None for f in frames)
    assert reader.stats.frames_without_pose == len(frames) > 0
    assert reader.stats.frames_without_camera_pose == len(frames)


def test_pairing_skips_sweeps_without_an_image_in_slop(bags, generated, tmp_path):
    sweeps, images = generated
    image_stamps = sorted(images)
    # Drop the images from the second to the last but one: the sweeps in between have
    # nothing within 50 ms.
    dropped = set(image_stamps[1:-1])
    sparse = tmp_path / 'sparse'
    _copy_bag(bags['sqlite3'], sparse,
              lambda topic, msg: not (topic == TOPICS.image
                                      and stamp_to_ns(msg.header.stamp) in dropped))
    kept = [s for s in image_stamps if s not in dropped]
    paired = _optimal_pairs(sorted(sweeps), kept, 50_000_000)
    reader = BagFrameReader(sparse, image_size=None)
    frames = list(reader)
    assert 0 < len(paired) <= len(kept)
    assert [(f.stamp_lidar_ns, f.stamp_image_ns) for f in frames] == paired
    assert reader.stats.unpaired_sweeps == NUM_SWEEPS - len(paired)
    assert [f.index for f in frames] == list(range(len(frames)))
    # A narrower slop pairs fewer.
    narrow = list(read_frames(sparse, image_size=None, sync=SyncParams(slop_s=0.008)))
    assert [(f.stamp_lidar_ns, f.stamp_image_ns) for f in narrow] == _optimal_pairs(
        sorted(sweeps), kept, 8_000_000)
    assert 0 < len(narrow) < len(frames)


def test_labeled_clouds_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    written = []
    for i in range(3):
        n = 100 + i
        points = rng.normal(0, 10, (n, 3)).astype(np.float32)
        labels = rng.integers(-1, 6, n)
        labels[labels < 0] = IGNORE_INDEX
        confidence = rng.random(n).astype(np.float32)
        buffer = encode_labeled_cloud(points, labels, confidence, intensity=points[:, 0] * 0)
        written.append((1_000_000_000 * (i + 1) + 7, 'LIDAR_TOP', buffer, points, labels,
                        confidence))
    for storage in STORAGES:
        path = tmp_path / storage
        count = write_labeled_clouds(path, ((s, f, b) for s, f, b, *_ in written),
                                     storage=storage)
        assert count == 3
        (qos,) = read_topics(path)[LABELED_POINTS_TOPIC].offered_qos
        assert qos.reliability == QosReliability.RELIABLE
        back = list(read_clouds(path))
        assert len(back) == 3
        for (stamp, frame_id, cloud), expected_cloud in zip(back, written):
            s, f, _, points, labels, confidence = expected_cloud
            assert (stamp, frame_id) == (s, f)
            np.testing.assert_array_equal(cloud.points, points)
            expected = np.where(labels == IGNORE_INDEX, UNLABELED, labels)
            np.testing.assert_array_equal(cloud.fields['label'], expected)
            np.testing.assert_array_equal(cloud.fields['confidence'], confidence)
        only = list(read_clouds(path, fields=['label']))
        assert set(only[0][2].fields) == {'label'}
        with pytest.raises(SensorDataError, match='no topic'):
            list(read_clouds(path, topic='/other'))


def test_writer_refuses_bad_arguments(tmp_path, bags):
    with pytest.raises(FileExistsError):
        write_demo_bag(bags['mcap'], **DEMO)
    with pytest.raises(ValueError, match='storage'):
        write_demo_bag(tmp_path / 'x', storage='rosbag1', **DEMO)
    with pytest.raises(ValueError, match='exactly one'):
        write_demo_bag(tmp_path / 'y', duration_s=1.0, **DEMO)


def test_parallel_rendering_gives_identical_samples():
    config = SequenceConfig(domain='night', seed=5, num_frames=3, image_size=(48, 27),
                            lidar_azimuth_steps=36)
    serial = list(sensor_samples(config, workers=1))
    parallel = list(sensor_samples(config, workers=2))
    assert [type(s) for s in serial] == [type(s) for s in parallel]
    for a, b in zip(serial, parallel):
        assert a.stamp_ns == b.stamp_ns
        if isinstance(a, LidarSweep):
            np.testing.assert_array_equal(a.points_lidar, b.points_lidar)
            np.testing.assert_array_equal(a.labels, b.labels)
        else:
            np.testing.assert_array_equal(a.image, b.image)


def test_make_demo_bag_tool(tmp_path, capsys):
    out = tmp_path / 'tool_bag'
    argv = [str(out), '--sweeps', '3', '--image-size', '64', '36', '--render-native',
            '--lidar-azimuth-steps', '36', '--storage', 'sqlite3', '--seed', '2', '--workers', '1']
    assert make_demo_bag.main(argv) == 0
    printed = capsys.readouterr().out
    assert '3 sweeps' in printed and '/LIDAR_TOP/labels' in printed
    assert (out / 'tool_bag.db3').exists()
    assert make_demo_bag.main(argv) == 1
    assert 'exists' in capsys.readouterr().err


# --- playback timing (no DDS) ---------------------------------------------------------------

class FakeTime:
    """A clock that only moves when playback sleeps."""

    def __init__(self):
        self.t = 100.0

    def now(self):
        return self.t

    def sleep(self, seconds):
        assert seconds >= 0
        self.t += seconds


def _play(path, options, stop_after_loops=None):
    clock = FakeTime()
    sent, clocks = [], []
    stats = PlaybackStats()

    def should_stop():
        return stop_after_loops is not None and stats.loops >= stop_after_loops

    play(path, options, lambda topic, raw: sent.append((clock.t, topic, raw)),
         lambda bag_ns: clocks.append((clock.t, bag_ns)), should_stop=should_stop,
         now=clock.now, sleep=clock.sleep, stats=stats)
    return sent, clocks, stats


def _log_times(path):
    with Reader(path) as bag:
        return [(log_ns, c.topic, bytes(raw)) for c, log_ns, raw in bag.messages()], \
            bag.start_time


@pytest.mark.parametrize('rate', [1.0, 2.5])
def test_playback_follows_log_times_scaled_by_rate(bags, rate):
    messages, start = _log_times(bags['mcap'])
    sent, clocks, stats = _play(bags['mcap'], PlaybackOptions(rate=rate, clock_hz=50))
    assert [(topic, raw) for _, topic, raw in sent] == [(t, r) for _, t, r in messages]
    for (wall, _, _), (log_ns, _, _) in zip(sent, messages):
        assert wall - 100.0 == pytest.approx((log_ns - start) * 1e-9 / rate, abs=1e-6)
    assert stats.loops == 1 and sum(stats.published.values()) == len(messages)
    # /clock: bag time of the wall time, monotonic, never ahead of the message to come.
    bag_times = [bag_ns for _, bag_ns in clocks]
    assert bag_times == sorted(bag_times) and bag_times[0] == start
    assert bag_times[-1] <= messages[-1][0]
    duration_wall = (messages[-1][0] - start) * 1e-9 / rate
    assert len(clocks) == pytest.approx(duration_wall * 50, abs=2)
    for wall, bag_ns in clocks:
        assert bag_ns == pytest.approx(start + (wall - 100.0) * rate * 1e9, abs=1e3)


def test_playback_offset_topics_and_loop(bags):
    messages, start = _log_times(bags['mcap'])
    offset = 0.2
    sent, _, _ = _play(bags['mcap'], PlaybackOptions(start_offset_s=offset))
    # The latched /tf_static still goes first; other messages before the offset are skipped.
    assert sent[0][1] == TOPICS.tf_static and sent[0][0] == 100.0
    later = [(t, r) for log_ns, t, r in messages if log_ns >= start + offset * 1e9]
    assert [(t, r) for _, t, r in sent[1:]] == later
    sent, _, stats = _play(bags['mcap'], PlaybackOptions(topics=[TOPICS.lidar]))
    assert {t for _, t, _ in sent} == {TOPICS.lidar} and stats.published == {
        TOPICS.lidar: NUM_SWEEPS}
    sent, clocks, stats = _play(bags['mcap'], PlaybackOptions(loop=True, topics=[TOPICS.lidar]),
                                stop_after_loops=3)
    assert stats.loops == 3 and len(sent) == 3 * NUM_SWEEPS
    bag_times = [bag_ns for _, bag_ns in clocks]
    assert sum(b < a for a, b in zip(bag_times, bag_times[1:])) == 2, 'time jumps back'
    with pytest.raises(ValueError, match='none of the topics'):
        _play(bags['mcap'], PlaybackOptions(topics=['/nope']))
    with pytest.raises(ValueError, match='rate'):
        PlaybackOptions(rate=0)


def test_playback_qos_follows_the_recording():
    player = pytest.importorskip('mmtta_ros.bags.player')
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    sensor = player.playback_qos(TopicInfo('/LIDAR_TOP', 'x/msg/Y', [SENSOR_QOS], 10))
    assert sensor.reliability == ReliabilityPolicy.BEST_EFFORT
    assert sensor.durability == DurabilityPolicy.VOLATILE and sensor.depth == 5
    static = player.playback_qos(TopicInfo('/tf_static', 'x/msg/Y', [TF_STATIC_QOS], 3))
    assert static.reliability == ReliabilityPolicy.RELIABLE
    assert static.durability == DurabilityPolicy.TRANSIENT_LOCAL and static.depth == 3
    unknown = player.playback_qos(TopicInfo('/other', 'x/msg/Y', [], 10))
    assert unknown.reliability == ReliabilityPolicy.RELIABLE and unknown.depth == 10
    assert unknown.durability == DurabilityPolicy.VOLATILE
    latched = player.playback_qos(TopicInfo('/tf_static', 'x/msg/Y', [], 2))
    assert latched.durability == DurabilityPolicy.TRANSIENT_LOCAL
    deep = player.playback_qos(TopicInfo('/s', 'x/msg/Y', [make_qos(False, False, 0)], 1))
    assert deep.depth == 1
    assert player.message_class('sensor_msgs/msg/PointCloud2').__name__ == 'PointCloud2'


# --- the player over real DDS -----------------------------------------------------------------

def _ros_env():
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=str(os.getpid() % 80 + 10), PYTHONUNBUFFERED='1')
    env.pop('ROS_LOCALHOST_ONLY', None)
    return env


def _start_player(bag, *args):
    return subprocess.Popen(
        [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), *args],
        env=_ros_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(Path(__file__).resolve().parents[1]))


def _stop(process):
    """End a player this test started, by its pid; returns (stdout, stderr)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGINT)
        try:
            return process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
    return process.communicate(timeout=10)


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_player_publishes_bag_over_dds(bags, generated, monkeypatch):
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, PointCloud2

    sweeps, images = generated
    for key, value in _ros_env().items():
        monkeypatch.setenv(key, value)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = executor = None
    looping = finite = None
    try:
        node = rclpy.create_node('test_bag_player_listener', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        clouds, pictures, clock_times = {}, {}, []
        node.create_subscription(
            PointCloud2, TOPICS.lidar,
            lambda m: clouds.setdefault(stamp_to_ns(m.header.stamp), m), qos_profile_sensor_data)
        node.create_subscription(
            CompressedImage, TOPICS.image,
            lambda m: pictures.setdefault(stamp_to_ns(m.header.stamp), m),
            qos_profile_sensor_data)
        node.create_subscription(
            Clock, '/clock', lambda m: clock_times.append(stamp_to_ns(m.clock)),
            QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))

        # Looping, so messages sent before discovery matched come round again.
        looping = _start_player(bags['mcap'], '--loop', '--rate', '2')
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and looping.poll() is None:
            executor.spin_once(timeout_sec=0.05)
            if len(clouds) == len(sweeps) and len(pictures) == len(images) and clock_times:
                break
        out, err = _stop(looping)
        assert looping.returncode == 0, err
        assert 'Traceback' not in err
        assert 'published:' in out and TOPICS.lidar in out
        assert set(clouds) == set(sweeps), 'every sweep should arrive with its stamp'
        assert set(pictures) == set(images)
        for stamp, msg in clouds.items():
            assert msg.header.frame_id == 'LIDAR_TOP'
            np.testing.assert_array_equal(cloud_to_numpy(msg).points, sweeps[stamp].points_lidar)
        assert all(m.format == 'jpeg' for m in pictures.values())
        first, last = min(sweeps.keys() | images.keys()), max(sweeps.keys() | images.keys())
        assert clock_times and all(first - 10**8 <= t <= last + 10**8 for t in clock_times)

        # Without --loop the player ends by itself and reports what it sent.
        finite = _start_player(bags['mcap'], '--rate', '4', '--topics', TOPICS.lidar,
                               TOPICS.image)
        out, err = finite.communicate(timeout=30)
        assert finite.returncode == 0, err
        assert f'{NUM_SWEEPS:8d}  {TOPICS.lidar}' in out
        assert f'{len(images):8d}  {TOPICS.image}' in out
        assert 'loops completed: 1' in out
    finally:
        for process in (looping, finite):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_recorded_labeled_clouds_are_scored_against_the_bag_labels(bags, generated, tmp_path):
    from mmtta_ros.eval.live_demo import score_labeled_bag

    sweeps, _ = generated
    stamps = sorted(sweeps)
    recorded = []
    for stamp in stamps:
        sweep = sweeps[stamp]
        labels = np.where(sweep.labels >= 0, sweep.labels, UNLABELED)
        recorded.append((stamp, 'LIDAR_TOP', encode_labeled_cloud(
            sweep.points_lidar, labels, np.ones(len(labels), np.float32), None,
            np.zeros((6, 3), np.uint8))))
    labeled = tmp_path / 'labeled'
    write_labeled_clouds(labeled, recorded)
    perfect = score_labeled_bag(labeled, bags['mcap'], stamps, topic=LABELED_POINTS_TOPIC)
    assert perfect['scored'] == NUM_SWEEPS and perfect['miou'] == pytest.approx(1.0)
    some = score_labeled_bag(labeled, bags['mcap'], stamps[:3], topic=LABELED_POINTS_TOPIC)
    assert some['scored'] == 3


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_the_player_waits_for_subscribers_and_refuses_topics_it_does_not_play(bags):
    pytest.importorskip('rclpy')
    refused = _start_player(bags['mcap'], '--wait-for', '/nowhere')
    out, err = refused.communicate(timeout=30)
    assert refused.returncode == 1 and 'Traceback' not in err
    assert '--wait-for: not played from this bag: /nowhere' in err
    # Nobody subscribes here: it waits the timeout, says so and plays anyway.
    alone = _start_player(bags['mcap'], '--rate', '8', '--topics', TOPICS.lidar,
                          '--wait-for', TOPICS.lidar, '--wait-timeout', '0.5')
    out, err = alone.communicate(timeout=30)
    assert alone.returncode == 0, err
    assert f'no subscriber after 0.5 s on {TOPICS.lidar}; playing anyway' in err
    assert f'{NUM_SWEEPS:8d}  {TOPICS.lidar}' in out


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_reliable_player_ends_at_once_without_readers_and_refuses_a_negative_ack_timeout(bags):
    pytest.importorskip('rclpy')
    refused = _start_player(bags['mcap'], '--reliable', '--ack-timeout', '-1')
    out, err = refused.communicate(timeout=30)
    assert refused.returncode != 0 and 'Traceback' not in err
    assert '--ack-timeout must be >= 0' in err
    # No reader: nothing waits to be acknowledged, so no warning and no 30 s wait.
    alone = _start_player(bags['mcap'], '--rate', '8', '--topics', TOPICS.lidar, '--reliable')
    out, err = alone.communicate(timeout=25)
    assert alone.returncode == 0, err
    assert 'not acknowledged' not in err
    assert f'{NUM_SWEEPS:8d}  {TOPICS.lidar}' in out
