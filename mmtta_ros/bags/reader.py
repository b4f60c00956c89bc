"""
Read rosbag2 bags (mcap or sqlite3) with `rosbags` into Frames, streaming.

Images and sweeps are paired by the node's own pairing policy (`core.pairing`, built from
the same `SyncParams`), and each pair becomes a frame through the node's own decoding
(`core.decode.frame_from_messages`), so a bag scored offline gives the frames the node
would have processed. The reader keeps only the messages pairing still needs, so a bag of
any length reads in bounded memory (but for the ego poses, 8 numbers per /tf sample).

Ego poses: where /tf carries odom -> base_link, a frame's T_odom_from_lidar is that pose
interpolated at the sweep's stamp (the nuScenes devkit takes the ego pose at the
sample_data stamp; the converter writes one at every such stamp, so there it is exact)
composed with base_link -> LiDAR from /tf_static. Without them it is None. Likewise
T_odom_from_cam: that pose interpolated at the image's stamp, composed with base_link ->
camera (from /tf_static; with a T_cam_from_lidar override, base_link -> LiDAR and the
override, so the compensated transform agrees with the override while the car stands).

More cameras (`BagTopics.extra_cameras`): every camera's image joins the same pairing (one
image per camera and the sweep make a set), each decoded with its own camera_info, mount
and pose into the frame's extra CameraViews; the T_cam_from_lidar override is the
primary camera's only.
"""

from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from rosbags.rosbag2 import Reader

from mmtta_ros.bags.topics import (
    BagTopics, bag_typestore, BASE_FRAME, CAMERA_FRAME, camera_topics, CLOUD_TYPE,
    LABELED_POINTS_TOPIC,
    LIDAR_FRAME, ODOM_FRAME, RAW_IMAGE_TYPE, stamp_to_ns)
from mmtta_ros.bags.transforms import (
    add_poses, add_transforms, lookup_transform, PoseTrack, TransformTree)
from mmtta_ros.core.builder import build_synchronizer
from mmtta_ros.core.decode import camera_view_from_messages, frame_from_messages
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.core.pairing import MatchedSet
from mmtta_ros.core.params import SyncParams
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, DecodedCloud
from mmtta_ros.sensors.projection import check_transform, rigid_inverse

PathLike = Union[str, Path]
# Inputs of the pairing, as the node numbers them.
IMAGE, POINTS = 0, 1
LOGGER = logging.getLogger(__name__)


@dataclass
class ReaderStats:
    """
    Counters of one pass over a bag.

    sweeps:                 LiDAR sweeps read
    frames:                 Frames produced
    images:                 camera images read
    unpaired_sweeps:        sweeps the pairing left without an image (none within the
                            slop, or the nearer image went to a closer sweep)
    skipped_no_camera_info: pairs whose image came before any camera_info
    sweeps_without_labels:  sweeps of a bag with a labels topic that had no labels message
    rejected_messages:      messages that could not be decoded (SensorDataError)
    frames_without_pose:    frames without T_odom_from_lidar (no odom -> base_link on /tf
                            around the sweep's stamp, or no base_link -> LiDAR mount)
    frames_without_camera_pose: frames without T_odom_from_cam (no odom -> base_link
                            around the image's stamp, or no base_link -> camera mount);
                            these are projected with the static transform
    """

    sweeps: int = 0
    frames: int = 0
    images: int = 0
    unpaired_sweeps: int = 0
    skipped_no_camera_info: int = 0
    sweeps_without_labels: int = 0
    rejected_messages: int = 0
    frames_without_pose: int = 0
    frames_without_camera_pose: int = 0


def _bag_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


