"""ament_python setup for mmtta_ros."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'mmtta_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*')),
        ('share/' + package_name + '/config', glob('config/*')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='mmtta_ros developers',
    maintainer_email='mmtta-ros@example.org',
    description='Online multi-modal test-time adaptation (MM-TTA) of a camera+LiDAR '
                'segmenter, as a ROS 2 node.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'sensor_core_benchmark = mmtta_ros.tools.sensor_core_benchmark:main',
            'tta_benchmark = mmtta_ros.tools.tta_benchmark:main',
            'mmtta_train = mmtta_ros.tools.train:main',
            'mmtta_evaluate = mmtta_ros.tools.evaluate:main',
            'mmtta_benchmark = mmtta_ros.tools.benchmark:main',
            'mmtta_adapt = mmtta_ros.ros.node:main',
            'mmtta_adapt_lifecycle = mmtta_ros.ros.lifecycle:main',
            'mmtta_demo = mmtta_ros.tools.demo:main',
            'node_benchmark = mmtta_ros.tools.node_benchmark:main',
            'mmtta_make_demo_bag = mmtta_ros.tools.make_demo_bag:main',
            'mmtta_play_bag = mmtta_ros.tools.play_bag:main',
            'mmtta_bag_calibration = mmtta_ros.tools.bag_calibration:main',
            'mmtta_nuscenes_to_bag = mmtta_ros.tools.nuscenes_to_bag:main',
            'mmtta_fuzz_node = mmtta_ros.tools.fuzz_node:main',
            'mmtta_annotator = mmtta_ros.tools.annotator:main',
            'mmtta_dds_delivery = mmtta_ros.tools.dds_delivery:main',
            'mmtta_camera_coverage = mmtta_ros.tools.camera_coverage:main',
        ],
    },
)
