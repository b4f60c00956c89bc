"""
PointCloud2 <-> numpy, duck-typed on message fields (no rclpy, no sensor_msgs).

The same functions read a live rclpy message (`data` is an `array.array('B')`), a
message deserialized by `rosbags` (`data` is a uint8 ndarray) or anything else with the
PointCloud2 attributes: height, width, fields (objects with name, offset, datatype,
count), is_bigendian, point_step, row_step, data.
"""

import array
from dataclasses import dataclass
import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import CLASS_PALETTE

# sensor_msgs/PointField datatype constants (identical in ROS 1, ROS 2 and rosbags).
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
# numpy kind+size per datatype; the byte order prefix is added per message.
_DATATYPE_FORMATS = {
    INT8: 'i1', UINT8: 'u1', INT16: 'i2', UINT16: 'u2',
    INT32: 'i4', UINT32: 'u4', FLOAT32: 'f4', FLOAT64: 'f8',
}
_XYZ = ('x', 'y', 'z')


@dataclass(frozen=True)
class PointFieldSpec:
    """One PointField: `count` values of `datatype` at byte `offset` of every point."""

    name: str
    offset: int
    datatype: int
    count: int = 1


@dataclass(frozen=True)
class CloudLayout:
    """The byte layout of one point: its fields and its size in bytes (point_step)."""

    fields: Tuple[PointFieldSpec, ...]
    point_step: int

    def dtype(self, is_bigendian: bool = False) -> np.dtype:
        """Numpy structured dtype of one point (itemsize == point_step)."""
        return _structured_dtype(_fields_key(self.fields), self.point_step, is_bigendian)


def _layout(point_step: int, *fields: Tuple) -> CloudLayout:
    return CloudLayout(tuple(PointFieldSpec(*f) for f in fields), point_step)


# /LIDAR_TOP of the nuScenes -> ROS 2 bag converters: five packed float32.
NUSCENES_LAYOUT = _layout(
    20, ('x', 0, FLOAT32), ('y', 4, FLOAT32), ('z', 8, FLOAT32),
    ('intensity', 12, FLOAT32), ('ring', 16, FLOAT32))
# ros-drivers/velodyne (ROS 2) PointcloudXYZIRT: PointCloud2Modifier packs fields with no
# alignment, so `time` is a float32 at the unaligned offset 18.
VELODYNE_LAYOUT = _layout(
    22, ('x', 0, FLOAT32), ('y', 4, FLOAT32), ('z', 8, FLOAT32),
    ('intensity', 12, FLOAT32), ('ring', 16, UINT16), ('time', 18, FLOAT32))
# velodyne_pcl::PointXYZIRT through pcl::toROSMsg (LIO-SAM, Autoware, ROS 1 tools):
# PCL_ADD_POINT4D pads xyz to 16 bytes and EIGEN_ALIGN16 pads the point to 32.
VELODYNE_PCL_LAYOUT = _layout(
    32, ('x', 0, FLOAT32), ('y', 4, FLOAT32), ('z', 8, FLOAT32),
    ('intensity', 16, FLOAT32), ('ring', 20, UINT16), ('time', 24, FLOAT32))
# ouster_ros::Point (legacy profile), EIGEN_ALIGN16; ouster_ros before 0.3 had ring uint8.
OUSTER_LAYOUT = _layout(
    48, ('x', 0, FLOAT32), ('y', 4, FLOAT32), ('z', 8, FLOAT32),
    ('intensity', 16, FLOAT32), ('t', 20, UINT32), ('reflectivity', 24, UINT16),
    ('ring', 26, UINT16), ('ambient', 28, UINT16), ('range', 32, UINT32))
# What encode_labeled_cloud writes: every float 4-byte aligned, 2 padding bytes at 26..28.
LABELED_LAYOUT = _layout(
    28, ('x', 0, FLOAT32), ('y', 4, FLOAT32), ('z', 8, FLOAT32),
    ('intensity', 12, FLOAT32), ('rgb', 16, FLOAT32), ('confidence', 20, FLOAT32),
    ('label', 24, UINT16))
# `label` of points whose class is not in the palette (e.g. IGNORE_INDEX); they are grey.
UNLABELED = 65535
UNLABELED_RGB = (128, 128, 128)