class BagFrameReader:
    """
    Frames from a rosbag2 bag with a camera, its camera_info, a LiDAR and optional labels.

    Iterate it (each pass re-reads the bag); `stats` holds the counters of the last pass.
    """

    def __init__(self, path: PathLike, *, topics: BagTopics = BagTopics(),
                 image_size: Optional[Tuple[int, int]] = (400, 225),
                 sync: SyncParams = SyncParams(),
                 T_cam_from_lidar: Optional[np.ndarray] = None, window_s: float = 0.5,
                 odom_frame: str = ODOM_FRAME, base_frame: str = BASE_FRAME):
        """
        Open nothing yet; check the arguments.

        image_size: (width, height) of the Frames' images (K scaled), None to keep the
        bag's size; sync: the pairing parameters (the node's); T_cam_from_lidar: <4, 4>
        override of the transform from /tf_static (or /tf); window_s: how far apart in
        stamp camera_info and labels may be logged from their image and sweep, seconds;
        odom_frame, base_frame: the ego pose on /tf (odom_frame -> base_frame).
        """
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f'no bag at {self.path}')
        self.topics = topics
        self.image_size = None if image_size is None else (int(image_size[0]),
                                                           int(image_size[1]))
        if window_s < 0:
            raise ValueError(f'window_s must be >= 0, got {window_s}')
        self.sync = sync
        self.window_ns = int(round(window_s * 1e9))
        self.T_cam_from_lidar = (None if T_cam_from_lidar is None
                                 else check_transform(T_cam_from_lidar))
        self.sequence = _bag_name(self.path)
        self.odom_frame, self.base_frame = str(odom_frame), str(base_frame)
        self.stats = ReaderStats()
        self.has_labels = False
        self._raw_image = False
        self._transforms: Dict[Tuple[str, str], np.ndarray] = {}
        self._odometry = PoseTrack()
        self._base_from_sensor: Dict[str, Optional[np.ndarray]] = {}

    def __iter__(self) -> Iterator[Frame]:
        """Frames in sweep order (see `frames`)."""
        return self.frames()

    def frames(self) -> Iterator[Frame]:
        """Read the bag once and yield a Frame per sweep that has an image within the slop."""
        self.stats = ReaderStats()
        typestore = bag_typestore()
        with Reader(self.path) as bag:
            by_topic = {}
            for connection in bag.connections:
                by_topic.setdefault(connection.topic, []).append(connection)
            for role in ('image', 'camera_info', 'lidar'):
                topic = getattr(self.topics, role)
                if topic not in by_topic:
                    raise SensorDataError(
                        f'bag {self.path} has no {role} topic {topic!r} (topics: '
                        f"{', '.join(sorted(by_topic))}); pass topics=BagTopics({role}=...)")
            for name in self.topics.extra_cameras:
                missing = [t for t in camera_topics(name) if t not in by_topic]
                if missing:
                    raise SensorDataError(
                        f"bag {self.path} has no {' or '.join(missing)} of camera {name} "
                        f"(topics: {', '.join(sorted(by_topic))})")
            self.has_labels = self.topics.labels in by_topic
            # The converters write compressed images, a raw camera driver sensor_msgs/Image.
            self._raw_image = by_topic[self.topics.image][0].msgtype == RAW_IMAGE_TYPE
            tree, self._odometry = read_transforms(bag, self.topics, self.odom_frame,
                                                   self.base_frame)
            self._transforms, self._base_from_sensor = {}, {}

            # Connection id -> (role, camera): camera 0 is the primary, k extra_cameras[k - 1].
            roles: Dict[int, Tuple[str, int]] = {}
            for role in ('image', 'camera_info', 'lidar', 'labels'):
                for connection in by_topic.get(getattr(self.topics, role), []):
                    roles[connection.id] = (role, 0)
            for camera, name in enumerate(self.topics.extra_cameras, start=1):
                for role, topic in zip(('image', 'camera_info'), camera_topics(name)):
                    for connection in by_topic[topic]:
                        roles[connection.id] = (role, camera)
            pairing = build_synchronizer(self.sync, 1 + len(self.topics.extra_cameras))
            infos = [_RecentByStamp(self.window_ns)
                     for _ in range(1 + len(self.topics.extra_cameras))]
            labels = _RecentByStamp(self.window_ns)
            ready: List[MatchedSet] = []
            connections = [c for c in bag.connections if c.id in roles]
            for connection, _, raw in bag.messages(connections=connections):
                role, camera = roles[connection.id]
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                stamp = stamp_to_ns(msg.header.stamp)
                if role in ('camera_info', 'labels'):
                    (infos[camera] if role == 'camera_info' else labels).add(stamp, msg)
                    continue
                if role == 'lidar':
                    self.stats.sweeps += 1
                else:
                    self.stats.images += 1
                index = POINTS if role == 'lidar' else (IMAGE if camera == 0 else 1 + camera)
                # A time jump (a bag with a loop in it) only clears the queues, as live.
                events = [e for e in pairing.add(index, stamp, msg)
                          if isinstance(e, MatchedSet)]
                # Pairs are built one message late: the camera_info or labels of the same
                # instant may be logged just after the message that made a pair final.
                yield from self._build(ready, infos, labels, tree)
                ready = events
            yield from self._build(ready + pairing.flush(), infos, labels, tree)
            self.stats.unpaired_sweeps = self.stats.sweeps - pairing.stats.matched[POINTS]

    def _build(self, pairs: List[MatchedSet], infos: List['_RecentByStamp'],
               labels: '_RecentByStamp', tree) -> Iterator[Frame]:
        for pair in pairs:
            image_msg, cloud_msg = pair.messages[IMAGE], pair.messages[POINTS]
            image_msgs = [image_msg] + list(pair.messages[POINTS + 1:])
            info_msgs = [box.get(stamp_to_ns(msg.header.stamp), nearest_fallback=True)
                         for box, msg in zip(infos, image_msgs)]
            image_stamp = stamp_to_ns(image_msg.header.stamp)
            info_msg = info_msgs[0]
            if any(info is None for info in info_msgs):
                self.stats.skipped_no_camera_info += 1
                continue
            lidar_stamp = stamp_to_ns(cloud_msg.header.stamp)
            labels_msg = labels.get(lidar_stamp) if self.has_labels else None
            if self.has_labels and labels_msg is None:
                self.stats.sweeps_without_labels += 1
            # Outside the try: a missing transform is the whole bag's problem, not a message's.
            T = self._camera_from_lidar(str(image_msg.header.frame_id),
                                        str(cloud_msg.header.frame_id), tree)
            lidar_frame = str(cloud_msg.header.frame_id)
            T_odom_from_lidar = self._odom_from_sensor(lidar_stamp, lidar_frame, tree)
            T_odom_from_cam = self._odom_from_camera(
                image_stamp, str(image_msg.header.frame_id), lidar_frame, tree)
            try:
                views = [camera_view_from_messages(
                    name, msg, info, image_size=self.image_size, raw_image=self._raw_image,
                    T_cam_from_lidar=self._camera_from_lidar(
                        str(msg.header.frame_id), lidar_frame, tree, override=False),
                    T_odom_from_cam=self._odom_from_sensor(
                        stamp_to_ns(msg.header.stamp), str(msg.header.frame_id), tree))
                    for name, msg, info in zip(self.topics.extra_cameras, image_msgs[1:],
                                               info_msgs[1:])]
                frame = frame_from_messages(
                    image_msg, info_msg, cloud_msg, T_cam_from_lidar=T,
                    image_size=self.image_size, raw_image=self._raw_image,
                    labels_msg=labels_msg, sequence=self.sequence, index=self.stats.frames,
                    T_odom_from_lidar=T_odom_from_lidar, T_odom_from_cam=T_odom_from_cam,
                    extra_cameras=views,
                    camera_name=str(image_msg.header.frame_id) if views else '')
            except SensorDataError as error:
                self._reject(error)
                continue
            self.stats.frames += 1
            self.stats.frames_without_pose += T_odom_from_lidar is None
            self.stats.frames_without_camera_pose += T_odom_from_cam is None
            yield frame

    def _odom_from_sensor(self, stamp_ns: int, sensor_frame: str,
                          tree) -> Optional[np.ndarray]:
        """T_odom_from_sensor at `stamp_ns`: the ego pose there and the sensor's mount."""
        T_odom_from_base = self._odometry.at(stamp_ns)
        if T_odom_from_base is None:
            return None
        T_base_from_sensor = self._base_from(sensor_frame, tree)
        return None if T_base_from_sensor is None else T_odom_from_base @ T_base_from_sensor

    def _odom_from_camera(self, stamp_ns: int, camera_frame: str, lidar_frame: str,
                          tree) -> Optional[np.ndarray]:
        if self.T_cam_from_lidar is None:
            return self._odom_from_sensor(stamp_ns, camera_frame, tree)
        # An override of the extrinsics: the camera mounted where the override puts it
        # relative to the LiDAR, not where /tf_static says.
        T_odom_from_lidar = self._odom_from_sensor(stamp_ns, lidar_frame, tree)
        return (None if T_odom_from_lidar is None
                else T_odom_from_lidar @ rigid_inverse(self.T_cam_from_lidar))

    def _base_from(self, sensor_frame: str, tree) -> Optional[np.ndarray]:
        if sensor_frame not in self._base_from_sensor:
            try:
                self._base_from_sensor[sensor_frame] = lookup_transform(
                    tree, self.base_frame, sensor_frame)
            except SensorDataError:
                # The odometry is of no use without the mount; counted in frames_without_pose
                # (LiDAR) or frames_without_camera_pose (camera).
                self._base_from_sensor[sensor_frame] = None
        return self._base_from_sensor[sensor_frame]

    def _reject(self, error: SensorDataError) -> None:
        self.stats.rejected_messages += 1
        count = self.stats.rejected_messages
        # Rate limited: the first few, then every hundredth, so a bad bag cannot flood the log.
        if count <= 5 or count % 100 == 0:
            LOGGER.warning('%s: skipped a frame (%d so far): %s', self.sequence, count, error)

    def _camera_from_lidar(self, camera_frame: str, lidar_frame: str, tree,
                           override: bool = True) -> np.ndarray:
        if override and self.T_cam_from_lidar is not None:
            return self.T_cam_from_lidar
        key = (camera_frame, lidar_frame)
        if key not in self._transforms:
            try:
                self._transforms[key] = lookup_transform(tree, camera_frame, lidar_frame)
            except SensorDataError as error:
                raise SensorDataError(
                    f'{error} in {self.topics.tf_static} or {self.topics.tf} of {self.path}: '
                    'pass T_cam_from_lidar') from None
        return self._transforms[key]


