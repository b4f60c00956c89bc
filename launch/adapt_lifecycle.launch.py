"""
Launch mmtta_adapt as a lifecycle node (and optionally RViz): adapt.launch.py's arguments.

The node starts unconfigured and waits for a lifecycle manager (or `ros2 lifecycle set
/mmtta_adapt configure`, then `activate`); `autostart:=true` configures and activates it
at start instead. Arguments, parameters, remappings, the DDS profile and RViz come from
adapt.launch.py.
"""

import importlib.util
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode


def _plain_launch():
    # The installed share and a source checkout both hold it next to this file.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'adapt.launch.py')
    spec = importlib.util.spec_from_file_location('mmtta_adapt_launch', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PLAIN = _plain_launch()


def _lifecycle_node(context):
    autostart = LaunchConfiguration('autostart').perform(context).lower()
    autostart = autostart in ('true', '1', 'yes')
    return [LifecycleNode(
        package='mmtta_ros', executable='mmtta_adapt_lifecycle', name='mmtta_adapt',
        namespace='', output='screen', emulate_tty=True,
        arguments=['--activate'] if autostart else [], **PLAIN.node_settings(context))]


def generate_launch_description():
    """Describe the arguments, the DDS profile, the lifecycle node and RViz."""
    return LaunchDescription(PLAIN.launch_arguments() + [
        DeclareLaunchArgument('autostart', default_value='false',
                              description='configure and activate at start (no manager)'),
        OpaqueFunction(function=PLAIN._dds_profile),
        OpaqueFunction(function=_lifecycle_node),
        OpaqueFunction(function=PLAIN._rviz),
    ])
