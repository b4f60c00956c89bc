"""Parameters: YAML, table and method registry agree; bad values rejected; typed structs."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from mmtta_ros.core.params import (
    check_value, check_values, coerce_value, flatten, node_params, PARAMETERS,
    read_params_file, SPECS, yaml_parameters)
from mmtta_ros.tta import METHODS
from mmtta_ros.tta.hyper import docstring_descriptions, hyperparameters, Range
from mmtta_ros.viz.overlay import draw_points

ROOT = Path(__file__).resolve().parents[1]


def test_adapt_yaml_declares_every_parameter_with_a_valid_value():
    values = read_params_file(ROOT / 'config' / 'adapt.yaml')
    assert set(values) == set(SPECS)
    merged, problems = check_values(values)
    assert problems == []
    assert merged['adaptation.method'] == 'bn_stats'
    assert set(flatten(yaml_parameters())) == set(SPECS)
    # The YAML's values are the generated defaults (the constructors' own), but for the
    # node's defaults chosen on the suite's validation shift (commented in the YAML).
    chosen = {'adaptation.method': 'bn_stats', 'adaptation.mmtta.momentum': 0.9,
              'adaptation.fallback': True,
              'adaptation.source_branch': '3d', 'adaptation.calibrate': True,
              'output.fusion': 'product'}
    for name, value in values.items():
        assert coerce_value(name, value) == chosen.get(name, SPECS[name].default), name


def test_every_method_hyperparameter_is_a_parameter_and_nothing_else_is():
    generated = {name for name in SPECS if name.startswith('adaptation.') and name.count('.') == 2}
    expected = {f'adaptation.{method}.{hyper.name}'
                for method, cls in METHODS.items() for hyper in hyperparameters(cls)}
    assert generated == expected and len(expected) > 20
    assert set(SPECS['adaptation.method'].choices) == set(METHODS)
    momentum = SPECS['adaptation.mmtta.momentum']
    assert (momentum.default, momentum.low, momentum.high) == (0.99, 0.0, 1.0)
    assert 'Eq. 6' in momentum.description and momentum.read_only
    assert SPECS['adaptation.mmtta.selection'].choices == ('hard', 'soft')
    assert SPECS['adaptation.xmuda_pl.quantile'].description.startswith('xmuda_pl: per-class')
    assert 'adaptation.source.collapse_guard' not in SPECS  # objects are not parameters


def test_a_new_method_needs_only_its_module_documented():
    class Documented:
        """
        A method.

        alpha: the step size
            over two lines
        beta, gamma: shared text
        """

        def __init__(self, model, *, alpha: float = 0.5, beta: int = 2,
                     gamma: bool = True, collapse_guard=None):
            pass

    found = {h.name: h for h in hyperparameters(Documented)}
    assert list(found) == ['alpha', 'beta', 'gamma']
    assert found['alpha'].description == 'the step size over two lines'
    assert found['beta'].kind is int and found['gamma'].description == 'shared text'
    assert docstring_descriptions(Documented)['gamma'] == 'shared text'

    class Undocumented:
        def __init__(self, model, *, alpha: float = 0.5):
            pass
    with pytest.raises(TypeError, match='document hyperparameter alpha'):
        hyperparameters(Undocumented)
    assert Range(0.0, 1.0).high == 1.0


@pytest.mark.parametrize('name,value,reason', [
    ('sync.slop', -0.1, '>= 0.001'),
    ('sync.slop', 'fast', 'number'),
    ('sync.queue_size', 2.5, 'integer'),
    ('adaptation.method', 'magic', 'one of'),
    ('adaptation.mmtta.momentum', 1.5, '<= 1.0'),
    ('adaptation.mmtta.selection', 'maybe', 'one of'),
    ('output.publish_overlay', 'yes', 'true or false'),
    ('calibration.T_cam_from_lidar', [1.0, 2.0], '16'),
    ('classes.palette', [0, 0, 300], '0..255'),
    ('no.such', 1, 'unknown parameter'),
])
def test_bad_values_are_rejected_with_a_reason(name, value, reason):
    assert reason in check_value(name, coerce_value(name, value))


def test_numbers_as_users_type_them():
    # `-p sync.slop:=1` is an integer literal; YAML reads 1e-12 (no dot) as a string.
    assert coerce_value('sync.slop', 1) == 1.0 and isinstance(coerce_value('sync.slop', 1), float)
    assert coerce_value('adaptation.mmtta.lr_2d', '1e-12') == 1e-12
    assert coerce_value('sync.queue_size', 3) == 3
    assert check_value('sync.slop', coerce_value('sync.slop', 1)) is None
    params = node_params({'adaptation.mmtta.lr_2d': '1e-12', 'sync.slop': 1})
    assert params.pipeline.adaptation.hyperparameters['lr_2d'] == 1e-12
    assert params.sync.slop_s == 1.0


def test_defaults_are_valid_and_read_only_flags_make_sense():
    for spec in PARAMETERS:
        assert check_value(spec.name, spec.default) is None, spec.name
    # What changes the model or its state needs a restart; what only shapes output does not.
    assert SPECS['adaptation.method'].read_only and SPECS['model.checkpoint'].read_only
    assert not SPECS['sync.slop'].read_only and not SPECS['output.publish_overlay'].read_only


def test_typed_params():
    params = node_params({
        'calibration.T_cam_from_lidar': [0, 0, 0, 0, 0, 0, 1.0],
        'classes.names': ['a', 'b'], 'classes.palette': [1, 2, 3, 4, 5, 6],
        'adaptation.method': 'xmuda', 'adaptation.xmuda.consistency_weight': 0.5})
    np.testing.assert_allclose(params.pipeline.inputs.T_cam_from_lidar, np.eye(4))
    assert params.pipeline.output.palette.shape == (2, 3)
    assert params.pipeline.model.image_size == (400, 225)
    assert params.pipeline.model.class_names == ('a', 'b')
    # Only the chosen method's hyperparameters reach the builder.
    assert dict(params.pipeline.adaptation.hyperparameters) == {
        'consistency_weight': 0.5, 'lr_2d': 6e-6, 'lr_3d': 1e-3, 'weight_decay_2d': 0.0,
        'predict_before_update': True}
    assert node_params({}).pipeline.inputs.T_cam_from_lidar is None
    with pytest.raises(ValueError, match='colours for 1 classes'):
        node_params({'classes.names': ['a'], 'classes.palette': [1, 2, 3, 4, 5, 6]})


def test_params_file_errors_say_what_is_wrong(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('other_node:\n  ros__parameters: {a: 1}\n')
    with pytest.raises(ValueError, match='no mmtta_adapt: ros__parameters'):
        read_params_file(bad)
    with pytest.raises(ValueError, match='cannot read'):
        read_params_file(tmp_path / 'missing.yaml')
    yaml_text = yaml.safe_dump({'/**': {'ros__parameters': {'sync': {'slop': 0.1}}}})
    (tmp_path / 'wild.yaml').write_text(yaml_text)
    assert read_params_file(tmp_path / 'wild.yaml') == {'sync.slop': 0.1}


def test_overlay_draws_near_points_over_far_ones():
    image = np.zeros((10, 10, 3), np.uint8)
    pixels = np.array([[5.0, 5.0], [5.2, 4.9], [0.0, 9.0]], np.float32)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    out = draw_points(image, pixels, colors, depth=np.array([2.0, 9.0, 5.0]), radius=1)
    assert out[5, 5].tolist() == [255, 0, 0]      # the nearer point wins the shared pixel
    assert out[9, 0].tolist() == [0, 0, 255] and out[8, 1].tolist() == [0, 0, 255]
    assert out[0, 0].tolist() == [0, 0, 0] and image.sum() == 0  # input untouched
