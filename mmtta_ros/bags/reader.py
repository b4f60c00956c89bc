"""
Read rosbag2 bags (mcap or sqlite3) with `rosbags` into Frames, streaming.

Each LiDAR sweep is paired with the camera image nearest in stamp within a slop; the
reader keeps only the messages pairing still needs, so a bag of any length reads in
bounded memory. Messages are decoded with the project's sensor core (duck-typed, so the
same functions serve live rclpy messages).
"""

from collections import deque
from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from rosbags.rosbag2 import Reader

from mmtta_ros.bags.topics import (
    BagTopics, bag_typestore, CLOUD_TYPE, LABELED_POINTS_TOPIC, RAW_IMAGE_TYPE,
    stamp_to_ns)
from mmtta_ros.bags.transforms import build_tree, lookup_transform, TransformTree
from mmtta_ros.errors import SensorDataError
from mmtta_ros.frame import CLASS_NAMES, Frame, IGNORE_INDEX
from mmtta_ros.sensors.image import decode_image
from mmtta_ros.sensors.pointcloud import cloud_structured_view, cloud_to_numpy, DecodedCloud
from mmtta_ros.sensors.projection import check_transform

PathLike = Union[str, Path]
LOGGER = logging.getLogger(__name__)


@dataclass
class _Stamped:
    stamp_ns: int
    msg: object


class NearestStampPairer:
    """
    Pairs each primary message (a sweep) with the secondary (an image) nearest in stamp.

    Streaming: `add_*` return the pairs that became final, as (primary, secondary or None)
    with None when no secondary lies within `slop_ns`. Assumes stamps rise on each topic
    (as drivers publish them) and that the topics are interleaved within `window_ns` of
    each other in the bag; pairs are returned in the primaries' order.
    """

    def __init__(self, slop_ns: int, window_ns: int):
        """slop_ns: largest stamp difference of a pair; window_ns: interleaving bound."""
        self.slop_ns = int(slop_ns)
        self.window_ns = int(window_ns)
        self._pending: Deque[_Stamped] = deque()
        self._secondaries: Deque[_Stamped] = deque()
        self._newest_secondary = None
        self._newest = None

    def add_secondary(self, stamp_ns: int, msg) -> List[Tuple[object, Optional[object]]]:
        """Add a secondary message; returns the pairs that became final."""
        self._secondaries.append(_Stamped(int(stamp_ns), msg))
        self._newest_secondary = max(int(stamp_ns), self._newest_secondary or int(stamp_ns))
        return self._advance(stamp_ns)

    def add_primary(self, stamp_ns: int, msg) -> List[Tuple[object, Optional[object]]]:
        """Add a primary message; returns the pairs that became final."""
        self._pending.append(_Stamped(int(stamp_ns), msg))
        return self._advance(stamp_ns)

    def flush(self) -> List[Tuple[object, Optional[object]]]:
        """Resolve every waiting primary (end of the stream)."""
        pairs = [self._resolve(primary) for primary in self._pending]
        self._pending.clear()
        self._secondaries.clear()
        return pairs

    def _resolve(self, primary: _Stamped) -> Tuple[object, Optional[object]]:
        best = None
        for secondary in self._secondaries:
            gap = abs(secondary.stamp_ns - primary.stamp_ns)
            # Strictly nearer only: on a tie the earlier image wins.
            if gap <= self.slop_ns and (best is None or gap < best[0]):
                best = (gap, secondary.msg)
        return primary.msg, None if best is None else best[1]

    def _advance(self, stamp_ns: int) -> List[Tuple[object, Optional[object]]]:
        self._newest = max(int(stamp_ns), self._newest or int(stamp_ns))
        pairs = []
        while self._pending:
            stamp = self._pending[0].stamp_ns
            # Final once a secondary at or after it was seen (later ones are farther), or
            # once the stream moved past any secondary that could still fall in the slop.
            seen_after = (self._newest_secondary is not None
                          and self._newest_secondary >= stamp)
            if not (seen_after or self._newest > stamp + self.slop_ns + self.window_ns):
                break
            pairs.append(self._resolve(self._pending.popleft()))
        # Secondaries older than any primary that is waiting or may still arrive can go.
        oldest = self._newest - self.window_ns
        if self._pending:
            oldest = min(oldest, self._pending[0].stamp_ns)
        while self._secondaries and self._secondaries[0].stamp_ns < oldest - self.slop_ns:
            self._secondaries.popleft()
        return pairs


