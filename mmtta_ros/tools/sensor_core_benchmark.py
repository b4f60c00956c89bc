"""
sensor_core_benchmark: median times of the sensor core at nuScenes scale (prints figures).

Not a timed test: figures on a shared 2-core machine vary run to run, so they are
printed for a person (and the README) to read, never asserted.
"""

import argparse
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image as PILImage

from mmtta_ros.core.classes import CLASS_PALETTE
from mmtta_ros.sensors.image import compressed_image_to_rgb, resize_image
from mmtta_ros.sensors.pointcloud import (
    cloud_to_numpy, encode_labeled_cloud, make_pointcloud2, NUSCENES_LAYOUT)
from mmtta_ros.sensors.projection import project_points

NUM_POINTS = 34_752  # one nuScenes LIDAR_TOP sweep
K_NUSCENES = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
T_CAM_FROM_LIDAR = np.array([
    [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.3], [1.0, 0.0, 0.0, -0.5], [0.0, 0.0, 0.0, 1.0]])


def median_seconds(function, repeats: int) -> float:
    """Median wall time of `function()` over `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _messages():
    """Real sensor_msgs classes when installed, else plain stand-ins with the same fields."""
    try:
        from sensor_msgs.msg import CompressedImage, PointCloud2, PointField
        from std_msgs.msg import Header
        return PointCloud2, PointField, CompressedImage, Header, 'sensor_msgs (rclpy)'
    except ImportError:
        from types import SimpleNamespace

        class _Msg(SimpleNamespace):
            pass
        return _Msg, _Msg, _Msg, _Msg, 'plain objects (no ROS 2 installed)'


def _street_like_jpeg(width=1600, height=900) -> bytes:
    """Make a jpeg with texture (noise over gradients), so it compresses like a photo."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    image = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def run(repeats: int = 200) -> dict:
    """Measure each step; returns {name: median seconds}."""
    cloud_cls, field_cls, compressed_cls, header_cls, flavour = _messages()
    rng = np.random.default_rng(0)
    points = rng.uniform(-50, 50, (NUM_POINTS, 3)).astype(np.float32)
    records = np.zeros(NUM_POINTS, dtype=NUSCENES_LAYOUT.dtype())
    for axis, name in enumerate('xyz'):
        records[name] = points[:, axis]
    records['intensity'] = rng.uniform(0, 255, NUM_POINTS)
    records['ring'] = rng.integers(0, 32, NUM_POINTS)
    cloud = cloud_cls()
    cloud.height, cloud.width = 1, NUM_POINTS
    cloud.fields = [field_cls(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
                    for f in NUSCENES_LAYOUT.fields]
    cloud.is_bigendian, cloud.point_step = False, NUSCENES_LAYOUT.point_step
    cloud.row_step, cloud.is_dense = NUSCENES_LAYOUT.point_step * NUM_POINTS, True
    cloud.data = records.tobytes()

    labels = rng.integers(0, len(CLASS_PALETTE), NUM_POINTS)
    confidence = rng.random(NUM_POINTS).astype(np.float32)
    intensity = records['intensity'].astype(np.float32)

    def encode():
        buffer = encode_labeled_cloud(points, labels, confidence, intensity, CLASS_PALETTE)
        return make_pointcloud2(cloud_cls, field_cls, buffer, header_cls())

    jpeg = compressed_cls()
    jpeg.format, jpeg.data = 'jpeg', _street_like_jpeg()

    def decode_jpeg_for_network():
        image = compressed_image_to_rgb(jpeg, draft_size=(400, 225))
        return resize_image(image, K_NUSCENES, (400, 225))

    figures = {
        'flavour': flavour,
        'decode PointCloud2 (34,752 pts, nuScenes layout)':
            median_seconds(lambda: cloud_to_numpy(cloud), repeats),
        'encode labeled PointCloud2 (34,752 pts, incl. message)':
            median_seconds(encode, repeats),
        'decode 1600x900 jpeg CompressedImage (full)':
            median_seconds(lambda: compressed_image_to_rgb(jpeg), max(repeats // 10, 5)),
        'decode 1600x900 jpeg -> 400x225 (draft + resize, K scaled)':
            median_seconds(decode_jpeg_for_network, max(repeats // 10, 5)),
        'project 34,752 points':
            median_seconds(lambda: project_points(points, T_CAM_FROM_LIDAR, K_NUSCENES,
                                                  (1600, 900)), repeats),
    }
    return figures


def main(argv=None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--repeats', type=int, default=200)
    args = parser.parse_args(argv)
    figures = run(args.repeats)
    flavour = figures.pop('flavour')
    print(f'sensor core benchmark, median of {args.repeats} runs, messages: {flavour}')
    for name, seconds in figures.items():
        print(f'  {name:<58} {seconds * 1e3:9.3f} ms')
    return 0


if __name__ == '__main__':
    sys.exit(main())
