"""
mmtta_annotator: a simulated annotator answering the node's label requests over ROS.

Subscribes the node's requests (~/output/label_requests), a LiDAR topic and its labels
topic (a replayed demo bag has both), and publishes each answer (x, y, z, label; the
sweep's stamp and frame) `--delay` requests later, a share `--error-rate` of the labels
wrong (core/annotator.py). Ctrl-C prints what it answered.
"""

import argparse
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from mmtta_ros.core.annotator import SimulatedAnnotator, SweepTruth
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.labels import answer_cloud, request_from_cloud
from mmtta_ros.sensors.pointcloud import make_pointcloud2
from mmtta_ros.sensors.stamps import ns_to_sec_nanosec


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--requests', default='/mmtta_adapt/output/label_requests')
    parser.add_argument('--answers', default='/mmtta_adapt/input/point_labels')
    parser.add_argument('--points', default='/LIDAR_TOP', help='the LiDAR topic')
    parser.add_argument('--labels', default='/LIDAR_TOP/labels',
                        help='its labels topic (a uint8 label per point, same stamp)')
    parser.add_argument('--delay', type=int, default=0,
                        help='answer a request this many requests later')
    parser.add_argument('--error-rate', type=float, default=0.0,
                        help='share of answered labels that are another class')
    parser.add_argument('--seed', type=int, default=0, help='seed of the errors')
    parser.add_argument('--history', type=int, default=100, help='sweeps kept')
    return parser


class AnnotatorNode(Node):
    """Requests + ground truth in, answers out (the logic is core/annotator.py)."""

    def __init__(self, args):
        super().__init__('mmtta_annotator')
        self.annotator = SimulatedAnnotator(delay=args.delay, error_rate=args.error_rate,
                                            seed=args.seed)
        self.truth = SweepTruth(history=args.history)
        self.unknown = 0  # requests about a sweep whose cloud or labels never came
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.answer_pub = self.create_publisher(PointCloud2, args.answers, reliable)
        self.create_subscription(PointCloud2, args.points, self.truth.add_cloud,
                                 qos_profile_sensor_data)
        self.create_subscription(PointCloud2, args.labels, self.truth.add_labels,
                                 qos_profile_sensor_data)
        self.create_subscription(PointCloud2, args.requests, self._on_request, reliable)

    def _on_request(self, msg) -> None:
        try:
            request = request_from_cloud(msg)
        except SensorDataError as error:
            self.get_logger().warning(f'unreadable request: {error}')
            return
        truth = self.truth.labels_for(request)
        if truth is None:
            self.unknown += 1
        else:
            self.annotator.ask(request, truth)
        for answer in self.annotator.tick():
            header = Header(frame_id=answer.frame_id)
            header.stamp.sec, header.stamp.nanosec = ns_to_sec_nanosec(answer.stamp_ns)
            self.answer_pub.publish(make_pointcloud2(PointCloud2, PointField,
                                                     answer_cloud(answer), header))

    def summary(self) -> str:
        """Return what was asked and answered."""
        a = self.annotator
        return (f'mmtta_annotator: {a.asked} requests, {self.unknown} about unknown sweeps, '
                f'{a.answered} answers, {a.points_answered} points ({a.points_wrong} wrong)')


def main(argv=None) -> int:
    """Answer requests until Ctrl-C; print a summary."""
    args = build_parser().parse_args(argv)
    if args.delay < 0 or not 0.0 <= args.error_rate <= 1.0:
        raise SystemExit('mmtta_annotator: need --delay >= 0 and --error-rate in [0, 1]')
    rclpy.init(args=None)
    node = None
    try:
        node = AnnotatorNode(args)
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            print(node.summary(), flush=True)
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
