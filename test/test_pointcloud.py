"""
PointCloud2 codec: layouts, malformed input, zero-copy, rclpy and rosbags messages.

Expected bytes are written with `struct`, independently of the numpy dtypes under test.
"""

import array
import math
import struct

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import CLASS_PALETTE, IGNORE_INDEX
from mmtta_ros.sensors.pointcloud import (
    cloud_structured_view, cloud_to_numpy, encode_labeled_cloud, FLOAT32, FLOAT64,
    LABELED_LAYOUT, make_pointcloud2, NUSCENES_LAYOUT, OUSTER_LAYOUT, UINT16, UNLABELED,
    VELODYNE_LAYOUT, VELODYNE_PCL_LAYOUT)

# struct format character and numpy dtype per PointField datatype.
STRUCT_CHARS = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 8: 'd'}
NUMPY_TYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16,
               5: np.int32, 6: np.uint32, 7: np.float32, 8: np.float64}
SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}
PADDING_BYTE = 0xA5  # not zero, so reading padding by mistake shows up


def pack_cloud(fields, point_step, rows, row_step=None, is_bigendian=False):
    """
    Bytes of a cloud, written value by value with struct.

    fields: (name, offset, datatype, count) tuples; rows: list of rows, each a list of
    points, each a dict name -> value (a list for count > 1).
    """
    width = len(rows[0]) if rows else 0
    row_step = width * point_step if row_step is None else row_step
    data = bytearray([PADDING_BYTE]) * (row_step * len(rows))
    order = '>' if is_bigendian else '<'
    for r, row in enumerate(rows):
        for c, point in enumerate(row):
            for name, offset, datatype, count in fields:
                values = point[name] if count > 1 else [point[name]]
                struct.pack_into(order + STRUCT_CHARS[datatype] * count, data,
                                 r * row_step + c * point_step + offset, *values)
    return bytes(data)


def rclpy_cloud(fields, point_step, data, height, width, row_step=None, is_bigendian=False):
    """Build a real sensor_msgs PointCloud2 (data an array.array, as rclpy delivers it)."""
    msg = PointCloud2()
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields]
    msg.point_step = point_step
    msg.row_step = width * point_step if row_step is None else row_step
    msg.is_bigendian = is_bigendian
    msg.is_dense = False
    msg.data = array.array('B', data)
    return msg


def as_tuples(layout):
    return [(f.name, f.offset, f.datatype, f.count) for f in layout.fields]


def rosbags_typestore():
    from rosbags.typesys import get_typestore, Stores
    store = getattr(Stores, 'ROS2_KILTED', Stores.ROS2_HUMBLE)
    return get_typestore(store)


# ---------------------------------------------------------------- named sensor layouts

def test_nuscenes_layout_reads_values():
    points = [dict(x=1.5, y=-2.25, z=0.125, intensity=7.0, ring=31.0),
              dict(x=-40.0, y=3.0, z=-1.75, intensity=0.0, ring=0.0)]
    fields = as_tuples(NUSCENES_LAYOUT)
    msg = rclpy_cloud(fields, 20, pack_cloud(fields, 20, [points]), 1, 2)
    decoded = cloud_to_numpy(msg)
    assert decoded.points.dtype == np.float32 and decoded.points.shape == (2, 3)
    np.testing.assert_array_equal(decoded.points, [[1.5, -2.25, 0.125], [-40.0, 3.0, -1.75]])
    np.testing.assert_array_equal(decoded.fields['intensity'], [7.0, 0.0])
    np.testing.assert_array_equal(decoded.fields['ring'], [31.0, 0.0])
    assert set(decoded.fields) == {'intensity', 'ring'}