@dataclass
class ReaderStats:
    """
    Counters of one pass over a bag.

    sweeps:                 LiDAR sweeps read
    frames:                 Frames produced
    images:                 camera images read
    skipped_no_image:       sweeps with no image within the slop
    skipped_no_camera_info: sweeps whose image came before any camera_info
    sweeps_without_labels:  sweeps of a bag with a labels topic that had no labels message
    rejected_messages:      messages that could not be decoded (SensorDataError)
    """

    sweeps: int = 0
    frames: int = 0
    images: int = 0
    skipped_no_image: int = 0
    skipped_no_camera_info: int = 0
    sweeps_without_labels: int = 0
    rejected_messages: int = 0


def _bag_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def labels_from_message(labels_msg, valid_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """
    Class indices <np.int64: N> of a labels-topic cloud; IGNORE_INDEX for unlabeled points.

    Values outside CLASS_NAMES (NO_LABEL = 255 included) become IGNORE_INDEX; valid_mask
    <bool: height * width> keeps the points its LiDAR cloud kept (finite coordinates).
    """
    view = cloud_structured_view(labels_msg)
    if 'label' not in (view.dtype.names or ()):
        raise SensorDataError('labels cloud has no field named label')
    wire = view['label'].reshape(-1)
    if valid_mask is not None:
        if valid_mask.shape != wire.shape:
            raise SensorDataError(
                f'labels cloud has {wire.size} points but its LiDAR cloud has '
                f'{valid_mask.size}: they must align point for point')
        wire = wire[valid_mask]
    labels = wire.astype(np.int64)
    labels[(labels < 0) | (labels >= len(CLASS_NAMES))] = IGNORE_INDEX
    return labels


class BagFrameReader:
    """
    Frames from a rosbag2 bag with a camera, its camera_info, a LiDAR and optional labels.

    Iterate it (each pass re-reads the bag); `stats` holds the counters of the last pass.
    """

    def __init__(self, path: PathLike, *, topics: BagTopics = BagTopics(),
                 image_size: Optional[Tuple[int, int]] = (400, 225), slop_s: float = 0.05,
                 T_cam_from_lidar: Optional[np.ndarray] = None, window_s: float = 0.5):
        """
        Open nothing yet; check the arguments.

        image_size: (width, height) of the Frames' images (K scaled), None to keep the
        bag's size; slop_s: largest |stamp_lidar - stamp_image| of a pair, seconds;
        T_cam_from_lidar: <4, 4> override of the transform from /tf_static (or /tf); window_s:
        how far apart in stamp the topics may be interleaved in the bag, seconds.
        """
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f'no bag at {self.path}')
        self.topics = topics
        self.image_size = None if image_size is None else (int(image_size[0]),
                                                           int(image_size[1]))
        if slop_s < 0 or window_s < 0:
            raise ValueError(f'slop_s and window_s must be >= 0, got {slop_s}, {window_s}')
        self.slop_ns = int(round(slop_s * 1e9))
        self.window_ns = int(round(window_s * 1e9))
        self.T_cam_from_lidar = (None if T_cam_from_lidar is None
                                 else check_transform(T_cam_from_lidar))
        self.sequence = _bag_name(self.path)
        self.stats = ReaderStats()
        self.has_labels = False
        self._raw_image = False
        self._transforms: Dict[Tuple[str, str], np.ndarray] = {}

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
            self.has_labels = self.topics.labels in by_topic
            # The converters write compressed images, a raw camera driver sensor_msgs/Image.
            self._raw_image = by_topic[self.topics.image][0].msgtype == RAW_IMAGE_TYPE
            tree = None
            if self.T_cam_from_lidar is None:
                tree = self._read_transforms(bag)
            self._transforms = {}

            roles = {}
            for role in ('image', 'camera_info', 'lidar', 'labels'):
                for connection in by_topic.get(getattr(self.topics, role), []):
                    roles[connection.id] = role
            pairer = NearestStampPairer(self.slop_ns, self.window_ns)
            infos = _RecentByStamp(self.window_ns)
            labels = _RecentByStamp(self.window_ns)
            ready: List[Tuple[object, Optional[object]]] = []
            connections = [c for c in bag.connections if c.id in roles]
            for connection, _, raw in bag.messages(connections=connections):
                role = roles[connection.id]
                msg = typestore.deserialize_cdr(raw, connection.msgtype)
                stamp = stamp_to_ns(msg.header.stamp)
                if role == 'lidar':
                    self.stats.sweeps += 1
                    new = pairer.add_primary(stamp, msg)
                elif role == 'image':
                    self.stats.images += 1
                    new = pairer.add_secondary(stamp, msg)
                else:
                    (infos if role == 'camera_info' else labels).add(stamp, msg)
                    continue
                # Pairs are built one message late: the camera_info or labels of the same
                # instant may be logged just after the message that made a pair final.
                yield from self._build(ready, infos, labels, tree)
                ready = new
            yield from self._build(ready + pairer.flush(), infos, labels, tree)

    def _read_transforms(self, bag) -> TransformTree:
        """Read the sensor mounts: /tf in the bag's first second, then /tf_static over it."""
        typestore = bag_typestore()

        def read(topic: str, stop: Optional[int] = None):
            connections = [c for c in bag.connections if c.topic == topic]
            if not connections:
                return []
            return [typestore.deserialize_cdr(raw, c.msgtype)
                    for c, _, raw in bag.messages(connections=connections, stop=stop)]

        # Both are small: one pass over their connections before the sensors. Static
        # transforms win over /tf, whose mounts some converters repeat every tick.
        return build_tree(read(self.topics.tf, stop=bag.start_time + 1_000_000_000)
                          + read(self.topics.tf_static))

    def _build(self, pairs, infos: '_RecentByStamp', labels: '_RecentByStamp',
               tree) -> Iterator[Frame]:
        for cloud_msg, image_msg in pairs:
            if image_msg is None:
                self.stats.skipped_no_image += 1
                continue
            image_stamp = stamp_to_ns(image_msg.header.stamp)
            info_msg = infos.get(image_stamp, nearest_fallback=True)
            if info_msg is None:
                self.stats.skipped_no_camera_info += 1
                continue
            lidar_stamp = stamp_to_ns(cloud_msg.header.stamp)
            labels_msg = labels.get(lidar_stamp) if self.has_labels else None
            if self.has_labels and labels_msg is None:
                self.stats.sweeps_without_labels += 1
            # Outside the try: a missing transform is the whole bag's problem, not a message's.
            T = self._camera_from_lidar(str(image_msg.header.frame_id),
                                        str(cloud_msg.header.frame_id), tree)
            try:
                frame = self._frame(cloud_msg, image_msg, info_msg, labels_msg, T)
            except SensorDataError as error:
                self._reject(error)
                continue
            self.stats.frames += 1
            yield frame

    def _reject(self, error: SensorDataError) -> None:
        self.stats.rejected_messages += 1
        count = self.stats.rejected_messages
        # Rate limited: the first few, then every hundredth, so a bad bag cannot flood the log.
        if count <= 5 or count % 100 == 0:
            LOGGER.warning('%s: skipped a frame (%d so far): %s', self.sequence, count, error)

    def _camera_from_lidar(self, camera_frame: str, lidar_frame: str, tree) -> np.ndarray:
        if self.T_cam_from_lidar is not None:
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

    def _frame(self, cloud_msg, image_msg, info_msg, labels_msg, T: np.ndarray) -> Frame:
        image, K = decode_image(image_msg, info_msg, self.image_size, raw=self._raw_image)
        cloud = cloud_to_numpy(cloud_msg)
        labels = None
        if labels_msg is not None:
            labels = labels_from_message(labels_msg, cloud.valid_mask)
        intensity = cloud.fields.get('intensity')
        # Copies: the decoded arrays are read-only views of the message's buffer.
        return Frame(
            image=image, points_lidar=np.array(cloud.points, dtype=np.float32),
            K=K, T_cam_from_lidar=T.copy(),
            stamp_lidar_ns=stamp_to_ns(cloud_msg.header.stamp),
            stamp_image_ns=stamp_to_ns(image_msg.header.stamp),
            intensity=(None if intensity is None
                       else np.array(intensity, dtype=np.float32).reshape(-1)),
            labels=labels, lidar_frame_id=str(cloud_msg.header.frame_id),
            sequence=self.sequence, index=self.stats.frames)


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
