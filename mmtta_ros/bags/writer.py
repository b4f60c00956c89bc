"""
Write rosbag2 bags with `rosbags` (no ROS 2 install): synthetic demo drives and labeled clouds.

A demo bag looks like a nuScenes-converted bag (topics in `mmtta_ros.bags.topics`): header
stamps are the sensor times of the generator, log (receive) times add a small seeded latency,
and the ground-truth labels ride on their own topic so a replay can be scored.
"""

from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
import heapq
import io
import itertools
import json
from pathlib import Path
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image as PILImage
from rosbags.rosbag2 import StoragePlugin, Writer

from mmtta_ros.bags.topics import (
    bag_typestore, BagTopics, BASE_FRAME, CAMERA_FRAME, CAMERA_INFO_TYPE, camera_topics,
    CLOUD_TYPE,
    IMAGE_TYPE, LABELED_POINTS_TOPIC, LABELS_LAYOUT, labels_to_wire, LIDAR_FRAME,
    matrix_to_quaternion, ns_to_sec_nanosec, ODOM_FRAME, RESULT_QOS, SENSOR_QOS, TF_QOS,
    TF_STATIC_QOS, TF_TYPE)
from mmtta_ros.sensors.image import resize_image
from mmtta_ros.sensors.pointcloud import (
    CloudLayout, LabeledCloudBuffer, make_pointcloud2, NUSCENES_LAYOUT)
from mmtta_ros.synth import (
    CameraImage, generate_streams, GENERATOR_VERSION, SensorSample, SequenceConfig,
    SyntheticSequence, T_EGO_FROM_CAM, T_EGO_FROM_LIDAR)
from mmtta_ros.synth.sequence import ego_from_camera, LIDAR_PERIOD_NS, stream_events

PathLike = Union[str, Path]
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
LIDAR_RATE_HZ = 1e9 / LIDAR_PERIOD_NS


@dataclass
class DemoBagSummary:
    """
    What write_demo_bag wrote.

    message_counts: messages per topic
    duration_s:     bag time from the first to the last message (log times), seconds
    wall_seconds:   time it took to generate and write, seconds
    size_bytes:     total size of the bag directory's files
    """

    path: Path
    storage: str
    num_sweeps: int
    num_images: int
    message_counts: Dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    wall_seconds: float = 0.0
    size_bytes: int = 0


def _storage_plugin(storage: str) -> StoragePlugin:
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return STORAGES[storage]


def _open_writer(path: PathLike, storage: str) -> Writer:
    path = Path(path)
    plugin = _storage_plugin(storage)
    if path.exists():
        raise FileExistsError(f'{path} exists: rosbag2 bags are never overwritten; '
                              'remove it or choose another path')
    return Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin)


def _header(stamp_ns: int, frame_id: str):
    types = bag_typestore().types
    sec, nanosec = ns_to_sec_nanosec(stamp_ns)
    return types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id=frame_id)


def cloud_message(layout: CloudLayout, records: np.ndarray, stamp_ns: int, frame_id: str):
    """Build a rosbags PointCloud2 of <layout.dtype(): N> records (unorganized, little-endian)."""
    types = bag_typestore().types
    buffer = LabeledCloudBuffer(data=records.view(np.uint8), width=int(records.shape[0]),
                                fields=layout.fields, point_step=layout.point_step)
    return make_pointcloud2(types[CLOUD_TYPE], types['sensor_msgs/msg/PointField'], buffer,
                            _header(stamp_ns, frame_id))


def lidar_cloud_message(points_lidar: np.ndarray, intensity: np.ndarray, ring: np.ndarray,
                        stamp_ns: int, frame_id: str = LIDAR_FRAME):
    """
    Build a nuScenes-converter style /LIDAR_TOP PointCloud2 (x, y, z, intensity, ring).

    points_lidar: <np.float32: N, 3> metres; intensity: <N> 0..255; ring: <int: N> beam.
    """
    records = np.empty(points_lidar.shape[0], dtype=NUSCENES_LAYOUT.dtype())
    records['x'], records['y'], records['z'] = points_lidar.T
    records['intensity'] = intensity
    records['ring'] = ring
    return cloud_message(NUSCENES_LAYOUT, records, stamp_ns, frame_id)


def labels_cloud_message(labels: np.ndarray, stamp_ns: int, frame_id: str = LIDAR_FRAME):
    """Build the labels-topic PointCloud2 of class indices <int: N> (NO_LABEL for others)."""
    return cloud_message(LABELS_LAYOUT, labels_to_wire(labels).view(LABELS_LAYOUT.dtype()),
                         stamp_ns, frame_id)