def test_velodyne_driver_layout_unaligned_time():
    points = [dict(x=1.0, y=2.0, z=3.0, intensity=100.0, ring=15, time=-0.05),
              dict(x=-1.0, y=-2.0, z=-3.0, intensity=5.0, ring=0, time=0.0)]
    fields = as_tuples(VELODYNE_LAYOUT)
    assert VELODYNE_LAYOUT.point_step == 22
    msg = rclpy_cloud(fields, 22, pack_cloud(fields, 22, [points]), 1, 2)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.points, [[1, 2, 3], [-1, -2, -3]])
    assert decoded.fields['ring'].dtype == np.uint16
    np.testing.assert_array_equal(decoded.fields['ring'], [15, 0])
    np.testing.assert_array_equal(decoded.fields['time'], np.float32([-0.05, 0.0]))


def test_velodyne_pcl_layout_skips_padding():
    fields = as_tuples(VELODYNE_PCL_LAYOUT)
    assert VELODYNE_PCL_LAYOUT.point_step == 32
    points = [dict(x=4.0, y=5.0, z=6.0, intensity=42.0, ring=7, time=0.025)]
    msg = rclpy_cloud(fields, 32, pack_cloud(fields, 32, [points]), 1, 1)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.points, [[4, 5, 6]])
    assert decoded.fields['intensity'][0] == 42.0
    assert decoded.fields['ring'][0] == 7
    assert decoded.fields['time'][0] == np.float32(0.025)


def test_ouster_layout_reads_values():
    fields = as_tuples(OUSTER_LAYOUT)
    assert OUSTER_LAYOUT.point_step == 48
    points = [dict(x=0.5, y=0.25, z=-0.5, intensity=300.0, t=4_000_000_000,
                   reflectivity=65535, ring=127, ambient=12, range=123456),
              dict(x=9.0, y=8.0, z=7.0, intensity=1.0, t=1, reflectivity=2, ring=3,
                   ambient=4, range=5)]
    msg = rclpy_cloud(fields, 48, pack_cloud(fields, 48, [points]), 1, 2)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.points, [[0.5, 0.25, -0.5], [9, 8, 7]])
    for name, dtype in [('t', np.uint32), ('reflectivity', np.uint16), ('ring', np.uint16),
                        ('ambient', np.uint16), ('range', np.uint32)]:
        assert decoded.fields[name].dtype == dtype
        np.testing.assert_array_equal(decoded.fields[name], [p[name] for p in points])


# ---------------------------------------------------------------- byte order, organization, NaN

def test_big_endian_cloud():
    fields = [('x', 0, FLOAT32, 1), ('y', 4, FLOAT32, 1), ('z', 8, FLOAT32, 1),
              ('ring', 12, UINT16, 1), ('time', 16, FLOAT64, 1)]
    points = [dict(x=1.0, y=-2.0, z=3.5, ring=258, time=1.25e9),
              dict(x=-0.5, y=0.0, z=100.0, ring=1, time=-3.0)]
    msg = rclpy_cloud(fields, 24, pack_cloud(fields, 24, [points], is_bigendian=True), 1, 2,
                      is_bigendian=True)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.points, [[1, -2, 3.5], [-0.5, 0, 100]])
    assert decoded.fields['ring'].dtype.isnative
    np.testing.assert_array_equal(decoded.fields['ring'], [258, 1])
    np.testing.assert_array_equal(decoded.fields['time'], [1.25e9, -3.0])


def test_organized_cloud_with_row_padding():
    fields = as_tuples(NUSCENES_LAYOUT)
    height, width, point_step = 3, 4, 20
    row_step = width * point_step + 7
    rows = [[dict(x=float(r), y=float(c), z=float(10 * r + c), intensity=1.0, ring=float(r))
             for c in range(width)] for r in range(height)]
    msg = rclpy_cloud(fields, point_step, pack_cloud(fields, point_step, rows, row_step),
                      height, width, row_step)
    view = cloud_structured_view(msg)
    assert view.shape == (height, width)
    decoded = cloud_to_numpy(msg)
    assert (decoded.height, decoded.width) == (height, width)
    expected = [[r, c, 10 * r + c] for r in range(height) for c in range(width)]
    np.testing.assert_array_equal(decoded.points, expected)
    np.testing.assert_array_equal(decoded.fields['ring'], np.repeat([0, 1, 2], width))
    assert decoded.valid_mask.shape == (height * width,) and decoded.valid_mask.all()