def _fields_key(fields: Sequence) -> Tuple[Tuple[str, int, int, int], ...]:
    """Hashable (name, offset, datatype, count) per field of any PointField-like objects."""
    return tuple((str(f.name), int(f.offset), int(f.datatype), int(f.count)) for f in fields)


@functools.lru_cache(maxsize=64)
def _structured_dtype(fields_key: Tuple[Tuple[str, int, int, int], ...], point_step: int,
                      is_bigendian: bool) -> np.dtype:
    """Validate a layout and build its numpy structured dtype (cached: layouts rarely change)."""
    order = '>' if is_bigendian else '<'
    names, formats, offsets = [], [], []
    for name, offset, datatype, count in fields_key:
        if not name:
            raise SensorDataError('PointCloud2 has a field with an empty name')
        if name in names:
            raise SensorDataError(f"PointCloud2 has duplicate field name '{name}'")
        if datatype not in _DATATYPE_FORMATS:
            raise SensorDataError(
                f"PointCloud2 field '{name}' has unknown datatype {datatype} "
                '(PointField datatypes are 1..8)')
        if count < 1:
            raise SensorDataError(f"PointCloud2 field '{name}' has count {count}; need >= 1")
        if offset < 0:
            raise SensorDataError(f"PointCloud2 field '{name}' has negative offset {offset}")
        item = np.dtype(order + _DATATYPE_FORMATS[datatype])
        end = offset + count * item.itemsize
        if end > point_step:
            raise SensorDataError(
                f"PointCloud2 field '{name}' (offset {offset}, {count} x {item.itemsize} "
                f'bytes) ends at byte {end}, beyond point_step {point_step}')
        names.append(name)
        formats.append(item if count == 1 else (item, (count,)))
        offsets.append(offset)
    return np.dtype({'names': names, 'formats': formats, 'offsets': offsets,
                     'itemsize': point_step})


def cloud_structured_view(msg) -> np.ndarray:
    """
    Zero-copy structured view of a PointCloud2's points, one numpy field per PointField.

    Returns <structured dtype (itemsize point_step, msg byte order): height, width>, a
    view of msg.data (strides row_step, point_step, so row padding is skipped); read-only.
    Raises SensorDataError when the layout and the data disagree.
    """
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if point_step == 0 and height * width > 0:
        raise SensorDataError(f'PointCloud2 has point_step 0 but {height * width} points')
    if row_step < width * point_step:
        raise SensorDataError(
            f'PointCloud2 row_step {row_step} < width * point_step = {width} * {point_step}')
    dtype = _structured_dtype(_fields_key(msg.fields), point_step, bool(msg.is_bigendian))
    # frombuffer does not copy: it wraps array.array (rclpy), bytes and uint8 ndarrays (rosbags).
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != row_step * height:
        raise SensorDataError(
            f'PointCloud2 data holds {data.size} bytes; expected row_step * height = '
            f'{row_step} * {height} = {row_step * height}')
    view = np.ndarray(shape=(height, width), dtype=dtype, buffer=data,
                      strides=(row_step, point_step))
    view.flags.writeable = False
    return view


@dataclass
class DecodedCloud:
    """
    The points of a PointCloud2 as numpy arrays; invalid (non-finite) points removed.

    points:     <np.float32: N, 3> x, y, z of the points with finite coordinates, in the
                message's frame; may be a read-only strided view of msg.data (copy it to
                write to it or to hand it to torch without a warning)
    fields:     other fields by name, <field dtype (native byte order): N> or
                <dtype: N, count> for count > 1, same points; may also be read-only views
    valid_mask: <bool: height * width> which input points were kept, row-major
    height:     rows of the input cloud (1 if unorganized)
    width:      points per row of the input cloud
    """

    points: np.ndarray
    fields: Dict[str, np.ndarray]
    valid_mask: np.ndarray
    height: int
    width: int


