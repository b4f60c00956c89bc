"""Image / CameraInfo decoding and LiDAR-to-camera projection, on real sensor_msgs objects."""

import io

import numpy as np
from PIL import Image as PILImage
import pytest

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.image import (
    camera_info_to_intrinsics, compressed_image_to_rgb, image_to_rgb, resize_image)
from mmtta_ros.sensors.projection import (
    parse_extrinsics, project_points, quaternion_to_matrix)

sensor_msgs = pytest.importorskip('sensor_msgs.msg', reason='ROS 2 sensor_msgs not installed')


def _rgb(height=5, width=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _image_msg(pixels, encoding, step=None, bigendian=False):
    msg = sensor_msgs.Image()
    msg.height, msg.width = pixels.shape[:2]
    row = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    step = row.shape[1] if step is None else step
    padded = np.zeros((pixels.shape[0], step), dtype=np.uint8)
    padded[:, :row.shape[1]] = row
    msg.encoding, msg.step, msg.is_bigendian = encoding, step, bigendian
    msg.data = padded.tobytes()
    return msg


@pytest.mark.parametrize('encoding,order,alpha', [
    ('rgb8', [0, 1, 2], False), ('bgr8', [2, 1, 0], False),
    ('rgba8', [0, 1, 2], True), ('bgra8', [2, 1, 0], True)])
def test_colour_encodings_give_rgb(encoding, order, alpha):
    rgb = _rgb()
    stored = rgb[:, :, order]
    if alpha:
        stored = np.concatenate([stored, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=2)
    out = image_to_rgb(_image_msg(np.ascontiguousarray(stored), encoding, step=None))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_row_padding_is_skipped():
    rgb = _rgb(4, 3)
    out = image_to_rgb(_image_msg(rgb, 'rgb8', step=3 * 3 + 5))
    np.testing.assert_array_equal(out, rgb)


def test_mono8_and_mono16_both_endiannesses():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = image_to_rgb(_image_msg(gray, 'mono8'))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    gray16 = np.array([[0, 257, 65535], [128, 1000, 30000]], dtype=np.uint16)
    expected = np.array([[0, 1, 255], [0, 4, 117]], dtype=np.uint8)  # round(v / 257)
    little = image_to_rgb(_image_msg(gray16.astype('<u2'), 'mono16'))
    big = image_to_rgb(_image_msg(gray16.astype('>u2'), 'mono16', bigendian=True))
    np.testing.assert_array_equal(little[:, :, 0], expected)
    np.testing.assert_array_equal(big, little)


@pytest.mark.parametrize('encoding,step,data_len,match', [
    ('yuv422', None, None, 'unknown image encoding'),
    ('rgb8', 5, None, 'step'),
    ('rgb8', None, 10, 'expected step'),
])
def test_bad_images_are_rejected(encoding, step, data_len, match):
    msg = _image_msg(_rgb(2, 3), 'rgb8')
    msg.encoding = encoding
    if step is not None:
        msg.step = step
    if data_len is not None:
        msg.data = bytes(data_len)
    with pytest.raises(SensorDataError, match=match):
        image_to_rgb(msg)


def _compressed(rgb, fmt):
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format=fmt.upper(), quality=95)
    msg = sensor_msgs.CompressedImage()
    msg.format, msg.data = fmt, buffer.getvalue()
    return msg


def test_png_is_lossless_and_jpeg_close():
    rgb = _rgb(16, 24)
    np.testing.assert_array_equal(compressed_image_to_rgb(_compressed(rgb, 'png')), rgb)
    smooth = np.repeat(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], 16, 0)
    smooth = np.repeat(smooth, 3, axis=2)
    decoded = compressed_image_to_rgb(_compressed(smooth, 'jpeg'))
    assert decoded.shape == smooth.shape
    assert np.abs(decoded.astype(int) - smooth).mean() < 3


def test_jpeg_draft_decodes_smaller_but_not_below_target():
    rgb = np.zeros((900, 1600, 3), np.uint8)
    rgb[:, 800:] = 200
    decoded = compressed_image_to_rgb(_compressed(rgb, 'jpeg'), draft_size=(400, 225))
    assert decoded.shape[0] >= 225 and decoded.shape[1] >= 400
    assert decoded.shape[1] < 1600


def test_bad_compressed_images_are_rejected():
    msg = _compressed(_rgb(), 'png')
    msg.format = 'tiff'
    with pytest.raises(SensorDataError, match='unknown compressed image format'):
        compressed_image_to_rgb(msg)
    msg = _compressed(_rgb(), 'jpeg')
    msg.data = bytes(msg.data)[:20]
    with pytest.raises(SensorDataError, match='cannot decode'):
        compressed_image_to_rgb(msg)