def compressed_image_message(image_rgb: np.ndarray, stamp_ns: int, frame_id: str = CAMERA_FRAME,
                             quality: int = 90):
    """Encode <np.uint8: H, W, 3> RGB as a jpeg sensor_msgs/CompressedImage."""
    encoded = io.BytesIO()
    PILImage.fromarray(image_rgb).save(encoded, format='JPEG', quality=int(quality))
    return bag_typestore().types[IMAGE_TYPE](
        header=_header(stamp_ns, frame_id), format='jpeg',
        data=np.frombuffer(encoded.getbuffer(), dtype=np.uint8).copy())


def camera_info_message(K: np.ndarray, image_size: Tuple[int, int], stamp_ns: int,
                        frame_id: str = CAMERA_FRAME):
    """Build a rectified (plumb_bob, zero distortion) CameraInfo for K <3, 3>, (width, height)."""
    types = bag_typestore().types
    K = np.asarray(K, dtype=np.float64)
    P = np.zeros((3, 4))
    P[:, :3] = K
    return types[CAMERA_INFO_TYPE](
        header=_header(stamp_ns, frame_id), height=int(image_size[1]), width=int(image_size[0]),
        distortion_model='plumb_bob', d=np.zeros(5), k=K.reshape(-1).copy(),
        r=np.eye(3).reshape(-1), p=P.reshape(-1), binning_x=0, binning_y=0,
        roi=types['sensor_msgs/msg/RegionOfInterest'](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def tf_message(transforms: Iterable[Tuple[str, str, np.ndarray]], stamp_ns: int):
    """Build a TFMessage of (parent, child, T_parent_from_child <4, 4>) triples."""
    types = bag_typestore().types
    stamped = []
    for parent, child, T in transforms:
        x, y, z = (float(v) for v in T[:3, 3])
        qx, qy, qz, qw = (float(v) for v in matrix_to_quaternion(T[:3, :3]))
        stamped.append(types['geometry_msgs/msg/TransformStamped'](
            header=_header(stamp_ns, parent), child_frame_id=child,
            transform=types['geometry_msgs/msg/Transform'](
                translation=types['geometry_msgs/msg/Vector3'](x=x, y=y, z=z),
                rotation=types['geometry_msgs/msg/Quaternion'](x=qx, y=qy, z=qz, w=qw))))
    return types[TF_TYPE](transforms=stamped)


def _num_sweeps(duration_s: Optional[float], num_sweeps: Optional[int]) -> int:
    if (duration_s is None) == (num_sweeps is None):
        raise ValueError('give exactly one of duration_s and num_sweeps')
    if num_sweeps is None:
        num_sweeps = int(round(float(duration_s) * LIDAR_RATE_HZ))
    if num_sweeps < 1:
        raise ValueError(f'a bag needs at least one sweep, got {num_sweeps}')
    return int(num_sweeps)


_WORKER_SEQUENCE: Optional[SyntheticSequence] = None


def _start_worker(config: SequenceConfig) -> None:
    global _WORKER_SEQUENCE
    _WORKER_SEQUENCE = SyntheticSequence(config)


def _render(is_camera: bool, index: int, camera: int) -> SensorSample:
    if is_camera:
        return _WORKER_SEQUENCE.camera_image(index, camera)
    return _WORKER_SEQUENCE.lidar_sweep(index)


def sensor_samples(config: SequenceConfig, workers: int = 1) -> Iterator[SensorSample]:
    """
    Yield the samples of generate_streams(config) in order, rendered by `workers` processes.

    Every sample draws its noise from its own index-keyed stream, so rendering them out of
    order in other processes gives identical samples.
    """
    if workers <= 1:
        yield from generate_streams(config)
        return
    events = stream_events(SyntheticSequence(config))
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(config,)) as pool:
        # A short look-ahead keeps every worker busy without holding the whole drive in memory.
        pending = deque()
        for _, is_camera, index, camera in events:
            pending.append(pool.submit(_render, is_camera, index, camera))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_demo_bag(path: PathLike, *, domain: str = 'night', seed: int = 0,
                   duration_s: Optional[float] = None, num_sweeps: Optional[int] = None,
                   image_size: Tuple[int, int] = (800, 450),
                   render_size: Optional[Tuple[int, int]] = (400, 225),
                   storage: str = 'mcap', jpeg_quality: int = 90,
                   lidar_azimuth_steps: Optional[int] = None,
                   latency_ms: Tuple[float, float] = (1.0, 6.0),
                   topics: BagTopics = BagTopics(), workers: int = 1, with_tf: bool = False,
                   extra_cameras: Tuple[str, ...] = (),
                   progress: Optional[Callable[[int, int], None]] = None) -> DemoBagSummary:
    """
    Write a synthetic drive as a rosbag2 bag (mcap or sqlite3) and return what was written.

    duration_s or num_sweeps: length (LiDAR at 20 Hz, camera at 12 Hz); 20 s if neither.
    image_size: (width, height) of the written jpegs; camera_info's K is for this size.
    render_size: size the generator renders at, upscaled to image_size (rendering costs
    ~5 us a pixel here, 2 s an 800x450 image); None renders at image_size.
    latency_ms: (min, max) of the uniform, seeded delay from a header stamp to its log time.
    workers: processes that render (the bag is the same for any number).
    with_tf: also write the ego pose, odom -> base_link on /tf, at every sensor stamp (as
    the nuScenes converter does with the ego pose of each sample_data).
    extra_cameras: cameras besides CAM_FRONT (`synth.sequence.CAMERA_MOUNTS` names), each
    on `camera_topics(name)` with frame id `name` and its mount on /tf_static.
    progress: called as progress(sweeps_written, num_sweeps).
    """
    started = time.perf_counter()
    if duration_s is None and num_sweeps is None:
        duration_s = 20.0
    num_sweeps = _num_sweeps(duration_s, num_sweeps)
    image_size = (int(image_size[0]), int(image_size[1]))
    render_size = image_size if render_size is None else (int(render_size[0]),
                                                          int(render_size[1]))
    low_ms, high_ms = (float(v) for v in latency_ms)
    if not 0.0 <= low_ms <= high_ms:
        raise ValueError(f'latency_ms must be (min, max) with 0 <= min <= max, got {latency_ms}')
    config = SequenceConfig(domain=domain, seed=int(seed), num_frames=num_sweeps,
                            image_size=render_size, lidar_azimuth_steps=lidar_azimuth_steps,
                            extra_cameras=tuple(extra_cameras))
    # Camera k: (image topic, camera_info topic, frame id); 0 is the primary.
    cameras = [(topics.image, topics.camera_info, CAMERA_FRAME)] + [
        (*camera_topics(name), name) for name in config.extra_cameras]
    samples = sensor_samples(config, workers)
    # The trajectory alone (no rendering): the ego poses for /tf.
    trajectory = SyntheticSequence(config) if with_tf else None
    rng = np.random.default_rng([int(seed), 0xBA6])  # latency only: the scene has its own keys
    typestore = bag_typestore()
    summary = DemoBagSummary(path=Path(path), storage=storage, num_sweeps=0, num_images=0)

    with _open_writer(path, storage) as writer:
        description = dict(
            generator_version=GENERATOR_VERSION, domain=domain, seed=int(seed),
            num_sweeps=num_sweeps, image_size=list(image_size), render_size=list(render_size),
            lidar_azimuth_steps=lidar_azimuth_steps, labels_topic=topics.labels)
        if config.extra_cameras:  # absent for one camera: that bag stays byte for byte
            description['extra_cameras'] = list(config.extra_cameras)
        writer.set_custom_data('mmtta_ros.demo_bag', json.dumps(description))
        connections = {
            topics.tf_static: writer.add_connection(
                topics.tf_static, TF_TYPE, typestore=typestore,
                offered_qos_profiles=[TF_STATIC_QOS]),
            topics.camera_info: writer.add_connection(
                topics.camera_info, CAMERA_INFO_TYPE, typestore=typestore,
                offered_qos_profiles=[SENSOR_QOS]),
            topics.image: writer.add_connection(
                topics.image, IMAGE_TYPE, typestore=typestore, offered_qos_profiles=[SENSOR_QOS]),
            topics.lidar: writer.add_connection(
                topics.lidar, CLOUD_TYPE, typestore=typestore, offered_qos_profiles=[SENSOR_QOS]),
            topics.labels: writer.add_connection(
                topics.labels, CLOUD_TYPE, typestore=typestore,
                offered_qos_profiles=[SENSOR_QOS]),
        }
        for image_topic, info_topic, _ in cameras[1:]:
            for topic, msgtype in ((info_topic, CAMERA_INFO_TYPE), (image_topic, IMAGE_TYPE)):
                connections[topic] = writer.add_connection(
                    topic, msgtype, typestore=typestore, offered_qos_profiles=[SENSOR_QOS])
        if with_tf:
            connections[topics.tf] = writer.add_connection(
                topics.tf, TF_TYPE, typestore=typestore, offered_qos_profiles=[TF_QOS])
        # Messages wait here until no later sample can get an earlier log time, so the bag
        # is in log-time order, as a recorder writes it. Entries: (log time, order, topic, msg).
        queue = []
        order = itertools.count()

        def push(log_ns: int, topic: str, msg) -> None:
            heapq.heappush(queue, (log_ns, next(order), topic, msg))

        def drain(until_ns: float) -> None:
            while queue and queue[0][0] <= until_ns:
                log_ns, _, topic, msg = heapq.heappop(queue)
                writer.write(connections[topic], log_ns,
                             typestore.serialize_cdr(msg, connections[topic].msgtype))

        first = True
        last_log_ns = {}  # per sensor: the LiDAR (None) or camera k
        for sample in samples:
            stamp = sample.stamp_ns
            if first:
                # Static transforms are latched before any sensor data, at the first stamp.
                push(stamp, topics.tf_static, tf_message(
                    [(BASE_FRAME, LIDAR_FRAME, T_EGO_FROM_LIDAR),
                     (BASE_FRAME, CAMERA_FRAME, T_EGO_FROM_CAM)]
                    + [(BASE_FRAME, name, ego_from_camera(name))
                       for name in config.extra_cameras], stamp))
                first = False
            is_camera = isinstance(sample, CameraImage)
            sensor = sample.camera if is_camera else None
            # A driver's messages leave through one queue: jitter never reorders a topic.
            log_ns = max(stamp + int(rng.uniform(low_ms, high_ms) * 1e6),
                         last_log_ns.get(sensor, 0))
            last_log_ns[sensor] = log_ns
            if with_tf:
                # Odometry at the sensor's stamp, logged with the sensor's message.
                push(log_ns, topics.tf, tf_message(
                    [(ODOM_FRAME, BASE_FRAME, trajectory.ego_pose(stamp))], stamp))
            if is_camera:
                image, K = resize_image(sample.image, sample.K, image_size)
                image_topic, info_topic, frame_id = cameras[sample.camera]
                # camera_info first: a reader that pairs by stamp has K when the image comes.
                push(log_ns, info_topic, camera_info_message(K, image_size, stamp, frame_id))
                push(log_ns, image_topic, compressed_image_message(
                    image, stamp, frame_id, quality=jpeg_quality))
                summary.num_images += 1
            else:
                push(log_ns, topics.lidar, lidar_cloud_message(
                    sample.points_lidar, sample.intensity, sample.ring, stamp))
                push(log_ns, topics.labels, labels_cloud_message(sample.labels, stamp))
                summary.num_sweeps += 1
                if progress is not None:
                    progress(summary.num_sweeps, num_sweeps)
            # Samples come in stamp order and every later one is logged at least low_ms
            # after its stamp.
            drain(stamp + low_ms * 1e6)
        drain(float('inf'))
        summary.message_counts = {topic: writer.counts[conn.id]
                                  for topic, conn in connections.items()}
        summary.duration_s = (writer.max_timestamp - writer.min_timestamp) * 1e-9
    summary.size_bytes = sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())
    summary.wall_seconds = time.perf_counter() - started
    return summary


def write_labeled_clouds(path: PathLike, clouds: Iterable[Tuple[int, str, LabeledCloudBuffer]],
                         *, topic: str = LABELED_POINTS_TOPIC, storage: str = 'mcap') -> int:
    """
    Write (stamp_ns, frame_id, LabeledCloudBuffer) triples as PointCloud2s; returns the count.

    Each message's log time is its stamp; the topic is offered reliable (RViz's default).
    """
    typestore = bag_typestore()
    types = typestore.types
    count = 0
    with _open_writer(path, storage) as writer:
        connection = writer.add_connection(topic, CLOUD_TYPE, typestore=typestore,
                                           offered_qos_profiles=[RESULT_QOS])
        for stamp_ns, frame_id, buffer in clouds:
            msg = make_pointcloud2(types[CLOUD_TYPE], types['sensor_msgs/msg/PointField'],
                                   buffer, _header(stamp_ns, frame_id))
            writer.write(connection, int(stamp_ns), typestore.serialize_cdr(msg, CLOUD_TYPE))
            count += 1
    return count
