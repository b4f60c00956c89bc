"""Arrays -> sensor_msgs: the labeled cloud and the overlay image."""

import numpy as np
from sensor_msgs.msg import Image, PointCloud2, PointField

from mmtta_ros.sensors.pointcloud import LabeledCloudBuffer, make_pointcloud2


def cloud_message(cloud: LabeledCloudBuffer, header) -> PointCloud2:
    """Return the labeled cloud as a PointCloud2 with `header` (the sweep's)."""
    return make_pointcloud2(PointCloud2, PointField, cloud, header)


def image_message(rgb: np.ndarray, header) -> Image:
    """Return <np.uint8: H, W, 3> as an rgb8 Image with `header` (the camera image's)."""
    msg = Image()
    msg.header = header
    msg.height, msg.width = rgb.shape[:2]
    msg.encoding, msg.is_bigendian = 'rgb8', 0
    msg.step = 3 * msg.width
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg
