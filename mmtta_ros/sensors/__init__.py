"""Sensor conversions: PointCloud2 and image codecs, camera projection; no ROS imports."""
