"""
Launch the mmtta_adapt node (and optionally RViz) with parameters from a YAML file.

The processes it starts load config/fastdds_large_data.xml (Fast DDS shared memory large
enough for LiDAR clouds) unless dds_profile:=false or FASTDDS_DEFAULT_PROFILES_FILE is set.
"""

import os

from ament_index_python.packages import get_package_share_directory, PackageNotFoundError
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# Fast DDS 3 reads its XML profile from this variable (Fast DDS 2: FASTRTPS_...).
DDS_PROFILES_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
# Launch arguments that override a parameter of the YAML file when they are not empty.
OVERRIDES = {
    'device': ('device', str),
    'method': ('adaptation.method', str),
    'checkpoint': ('model.checkpoint', str),
}


def node_settings(context):
    """Return the node's parameters and remappings from the launch arguments."""
    overrides = {'use_sim_time': LaunchConfiguration('use_sim_time').perform(context) == 'true'}
    for argument, (parameter, kind) in OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[parameter] = kind(value)
    remappings = [
        ('~/input/image', LaunchConfiguration('image_topic').perform(context)),
        ('~/input/camera_info', LaunchConfiguration('camera_info_topic').perform(context)),
        ('~/input/points', LaunchConfiguration('points_topic').perform(context)),
        # Label requests and answers (used only with labels.mode set).
        ('~/output/label_requests',
         LaunchConfiguration('label_requests_topic').perform(context)),
        ('~/input/point_labels', LaunchConfiguration('point_labels_topic').perform(context)),
    ]
    return {'parameters': [LaunchConfiguration('params_file').perform(context), overrides],
            'remappings': remappings}


def _adapt_node(context):
    return [Node(package='mmtta_ros', executable='mmtta_adapt', name='mmtta_adapt',
                 output='screen', emulate_tty=True, **node_settings(context))]


def _rviz(context):
    if LaunchConfiguration('rviz').perform(context).lower() not in ('true', '1', 'yes'):
        return []
    # launch_ros fails on a missing package only after it started the node: that node
    # then runs on its own, holding the topics. Check first, and go on without RViz.
    try:
        get_package_share_directory('rviz2')
    except PackageNotFoundError:
        return [LogInfo(msg='WARNING: rviz:=true but rviz2 is not installed '
                            '(apt install ros-$ROS_DISTRO-rviz2): starting without RViz')]
    share = _share()
    return [Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
                 arguments=['-d', os.path.join(share, 'config', 'mmtta.rviz')])]


def _dds_profile(context):
    # Fast DDS reads the profile when a process creates its first participant: set it for
    # the processes started after this action (the node, RViz). A profile file the user
    # named already wins; config/fastdds_large_data.xml says why each setting.
    value = LaunchConfiguration('dds_profile').perform(context).strip().lower()
    if value in ('false', '0', 'no', 'off'):
        return []
    if value not in ('true', '1', 'yes', 'on'):
        raise ValueError(f'dds_profile must be true or false, got {value!r}')
    if os.environ.get(DDS_PROFILES_VARIABLE):
        return [LogInfo(msg=f'dds_profile: keeping {DDS_PROFILES_VARIABLE}='
                            f'{os.environ[DDS_PROFILES_VARIABLE]}')]
    return [SetEnvironmentVariable(DDS_PROFILES_VARIABLE, dds_profile_path())]


def dds_profile_path():
    """Return the shipped Fast DDS profile: installed with the package's config files."""
    return os.path.join(_share(), 'config', 'fastdds_large_data.xml')


def _share():
    try:
        return get_package_share_directory('mmtta_ros')
    except PackageNotFoundError:  # run from a source checkout, not an installed workspace
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_arguments():
    """Declare the launch arguments (shared with adapt_lifecycle.launch.py)."""
    share = _share()
    return [
        DeclareLaunchArgument('params_file', default_value=os.path.join(share, 'config',
                                                                        'adapt.yaml'),
                              description='YAML with the node parameters'),
        DeclareLaunchArgument('use_sim_time', default_value='true',
                              description='follow /clock (true when replaying bags)'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cuda or cpu (empty: from the YAML)'),
        DeclareLaunchArgument('method', default_value='',
                              description='adaptation method (empty: from the YAML)'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='source checkpoint .pt (empty: from the YAML)'),
        DeclareLaunchArgument('image_topic', default_value='/CAM_FRONT/image_rect_compressed'),
        DeclareLaunchArgument('camera_info_topic', default_value='/CAM_FRONT/camera_info'),
        DeclareLaunchArgument('points_topic', default_value='/LIDAR_TOP'),
        DeclareLaunchArgument('label_requests_topic', default_value='/mmtta/label_requests',
                              description='where the node asks for labels (labels.mode)'),
        DeclareLaunchArgument('point_labels_topic', default_value='/mmtta/point_labels',
                              description='where the answers come in (labels.mode)'),
        DeclareLaunchArgument('rviz', default_value='false', description='start RViz too'),
        DeclareLaunchArgument('dds_profile', default_value='true',
                              description='load config/fastdds_large_data.xml (shared memory '
                                          'for large clouds) into the started processes'),
    ]


def generate_launch_description():
    """Describe the arguments, the DDS profile, the node and RViz."""
    return LaunchDescription(launch_arguments() + [
        OpaqueFunction(function=_dds_profile),
        OpaqueFunction(function=_adapt_node),
        OpaqueFunction(function=_rviz),
    ])
