"""Node parameters: the YAML matches the table, and bad values are rejected with a reason."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from mmtta_ros.node_config import (
    build_config, check_value, PARAMETERS, SPECS, yaml_parameters)
from mmtta_ros.overlay import draw_points

ROOT = Path(__file__).resolve().parents[1]


def _flatten(mapping, prefix=''):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def test_adapt_yaml_declares_every_parameter_with_a_valid_value():
    params = yaml.safe_load((ROOT / 'config' / 'adapt.yaml').read_text())
    values = dict(_flatten(params['mmtta_adapt']['ros__parameters']))
    assert set(values) == set(SPECS)
    config, problems = build_config(values)
    assert problems == []
    assert config['adaptation.method'] == 'mmtta'
    assert set(dict(_flatten(yaml_parameters()))) == set(SPECS)


@pytest.mark.parametrize('name,value,reason', [
    ('sync.slop', -0.1, '>= 0.001'),
    ('sync.slop', 'fast', 'number'),
    ('sync.queue_size', 2.5, 'integer'),
    ('adaptation.method', 'magic', 'one of'),
    ('adaptation.momentum', 1.5, '<= 1.0'),
    ('output.publish_overlay', 'yes', 'true or false'),
    ('calibration.T_cam_from_lidar', [1.0, 2.0], '16'),
    ('classes.palette', [0, 0, 300], '0..255'),
    ('no.such', 1, 'unknown parameter'),
])
def test_bad_values_are_rejected_with_a_reason(name, value, reason):
    assert reason in check_value(name, value)


def test_defaults_are_valid_and_read_only_flags_make_sense():
    for spec in PARAMETERS:
        assert check_value(spec.name, spec.default) is None, spec.name
    # What changes the model or its state needs a restart; what only shapes output does not.
    assert SPECS['adaptation.method'].read_only and SPECS['model.checkpoint'].read_only
    assert not SPECS['sync.slop'].read_only and not SPECS['output.publish_overlay'].read_only


def test_config_objects():
    config, problems = build_config({
        'calibration.T_cam_from_lidar': [0, 0, 0, 0, 0, 0, 1.0],
        'classes.names': ['a', 'b'], 'classes.palette': [1, 2, 3, 4, 5, 6]})
    assert problems == []
    np.testing.assert_allclose(config.T_cam_from_lidar, np.eye(4))
    assert config.palette.shape == (2, 3) and config.image_size == (400, 225)
    assert config.method_hyperparameters()['selection'] == 'soft'
    _, problems = build_config({'classes.names': ['a'], 'classes.palette': [1, 2, 3, 4, 5, 6]})
    assert 'colours for 1 classes' in problems[0]


def test_overlay_draws_near_points_over_far_ones():
    image = np.zeros((10, 10, 3), np.uint8)
    pixels = np.array([[5.0, 5.0], [5.2, 4.9], [0.0, 9.0]], np.float32)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    out = draw_points(image, pixels, colors, depth=np.array([2.0, 9.0, 5.0]), radius=1)
    assert out[5, 5].tolist() == [255, 0, 0]      # the nearer point wins the shared pixel
    assert out[9, 0].tolist() == [0, 0, 255] and out[8, 1].tolist() == [0, 0, 255]
    assert out[0, 0].tolist() == [0, 0, 0] and image.sum() == 0  # input untouched
