"""The node with two cameras in-process over real DDS (loopback): N-way sync, labels of both."""

from dataclasses import replace
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402

from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2  # noqa: E402

from mmtta_ros.core.batching import project_views  # noqa: E402
from mmtta_ros.ros.node import MMTTANode  # noqa: E402
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, UNLABELED  # noqa: E402
from mmtta_ros.synth import generate_frames, SequenceConfig  # noqa: E402
from test_node import cloud_msg, image_msg, info_msg  # noqa: E402

IMAGE_SIZE = (128, 72)
CAMERAS = ('CAM_FRONT', 'CAM_BACK')
pytestmark = pytest.mark.dds


def _flat(T):
    return [float(v) for v in np.asarray(T).reshape(-1)]


def test_two_cameras_are_synchronised_and_both_label_the_sweep():
    frames = list(generate_frames(SequenceConfig(
        domain='night', seed=3, num_frames=4, image_size=IMAGE_SIZE, frame_stride=2,
        lidar_azimuth_steps=300, extra_cameras=CAMERAS[1:])))
    back = [replace(f, **{k: getattr(f.extra_cameras[0], k) for k in (
        'image', 'K', 'T_cam_from_lidar', 'stamp_image_ns')}) for f in frames]
    context = rclpy.context.Context()
    rclpy.init(context=context)
    params = {'inputs.cameras': list(CAMERAS), 'calibration.use_tf': False,
              'calibration.T_cam_from_lidar': _flat(frames[0].T_cam_from_lidar),
              'calibration.extra_T_cam_from_lidar': _flat(back[0].T_cam_from_lidar),
              'calibration.ego_motion': False, 'model.image_width': IMAGE_SIZE[0],
              'model.image_height': IMAGE_SIZE[1], 'device': 'cpu',
              'worker.process_every_pair': True}
    node = MMTTANode(context=context, parameter_overrides=[
        Parameter(name, value=value) for name, value in params.items()])
    peer = rclpy.create_node('peer', context=context)
    ns = '/mmtta_adapt/input'
    pubs = {(name, kind): peer.create_publisher(msg_type, f'{ns}/{name}/{kind}',
                                                qos_profile_sensor_data)
            for name in CAMERAS for kind, msg_type in (('image', CompressedImage),
                                                       ('camera_info', CameraInfo))}
    points_pub = peer.create_publisher(PointCloud2, f'{ns}/points', qos_profile_sensor_data)
    clouds = []
    peer.create_subscription(PointCloud2, '/mmtta_adapt/output/labeled_points',
                             clouds.append, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(peer)

    def spin_until(condition, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            executor.spin_once(timeout_sec=0.05)
        return condition()

    try:
        assert spin_until(lambda: all(p.get_subscription_count() for p in pubs.values()), 10)
        for frame, back_frame in zip(frames, back):
            for name, view in zip(CAMERAS, (frame, back_frame)):
                info, image = info_msg(view), image_msg(view)
                info.header.frame_id = image.header.frame_id = name
                pubs[name, 'camera_info'].publish(info)
                spin_until(lambda: False, 0.05)
                pubs[name, 'image'].publish(image)
            points_pub.publish(cloud_msg(frame))
            spin_until(lambda: False, 0.2)
        # A set is final once a later message came on every input: the last one waits.
        assert spin_until(lambda: len(clouds) >= len(frames) - 1, 120)
        values = node.diagnostics_values()
        assert values['rejected_no_transform'] == values['rejected_frames'] == 0
        labels = cloud_to_numpy(clouds[0], ['label']).fields['label']
        front, rear = project_views(frames[0])
        assert labels.shape == (frames[0].num_points,)
        # Points only the back camera labels are labeled, not 65535.
        assert rear.in_view.sum() > 100
        assert (labels[rear.in_view] != UNLABELED).all()
        assert (labels[front.in_view] != UNLABELED).all()
        assert (labels[~(front.in_view | rear.in_view)] == UNLABELED).all()
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()
        rclpy.try_shutdown(context=context)
