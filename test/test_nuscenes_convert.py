"""nuScenes -> rosbag2 converter on a tiny nuScenes-format dataset written by the tests."""

import json
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader
import yaml

from mmtta_ros.bags.nuscenes_convert import (
    ALL_CAMERAS, camera_bag_topics, convert, LIDARSEG_TO_CLASS, lidarseg_lookup, ODOM_FRAME,
    read_lidar_records, read_lidarseg_labels, select_scenes, TF_TOPIC)
from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.bags.topics import bag_typestore, BagTopics, NO_LABEL, stamp_to_ns
from mmtta_ros.bags.transforms import build_tree, lookup_transform
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import CLASS_NAMES
from mmtta_ros.eval.coverage import coverage
from mmtta_ros.sensors.pointcloud import cloud_structured_view, cloud_to_numpy
from mmtta_ros.sensors.projection import transform_from_translation_quaternion
from mmtta_ros.tools import nuscenes_to_bag
from nuscenes_fixture import LIDARSEG_NAMES, write_tiny_nuscenes

# Any ImportError skips: a devkit missing one of its import-time dependencies too.
pytest.importorskip(
    'nuscenes.nuscenes', exc_type=ImportError, reason='nuscenes-devkit not importable '
    '(pip install --no-deps nuscenes-devkit==1.2.0 plus its import-time dependencies, see '
    'requirements.txt)')

from nuscenes.nuscenes import NuScenes  # noqa: E402  (after the skip on purpose)
from nuscenes.utils.data_classes import LidarPointCloud  # noqa: E402
from nuscenes.utils.geometry_utils import transform_matrix  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

TOPICS = BagTopics()
# Project class per lidarseg index 0..31 (official indices), checked by hand against
# xmuda_journal (LidarsegClassMapper, then NuScenesLidarSegBase.categories).
V, D, S, T, M, G, X = 0, 1, 2, 3, 4, 5, NO_LABEL
EXPECTED_BY_INDEX = (
    X, X, X, X, X, X, X, X, X,   # noise, animal, 7 human.pedestrian.*
    X, X, X, X, X,               # barrier, debris, pushable_pullable, trafficcone, bicycle_rack
    V, V, V, V, V,               # bicycle, bus.bendy, bus.rigid, car, construction
    X, X,                        # emergency.ambulance, emergency.police
    V, V, V,                     # motorcycle, trailer, truck
    D, X, S, T, M, X, G,         # driveable, flat.other, sidewalk, terrain, manmade,
    X,                           # static.other, vegetation; vehicle.ego
)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return write_tiny_nuscenes(tmp_path_factory.mktemp('nuscenes'))


@pytest.fixture(scope='module')
def nusc(dataset):
    return NuScenes(version=dataset.version, dataroot=str(dataset.dataroot), verbose=False)


@pytest.fixture(scope='module')
def night_bag(dataset, tmp_path_factory):
    """Convert the default way (night scenes, mcap, every sweep, /tf); out dir, summaries."""
    out = tmp_path_factory.mktemp('bags')
    return out, convert(dataset.dataroot, out)


def bag_info(path: Path):
    return yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']


def read_bag(path: Path):
    """{topic: [(log time ns, message)]} and the bag's storage id and log order."""
    typestore = bag_typestore()
    messages, order = {}, []
    storage = bag_info(path)['storage_identifier']
    with Reader(path) as bag:
        for connection, log_ns, raw in bag.messages():
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            messages.setdefault(connection.topic, []).append((log_ns, msg))
            order.append((log_ns, connection.topic))
    return messages, storage, order


def by_stamp(messages):
    return {stamp_to_ns(msg.header.stamp): msg for _, msg in messages}


def test_lookup_matches_hand_checked_xmuda_mapping():
    categories = [{'name': name, 'index': i} for i, name in enumerate(LIDARSEG_NAMES)]
    lookup = lidarseg_lookup(categories)
    assert tuple(lookup[:32]) == EXPECTED_BY_INDEX
    assert np.all(lookup[32:] == NO_LABEL)
    assert set(LIDARSEG_TO_CLASS.values()) == set(CLASS_NAMES)