def _xyz(view: np.ndarray) -> np.ndarray:
    """<np.float32: height, width, 3> x, y, z of a structured view; a view when possible."""
    x_dtype, x_offset = view.dtype.fields['x'][:2]
    y_dtype, y_offset = view.dtype.fields['y'][:2]
    z_dtype, z_offset = view.dtype.fields['z'][:2]
    f4 = np.dtype(np.float32)
    if (x_dtype == f4 and y_dtype == f4 and z_dtype == f4
            and (y_offset, z_offset) == (x_offset + 4, x_offset + 8)):
        # Consecutive native float32: one (H, W, 3) window over the buffer, no copy.
        return np.lib.stride_tricks.as_strided(
            view['x'], shape=view.shape + (3,), strides=view.strides + (4,), writeable=False)
    # Any other layout (float64, big-endian, ints, other order): one gather with casting.
    xyz = np.empty(view.shape + (3,), dtype=np.float32)
    # float64 beyond float32 range becomes inf and is then dropped like any non-finite point.
    with np.errstate(over='ignore'):
        for axis, name in enumerate(_XYZ):
            xyz[..., axis] = view[name]
    return xyz


def cloud_to_numpy(msg, fields: Optional[Sequence[str]] = None) -> DecodedCloud:
    """
    Decode a PointCloud2-like message: finite x, y, z plus the other fields.

    fields: names to return besides x, y, z; None returns all of them.
    Raises SensorDataError for a malformed message, a missing x/y/z (or count > 1), or a
    requested field the cloud does not have.
    """
    view = cloud_structured_view(msg)
    names = view.dtype.names
    for name in _XYZ:
        if name not in names:
            raise SensorDataError(
                f"PointCloud2 has no '{name}' field (fields: {', '.join(names) or 'none'})")
        if view.dtype.fields[name][0].shape:
            raise SensorDataError(f"PointCloud2 field '{name}' has count > 1; need 1")
    if fields is None:
        fields = [name for name in names if name not in _XYZ]
    for name in fields:
        if name not in names:
            raise SensorDataError(
                f"PointCloud2 has no '{name}' field (fields: {', '.join(names)})")
    height, width = view.shape
    num_points = height * width
    # reshape is free unless rows are padded (row_step > width * point_step): then it copies.
    xyz = _xyz(view).reshape(num_points, 3)
    # A finite sum proves every coordinate finite (NaN and inf propagate; a float32 overflow
    # only sends a valid cloud down the exact path). Per-column ops: numpy is several times
    # slower on an (N, 3) strided array than on three strided columns.
    columns = [xyz[:, axis] for axis in range(3)]
    with np.errstate(over='ignore', invalid='ignore'):  # inf - inf is expected here
        all_finite = bool(np.isfinite(sum(column.sum() for column in columns)))
    if all_finite:
        valid_mask = np.ones(num_points, dtype=bool)
        points = xyz
    else:
        valid_mask = np.isfinite(columns[0]) & np.isfinite(columns[1]) & np.isfinite(columns[2])
        points = np.empty((int(np.count_nonzero(valid_mask)), 3), dtype=np.float32)
        for axis, column in enumerate(columns):
            points[:, axis] = column[valid_mask]
    decoded = {}
    for name in fields:
        values = view[name].reshape((num_points,) + view.dtype.fields[name][0].shape)
        if not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder('='))
        decoded[name] = values if all_finite else values[valid_mask]
    return DecodedCloud(points=points, fields=decoded, valid_mask=valid_mask,
                        height=height, width=width)


@dataclass
class LabeledCloudBuffer:
    """
    A little-endian, unorganized PointCloud2 payload: every PointCloud2 field but header.

    It is itself PointCloud2-like, so cloud_to_numpy(buffer) reads it back.
    data: array.array('B') of width * point_step bytes, laid out as `fields` say
    """

    data: array.array
    width: int
    fields: Tuple[PointFieldSpec, ...] = LABELED_LAYOUT.fields
    point_step: int = LABELED_LAYOUT.point_step
    height: int = 1
    is_bigendian: bool = False
    is_dense: bool = True

    @property
    def row_step(self) -> int:
        """Bytes per row (the only row)."""
        return self.width * self.point_step


