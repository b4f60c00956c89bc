"""The launch file: always parsed here; loaded with launch_ros where that is installed."""

import ast
import importlib.util
from pathlib import Path

import pytest

LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'adapt.launch.py'
LIFECYCLE_LAUNCH_FILE = LAUNCH_FILE.with_name('adapt_lifecycle.launch.py')
EXPECTED_ARGUMENTS = {'params_file', 'use_sim_time', 'device', 'method', 'checkpoint',
                      'image_topic', 'camera_info_topic', 'points_topic',
                      'label_requests_topic', 'point_labels_topic', 'rviz', 'dds_profile'}


def _declared_arguments(tree):
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
            'DeclareLaunchArgument' and node.args and isinstance(node.args[0], ast.Constant)}


def test_launch_file_parses_and_declares_its_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    assert _declared_arguments(tree) == EXPECTED_ARGUMENTS
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert 'generate_launch_description' in names


@pytest.mark.parametrize('path,extra', [
    (LAUNCH_FILE, set()), (LIFECYCLE_LAUNCH_FILE, {'autostart'})])
def test_launch_description_loads_with_launch_ros(path, extra):
    pytest.importorskip('launch_ros', reason='launch_ros is not installable from PyPI; '
                        'this runs on machines with a ROS 2 install')
    spec = importlib.util.spec_from_file_location('adapt_launch', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {a.name for a in description.get_launch_arguments()}
    assert declared == EXPECTED_ARGUMENTS | extra


def _load_with_fake_launch(monkeypatch, path=LAUNCH_FILE):
    """Load the launch file against minimal stand-ins for launch and launch_ros."""
    import sys
    import types

    class Action:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    modules = {
        'launch': types.ModuleType('launch'),
        'launch.actions': types.ModuleType('launch.actions'),
        'launch.substitutions': types.ModuleType('launch.substitutions'),
        'launch_ros': types.ModuleType('launch_ros'),
        'launch_ros.actions': types.ModuleType('launch_ros.actions'),
    }
    modules['launch'].LaunchDescription = Action
    for name in ('DeclareLaunchArgument', 'LogInfo', 'OpaqueFunction', 'SetEnvironmentVariable'):
        setattr(modules['launch.actions'], name, type(name, (Action,), {}))
    modules['launch.substitutions'].LaunchConfiguration = LaunchConfiguration
    modules['launch_ros.actions'].Node = type('Node', (Action,), {})
    modules['launch_ros.actions'].LifecycleNode = type('LifecycleNode', (Action,), {})
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location('adapt_launch_fake', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ament_prefix(root, packages):
    index = root / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True)
    for package in packages:
        (index / package).write_text('')
        (root / 'share' / package).mkdir(parents=True)
    return str(root)


def test_rviz_true_without_rviz2_warns_instead_of_failing(monkeypatch, tmp_path):
    module = _load_with_fake_launch(monkeypatch)
    monkeypatch.setenv('AMENT_PREFIX_PATH', _ament_prefix(tmp_path / 'bare', []))
    actions = module._rviz({'rviz': 'true'})
    assert [type(a).__name__ for a in actions] == ['LogInfo']
    assert 'rviz2 is not installed' in actions[0].kwargs['msg']
    assert module._rviz({'rviz': 'false'}) == []
    # Where rviz2 is installed, RViz is started with the package's config.
    monkeypatch.setenv('AMENT_PREFIX_PATH', _ament_prefix(tmp_path / 'full', ['rviz2']))
    actions = module._rviz({'rviz': 'true'})
    assert [type(a).__name__ for a in actions] == ['Node']
    assert actions[0].kwargs['package'] == 'rviz2'
    assert actions[0].kwargs['arguments'][1].endswith('mmtta.rviz')


LAUNCH_VALUES = {'params_file': 'p.yaml', 'use_sim_time': 'true', 'device': 'cpu', 'method': '',
                 'checkpoint': '', 'image_topic': '/cam', 'camera_info_topic': '/info',
                 'points_topic': '/lidar', 'label_requests_topic': '/ask',
                 'point_labels_topic': '/answers', 'rviz': 'false', 'dds_profile': 'true'}


def test_lifecycle_launch_has_the_plain_arguments_and_starts_the_lifecycle_node(
        monkeypatch, tmp_path):
    monkeypatch.setenv('AMENT_PREFIX_PATH', _ament_prefix(tmp_path / 'bare', []))
    plain = _load_with_fake_launch(monkeypatch)
    module = _load_with_fake_launch(monkeypatch, LIFECYCLE_LAUNCH_FILE)
    description = module.generate_launch_description()
    declared = {a.args[0] for a in description.args[0]
                if type(a).__name__ == 'DeclareLaunchArgument'}
    assert declared == EXPECTED_ARGUMENTS | {'autostart'}
    [node] = module._lifecycle_node(dict(LAUNCH_VALUES, autostart='false'))
    assert type(node).__name__ == 'LifecycleNode'
    assert node.kwargs['executable'] == 'mmtta_adapt_lifecycle'
    assert node.kwargs['name'] == 'mmtta_adapt' and node.kwargs['arguments'] == []
    # The same parameters and remappings as the plain node's launch.
    [plain_node] = plain._adapt_node(LAUNCH_VALUES)
    assert plain_node.kwargs['executable'] == 'mmtta_adapt'
    for key in ('parameters', 'remappings'):
        assert node.kwargs[key] == plain_node.kwargs[key]
    assert ('~/input/points', '/lidar') in node.kwargs['remappings']
    assert ('~/output/label_requests', '/ask') in node.kwargs['remappings']
    assert ('~/input/point_labels', '/answers') in node.kwargs['remappings']
    assert node.kwargs['parameters'][1] == {'use_sim_time': True, 'device': 'cpu'}
    [node] = module._lifecycle_node(dict(LAUNCH_VALUES, autostart='true'))
    assert node.kwargs['arguments'] == ['--activate']