def test_lookup_goes_by_the_index_field_not_the_order():
    categories = [{'name': 'static.vegetation', 'index': 3}, {'name': 'vehicle.car', 'index': 0},
                  {'name': 'noise', 'index': 7}, {'name': 'flat.sidewalk', 'index': 1}]
    lookup = lidarseg_lookup(categories)
    assert lookup[[3, 0, 7, 1, 2]].tolist() == [
        CLASS_NAMES.index('vegetation'), CLASS_NAMES.index('vehicle'), NO_LABEL,
        CLASS_NAMES.index('sidewalk'), NO_LABEL]
    with pytest.raises(SensorDataError, match='nuScenes-lidarseg'):
        lidarseg_lookup([{'name': 'vehicle.car'}])  # the pre-lidarseg category.json


def test_lookup_agrees_with_devkit_class_mapper(nusc):
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper
    # xmuda_journal's merge of the 16 challenge classes into its 6 (other classes ignored).
    merge = {'bicycle': 'vehicle', 'bus': 'vehicle', 'car': 'vehicle',
             'construction_vehicle': 'vehicle', 'motorcycle': 'vehicle', 'trailer': 'vehicle',
             'truck': 'vehicle', 'driveable_surface': 'driveable_surface',
             'sidewalk': 'sidewalk', 'terrain': 'terrain', 'manmade': 'manmade',
             'vegetation': 'vegetation'}
    mapper = LidarsegClassMapper(nusc)
    coarse_names = {i: name for name, i in mapper.coarse_name_2_coarse_idx_mapping.items()}
    lookup = lidarseg_lookup(nusc.category)
    for fine_index, coarse_index in mapper.get_fine_idx_2_coarse_idx().items():
        target = merge.get(coarse_names[coarse_index])
        expected = NO_LABEL if target is None else CLASS_NAMES.index(target)
        assert lookup[fine_index] == expected, nusc.lidarseg_idx2name_mapping[fine_index]


def test_select_scenes():
    scenes = [{'name': 'a', 'description': 'Rain, NIGHT, turn'}, {'name': 'b', 'description':
              'day, nightclub parking'}, {'name': 'c', 'description': 'Day, peds'}]
    # The rule is a substring test, as in xMUDA: 'nightclub' counts as night.
    assert [s['name'] for s in select_scenes(scenes)] == ['a', 'b']
    assert [s['name'] for s in select_scenes(scenes, ['c', 'a', 'c'])] == ['c', 'a']
    with pytest.raises(ValueError, match='no scene named zz'):
        select_scenes(scenes, ['a', 'zz'])


def test_default_converts_only_the_night_scene_with_all_messages(dataset, night_bag):
    out, summaries = night_bag
    night = dataset.night_scene
    assert [s.scene for s in summaries] == [night.name]
    assert sorted(p.name for p in out.iterdir()) == [night.name]
    messages, storage, order = read_bag(out / night.name)
    assert storage == 'mcap'
    counts = {topic: len(items) for topic, items in messages.items()}
    expected = {
        TOPICS.lidar: len(night.lidar_tokens),
        TOPICS.labels: len(night.lidar_keyframe_tokens),
        TOPICS.image: len(night.camera_tokens),
        TOPICS.camera_info: len(night.camera_tokens),
        TOPICS.tf_static: 1,
        TF_TOPIC: len(night.lidar_tokens) + len(night.camera_tokens),
    }
    assert counts == expected
    assert summaries[0].message_counts == expected
    # Log order is stamp order and /tf_static comes first.
    assert [t for t, _ in order] == sorted(t for t, _ in order)
    assert order[0][1] == TOPICS.tf_static