class _RecentByStamp:
    """Messages by header stamp, forgetting those more than `window_ns` behind the newest."""

    def __init__(self, window_ns: int):
        self.window_ns = window_ns
        self._items: Dict[int, object] = {}
        self._newest: Optional[int] = None

    def add(self, stamp_ns: int, msg) -> None:
        self._items[stamp_ns] = msg
        if self._newest is None or stamp_ns >= self._newest:
            self._newest = stamp_ns
        # Twice the window: a sweep may wait up to slop + window before it is paired.
        horizon = self._newest - 2 * self.window_ns - 1_000_000_000
        for stale in [s for s in self._items if s < horizon]:
            del self._items[stale]

    def get(self, stamp_ns: int, nearest_fallback: bool = False):
        if stamp_ns in self._items or not nearest_fallback or not self._items:
            return self._items.get(stamp_ns)
        # Camera intrinsics are fixed: any recent camera_info describes the image.
        return self._items[min(self._items, key=lambda s: abs(s - stamp_ns))]


def read_transforms(bag, topics: BagTopics = BagTopics(), odom_frame: str = ODOM_FRAME,
                    base_frame: str = BASE_FRAME) -> Tuple[TransformTree, PoseTrack]:
    """
    Read the sensor mounts and the ego poses of an open bag in one pass over /tf and /tf_static.

    Mounts: /tf in its first second, then /tf_static (static transforms win over /tf, whose
    mounts some converters repeat every tick). Ego poses: every odom_frame -> base_frame
    transform on /tf.
    """
    typestore = bag_typestore()
    tf_ids = {c.id for c in bag.connections if c.topic == topics.tf}
    static_ids = {c.id for c in bag.connections if c.topic == topics.tf_static}
    connections = [c for c in bag.connections if c.id in tf_ids | static_ids]
    mounts_from_tf, statics = [], []
    odometry = PoseTrack()
    if connections:
        mounts_until = bag.start_time + 1_000_000_000
        for connection, log_ns, raw in bag.messages(connections=connections):
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            if connection.id in static_ids:
                statics.append(msg)
                continue
            add_poses(odometry, msg, odom_frame, base_frame)
            if log_ns < mounts_until:
                mounts_from_tf.append(msg)
    tree: TransformTree = {}
    for msg in mounts_from_tf + statics:
        add_transforms(tree, msg)
    return tree, odometry


