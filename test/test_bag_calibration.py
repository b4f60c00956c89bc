"""mmtta_bag_calibration: a bag's /tf_static as the node's calibration parameter."""

import re

import numpy as np
import pytest

from mmtta_ros.bags.writer import write_demo_bag
from mmtta_ros.core.params import check_value, node_params
from mmtta_ros.synth import T_CAM_FROM_LIDAR
from mmtta_ros.tools.bag_calibration import main


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    path = tmp_path_factory.mktemp('calibration') / 'night'
    write_demo_bag(path, domain='night', seed=4, num_sweeps=2, image_size=(64, 36),
                   render_size=(64, 36), lidar_azimuth_steps=60)
    return path


def test_prints_the_parameter_line_and_the_yaml_with_the_bag_transform(bag, capsys):
    assert main([str(bag)]) == 0
    out = capsys.readouterr().out
    line = re.search(r'^-p "calibration\.T_cam_from_lidar:=\[(.*)\]"$', out, re.MULTILINE)
    assert line, out
    numbers = [float(v) for v in line.group(1).split(',')]
    assert len(numbers) == 16
    np.testing.assert_allclose(np.reshape(numbers, (4, 4)), T_CAM_FROM_LIDAR, atol=1e-12)
    yaml_line = re.search(r'^\s+T_cam_from_lidar: \[(.*)\]$', out, re.MULTILINE)
    assert yaml_line and yaml_line.group(1) == line.group(1)
    # The node takes it as printed.
    assert check_value('calibration.T_cam_from_lidar', numbers) is None
    T = node_params({'calibration.T_cam_from_lidar': numbers}).pipeline.inputs.T_cam_from_lidar
    np.testing.assert_allclose(T, T_CAM_FROM_LIDAR, atol=1e-12)


def test_other_frames_give_their_transform(bag, capsys):
    # LiDAR from itself is the identity; LiDAR from the camera the inverse.
    assert main([str(bag), '--camera-frame', 'LIDAR_TOP']) == 0
    numbers = re.search(r':=\[(.*)\]', capsys.readouterr().out).group(1).split(',')
    np.testing.assert_allclose(np.reshape([float(v) for v in numbers], (4, 4)), np.eye(4),
                               atol=1e-12)
    assert main([str(bag), '--camera-frame', 'LIDAR_TOP', '--lidar-frame', 'CAM_FRONT']) == 0
    numbers = re.search(r':=\[(.*)\]', capsys.readouterr().out).group(1).split(',')
    np.testing.assert_allclose(np.reshape([float(v) for v in numbers], (4, 4)),
                               np.linalg.inv(T_CAM_FROM_LIDAR), atol=1e-12)


@pytest.mark.parametrize('case,reason', [
    ('missing bag', 'no bag at'),
    ('not a bag', 'is not a rosbag2 bag'),
    ('missing frame', "no transform between 'CAM_BACK' and 'LIDAR_TOP' (known frames: "
                      'CAM_FRONT, LIDAR_TOP, base_link)'),
    ('no transforms', 'has no transforms on /tf_static_elsewhere or /tf_elsewhere'),
])
def test_errors_are_one_line_without_a_traceback(bag, tmp_path, capsys, case, reason):
    args = {'missing bag': [str(tmp_path / 'none')],
            'not a bag': [str(tmp_path)],
            'missing frame': [str(bag), '--camera-frame', 'CAM_BACK'],
            'no transforms': [str(bag), '--tf-static-topic', '/tf_static_elsewhere',
                              '--tf-topic', '/tf_elsewhere']}[case]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('mmtta_bag_calibration: '), captured.err
    assert reason in lines[0]
