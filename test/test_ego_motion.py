"""
Ego-motion compensation: the devkit's chain on a nuScenes-format scene, true poses on a drive.

The figures these tests measure are printed (pytest -s): the pixel error of the static
LiDAR -> camera projection and of the compensated one against the reference.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmtta_ros.core.batching import camera_from_lidar, project_frame
from mmtta_ros.eval.ego_motion import exact_projection, label_agreement, projection_errors
from mmtta_ros.sensors.projection import ego_motion_cam_from_lidar, rigid_inverse
from mmtta_ros.synth import generate_frames, SequenceConfig, SyntheticSequence
from nuscenes_fixture import write_tiny_nuscenes

# Compensated against the reference: float32 projection of float64 poses, at 1600 x 900.
TOLERANCE_PX = 0.05


def _posed_frame():
    config = SequenceConfig(domain='day', seed=3, num_frames=2, image_size=(64, 36),
                            lidar_azimuth_steps=300, frame_stride=3)
    return list(generate_frames(config))[1], config


def test_the_compensated_transform_is_the_pose_chain_and_falls_back_to_the_static_one():
    frame, config = _posed_frame()
    assert frame.stamp_image_ns != frame.stamp_lidar_ns
    T = ego_motion_cam_from_lidar(frame.T_odom_from_lidar, frame.T_odom_from_cam)
    np.testing.assert_allclose(T, np.linalg.inv(frame.T_odom_from_cam) @ frame.T_odom_from_lidar,
                               atol=1e-9)
    np.testing.assert_allclose(rigid_inverse(T) @ T, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(camera_from_lidar(frame, ego_motion=True), T)
    assert not np.allclose(T, frame.T_cam_from_lidar, atol=1e-3)  # the car moved
    # The car standing still (both poses at one instant): the static transform.
    sequence = SyntheticSequence(config)
    still = replace(frame, T_odom_from_cam=sequence.camera_pose(frame.stamp_lidar_ns))
    np.testing.assert_allclose(camera_from_lidar(still, True), frame.T_cam_from_lidar,
                               atol=1e-9)
    # Off, or a pose unknown: the static transform, untouched.
    for static in (camera_from_lidar(frame, ego_motion=False),
                   camera_from_lidar(replace(frame, T_odom_from_cam=None), True),
                   camera_from_lidar(replace(frame, T_odom_from_lidar=None), True)):
        assert static is frame.T_cam_from_lidar


def test_the_pipeline_projects_as_calibration_ego_motion_says():
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig

    frame, _ = _posed_frame()
    outputs = {}
    for ego_motion in (True, False):
        params = node_params({'adaptation.method': 'source', 'device': 'cpu',
                              'calibration.ego_motion': ego_motion})
        torch.manual_seed(0)
        pipeline = build_pipeline(params.pipeline,
                                  model=build_segmenter(SegmenterConfig(size='tiny')))
        outputs[ego_motion] = pipeline.predict(frame)
        expected = project_frame(frame, ego_motion=ego_motion)
        np.testing.assert_array_equal(outputs[ego_motion].in_view, expected.in_view)
    assert not np.array_equal(outputs[True].in_view, outputs[False].in_view)
    assert node_params({}).pipeline.inputs.ego_motion is True  # the node's default


def _print(title, errors):
    for name, error in errors.items():
        print(f'{title}, {name}: {error.line()}')


# --- nuScenes-format scene vs the nuscenes-devkit ------------------------------------------

def _devkit_pixels(nusc, lidar_record, camera_record):
    """
    Per point of the sweep: the devkit's pixels <N, 2>, in-view mask, and its own output.

    The steps of NuScenesExplorer.map_pointcloud_to_image, on every point (the devkit
    returns only those it keeps); checked against its output below.
    """
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion

    pc = LidarPointCloud.from_file(f"{nusc.dataroot}/{lidar_record['filename']}")
    calibration = nusc.get('calibrated_sensor', lidar_record['calibrated_sensor_token'])
    pc.rotate(Quaternion(calibration['rotation']).rotation_matrix)
    pc.translate(np.array(calibration['translation']))
    pose = nusc.get('ego_pose', lidar_record['ego_pose_token'])
    pc.rotate(Quaternion(pose['rotation']).rotation_matrix)
    pc.translate(np.array(pose['translation']))
    pose = nusc.get('ego_pose', camera_record['ego_pose_token'])
    pc.translate(-np.array(pose['translation']))
    pc.rotate(Quaternion(pose['rotation']).rotation_matrix.T)
    calibration = nusc.get('calibrated_sensor', camera_record['calibrated_sensor_token'])
    pc.translate(-np.array(calibration['translation']))
    pc.rotate(Quaternion(calibration['rotation']).rotation_matrix.T)
    depth = pc.points[2]
    pixels = view_points(pc.points[:3], np.array(calibration['camera_intrinsic']),
                         normalize=True)[:2].T
    width, height = camera_record['width'], camera_record['height']
    in_view = ((depth > 1.0) & (pixels[:, 0] >= 0) & (pixels[:, 0] < width)
               & (pixels[:, 1] >= 0) & (pixels[:, 1] < height))
    # The devkit's own function keeps depth > 1 and 1 < u < width - 1, 1 < v < height - 1.
    kept = ((depth > 1.0) & (pixels[:, 0] > 1) & (pixels[:, 0] < width - 1)
            & (pixels[:, 1] > 1) & (pixels[:, 1] < height - 1))
    devkit_points, _, _ = nusc.explorer.map_pointcloud_to_image(lidar_record['token'],
                                                                camera_record['token'])
    np.testing.assert_allclose(pixels[kept].T, devkit_points[:2], atol=1e-9)
    return pixels, in_view


@pytest.mark.slow
def test_compensation_matches_the_nuscenes_devkit_chain(tmp_path):
    """Keyframes of a moving ego (8 m/s, 0.1 rad/s), the camera 35 ms before the LiDAR."""
    pytest.importorskip('nuscenes.nuscenes', exc_type=ImportError,
                        reason='nuscenes-devkit not importable')
    from nuscenes.nuscenes import NuScenes

    from mmtta_ros.bags.nuscenes_convert import convert
    from mmtta_ros.bags.reader import BagFrameReader

    # Full size (1600 x 900); keyframes, the pairs xMUDA and MM-TTA train and score on.
    dataset = write_tiny_nuscenes(tmp_path / 'data', keyframes=6, lidar_sweeps_between=0,
                                  camera_sweeps_between=0, image_size=(1600, 900),
                                  points_range=(3000, 4000), camera_lag_us=-35_000)
    night = dataset.night_scene
    convert(dataset.dataroot, tmp_path / 'bags', scene_names=[night.name],
            keyframes_only=True)
    nusc = NuScenes(version=dataset.version, dataroot=str(dataset.dataroot), verbose=False)
    records = {nusc.get('sample_data', token)['timestamp'] * 1000:
               nusc.get('sample_data', token) for token in night.lidar_tokens
               + night.camera_tokens}
    reader = BagFrameReader(tmp_path / 'bags' / night.name, image_size=None)
    cases, offsets_ms = [], []
    for frame in reader:
        assert frame.T_odom_from_cam is not None
        pixels, in_view = _devkit_pixels(nusc, records[frame.stamp_lidar_ns],
                                         records[frame.stamp_image_ns])
        cases.append((frame, pixels, in_view))
        offsets_ms.append((frame.stamp_image_ns - frame.stamp_lidar_ns) / 1e6)
    assert len(cases) == 6 and reader.stats.frames_without_camera_pose == 0
    assert offsets_ms == [-35.0] * 6
    errors = projection_errors(cases)
    _print(f'nuScenes-format night scene, {len(cases)} keyframes at 1600x900, image 35 ms '
           'before the sweep, 8 m/s', errors)
    assert errors['compensated'].max_px < TOLERANCE_PX
    assert errors['compensated'].changed_view < 1e-3
    assert errors['static'].median_px > 10 * TOLERANCE_PX
    assert errors['static'].changed_view > 0.01


# --- the synthetic drive vs its true poses -------------------------------------------------

@pytest.mark.slow
def test_compensation_recovers_the_synthetic_drives_true_projection(tmp_path):
    """The generator's frames, and a bag of the drive read back with poses from /tf."""
    from mmtta_ros.bags.reader import BagFrameReader
    from mmtta_ros.bags.writer import write_demo_bag

    config = SequenceConfig(domain='day', seed=5, num_frames=4, image_size=(400, 225),
                            frame_stride=3, lidar_azimuth_steps=300)

    def truth(sequence, frame):
        """Project the frame's points through the true poses at the two stamps."""
        sweep = (frame.stamp_lidar_ns - sequence.stamp0_ns) // 50_000_000
        assert sequence.lidar_stamp(sweep) == frame.stamp_lidar_ns
        T = rigid_inverse(sequence.camera_pose(frame.stamp_image_ns)) @ \
            sequence.lidar_pose(sweep)
        return (frame,) + exact_projection(frame.points_lidar, T, frame.K, frame.image_size)

    frames = list(generate_frames(config))
    sequence = SyntheticSequence(config)
    generated = projection_errors([truth(sequence, frame) for frame in frames])
    _print(f'synthetic drive (generator), {len(frames)} frames at 8 m/s', generated)
    assert generated['compensated'].max_px < TOLERANCE_PX
    assert generated['static'].median_px > 10 * TOLERANCE_PX
    # Independent of the poses: the rendered class under each point (what the 2D branch
    # sees there). Moving cars and the two sensors' parallax keep it below 100 %.
    agreement = {ego_motion: np.zeros(2) for ego_motion in (False, True)}
    for frame in frames:
        labels = sequence.camera_image(sequence.nearest_camera_index(frame.stamp_lidar_ns))
        assert labels.stamp_ns == frame.stamp_image_ns
        for ego_motion in agreement:
            agreement[ego_motion] += label_agreement(frame, labels.labels, ego_motion)
    static, compensated = (agreement[key][0] / agreement[key][1] for key in (False, True))
    print(f'synthetic drive (generator): point label = rendered label under it: static '
          f'{100 * static:.2f} %, compensated {100 * compensated:.2f} % '
          f'of {int(agreement[True][1])} points')
    assert compensated > static
    # Through a bag: poses from odom -> base_link on /tf and the mounts on /tf_static.
    write_demo_bag(tmp_path / 'drive', domain='day', seed=5, num_sweeps=10,
                   image_size=(400, 225), render_size=None, with_tf=True,
                   lidar_azimuth_steps=300)
    bag_frames = list(BagFrameReader(tmp_path / 'drive', image_size=None))
    assert bag_frames and all(f.T_odom_from_cam is not None for f in bag_frames)
    sequence = SyntheticSequence(replace(config, num_frames=10, frame_stride=1))
    from_bag = projection_errors([truth(sequence, frame) for frame in bag_frames])
    _print(f'synthetic drive (bag, /tf), {len(bag_frames)} frames', from_bag)
    assert from_bag['compensated'].max_px < TOLERANCE_PX
    assert from_bag['static'].median_px > 10 * TOLERANCE_PX
