"""The shipped Fast DDS profile: well formed, installed, used by the launch files, honoured."""

import ast
import os
from pathlib import Path
import sys
import xml.etree.ElementTree as ET

import pytest

from mmtta_ros.ros import dds_profile
from mmtta_ros.ros.dds_profile import dds_environment, PROFILES_VARIABLE, SWITCH_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / 'config' / dds_profile.PROFILE_FILE
NS = {'dds': 'http://www.eprosima.com'}
# A demo-size cloud (~600-700 KB): the segment must hold many, not one.
CLOUD_BYTES = 700_000


def _transports():
    root = ET.parse(PROFILE).getroot()
    return root, {d.findtext('dds:transport_id', namespaces=NS): d
                  for d in root.iterfind('.//dds:transport_descriptor', NS)}


def test_profile_declares_large_shared_memory_and_udp_buffers_for_the_default_participant():
    root, transports = _transports()
    assert root.tag == '{http://www.eprosima.com}dds'
    kinds = {d.findtext('dds:type', namespaces=NS): d for d in transports.values()}
    assert set(kinds) == {'SHM', 'UDPv4'}
    assert int(kinds['SHM'].findtext('dds:segment_size', namespaces=NS)) >= 10 * CLOUD_BYTES
    for name in ('sendBufferSize', 'receiveBufferSize'):
        assert int(kinds['UDPv4'].findtext(f'dds:{name}', namespaces=NS)) >= 4 * 2**20
    [participant] = root.findall('.//dds:participant', NS)
    assert participant.get('is_default_profile') == 'true'
    used = [t.text for t in participant.iterfind('dds:rtps/dds:userTransports/dds:transport_id',
                                                 NS)]
    assert sorted(used) == sorted(transports)
    # Without this the built-in 512 KB segment would stay the one used.
    assert participant.findtext('dds:rtps/dds:useBuiltinTransports', namespaces=NS) == 'false'
    # Transports only: QoS stays rmw_fastrtps's (the node's inputs.reliable / inputs.depth).
    assert not root.findall('.//dds:data_writer', NS) + root.findall('.//dds:data_reader', NS)


def test_profile_uses_only_elements_of_the_installed_fast_dds_schema():
    xsd = Path(os.environ.get('VIRTUAL_ENV', Path(sys.executable).parents[1])) / \
        'share' / 'fastdds' / 'fastdds_profiles.xsd'
    if not xsd.is_file():
        pytest.skip(f'no Fast DDS schema at {xsd}')
    schema_names = {e.get('name') for e in ET.parse(xsd).getroot().iter() if e.get('name')}
    used = {element.tag.split('}')[1] for element in ET.parse(PROFILE).getroot().iter()}
    assert used <= schema_names | {'dds', 'profiles'}, used - schema_names


def test_environment_sets_the_profile_unless_disabled_or_the_user_named_one():
    env = dds_environment({'PATH': '/bin'})
    assert Path(env[PROFILES_VARIABLE]) == dds_profile.profile_path()
    assert dds_profile.profile_path().samefile(PROFILE)
    assert PROFILES_VARIABLE not in dds_environment({SWITCH_VARIABLE: 'off'})
    assert PROFILES_VARIABLE not in dds_environment({}, enabled=False)
    mine = {PROFILES_VARIABLE: '/etc/my_fastdds.xml'}
    assert dds_environment(mine)[PROFILES_VARIABLE] == '/etc/my_fastdds.xml'
    with pytest.raises(ValueError, match=SWITCH_VARIABLE):
        dds_environment({SWITCH_VARIABLE: 'maybe'})


def test_setup_installs_every_config_file_so_the_launch_path_exists_installed():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    installs = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Tuple)}
    assert "('share/' + package_name + '/config', glob('config/*'))" in installs
    assert PROFILE.parent.name == 'config' and PROFILE.is_file()


