"""
Image, CompressedImage and CameraInfo messages to numpy, duck-typed on message fields.

The same functions read live rclpy messages (`data` is an `array.array`) and messages read
from bags with `rosbags` (`data` is a numpy uint8 array). Nothing here imports rclpy.
"""

from dataclasses import dataclass
import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image as PILImage

from mmtta_ros.core.errors import SensorDataError

# encoding -> (bytes per pixel, channel order to take for RGB, dtype of a channel)
_RAW_ENCODINGS = {
    'rgb8': (3, (0, 1, 2), np.uint8),
    'bgr8': (3, (2, 1, 0), np.uint8),
    'rgba8': (4, (0, 1, 2), np.uint8),
    'bgra8': (4, (2, 1, 0), np.uint8),
    'mono8': (1, (0, 0, 0), np.uint8),
    'mono16': (2, (0, 0, 0), np.uint16),
}
RAW_ENCODINGS = tuple(_RAW_ENCODINGS)
COMPRESSED_FORMATS = ('jpeg', 'png')
# Largest image (width x height) decoded at all: 50 MP is 6x a 4K frame. A compressed
# image's header is read before its pixels, so a tiny file claiming more is refused
# before it can take gigabytes (a decompression bomb). The node sets its own limit.
MAX_IMAGE_PIXELS = 50_000_000


def _buffer(data) -> np.ndarray:
    """View any message byte buffer (array.array, bytes, memoryview, ndarray) as uint8."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def image_to_rgb(msg) -> np.ndarray:
    """
    Decode a sensor_msgs/Image to <np.uint8: H, W, 3> RGB.

    Supports rgb8, bgr8, rgba8, bgra8, mono8 and mono16 (scaled so 65535 maps to 255),
    any row padding (`step`) and big-endian mono16. Returns a view where the layout
    allows (rgb8 without padding), a copy otherwise.
    """
    encoding = str(msg.encoding).lower()
    if encoding not in _RAW_ENCODINGS:
        raise SensorDataError(
            f'unknown image encoding {msg.encoding!r}; supported: {", ".join(RAW_ENCODINGS)}')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise SensorDataError(f'empty image ({width}x{height})')
    bytes_per_pixel, channels, channel_dtype = _RAW_ENCODINGS[encoding]
    if step < width * bytes_per_pixel:
        raise SensorDataError(
            f'image step {step} is smaller than width*bytes_per_pixel = '
            f'{width}*{bytes_per_pixel} for {encoding}')
    data = _buffer(msg.data)
    if data.size != step * height:
        raise SensorDataError(
            f'image data has {data.size} bytes, expected step*height = {step}*{height} = '
            f'{step * height}')
    rows = data.reshape(height, step)[:, :width * bytes_per_pixel]
    if channel_dtype == np.uint8:
        pixels = rows.reshape(height, width, bytes_per_pixel)
    else:
        byte_order = '>' if getattr(msg, 'is_bigendian', False) else '<'
        pixels = np.ascontiguousarray(rows).view(np.dtype(byte_order + 'u2'))
        # 65535 -> 255 exactly, with rounding: the mapping cv_bridge's scaled conversion uses.
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
        pixels = pixels.reshape(height, width, 1)
    if channels == (0, 1, 2) and bytes_per_pixel == 3:
        return pixels
    return np.ascontiguousarray(pixels[:, :, list(channels)])


def compressed_image_to_rgb(msg, draft_size: Optional[Tuple[int, int]] = None,
                            expected_size: Optional[Tuple[int, int]] = None,
                            max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """
    Decode a sensor_msgs/CompressedImage (jpeg or png) to <np.uint8: H, W, 3> RGB.

    draft_size: optional (width, height) the caller will resize to; a jpeg is then decoded
    at the smallest power-of-two reduction still at least that large (libjpeg DCT scaling),
    which is several times faster than a full decode. The result may be larger than
    draft_size: resize it with `resize_image` (which keeps K consistent).
    expected_size: (width, height) camera_info gives; an image whose header says otherwise
    is refused before decoding, as is one over max_pixels (width x height).
    """
    fmt = str(msg.format).lower()
    if fmt and not any(name in fmt for name in ('jpeg', 'jpg', 'png')):
        raise SensorDataError(
            f'unknown compressed image format {msg.format!r}; supported: jpeg, png')
    data = _buffer(msg.data)
    if data.size == 0:
        raise SensorDataError('compressed image has no data')
    try:
        with PILImage.open(io.BytesIO(data.tobytes())) as image:
            if image.format not in ('JPEG', 'PNG'):
                raise SensorDataError(
                    f'compressed image data is {image.format}, not jpeg or png')
            # open() reads the header only: check the size before any pixel is decoded.
            check_image_size(image.size, expected_size, max_pixels)
            if draft_size is not None and image.format == 'JPEG':
                image.draft('RGB', tuple(int(v) for v in draft_size))
            return np.asarray(image.convert('RGB'))
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as error:
        raise SensorDataError(f'cannot decode compressed image ({msg.format!r}): {error}')


def check_image_size(size: Tuple[int, int], expected_size: Optional[Tuple[int, int]] = None,
                     max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise SensorDataError if (width, height) differs from expected_size or is too large."""
    width, height = int(size[0]), int(size[1])
    if expected_size is not None and (width, height) != tuple(int(v) for v in expected_size):
        raise SensorDataError(
            f'image is {width}x{height} but camera_info says '
            f'{int(expected_size[0])}x{int(expected_size[1])}: refused before decoding')
    if width * height > max_pixels:
        raise SensorDataError(f'image is {width}x{height} = {width * height} pixels, more '
                              f'than the limit of {max_pixels}: refused before decoding')


