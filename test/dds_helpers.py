"""What the tests that start the node as a process share: bag, environment, command, teardown."""

from contextlib import contextmanager
import os
from pathlib import Path
import sys
import time

from mmtta_ros.bags.topics import BagTopics
from mmtta_ros.bags.writer import write_demo_bag
from mmtta_ros.synth import T_CAM_FROM_LIDAR

ROOT = Path(__file__).resolve().parents[1]
INPUT_TOPICS = (BagTopics.image, BagTopics.camera_info, BagTopics.lidar)


def small_night_bag(path: Path) -> Path:
    """Write the 24-sweep night bag (320x180 images, ~230 KB clouds) the e2e tests replay."""
    write_demo_bag(path, domain='night', seed=4, num_sweeps=24, image_size=(320, 180),
                   render_size=(160, 90), lidar_azimuth_steps=360)
    return path


def process_env() -> dict:
    """Return the environment of a process a test starts: loopback, this run's domain."""
    return dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                ROS_DOMAIN_ID=os.environ['ROS_DOMAIN_ID'], PYTHONUNBUFFERED='1')


def node_command(*parameters: str, params_file: bool = True) -> list:
    """
    Return the node's command line on the demo bag's topics with the demo's calibration.

    parameters: more `-p name:=value` arguments ('name:=value' each); params_file: start
    from config/adapt.yaml (else the parameter table's defaults).
    """
    T = ','.join(repr(float(v)) for v in T_CAM_FROM_LIDAR.reshape(-1))
    command = [sys.executable, '-m', 'mmtta_ros.ros.node', '--ros-args']
    if params_file:
        command += ['--params-file', str(ROOT / 'config' / 'adapt.yaml')]
    for parameter in (f'calibration.T_cam_from_lidar:=[{T}]', *parameters):
        command += ['-p', parameter]
    return command + ['-r', f'~/input/image:={BagTopics.image}',
                      '-r', f'~/input/camera_info:={BagTopics.camera_info}',
                      '-r', f'~/input/points:={BagTopics.lidar}']


def spin_until(executor, condition, timeout: float) -> bool:
    """Spin `executor` until `condition()` holds or `timeout` seconds pass; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        executor.spin_once(timeout_sec=0.05)
    return condition()


def kill_left_over(processes) -> None:
    """Kill the processes this test started that are still running, by their handles."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def listening(name: str):
    """
    Yield (listener node, its executor, processes) in a DDS context of its own.

    On exit, however the test ends: the processes still running are killed (append each
    one the test starts), then the executor, the node and the context are shut down.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.context.Context()
    rclpy.init(context=context)
    listener = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    processes = []
    try:
        yield listener, executor, processes
    finally:
        kill_left_over(processes)
        executor.shutdown()
        listener.destroy_node()
        rclpy.try_shutdown(context=context)
