"""
The ROS-free core: frames, the pairing policy, the pipeline and the one builder.

Nothing here imports rclpy or rosbags: the node (`mmtta_ros.ros`), the offline tools
(`mmtta_ros.eval`, `mmtta_ros.tools`) and the tests all drive these same objects.
"""