@dataclass
class CameraIntrinsics:
    """
    Pinhole intrinsics from a CameraInfo.

    K:          <np.float64: 3, 3> camera matrix
    distortion: <np.float64: D> distortion coefficients (rectified images have zeros)
    distortion_model: e.g. 'plumb_bob'
    width, height: image size in pixels
    """

    K: np.ndarray
    distortion: np.ndarray
    distortion_model: str
    width: int
    height: int

    @property
    def image_size(self) -> Tuple[int, int]:
        """Return (width, height) in pixels."""
        return self.width, self.height


def camera_info_to_intrinsics(msg, max_pixels: int = MAX_IMAGE_PIXELS) -> CameraIntrinsics:
    """Read K, distortion and image size (at most max_pixels) from a sensor_msgs/CameraInfo."""
    K = np.asarray(msg.k, dtype=np.float64)
    if K.size != 9:
        raise SensorDataError(f'camera_info K has {K.size} values, expected 9')
    K = K.reshape(3, 3)
    check_intrinsics(K)
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise SensorDataError(f'camera_info image size is {width}x{height}')
    if width * height > max_pixels:
        raise SensorDataError(f'camera_info image size {width}x{height} is more than '
                              f'{max_pixels} pixels (the image size limit)')
    return CameraIntrinsics(
        K=K, distortion=np.asarray(msg.d, dtype=np.float64).copy(),
        distortion_model=str(msg.distortion_model), width=width, height=height)


def check_intrinsics(K: np.ndarray) -> None:
    """Raise SensorDataError unless K <3, 3> is a usable pinhole matrix."""
    K = np.asarray(K)
    if K.shape != (3, 3):
        raise SensorDataError(f'K has shape {K.shape}, expected (3, 3)')
    if not np.all(np.isfinite(K)):
        raise SensorDataError('K contains NaN or inf')
    if not np.any(K):
        raise SensorDataError('K is all zeros: the camera is not calibrated')
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SensorDataError(f'K has non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]}')
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise SensorDataError(f'K last row is {K[2].tolist()}, expected [0, 0, 1]')


def resize_image(image_rgb: np.ndarray, K: np.ndarray,
                 size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """
    Resize <uint8: H, W, 3> to size=(width, height) and scale K to match.

    Returns the resized image and <np.float64: 3, 3> K for it. Uses the pixel-centre
    convention (pixel i covers [i, i+1)), so a point keeps its place in the picture.
    """
    width, height = int(size[0]), int(size[1])
    src_height, src_width = image_rgb.shape[:2]
    K = np.asarray(K, dtype=np.float64)
    if (src_width, src_height) == (width, height):
        return image_rgb, K.copy()
    resized = np.asarray(
        PILImage.fromarray(image_rgb).resize((width, height), PILImage.BILINEAR))
    return resized, scale_intrinsics(K, (src_width, src_height), (width, height))


def scale_intrinsics(K: np.ndarray, from_size: Tuple[int, int],
                     to_size: Tuple[int, int]) -> np.ndarray:
    """
    Return <np.float64: 3, 3> K of an image resized from `from_size` to `to_size`.

    Sizes are (width, height). Pixel-centre convention: pixel i covers [i, i+1), so the
    principal point maps as (c + 0.5) * s - 0.5.
    """
    K = np.asarray(K, dtype=np.float64)
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    scaled = K.copy()
    scaled[0, :2] *= sx
    scaled[1, :2] *= sy
    scaled[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    scaled[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return scaled


def decode_image(image_msg, info_msg, image_size: Optional[Tuple[int, int]],
                 raw: bool = False):
    """
    Decode an image message and resize it: <np.uint8: H, W, 3> RGB and its K <3, 3>.

    raw: image_msg is a sensor_msgs/Image (else a CompressedImage). K comes from
    `info_msg` (a CameraInfo for the full-size image) and is scaled with every size
    change; image_size None keeps the decoded size. An image whose size differs from
    camera_info's is refused (its K would be wrong), a compressed one before decoding.
    """
    intrinsics = camera_info_to_intrinsics(info_msg)
    if raw:
        check_image_size((int(image_msg.width), int(image_msg.height)), intrinsics.image_size)
        image = image_to_rgb(image_msg)
    else:
        image = compressed_image_to_rgb(image_msg, draft_size=image_size,
                                        expected_size=intrinsics.image_size)
    # A draft jpeg decode is smaller than camera_info's size: scale K to what was decoded.
    decoded_size = (int(image.shape[1]), int(image.shape[0]))
    K = scale_intrinsics(intrinsics.K, intrinsics.image_size, decoded_size)
    if image_size is None:
        return np.ascontiguousarray(image), K
    image, K = resize_image(image, K, image_size)
    return np.ascontiguousarray(image), K
