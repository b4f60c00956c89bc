"""Input QoS parameters: a reliable node gets every message of a reliable player process."""

import os
from pathlib import Path
import re
import subprocess
import sys
import time

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data, ReliabilityPolicy  # noqa: E402

from mmtta_ros.bags.writer import write_demo_bag  # noqa: E402
from mmtta_ros.core.params import node_params  # noqa: E402
from mmtta_ros.ros.shell import input_qos  # noqa: E402
from mmtta_ros.synth import T_CAM_FROM_LIDAR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
    bag = tmp_path / 'night'
    write_demo_bag(bag, domain='night', seed=4, num_sweeps=24, image_size=(320, 180),
                   render_size=(160, 90), lidar_azimuth_steps=360)
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=os.environ['ROS_DOMAIN_ID'], PYTHONUNBUFFERED='1')
    T = ','.join(repr(float(v)) for v in T_CAM_FROM_LIDAR.reshape(-1))
    node_cmd = [
        sys.executable, '-m', 'mmtta_ros.ros.node', '--ros-args', '-p', 'device:=cpu',
        '-p', 'inputs.reliable:=true', '-p', f'calibration.T_cam_from_lidar:=[{T}]',
        '-p', 'model.image_width:=160', '-p', 'model.image_height:=90',
        '-p', 'diagnostics_period:=0.5',
        '-r', '~/input/image:=/CAM_FRONT/image_rect_compressed',
        '-r', '~/input/camera_info:=/CAM_FRONT/camera_info',
        '-r', '~/input/points:=/LIDAR_TOP']
    context = rclpy.context.Context()
    rclpy.init(context=context)
    listener = rclpy.create_node('qos_listener', context=context)
    latest = {}

    def on_diagnostics(msg):
        for status in msg.status:
            latest.update({kv.key: kv.value for kv in status.values})
    listener.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)

    def spin_until(condition, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            executor.spin_once(timeout_sec=0.05)
        return condition()

    node_log = tmp_path / 'node.log'
    node = player = None
    try:
        with open(node_log, 'w') as log:
            node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        assert spin_until(lambda: listener.count_subscribers('/LIDAR_TOP') > 0, 90.0), \
            node_log.read_text()
        # --delay: the node discovers the player's publishers before the first message.
        player = subprocess.run(
            [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), '--reliable',
             '--delay', '5'], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=120)
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
        assert spin_until(lambda: received() == expected, 30.0), (
            received(), node_log.read_text()[-2000:])
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=60)
        listener.destroy_node()
        rclpy.try_shutdown(context=context)