def transform_tree(bag, topics: BagTopics = BagTopics()) -> TransformTree:
    """Read the sensor mounts of an open bag: /tf in its first second, then /tf_static over it."""
    return read_transforms(bag, topics)[0]


def bag_calibration(path: PathLike, camera_frame: str = CAMERA_FRAME,
                    lidar_frame: str = LIDAR_FRAME,
                    topics: BagTopics = BagTopics()) -> np.ndarray:
    """
    T_cam_from_lidar <np.float64: 4, 4> of a bag, from its /tf_static (and /tf), as the reader.

    FileNotFoundError: no bag there; SensorDataError: no transforms, or the two frames are
    not connected (the message names the frames the bag has).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'no bag at {path}')
    try:
        with Reader(path) as bag:
            tree = transform_tree(bag, topics)
    except FileNotFoundError as error:  # rosbags: a folder without metadata.yaml
        raise FileNotFoundError(f'{path} is not a rosbag2 bag ({error})') from None
    if not tree:
        raise SensorDataError(f'{path} has no transforms on {topics.tf_static} or {topics.tf}')
    try:
        return lookup_transform(tree, camera_frame, lidar_frame)
    except SensorDataError as error:
        raise SensorDataError(f'{error} in {path}') from None


def read_frames(path: PathLike, **kwargs) -> Iterator[Frame]:
    """Frames of a bag: BagFrameReader(path, **kwargs) iterated once."""
    return iter(BagFrameReader(path, **kwargs))


def read_clouds(path: PathLike, topic: str = LABELED_POINTS_TOPIC,
                fields: Optional[List[str]] = None) -> Iterator[Tuple[int, str, DecodedCloud]]:
    """(stamp_ns, frame_id, DecodedCloud) of every PointCloud2 on `topic`, in log order."""
    typestore = bag_typestore()
    with Reader(Path(path)) as bag:
        connections = [c for c in bag.connections if c.topic == topic]
        if not connections:
            raise SensorDataError(
                f"bag {path} has no topic {topic!r} (topics: "
                f"{', '.join(sorted({c.topic for c in bag.connections}))})")
        for connection, _, raw in bag.messages(connections=connections):
            if connection.msgtype != CLOUD_TYPE:
                raise SensorDataError(f'{topic} carries {connection.msgtype}, not PointCloud2')
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            yield (stamp_to_ns(msg.header.stamp), str(msg.header.frame_id),
                   cloud_to_numpy(msg, fields))