def test_clouds_carry_the_sweep_files_and_mapped_labels(dataset, nusc, night_bag):
    out, _ = night_bag
    night = dataset.night_scene
    messages, _, _ = read_bag(out / night.name)
    clouds, labels = by_stamp(messages[TOPICS.lidar]), by_stamp(messages[TOPICS.labels])
    for token in night.lidar_tokens:
        record = nusc.get('sample_data', token)
        stamp = record['timestamp'] * 1000
        msg = clouds[stamp]
        assert msg.header.frame_id == 'LIDAR_TOP' and msg.point_step == 20
        assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [
            ('x', 0, 7), ('y', 4, 7), ('z', 8, 7), ('intensity', 12, 7), ('ring', 16, 7)]
        decoded = cloud_to_numpy(msg)
        path = nusc.get_sample_data_path(token)
        devkit_points = LidarPointCloud.from_file(path).points  # <4, N>: x, y, z, intensity
        np.testing.assert_array_equal(decoded.points, devkit_points[:3].T)
        np.testing.assert_array_equal(decoded.fields['intensity'].reshape(-1), devkit_points[3])
        ring = np.fromfile(path, dtype=np.float32).reshape(-1, 5)[:, 4]
        np.testing.assert_array_equal(decoded.fields['ring'].reshape(-1), ring)
        if token in night.lidar_keyframe_tokens:
            label_msg = labels[stamp]
            assert (label_msg.header.frame_id, label_msg.width) == ('LIDAR_TOP', msg.width)
            wire = cloud_structured_view(label_msg)['label'].reshape(-1)
            raw = np.fromfile(Path(nusc.dataroot) / nusc.get('lidarseg', token)['filename'],
                              dtype=np.uint8)
            np.testing.assert_array_equal(wire, np.array(EXPECTED_BY_INDEX)[raw])
            # The fixture gives the first 32 points the classes 0..31 in order.
            assert tuple(wire[:32]) == EXPECTED_BY_INDEX
        else:
            assert stamp not in labels


def test_images_are_the_jpeg_files_with_their_intrinsics(dataset, nusc, night_bag):
    out, _ = night_bag
    night = dataset.night_scene
    messages, _, _ = read_bag(out / night.name)
    images, infos = by_stamp(messages[TOPICS.image]), by_stamp(messages[TOPICS.camera_info])
    for token in night.camera_tokens:
        record = nusc.get('sample_data', token)
        stamp = record['timestamp'] * 1000
        image, info = images[stamp], infos[stamp]
        assert image.format == 'jpeg' and image.header.frame_id == 'CAM_FRONT'
        assert image.data.tobytes() == Path(nusc.get_sample_data_path(token)).read_bytes()
        K = np.array(nusc.get('calibrated_sensor', record['calibrated_sensor_token'])
                     ['camera_intrinsic'])
        np.testing.assert_array_equal(info.k.reshape(3, 3), K)
        np.testing.assert_array_equal(info.p.reshape(3, 4)[:, :3], K)
        assert (info.width, info.height) == dataset.image_size
        assert info.header.frame_id == 'CAM_FRONT'


def test_transforms_compose_like_the_devkit(dataset, nusc, night_bag):
    out, _ = night_bag
    night = dataset.night_scene
    messages, _, _ = read_bag(out / night.name)
    tree = build_tree(msg for _, msg in messages[TOPICS.tf_static])
    lidar_record = nusc.get('sample_data', night.lidar_keyframe_tokens[0])
    camera_record = nusc.get('sample_data', night.camera_keyframe_tokens[0])
    lidar_cal = nusc.get('calibrated_sensor', lidar_record['calibrated_sensor_token'])
    camera_cal = nusc.get('calibrated_sensor', camera_record['calibrated_sensor_token'])
    # The devkit's own matrices (pyquaternion reads w, x, y, z), as in map_pointcloud_to_image.
    T_ego_from_lidar = transform_matrix(lidar_cal['translation'],
                                        Quaternion(lidar_cal['rotation']))
    T_cam_from_ego = transform_matrix(camera_cal['translation'],
                                      Quaternion(camera_cal['rotation']), inverse=True)
    np.testing.assert_allclose(lookup_transform(tree, 'CAM_FRONT', 'LIDAR_TOP'),
                               T_cam_from_ego @ T_ego_from_lidar, atol=1e-9)
    # /tf: odom -> base_link is the ego pose at each sample_data stamp.
    poses = by_stamp((log, msg.transforms[0]) for log, msg in messages[TF_TOPIC])
    for token in night.lidar_tokens + night.camera_tokens:
        record = nusc.get('sample_data', token)
        stamped = poses[record['timestamp'] * 1000]
        assert (stamped.header.frame_id, stamped.child_frame_id) == (ODOM_FRAME, 'base_link')
        ego = nusc.get('ego_pose', record['ego_pose_token'])
        t, q = stamped.transform.translation, stamped.transform.rotation
        np.testing.assert_allclose(
            transform_from_translation_quaternion((t.x, t.y, t.z), (q.x, q.y, q.z, q.w)),
            transform_matrix(ego['translation'], Quaternion(ego['rotation'])), atol=1e-9)


