"""
rosbag2 tools on `rosbags` (no ROS 2 install needed).

- `writer`: synthetic demo bags like nuScenes-converted ones (plus ground-truth labels),
  and bags of labeled output clouds;
- `reader`: any such bag (mcap or sqlite3) -> `mmtta_ros.core.frame.Frame`s, streamed;
- `playback` / `player`: a `ros2 bag play` stand-in (the player is the only rclpy module);
- `topics`, `transforms`: topic names, QoS, message helpers and static transform trees.
"""
