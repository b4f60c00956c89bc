"""Shared test setup: every DDS participant stays on loopback, in a domain of its own."""

import os

# Set before rclpy is imported anywhere: traffic stays on this machine, and parallel runs
# (a developer's and CI's, say) do not see each other.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_DOMAIN_ID', str(10 + os.getpid() % 90))