def test_non_finite_points_dropped_with_mask():
    fields = as_tuples(NUSCENES_LAYOUT)
    nan, inf = float('nan'), float('inf')
    points = [dict(x=1.0, y=1.0, z=1.0, intensity=10.0, ring=0.0),
              dict(x=nan, y=1.0, z=1.0, intensity=11.0, ring=1.0),
              dict(x=2.0, y=inf, z=1.0, intensity=12.0, ring=2.0),
              dict(x=3.0, y=3.0, z=3.0, intensity=nan, ring=3.0),  # NaN elsewhere is kept
              dict(x=4.0, y=4.0, z=-inf, intensity=14.0, ring=4.0)]
    msg = rclpy_cloud(fields, 20, pack_cloud(fields, 20, [points]), 1, 5)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.valid_mask, [True, False, False, True, False])
    np.testing.assert_array_equal(decoded.points, [[1, 1, 1], [3, 3, 3]])
    np.testing.assert_array_equal(decoded.fields['ring'], [0.0, 3.0])
    np.testing.assert_array_equal(decoded.fields['intensity'], [10.0, nan])
    assert np.isfinite(decoded.points).all()


def test_float64_xyz_out_of_float32_range_is_dropped():
    # Finite as float64 but inf as float32: the output contract is finite float32 points.
    fields = [('x', 0, FLOAT64, 1), ('y', 8, FLOAT64, 1), ('z', 16, FLOAT64, 1)]
    points = [dict(x=1e300, y=0.0, z=0.0), dict(x=1.0, y=2.0, z=3.0)]
    msg = rclpy_cloud(fields, 24, pack_cloud(fields, 24, [points]), 1, 2)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.valid_mask, [False, True])
    np.testing.assert_array_equal(decoded.points, [[1, 2, 3]])


@pytest.mark.parametrize('height, width', [(1, 0), (0, 5), (0, 0), (4, 0)])
def test_zero_points_is_valid(height, width):
    fields = as_tuples(VELODYNE_LAYOUT)
    msg = rclpy_cloud(fields, 22, b'', height, width)
    decoded = cloud_to_numpy(msg)
    assert decoded.points.shape == (0, 3) and decoded.points.dtype == np.float32
    assert decoded.valid_mask.shape == (0,)
    assert decoded.fields['ring'].shape == (0,) and decoded.fields['ring'].dtype == np.uint16
    assert (decoded.height, decoded.width) == (height, width)


def test_field_selection_and_count_above_one():
    fields = [('x', 0, FLOAT32, 1), ('y', 4, FLOAT32, 1), ('z', 8, FLOAT32, 1),
              ('normal', 12, FLOAT32, 3), ('ring', 24, UINT16, 1)]
    points = [dict(x=1.0, y=2.0, z=3.0, normal=[0.0, 0.5, 1.0], ring=9),
              dict(x=4.0, y=5.0, z=6.0, normal=[1.0, 0.0, -1.0], ring=8)]
    msg = rclpy_cloud(fields, 28, pack_cloud(fields, 28, [points]), 1, 2)
    decoded = cloud_to_numpy(msg, fields=['normal'])
    assert list(decoded.fields) == ['normal']
    np.testing.assert_array_equal(decoded.fields['normal'], [[0, 0.5, 1], [1, 0, -1]])
    with pytest.raises(SensorDataError, match="no 'intensity' field"):
        cloud_to_numpy(msg, fields=['intensity'])


# ---------------------------------------------------------------- malformed input

def _good_nuscenes_cloud():
    fields = as_tuples(NUSCENES_LAYOUT)
    points = [dict(x=1.0, y=2.0, z=3.0, intensity=4.0, ring=5.0)] * 3
    return rclpy_cloud(fields, 20, pack_cloud(fields, 20, [points]), 1, 3)