def test_delivery_tool_settings_differ_only_in_the_dds_variables(tmp_path):
    from mmtta_ros.tools.dds_delivery import setting_environment

    base = {'PATH': '/bin', PROFILES_VARIABLE: '/etc/theirs.xml', SWITCH_VARIABLE: '0'}
    default = setting_environment('default', base)
    assert PROFILES_VARIABLE not in default and 'FASTDDS_BUILTIN_TRANSPORTS' not in default
    assert Path(setting_environment('profile', base)[PROFILES_VARIABLE]).samefile(PROFILE)
    assert setting_environment('large_data', base)['FASTDDS_BUILTIN_TRANSPORTS'] == 'LARGE_DATA'
    other = tmp_path / 'other.xml'
    assert setting_environment(str(other), base)[PROFILES_VARIABLE] == str(other)
    with pytest.raises(SystemExit, match='unknown setting'):
        setting_environment('shm', base)


@pytest.mark.parametrize('launch_file', ['adapt.launch.py', 'adapt_lifecycle.launch.py'])
def test_launch_files_point_the_started_processes_at_the_installed_profile(
        monkeypatch, tmp_path, launch_file):
    from test_launch import _ament_prefix, _load_with_fake_launch, LAUNCH_VALUES

    prefix = tmp_path / 'install'
    monkeypatch.setenv('AMENT_PREFIX_PATH', _ament_prefix(prefix, ['mmtta_ros']))
    monkeypatch.delenv(PROFILES_VARIABLE, raising=False)
    module = _load_with_fake_launch(monkeypatch, ROOT / 'launch' / launch_file)
    description = module.generate_launch_description()
    declared = {a.args[0] for a in description.args[0]
                if type(a).__name__ == 'DeclareLaunchArgument'}
    assert 'dds_profile' in declared
    functions = [a.kwargs['function'] for a in description.args[0]
                 if type(a).__name__ == 'OpaqueFunction']
    plain = getattr(module, 'PLAIN', module)
    node_function = getattr(module, '_lifecycle_node', None) or module._adapt_node
    # The profile is set before the node (and RViz) are started.
    assert functions.index(plain._dds_profile) < functions.index(node_function)
    [action] = plain._dds_profile(dict(LAUNCH_VALUES, dds_profile='true'))
    assert type(action).__name__ == 'SetEnvironmentVariable'
    installed = prefix / 'share' / 'mmtta_ros' / 'config' / dds_profile.PROFILE_FILE
    assert action.args == (PROFILES_VARIABLE, str(installed))
    assert plain._dds_profile(dict(LAUNCH_VALUES, dds_profile='false')) == []
    monkeypatch.setenv(PROFILES_VARIABLE, '/etc/my_fastdds.xml')
    [action] = plain._dds_profile(dict(LAUNCH_VALUES, dds_profile='true'))
    assert type(action).__name__ == 'LogInfo' and '/etc/my_fastdds.xml' in action.kwargs['msg']


@pytest.mark.e2e
@pytest.mark.dds
def test_fast_dds_takes_the_profile_and_clouds_arrive_through_its_segment():
    pytest.importorskip('rclpy', reason='rclpy not installed')
    from mmtta_ros.tools.dds_delivery import build_parser, run_once

    # A publisher process sends 621 KB clouds to a counting subscriber process, both with
    # the profile. Fast DDS silently keeps its defaults for a profile it rejects: the
    # proof that it took this one is the segment size the counter maps.
    # --wait-match: discovery on a loaded CI machine may take seconds; not the point here.
    args = build_parser().parse_args(['--fresh', '--count', '8', '--hz', '4',
                                      '--wait-match', '60'])
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    run = run_once('profile', args, env)
    segment = int(ET.parse(PROFILE).getroot().findtext(
        './/dds:transport_descriptor[dds:type="SHM"]/dds:segment_size', namespaces=NS))
    # Mapped by the counter at the first cloud: its own segment and the publisher's.
    assert sum(size >= segment for size in run['shm_segments']) >= 2, run
    assert 'Error' not in run['counter_log'], run['counter_log']
    # Delivery ratios vary with load (README has measured ones); a cloud must arrive.
    assert run['received'] >= 1, run
    assert run['mean_kb'] == pytest.approx(621, rel=0.01)
    without = run_once('default', args, env)
    assert max(without['shm_segments'], default=0) < segment, without
