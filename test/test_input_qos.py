"""Input QoS parameters: a reliable node gets every message of a reliable player process."""

import re
import subprocess
import sys

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.qos import qos_profile_sensor_data, ReliabilityPolicy  # noqa: E402

from dds_helpers import (  # noqa: E402
    INPUT_TOPICS, listening, node_command, process_env, small_night_bag, spin_until)
from mmtta_ros.core.params import node_params  # noqa: E402
from mmtta_ros.ros.shell import input_qos  # noqa: E402


def test_default_input_qos_is_the_sensor_data_profile():
    inputs = node_params({}).pipeline.inputs
    assert (inputs.reliable, inputs.depth) == (False, 5)
    assert input_qos(inputs.reliable, inputs.depth) == qos_profile_sensor_data
    reliable = input_qos(True, 20)
    assert reliable.reliability == ReliabilityPolicy.RELIABLE and reliable.depth == 20
    with pytest.raises(ValueError, match='inputs.depth'):
        node_params({'inputs.depth': 0})


@pytest.mark.e2e
def test_reliable_node_receives_every_message_of_a_reliable_player(tmp_path):
    bag = small_night_bag(tmp_path / 'night')
    env = process_env()
    # Depth covers the bag: keep last drops the oldest once the callbacks fall behind by
    # more than `depth` messages, reliable or not.
    node_cmd = node_command('device:=cpu', 'inputs.reliable:=true', 'inputs.depth:=100',
                            'model.image_width:=160', 'model.image_height:=90',
                            'diagnostics_period:=0.5', params_file=False)
    with listening('qos_listener') as (listener, executor, processes):
        latest = {}

        def on_diagnostics(msg):
            for status in msg.status:
                latest.update({kv.key: kv.value for kv in status.values})
        listener.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)

        node_log = tmp_path / 'node.log'
        with open(node_log, 'w') as log:
            node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(node)
        assert spin_until(executor, lambda: listener.count_subscribers('/LIDAR_TOP') > 0, 90.0), \
            node_log.read_text()
        # --wait-for, then --delay: the player's publishers have matched the node's
        # subscriptions, and the node's side has had time to match them too (a volatile
        # reader misses what comes before; under load 2 s lost the first of each topic).
        player = subprocess.run(
            [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), '--reliable',
             '--wait-for', *INPUT_TOPICS, '--delay', '5'],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        assert player.returncode == 0, player.stdout
        sent = {topic: int(count) for count, topic in
                re.findall(r'^\s+(\d+)\s+(\S+)$', player.stdout, re.MULTILINE)}
        expected = {'image_received': sent['/CAM_FRONT/image_rect_compressed'],
                    'points_received': sent['/LIDAR_TOP'],
                    'camera_info_received': sent['/CAM_FRONT/camera_info']}
        assert expected == {'image_received': 15, 'points_received': 24,
                            'camera_info_received': 15}

        def received():
            return {key: int(latest.get(key, -1)) for key in expected}
        assert spin_until(executor, lambda: received() == expected, 30.0), (
            received(), node_log.read_text()[-2000:])