def test_sqlite3_keyframes_only_without_tf(dataset, tmp_path):
    day = dataset.day_scene
    summaries = convert(dataset.dataroot, tmp_path, scene_names=[day.name], storage='sqlite3',
                        keyframes_only=True, with_tf=False)
    messages, storage, _ = read_bag(tmp_path / day.name)
    assert storage == 'sqlite3'
    keyframes = len(day.lidar_keyframe_tokens)
    assert {topic: len(items) for topic, items in messages.items()} == {
        TOPICS.lidar: keyframes, TOPICS.labels: keyframes, TOPICS.tf_static: 1,
        TOPICS.image: len(day.camera_keyframe_tokens),
        TOPICS.camera_info: len(day.camera_keyframe_tokens)}
    assert summaries[0].storage == 'sqlite3'
    metadata = (tmp_path / day.name / 'metadata.yaml').read_text()
    assert 'transient_local' in metadata and 'best_effort' in metadata


def test_project_reader_reads_the_converted_bag(dataset, nusc, night_bag):
    from mmtta_ros.bags.reader import read_frames
    out, _ = night_bag
    night = dataset.night_scene
    frames = list(read_frames(out / night.name, image_size=None))
    labeled = [f for f in frames if f.labels is not None]
    keyframe_stamps = {nusc.get('sample_data', t)['timestamp'] * 1000
                       for t in night.lidar_keyframe_tokens}
    # Every keyframe sweep has its image 12 ms away, so each makes a labeled frame.
    assert {f.stamp_lidar_ns for f in labeled} == keyframe_stamps
    for frame in labeled:
        assert frame.image.shape == (dataset.image_size[1], dataset.image_size[0], 3)
        assert frame.labels.shape == (frame.num_points,)
        assert set(np.unique(frame.labels)) <= set(range(len(CLASS_NAMES))) | {-100}
    # Ego poses: the devkit's ego pose at the sweep's sample_data stamp, composed with the
    # LiDAR's calibration, as its map_pointcloud_to_image moves a sweep into the world.
    lidar_records = {nusc.get('sample_data', t)['timestamp'] * 1000: nusc.get('sample_data', t)
                     for t in night.lidar_tokens}
    assert frames and all(f.T_odom_from_lidar is not None for f in frames)
    for frame in frames:
        record = lidar_records[frame.stamp_lidar_ns]
        ego = nusc.get('ego_pose', record['ego_pose_token'])
        cal = nusc.get('calibrated_sensor', record['calibrated_sensor_token'])
        expected = (transform_matrix(ego['translation'], Quaternion(ego['rotation']))
                    @ transform_matrix(cal['translation'], Quaternion(cal['rotation'])))
        np.testing.assert_allclose(frame.T_odom_from_lidar, expected, atol=1e-9)


def test_without_lidarseg_there_is_no_labels_topic(tmp_path):
    dataset = write_tiny_nuscenes(tmp_path / 'data', keyframes=2)
    (dataset.dataroot / dataset.version / 'lidarseg.json').unlink()
    convert(dataset.dataroot, tmp_path / 'bags')
    messages, _, _ = read_bag(tmp_path / 'bags' / dataset.night_scene.name)
    assert TOPICS.labels not in messages
    assert len(messages[TOPICS.lidar]) == len(dataset.night_scene.lidar_tokens)


def test_bad_files_and_existing_output_fail_loudly(dataset, tmp_path):
    broken = tmp_path / 'broken.pcd.bin'
    broken.write_bytes(np.zeros(11, dtype=np.float32).tobytes())
    with pytest.raises(SensorDataError, match='not a whole number'):
        read_lidar_records(broken)
    labels = tmp_path / 'labels.bin'
    labels.write_bytes(np.zeros(4, dtype=np.uint8).tobytes())
    with pytest.raises(SensorDataError, match='4 labels but its sweep has 5 points'):
        read_lidarseg_labels(labels, 5, np.zeros(256, dtype=np.uint8))
    (tmp_path / 'out' / dataset.night_scene.name).mkdir(parents=True)
    with pytest.raises(FileExistsError):
        convert(dataset.dataroot, tmp_path / 'out')
    with pytest.raises(ValueError, match='storage'):
        convert(dataset.dataroot, tmp_path / 'out2', storage='rosbag1')