def test_camera_info_and_bad_K():
    msg = sensor_msgs.CameraInfo()
    msg.width, msg.height = 1600, 900
    msg.k = [1266.4, 0.0, 816.3, 0.0, 1266.4, 491.5, 0.0, 0.0, 1.0]
    msg.d = [0.0] * 5
    msg.distortion_model = 'plumb_bob'
    intrinsics = camera_info_to_intrinsics(msg)
    assert intrinsics.image_size == (1600, 900)
    assert intrinsics.K[0, 2] == pytest.approx(816.3)
    msg.k = [0.0] * 9
    with pytest.raises(SensorDataError, match='all zeros'):
        camera_info_to_intrinsics(msg)


def test_resize_keeps_points_on_their_pixels():
    K = np.array([[100.0, 0, 79.5], [0, 100.0, 44.5], [0, 0, 1]])
    image = np.zeros((90, 160, 3), np.uint8)
    resized, K_half = resize_image(image, K, (80, 45))
    assert resized.shape == (45, 80, 3)
    # The image centre stays the centre: pixel-centre convention.
    assert K_half[0, 2] == pytest.approx(39.5) and K_half[1, 2] == pytest.approx(22.0)
    assert K_half[0, 0] == pytest.approx(50.0)


# A LiDAR (x forward, y left, z up) and a camera (x right, y down, z forward) at the same
# origin: camera x = -lidar y, camera y = -lidar z, camera z = lidar x.
T_CAM_FROM_LIDAR = np.array([
    [0.0, -1.0, 0.0, 0.0],
    [0.0, 0.0, -1.0, 0.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0]])
K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])


def test_projection_against_hand_computed_pixels():
    points = np.array([
        [10.0, 0.0, 0.0],    # straight ahead -> principal point (50, 40)
        [10.0, 2.0, 1.0],    # left and up -> u = 50 - 100*2/10 = 30, v = 40 - 100*1/10 = 30
        [5.0, -1.0, -0.5],   # right and down -> u = 70, v = 50
        [-10.0, 0.0, 0.0],   # behind
        [0.5, 0.0, 0.0],     # in front but closer than min_depth
        [10.0, -6.0, 0.0],   # right of the image: u = 110 >= 100
    ], dtype=np.float32)
    projection = project_points(points, T_CAM_FROM_LIDAR, K, (100, 80), min_depth=1.0)
    np.testing.assert_allclose(projection.pixels[:3], [[50, 40], [30, 30], [70, 50]], atol=1e-4)
    np.testing.assert_allclose(projection.depth[:4], [10, 10, 5, -10])
    assert projection.in_view.tolist() == [True, True, True, False, False, False]
    assert np.all(np.isfinite(projection.pixels))


def test_projection_with_translation_and_zero_points():
    T = T_CAM_FROM_LIDAR.copy()
    T[:3, 3] = [0.0, 0.5, 0.0]  # camera 0.5 m above the LiDAR: points appear lower (v grows)
    projection = project_points(np.array([[10.0, 0, 0]], np.float32), T, K, (100, 80))
    np.testing.assert_allclose(projection.pixels[0], [50, 45], atol=1e-4)
    empty = project_points(np.zeros((0, 3), np.float32), T, K, (100, 80))
    assert empty.pixels.shape == (0, 2) and empty.in_view.shape == (0,)


def test_projection_rejects_bad_inputs():
    with pytest.raises(SensorDataError, match='all zeros'):
        project_points(np.zeros((1, 3), np.float32), T_CAM_FROM_LIDAR, np.zeros((3, 3)), (10, 10))
    with pytest.raises(SensorDataError, match='shape'):
        project_points(np.zeros((4, 2), np.float32), T_CAM_FROM_LIDAR, K, (10, 10))
    bad_T = T_CAM_FROM_LIDAR.copy()
    bad_T[0, 0] = 3.0
    with pytest.raises(SensorDataError, match='rotation'):
        project_points(np.zeros((1, 3), np.float32), bad_T, K, (10, 10))


def test_extrinsics_forms_agree():
    # 90 degrees about z: quaternion (0, 0, sin45, cos45).
    s = np.sqrt(0.5)
    T16 = parse_extrinsics([0, -1, 0, 1.0, 1, 0, 0, 2.0, 0, 0, 1, 3.0, 0, 0, 0, 1])
    T7 = parse_extrinsics([1.0, 2.0, 3.0, 0, 0, s, s])
    Tmap = parse_extrinsics({'translation': [1.0, 2.0, 3.0], 'rotation': [0, 0, s, s]})
    np.testing.assert_allclose(T7, T16, atol=1e-12)
    np.testing.assert_allclose(Tmap, T16, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix([0, 0, 0, 2.0]), np.eye(3))


@pytest.mark.parametrize('value,match', [
    ([1.0, 2.0, 3.0], '16'),
    ({'translation': [0, 0, 0]}, 'rotation'),
    ([0, 0, 0, 0, 0, 0, 0], 'quaternion'),
    ('not numbers', 'not numbers'),
    ([2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1], 'rotation'),
])
def test_bad_extrinsics_are_rejected(value, match):
    with pytest.raises(SensorDataError, match=match):
        parse_extrinsics(value)