def pack_rgb(palette: np.ndarray) -> np.ndarray:
    """Packed RViz colours: <np.uint32: C> (r << 16) | (g << 8) | b of <np.uint8: C, 3>."""
    rgb = np.asarray(palette, dtype=np.uint32)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def encode_labeled_cloud(points_lidar: np.ndarray, labels: np.ndarray,
                         confidence: np.ndarray, intensity: Optional[np.ndarray] = None,
                         palette: np.ndarray = CLASS_PALETTE) -> LabeledCloudBuffer:
    """
    Pack per-point predictions into LABELED_LAYOUT for RViz.

    points_lidar: <np.float32: N, 3> metres; labels: <int: N> class index into palette;
    confidence: <np.float32: N>; intensity: <np.float32: N> or None (written as 0);
    palette: <np.uint8: C, 3> RGB per class.
    `rgb` is a float32 whose bits are the uint32 (r << 16) | (g << 8) | b of the point's
    class. Labels outside 0..C-1 (IGNORE_INDEX included) become `label` UNLABELED (65535)
    and grey UNLABELED_RGB.
    """
    points_lidar = np.asarray(points_lidar)
    labels = np.asarray(labels)
    confidence = np.asarray(confidence)
    palette = np.asarray(palette)
    if points_lidar.ndim != 2 or points_lidar.shape[1] != 3:
        raise ValueError(f'points_lidar must be (N, 3), got {points_lidar.shape}')
    num_points = points_lidar.shape[0]
    per_point = {'labels': labels, 'confidence': confidence}
    if intensity is not None:
        per_point['intensity'] = intensity = np.asarray(intensity)
    for name, values in per_point.items():
        if values.shape != (num_points,):
            raise ValueError(f'{name} must be ({num_points},) like points_lidar, '
                             f'got {values.shape}')
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be integers, got {labels.dtype}')
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f'palette must be (C, 3) RGB, got {palette.shape}')

    num_classes = palette.shape[0]
    # Seen as unsigned, negative labels (IGNORE_INDEX) wrap to huge values, so one clamp
    # sends every label outside 0..C-1 to index C: the extra, grey table entry.
    class_index = np.minimum(labels.astype(np.int64, copy=False).view(np.uint64), num_classes)
    # Reinterpret (not convert) the uint32 colours as float32 so their bits reach RViz as is.
    rgb_table = pack_rgb(np.concatenate([palette, [UNLABELED_RGB]])).astype('<u4').view('<f4')
    label_table = np.append(np.arange(num_classes), UNLABELED).astype(np.uint16)

    # The bytes live in an array.array from the start: rclpy's PointCloud2.data setter takes
    # array.array('B') fastest (bytes go through a slow conversion, or a per-byte check with
    # ROS_PYTHON_CHECK_FIELDS=1). array * n fills by doubling memcpy; array('B', bytes(n))
    # was 20x slower here.
    storage = array.array('B', [0]) * (num_points * LABELED_LAYOUT.point_step)
    cloud = np.frombuffer(storage, dtype=LABELED_LAYOUT.dtype())
    for axis, name in enumerate(_XYZ):
        cloud[name] = points_lidar[:, axis]
    if intensity is not None:
        cloud['intensity'] = intensity
    cloud['rgb'] = rgb_table[class_index]
    cloud['confidence'] = confidence
    cloud['label'] = label_table[class_index]
    return LabeledCloudBuffer(data=storage, width=num_points)


def make_pointcloud2(cloud_cls, point_field_cls, buffer: LabeledCloudBuffer, header):
    """
    Build a `cloud_cls` PointCloud2 (rclpy or rosbags class) from `buffer` and `header`.

    point_field_cls is the matching PointField class; header the matching std_msgs Header.
    rclpy classes get data as the buffer's array.array; others (rosbags dataclasses, whose
    CDR serializer needs it) a uint8 ndarray view of it.
    """
    fields = [point_field_cls(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
              for f in buffer.fields]
    kwargs = dict(header=header, height=buffer.height, width=buffer.width, fields=fields,
                  is_bigendian=buffer.is_bigendian, point_step=buffer.point_step,
                  row_step=buffer.row_step, is_dense=buffer.is_dense)
    if hasattr(cloud_cls, 'get_fields_and_field_types'):
        # rclpy: the constructor copies `data` into a new array.array before its setter
        # copies it again; setting the attribute copies an array.array('B') once (or, with
        # ROS_PYTHON_CHECK_FIELDS=1, not at all), while bytes take ~20x longer.
        msg = cloud_cls(**kwargs)
        msg.data = buffer.data
        return msg
    return cloud_cls(data=np.frombuffer(buffer.data, dtype=np.uint8), **kwargs)
