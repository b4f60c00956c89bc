"""Hostile images are rejected by their header, before any pixel is decoded (issue 13, 1)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image as PILImage
import pytest

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.image import (
    camera_info_to_intrinsics, compressed_image_to_rgb, decode_image, MAX_IMAGE_PIXELS)

sensor_msgs = pytest.importorskip('sensor_msgs.msg', reason='ROS 2 sensor_msgs not installed')


def png_header_only(width: int, height: int) -> bytes:
    """Return a tiny PNG whose header claims width x height (no pixel data): a bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b'')


def compressed(data: bytes, fmt='png'):
    msg = sensor_msgs.CompressedImage()
    msg.format, msg.data = fmt, data
    return msg


def camera_info(width=160, height=90):
    msg = sensor_msgs.CameraInfo()
    msg.width, msg.height = width, height
    msg.k = [100.0, 0.0, width / 2, 0.0, 100.0, height / 2, 0.0, 0.0, 1.0]
    msg.d, msg.distortion_model = [0.0] * 5, 'plumb_bob'
    return msg


def test_a_decompression_bomb_is_a_rejected_message_not_a_crash():
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    # PIL itself raises DecompressionBombError (not an OSError) for this header.
    with pytest.raises(SensorDataError, match='pixels'):
        compressed_image_to_rgb(compressed(bomb))


def test_an_image_larger_than_camera_info_is_refused_before_decoding():
    # 9000x9000 in the header, no pixel data: were it decoded, the error would be a
    # truncated file, not the size check.
    big = compressed(png_header_only(9000, 9000))
    with pytest.raises(SensorDataError, match='camera_info says 160x90: refused before decoding'):
        decode_image(big, camera_info(), (80, 45))
    raw = sensor_msgs.Image()
    raw.width, raw.height, raw.encoding, raw.step = 8, 4, 'rgb8', 24
    raw.data = bytes(96)
    with pytest.raises(SensorDataError, match='camera_info says'):
        decode_image(raw, camera_info(), None, raw=True)


def test_pixel_limit_on_images_and_camera_info():
    with pytest.raises(SensorDataError, match='more than the limit of 1000'):
        compressed_image_to_rgb(compressed(png_header_only(40, 30)), max_pixels=1000)
    with pytest.raises(SensorDataError, match='more than 1000 pixels'):
        camera_info_to_intrinsics(camera_info(40, 30), max_pixels=1000)
    with pytest.raises(SensorDataError, match='more than'):
        camera_info_to_intrinsics(camera_info(20000, 20000))
    assert 1600 * 900 < MAX_IMAGE_PIXELS


def test_an_image_that_matches_camera_info_still_decodes():
    rgb = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format='PNG')
    image, K = decode_image(compressed(buffer.getvalue()), camera_info(), None)
    np.testing.assert_array_equal(image, rgb)
    assert K[0, 0] == 100.0