def _set_fields(msg, fields):
    msg.fields = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields]


MALFORMED = {
    'missing x': (lambda m: _set_fields(m, [('y', 4, FLOAT32, 1), ('z', 8, FLOAT32, 1)]),
                  "no 'x' field"),
    'missing z': (lambda m: _set_fields(m, [('x', 0, FLOAT32, 1), ('y', 4, FLOAT32, 1)]),
                  "no 'z' field"),
    'field past point_step': (
        lambda m: _set_fields(m, as_tuples(NUSCENES_LAYOUT)[:4] + [('ring', 18, FLOAT32, 1)]),
        "'ring'.*ends at byte 22, beyond point_step 20"),
    'array field past point_step': (
        lambda m: _set_fields(m, as_tuples(NUSCENES_LAYOUT)[:3] + [('v', 12, FLOAT32, 3)]),
        "'v'.*beyond point_step 20"),
    'unknown datatype': (
        lambda m: _set_fields(m, as_tuples(NUSCENES_LAYOUT)[:4] + [('ring', 16, 9, 1)]),
        "'ring' has unknown datatype 9"),
    'duplicate name': (
        lambda m: _set_fields(m, as_tuples(NUSCENES_LAYOUT)[:4] + [('intensity', 16, 7, 1)]),
        "duplicate field name 'intensity'"),
    'zero count': (
        lambda m: _set_fields(m, as_tuples(NUSCENES_LAYOUT)[:4] + [('ring', 16, 7, 0)]),
        "'ring' has count 0"),
    'xyz array': (
        lambda m: _set_fields(m, [('x', 0, FLOAT32, 2), ('y', 8, FLOAT32, 1),
                                  ('z', 12, FLOAT32, 1)]),
        "'x' has count > 1"),
    'row_step too small': (lambda m: setattr(m, 'row_step', 59),
                           'row_step 59 < width \\* point_step = 3 \\* 20'),
    'data too short': (lambda m: setattr(m, 'data', m.data[:-1]),
                       'holds 59 bytes; expected .* = 60'),
    'data too long': (lambda m: m.data.extend([0] * 20), 'holds 80 bytes; expected .* = 60'),
    'point_step zero': (lambda m: setattr(m, 'point_step', 0), 'point_step 0 but 3 points'),
    'height without data': (lambda m: setattr(m, 'height', 2),
                            'holds 60 bytes; expected row_step \\* height = 60 \\* 2 = 120'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_cloud_raises_sensor_data_error(case):
    mutate, message = MALFORMED[case]
    msg = _good_nuscenes_cloud()
    cloud_to_numpy(msg)  # the unmutated message is fine
    mutate(msg)
    with pytest.raises(SensorDataError, match=message) as info:
        cloud_to_numpy(msg)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- zero-copy

def test_structured_view_shares_message_memory():
    msg = _good_nuscenes_cloud()
    view = cloud_structured_view(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, dtype=np.uint8))
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view['x'][0] = 0.0


def test_points_are_a_view_until_filtering_needs_a_copy():
    msg = _good_nuscenes_cloud()
    data = np.frombuffer(msg.data, dtype=np.uint8)
    decoded = cloud_to_numpy(msg)
    assert np.shares_memory(decoded.points, data)
    assert np.shares_memory(decoded.fields['intensity'], data)
    assert not decoded.points.flags.writeable
    msg.data[0:4] = array.array('B', struct.pack('<f', float('nan')))
    decoded = cloud_to_numpy(msg)
    assert decoded.points.shape == (2, 3)
    assert not np.shares_memory(decoded.points, np.frombuffer(msg.data, dtype=np.uint8))


def test_rosbags_message_reads_and_shares_memory():
    store = rosbags_typestore()
    cloud_cls = store.types['sensor_msgs/msg/PointCloud2']
    field_cls = store.types['sensor_msgs/msg/PointField']
    header_cls = store.types['std_msgs/msg/Header']
    time_cls = store.types['builtin_interfaces/msg/Time']
    fields = as_tuples(NUSCENES_LAYOUT)
    points = [dict(x=float(i), y=-float(i), z=0.5 * i, intensity=2.0 * i, ring=float(i % 32))
              for i in range(7)]
    original = cloud_cls(
        header=header_cls(stamp=time_cls(sec=1533151603, nanosec=547590000),
                          frame_id='LIDAR_TOP'),
        height=1, width=7, fields=[field_cls(name=n, offset=o, datatype=d, count=c)
                                   for n, o, d, c in fields],
        is_bigendian=False, point_step=20, row_step=140,
        data=np.frombuffer(pack_cloud(fields, 20, [points]), dtype=np.uint8), is_dense=True)
    msg = store.deserialize_cdr(store.serialize_cdr(original, cloud_cls.__msgtype__),
                                cloud_cls.__msgtype__)
    assert isinstance(msg.data, np.ndarray)
    decoded = cloud_to_numpy(msg)
    np.testing.assert_array_equal(decoded.points, [[i, -i, 0.5 * i] for i in range(7)])
    np.testing.assert_array_equal(decoded.fields['ring'], [i % 32 for i in range(7)])
    assert np.shares_memory(cloud_structured_view(msg), msg.data)


# ---------------------------------------------------------------- encode

def expected_rgb(labels, palette):
    """Packed colours computed with Python ints, one point at a time."""
    out = []
    for label in labels:
        r, g, b = palette[label] if 0 <= label < len(palette) else (128, 128, 128)
        out.append((int(r) << 16) | (int(g) << 8) | int(b))
    return np.array(out, dtype=np.uint32)


def random_predictions(num_points, seed=0):
    rng = np.random.default_rng(seed)
    points = (rng.normal(size=(num_points, 3)) * 30).astype(np.float32)
    labels = rng.integers(-1, len(CLASS_PALETTE) + 1, size=num_points)
    labels[labels == -1] = IGNORE_INDEX
    confidence = rng.random(num_points).astype(np.float32)
    intensity = (rng.random(num_points) * 255).astype(np.float32)
    return points, labels, confidence, intensity


def check_labeled(decoded, points, labels, confidence, intensity, palette):
    in_palette = (labels >= 0) & (labels < len(palette))
    np.testing.assert_array_equal(decoded.points, points)
    np.testing.assert_array_equal(decoded.fields['intensity'], intensity)
    np.testing.assert_array_equal(decoded.fields['confidence'], confidence)
    assert decoded.fields['label'].dtype == np.uint16
    np.testing.assert_array_equal(decoded.fields['label'],
                                  np.where(in_palette, labels, UNLABELED))
    assert decoded.fields['rgb'].dtype == np.float32
    np.testing.assert_array_equal(decoded.fields['rgb'].view(np.uint32),
                                  expected_rgb(labels, palette))


def test_labeled_round_trip_through_rclpy_serialization():
    points, labels, confidence, intensity = random_predictions(500)
    buffer = encode_labeled_cloud(points, labels, confidence, intensity=intensity)
    header = Header(frame_id='LIDAR_TOP')
    header.stamp.sec = 12
    msg = make_pointcloud2(PointCloud2, PointField, buffer, header)
    assert isinstance(msg, PointCloud2) and isinstance(msg.fields[0], PointField)
    assert (msg.height, msg.width, msg.point_step) == (1, 500, LABELED_LAYOUT.point_step)
    assert msg.row_step == 500 * LABELED_LAYOUT.point_step and not msg.is_bigendian
    assert [f.name for f in msg.fields] == ['x', 'y', 'z', 'intensity', 'rgb', 'confidence',
                                            'label']
    assert {f.name: f.datatype for f in msg.fields}['rgb'] == PointField.FLOAT32
    assert {f.name: f.datatype for f in msg.fields}['label'] == PointField.UINT16
    received = deserialize_message(serialize_message(msg), PointCloud2)
    assert received.header.frame_id == 'LIDAR_TOP' and received.header.stamp.sec == 12
    check_labeled(cloud_to_numpy(received), points, labels, confidence, intensity,
                  CLASS_PALETTE)


def test_labeled_round_trip_through_rosbags():
    store = rosbags_typestore()
    cloud_cls = store.types['sensor_msgs/msg/PointCloud2']
    header = store.types['std_msgs/msg/Header'](
        stamp=store.types['builtin_interfaces/msg/Time'](sec=3, nanosec=4), frame_id='lidar')
    points, labels, confidence, intensity = random_predictions(64, seed=1)
    buffer = encode_labeled_cloud(points, labels, confidence, intensity=intensity)
    msg = make_pointcloud2(cloud_cls, store.types['sensor_msgs/msg/PointField'], buffer,
                           header)
    raw = store.serialize_cdr(msg, cloud_cls.__msgtype__)
    received = store.deserialize_cdr(raw, cloud_cls.__msgtype__)
    check_labeled(cloud_to_numpy(received), points, labels, confidence, intensity,
                  CLASS_PALETTE)


def test_labels_outside_palette_are_grey_and_unlabeled():
    points = np.zeros((4, 3), np.float32)
    labels = np.array([IGNORE_INDEX, 0, len(CLASS_PALETTE), 70000])
    buffer = encode_labeled_cloud(points, labels, np.ones(4, np.float32))
    decoded = cloud_to_numpy(buffer)  # the buffer itself is PointCloud2-like
    np.testing.assert_array_equal(decoded.fields['label'], [UNLABELED, 0, UNLABELED, UNLABELED])
    grey = 0x808080
    r, g, b = (int(v) for v in CLASS_PALETTE[0])
    np.testing.assert_array_equal(decoded.fields['rgb'].view(np.uint32),
                                  [grey, (r << 16) | (g << 8) | b, grey, grey])
    np.testing.assert_array_equal(decoded.fields['intensity'], 0.0)  # intensity=None


def test_encode_empty_cloud():
    buffer = encode_labeled_cloud(np.zeros((0, 3), np.float32), np.zeros(0, int),
                                  np.zeros(0, np.float32))
    assert buffer.width == 0 and len(buffer.data) == 0
    msg = make_pointcloud2(PointCloud2, PointField, buffer, Header())
    assert cloud_to_numpy(msg).points.shape == (0, 3)


@pytest.mark.parametrize('kwargs, message', [
    (dict(points_lidar=np.zeros((3, 2))), 'points_lidar must be'),
    (dict(labels=np.zeros(2, int)), 'labels must be'),
    (dict(labels=np.zeros(3)), 'labels must be integers'),
    (dict(confidence=np.zeros((3, 1))), 'confidence must be'),
    (dict(intensity=np.zeros(4)), 'intensity must be'),
    (dict(palette=np.zeros((3, 4), np.uint8)), 'palette must be'),
])
def test_encode_rejects_bad_shapes(kwargs, message):
    args = dict(points_lidar=np.zeros((3, 3), np.float32), labels=np.zeros(3, int),
                confidence=np.zeros(3, np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        encode_labeled_cloud(**args)


@settings(max_examples=60, deadline=None)
@given(num_points=st.integers(0, 40), num_classes=st.integers(1, 12),
       label_type=st.sampled_from([np.int16, np.int32, np.int64, np.uint8]),
       seed=st.integers(0, 2**32 - 1))
def test_encode_property(num_points, num_classes, label_type, seed):
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
    info = np.iinfo(label_type)
    labels = rng.integers(max(info.min, -300), min(info.max, 300), size=num_points,
                          endpoint=True).astype(label_type)
    points = rng.normal(size=(num_points, 3)).astype(np.float32)
    confidence = rng.random(num_points).astype(np.float32)
    intensity = rng.normal(size=num_points).astype(np.float32)
    buffer = encode_labeled_cloud(points, labels, confidence, intensity=intensity,
                                  palette=palette)
    check_labeled(cloud_to_numpy(buffer), points, labels.astype(np.int64), confidence,
                  intensity, palette)


# ---------------------------------------------------------------- random layouts

XYZ = ('x', 'y', 'z')
EXTRA_NAMES = ['intensity', 'ring', 'time', 't', 'reflectivity', 'ambient', 'range', 'rgb']


def random_value(rng, datatype, may_be_non_finite):
    if datatype in (FLOAT32, FLOAT64):
        if may_be_non_finite and rng.random() < 0.15:
            return float(rng.choice([np.nan, np.inf, -np.inf]))
        value = rng.normal() * 100
        return float(np.float32(value)) if datatype == FLOAT32 else value
    info = np.iinfo(NUMPY_TYPES[datatype])
    return int(rng.integers(info.min, info.max, endpoint=True))


@st.composite
def cloud_layouts(draw):
    """(fields, point_step, height, width, row_step, is_bigendian) of any valid cloud."""
    xyz_type = draw(st.sampled_from([FLOAT32, FLOAT32, FLOAT64]))
    extras = draw(st.lists(st.sampled_from(EXTRA_NAMES), unique=True, max_size=5))
    specs = [(name, draw(st.integers(1, 8)), draw(st.sampled_from([1, 1, 2, 3])))
             for name in extras]
    if draw(st.booleans()):  # x, y, z packed together (the fast path when float32)
        specs.insert(draw(st.integers(0, len(specs))), ('xyz', xyz_type, 1))
    else:
        for name in XYZ:
            specs.insert(draw(st.integers(0, len(specs))), (name, xyz_type, 1))
    fields, offset = [], 0
    for name, datatype, count in specs:
        offset += draw(st.integers(0, 5))  # padding before the field, any alignment
        for part in (name if name == 'xyz' else [name]):
            fields.append((part, offset, datatype, count))
            offset += SIZES[datatype] * count
    point_step = offset + draw(st.integers(0, 9))
    height, width = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    row_step = width * point_step + draw(st.integers(0, 11))
    return fields, point_step, height, width, row_step, draw(st.booleans())


@settings(max_examples=100, deadline=None)
@given(layout=cloud_layouts(), seed=st.integers(0, 2**32 - 1))
def test_decode_any_layout(layout, seed):
    fields, point_step, height, width, row_step, is_bigendian = layout
    rng = np.random.default_rng(seed)
    rows = [[{name: (random_value(rng, datatype, name in XYZ) if count == 1 else
                     [random_value(rng, datatype, False) for _ in range(count)])
              for name, _, datatype, count in fields}
             for _ in range(width)] for _ in range(height)]
    data = pack_cloud(fields, point_step, rows, row_step, is_bigendian)
    msg = rclpy_cloud(fields, point_step, data, height, width, row_step, is_bigendian)

    decoded = cloud_to_numpy(msg)

    flat = [point for row in rows for point in row]
    valid = [all(math.isfinite(np.float32(p[axis])) for axis in XYZ) for p in flat]
    np.testing.assert_array_equal(decoded.valid_mask, np.array(valid, dtype=bool))
    kept = [p for p, ok in zip(flat, valid) if ok]
    expected_points = np.array([[p['x'], p['y'], p['z']] for p in kept],
                               dtype=np.float32).reshape(-1, 3)
    assert decoded.points.dtype == np.float32
    np.testing.assert_array_equal(decoded.points, expected_points)
    assert cloud_structured_view(msg).shape == (height, width)
    extra_fields = [f for f in fields if f[0] not in XYZ]
    assert sorted(decoded.fields) == sorted(f[0] for f in extra_fields)
    for name, _, datatype, count in extra_fields:
        values = decoded.fields[name]
        assert values.dtype == NUMPY_TYPES[datatype] and values.dtype.isnative
        expected = np.array([p[name] for p in kept], dtype=NUMPY_TYPES[datatype])
        expected = expected.reshape((len(kept),) + ((count,) if count > 1 else ()))
        np.testing.assert_array_equal(values, expected)
