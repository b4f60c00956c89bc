"""The launch file: always parsed here; loaded with launch_ros where that is installed."""

import ast
import importlib.util
from pathlib import Path

import pytest

LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'adapt.launch.py'
EXPECTED_ARGUMENTS = {'params_file', 'use_sim_time', 'device', 'method', 'checkpoint',
                      'image_topic', 'camera_info_topic', 'points_topic', 'rviz'}


def _declared_arguments(tree):
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
            'DeclareLaunchArgument' and node.args and isinstance(node.args[0], ast.Constant)}


def test_launch_file_parses_and_declares_its_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    assert _declared_arguments(tree) == EXPECTED_ARGUMENTS
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert 'generate_launch_description' in names


def test_launch_description_loads_with_launch_ros():
    pytest.importorskip('launch_ros', reason='launch_ros is not installable from PyPI; '
                        'this runs on machines with a ROS 2 install')
    spec = importlib.util.spec_from_file_location('adapt_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {a.name for a in description.get_launch_arguments()}
    assert declared == EXPECTED_ARGUMENTS