def test_tool(dataset, tmp_path, capsys):
    day = dataset.day_scene
    rc = nuscenes_to_bag.main(['--dataroot', str(dataset.dataroot), '--output-dir',
                               str(tmp_path), '--scenes', day.name, '--keyframes-only'])
    assert rc == 0
    assert (tmp_path / day.name / 'metadata.yaml').exists()
    assert day.name in capsys.readouterr().out
    assert nuscenes_to_bag.main(['--dataroot', str(dataset.dataroot), '--output-dir',
                                 str(tmp_path), '--scenes', 'scene-9999']) == 1
    assert 'no scene named scene-9999' in capsys.readouterr().err
    custom = json.loads(bag_info(tmp_path / day.name)['custom_data']['mmtta_ros.nuscenes'])
    assert custom['scene'] == day.name and custom['keyframes_only'] is True


@pytest.fixture(scope='module')
def six_camera_bag(tmp_path_factory):
    """Convert the night scene of a six-camera dataset with --cameras all; dataset, bag."""
    dataset = write_tiny_nuscenes(tmp_path_factory.mktemp('nuscenes6'), six_cameras=True)
    out = tmp_path_factory.mktemp('bags6')
    assert nuscenes_to_bag.main(['--dataroot', str(dataset.dataroot), '--output-dir', str(out),
                                 '--scenes', 'scene-1077', '--cameras', 'all']) == 0
    return dataset, out / 'scene-1077'


def test_all_six_cameras_are_written_and_read_back(six_camera_bag):
    dataset, path = six_camera_bag
    messages, _, _ = read_bag(path)
    for channel in ALL_CAMERAS:
        image_topic, info_topic = camera_bag_topics(channel)
        assert len(messages[image_topic]) == len(messages[info_topic]) > 0
        assert {msg.header.frame_id for _, msg in messages[image_topic]} == {channel}
    (static,) = [msg for _, msg in messages['/tf_static']]
    assert {t.child_frame_id for t in static.transforms} == {'LIDAR_TOP', *ALL_CAMERAS}
    custom = json.loads(bag_info(path)['custom_data']['mmtta_ros.nuscenes'])
    assert custom['cameras'] == list(ALL_CAMERAS)

    reader = BagFrameReader(path, image_size=dataset.image_size,
                            topics=BagTopics(extra_cameras=ALL_CAMERAS[1:]))
    frames = list(reader)
    assert len(frames) >= 3 and reader.stats.rejected_messages == 0
    nusc = NuScenes(version=dataset.version, dataroot=str(dataset.dataroot), verbose=False)
    scene = next(s for s in nusc.scene if s['name'] == 'scene-1077')
    sample = nusc.get('sample', scene['first_sample_token'])
    lidar = nusc.get('calibrated_sensor', nusc.get(
        'sample_data', sample['data']['LIDAR_TOP'])['calibrated_sensor_token'])
    for view in frames[0].views():
        camera = nusc.get('calibrated_sensor', nusc.get(
            'sample_data', sample['data'][view.name])['calibrated_sensor_token'])
        # The devkit's chain: LiDAR -> ego -> camera.
        expected = (np.linalg.inv(transform_matrix(camera['translation'],
                                                   Quaternion(camera['rotation'])))
                    @ transform_matrix(lidar['translation'], Quaternion(lidar['rotation'])))
        np.testing.assert_allclose(view.T_cam_from_lidar, expected, atol=1e-6)
    one, six = coverage(frames, 1), coverage(frames, 6)
    assert six.labeled > one.labeled and six.points == one.points
    assert sum(six.per_camera) == six.labeled and len(six.per_camera) == 6


def test_a_bad_camera_list_stops_the_converter_in_one_line(dataset, tmp_path, capsys):
    assert nuscenes_to_bag.main(['--dataroot', str(dataset.dataroot), '--output-dir',
                                 str(tmp_path / 'out'), '--cameras', 'CAM_FRONT,CAM_ROOF']) == 1
    err = capsys.readouterr().err
    assert 'CAM_ROOF' in err and err.count('\n') == 1
    assert not (tmp_path / 'out').exists()
