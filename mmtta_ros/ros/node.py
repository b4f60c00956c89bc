"""
mmtta_adapt: the ROS 2 node. A thin shell: declare -> build -> pair -> worker -> publish.

Inputs (sensor-data QoS, or reliable with `inputs.reliable`): ~/input/image
(CompressedImage or Image), ~/input/camera_info, ~/input/points (PointCloud2). Outputs
(reliable): ~/output/labeled_points, ~/output/overlay, /diagnostics. With labels.mode
set, label requests go out on ~/output/label_requests and answered points come in on
~/input/point_labels (PointCloud2 x, y, z, label; reliable; core/labels.py). Services:
~/reset, ~/save_state (std_srvs/Trigger). Parameters: the table in
`mmtta_ros.core.params` (and config/adapt.yaml). Everything between a matched pair and
the arrays to publish is `core.pipeline.Pipeline`, built by `core.builder`, as offline.
The loop around it is `ros.shell.AdaptationShell`, shared with the lifecycle node
(`ros.lifecycle`), which does the same in steps.
"""

from rclpy.node import Node

from mmtta_ros.core.params import NODE_NAME
from mmtta_ros.ros.params import check_changes, declare_parameters
from mmtta_ros.ros.shell import AdaptationShell, spin_node


class MMTTANode(AdaptationShell, Node):
    """Online test-time adaptation of a camera+LiDAR segmenter, publishing labeled clouds."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.params = declare_parameters(self)
        self.add_on_set_parameters_callback(check_changes)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._load()
        self._start_io()
        self.get_logger().info(f'ready: {self._ready_message()}')

    def shutdown(self) -> None:
        """Stop the worker (its last step publishes nothing); save the state if configured."""
        self._stop_worker()
        self._save_at_shutdown()
        self._restore_threads()


def main(args=None) -> int:
    """Run the node until Ctrl-C or shutdown; a bad start-up ends in one FATAL line, exit 2."""
    return spin_node(MMTTANode, args)


if __name__ == '__main__':
    raise SystemExit(main())
