"""
nuScenes scenes to ROS 2 bags (rosbag2: mcap or sqlite3), one bag per scene, streamed.

Topics are those of the public nuScenes -> ROS 2 converters (`mmtta_ros.bags.topics`):
CAM_FRONT jpegs (or those of any of the six cameras, `cameras`) as they are on disk (no
re-encode) with their camera_info, LIDAR_TOP
sweeps as x, y, z, intensity, ring float32, the static transforms base_link -> sensors,
and optionally odom -> base_link on /tf from the ego poses. Where the dataset has
nuScenes-lidarseg, every keyframe sweep also gets a labels cloud aligned point for point,
with the lidarseg classes merged into `mmtta_ros.core.classes.CLASS_NAMES` as xMUDA's journal
version does. Header stamps (and log times) are the sample_data timestamps.

The dataset is read with nuscenes-devkit, imported only by `convert` so the pure parts
work without it. Messages are written one at a time, in stamp order: a scene is never
held in memory, only its sample_data records.
"""

from dataclasses import dataclass, field
import heapq
import json
from pathlib import Path
import shutil
import time
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image as PILImage
from rosbags.rosbag2 import Writer

from mmtta_ros.bags.topics import (
    bag_typestore, BagTopics, BASE_FRAME, CAMERA_INFO_TYPE, camera_topics, CLOUD_TYPE,
    IMAGE_TYPE,
    LABELS_LAYOUT, NO_LABEL, ns_to_sec_nanosec, ODOM_FRAME, SENSOR_QOS, TF_QOS,
    TF_STATIC_QOS, TF_TYPE)
from mmtta_ros.bags.writer import camera_info_message, cloud_message, STORAGES, tf_message
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import CLASS_NAMES
from mmtta_ros.sensors.pointcloud import NUSCENES_LAYOUT
from mmtta_ros.sensors.projection import transform_from_translation_quaternion

PathLike = Union[str, Path]
DEFAULT_VERSION = 'v1.0-mini'
LIDAR_CHANNEL = 'LIDAR_TOP'
CAMERA_CHANNEL = 'CAM_FRONT'
# nuScenes' six cameras, clockwise from the front (`cameras='all'`).
ALL_CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT',
               'CAM_FRONT_LEFT')
# The converters' frame ids are the nuScenes channel names.
LIDAR_FRAME = LIDAR_CHANNEL
CAMERA_FRAME = CAMERA_CHANNEL
TF_TOPIC = '/tf'
NIGHT_KEYWORD = 'night'
# xMUDA's day/night split (valeoai/xmuda, xmuda/data/nuscenes/splits.py): night scenes of
# the official train set, less these 15 for validation, are train; the official val set's
# night scenes are test. MM-TTA adapts and scores on the test night scenes.
XMUDA_VAL_NIGHT = tuple(f'scene-{n}' for n in range(1044, 1059))
SPLITS = ('train', 'val', 'test')
# nuScenes-lidarseg class name -> project class, as xMUDA's journal version builds it:
# nuscenes-devkit's LidarsegClassMapper (32 fine -> 16 challenge classes) then
# NuScenesLidarSegBase.categories (16 -> 6). Everything else is ignored, including
# vehicle.emergency.*, vehicle.ego, pedestrians, barriers, cones and flat.other.
LIDARSEG_TO_CLASS: Mapping[str, str] = {
    'vehicle.bicycle': 'vehicle', 'vehicle.bus.bendy': 'vehicle',
    'vehicle.bus.rigid': 'vehicle', 'vehicle.car': 'vehicle',
    'vehicle.construction': 'vehicle', 'vehicle.motorcycle': 'vehicle',
    'vehicle.trailer': 'vehicle', 'vehicle.truck': 'vehicle',
    'flat.driveable_surface': 'driveable_surface', 'flat.sidewalk': 'sidewalk',
    'flat.terrain': 'terrain', 'static.manmade': 'manmade', 'static.vegetation': 'vegetation',
}
DEVKIT_INSTALL = (
    'nuscenes-devkit is not installed. It pins numpy<2 but works on numpy 2 for loading: '
    'pip install --no-deps nuscenes-devkit==1.2.0, plus pyquaternion, matplotlib, '
    'opencv-python-headless, scikit-learn, cachetools (see requirements.txt)')


@dataclass
class SceneConversion:
    """
    What convert_scene wrote for one scene.

    message_counts: messages per topic
    unlabeled_keyframes: keyframe sweeps for which the dataset has no lidarseg file
    wall_seconds: time it took to read and write, seconds
    labeled: whether the dataset has nuScenes-lidarseg (else the bag cannot be scored)
    """

    scene: str
    description: str
    path: Path
    storage: str
    message_counts: Dict[str, int] = field(default_factory=dict)
    unlabeled_keyframes: int = 0
    num_points: int = 0
    wall_seconds: float = 0.0
    size_bytes: int = 0
    labeled: bool = True


def is_night(scene: Mapping) -> bool:
    """Whether a nuScenes scene record is a night scene (xMUDA's and MM-TTA's rule)."""
    return NIGHT_KEYWORD in str(scene['description']).lower()


def xmuda_night_split(name: str, split: str) -> bool:
    """Whether night scene `name` belongs to xMUDA's `split` (train, val or test)."""
    from nuscenes.utils import splits as official  # the devkit's official scene lists
    if split == 'val':
        return name in XMUDA_VAL_NIGHT
    if split == 'test':
        return name in official.val
    if split == 'train':
        return name in official.train and name not in XMUDA_VAL_NIGHT
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def select_scenes(scenes: Sequence[Mapping], names: Optional[Sequence[str]] = None,
                  split: Optional[str] = None) -> List[Mapping]:
    """Scene records named in `names` (in that order), or the night scenes (of xMUDA's split)."""
    if names is None:
        return [scene for scene in scenes if is_night(scene)
                and (split is None or xmuda_night_split(scene['name'], split))]
    by_name = {scene['name']: scene for scene in scenes}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"no scene named {', '.join(unknown)} in the dataset "
                         f"(it has {', '.join(sorted(by_name))})")
    return [by_name[name] for name in dict.fromkeys(names)]


def lidarseg_lookup(categories: Sequence[Mapping]) -> np.ndarray:
    """
    Table <np.uint8: 256> from a lidarseg class index to a CLASS_NAMES index or NO_LABEL.

    categories: the records of the dataset's category.json; the lidarseg index of a class
    is its record's `index` field (the file's order does not matter).
    """
    lookup = np.full(256, NO_LABEL, dtype=np.uint8)
    for record in categories:
        if 'index' not in record:
            raise SensorDataError(
                f"category {record.get('name')!r} has no 'index': use the category.json that "
                'comes with nuScenes-lidarseg')
        index = int(record['index'])
        if not 0 <= index < NO_LABEL:
            raise SensorDataError(f"category {record['name']!r} has lidarseg index {index}, "
                                  f'expected 0..{NO_LABEL - 1}')
        target = LIDARSEG_TO_CLASS.get(record['name'])
        if target is not None:
            lookup[index] = CLASS_NAMES.index(target)
    return lookup


def read_lidar_records(path: PathLike) -> np.ndarray:
    """Sweep of a nuScenes .pcd.bin as <NUSCENES_LAYOUT.dtype(): N> (5 float32 a point)."""
    path = Path(path)
    size = path.stat().st_size
    if size % NUSCENES_LAYOUT.point_step:
        raise SensorDataError(f'{path} has {size} bytes, not a whole number of '
                              f'{NUSCENES_LAYOUT.point_step}-byte points (5 float32)')
    # The file layout is the message layout: no copy, no reordering.
    return np.fromfile(path, dtype=NUSCENES_LAYOUT.dtype())


def read_lidarseg_labels(path: PathLike, num_points: int, lookup: np.ndarray) -> np.ndarray:
    """Labels <np.uint8: N> of a lidarseg .bin mapped through `lookup` (lidarseg_lookup)."""
    raw = np.fromfile(Path(path), dtype=np.uint8)
    if raw.shape[0] != num_points:
        raise SensorDataError(f'{path} has {raw.shape[0]} labels but its sweep has '
                              f'{num_points} points')
    return lookup[raw]


def _header(stamp_ns: int, frame_id: str):
    types = bag_typestore().types
    sec, nanosec = ns_to_sec_nanosec(stamp_ns)
    return types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id=frame_id)


def jpeg_message(jpeg: bytes, stamp_ns: int, frame_id: str = CAMERA_FRAME):
    """Build a sensor_msgs/CompressedImage carrying `jpeg` as it is (format 'jpeg')."""
    return bag_typestore().types[IMAGE_TYPE](
        header=_header(stamp_ns, frame_id), format='jpeg',
        data=np.frombuffer(jpeg, dtype=np.uint8))


def pose_matrix(translation: Sequence[float], rotation_wxyz: Sequence[float]) -> np.ndarray:
    """<np.float64: 4, 4> of a nuScenes pose: translation (m), rotation quaternion (w, x, y, z)."""
    w, x, y, z = (float(v) for v in rotation_wxyz)
    # nuScenes writes quaternions scalar first; ROS (and the project) scalar last.
    return transform_from_translation_quaternion(translation, (x, y, z, w))


def sample_data_stamp_ns(record: Mapping) -> int:
    """Header stamp in nanoseconds of a sample_data or ego_pose record (microseconds)."""
    return int(record['timestamp']) * 1000


def _in_scene(nusc, record: Mapping, scene_token: str) -> bool:
    return nusc.get('sample', record['sample_token'])['scene_token'] == scene_token


def first_keyframe(nusc, scene: Mapping, channel: str) -> Mapping:
    """Return the sample_data record of a channel at the first keyframe of a scene."""
    first_sample = nusc.get('sample', scene['first_sample_token'])
    if channel not in first_sample['data']:
        raise SensorDataError(f"scene {scene['name']} has no {channel} data")
    return nusc.get('sample_data', first_sample['data'][channel])


def channel_records(nusc, scene: Mapping, channel: str,
                    keyframes_only: bool = False) -> List[Mapping]:
    """
    sample_data records of one channel of a scene, in time order.

    keyframes_only: only the 2 Hz keyframes; otherwise every sweep, including those before
    the first and after the last keyframe that belong to the scene.
    """
    record = first_keyframe(nusc, scene, channel)
    if keyframes_only:
        records, sample = [record], nusc.get('sample', record['sample_token'])
        while sample['next']:
            sample = nusc.get('sample', sample['next'])
            records.append(nusc.get('sample_data', sample['data'][channel]))
        return records
    # Walk back to the first sweep of the scene, then forward to its last.
    while record['prev'] and _in_scene(nusc, nusc.get('sample_data', record['prev']),
                                       scene['token']):
        record = nusc.get('sample_data', record['prev'])
    records = [record]
    while record['next']:
        record = nusc.get('sample_data', record['next'])
        if not _in_scene(nusc, record, scene['token']):
            break
        records.append(record)
    return records


def scene_stream(nusc, scene: Mapping, channels: Sequence[str],
                 keyframes_only: bool = False) -> Iterator[Tuple[str, Mapping]]:
    """(channel, sample_data record) of the channels of a scene, merged in time order."""
    streams = [[(int(record['timestamp']), channel, record)
                for record in channel_records(nusc, scene, channel, keyframes_only)]
               for channel in channels]
    for _, channel, record in heapq.merge(*streams, key=lambda item: item[:2]):
        yield channel, record


def camera_channels(cameras: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """
    Return the camera channels `cameras` names: 'all' (the six), or names (a list or commas).

    ValueError for an unknown or repeated name; the order given is kept (the first is the
    primary camera of the frames read back).
    """
    if isinstance(cameras, str):
        cameras = ALL_CAMERAS if cameras == 'all' else [c for c in cameras.split(',') if c]
    cameras = tuple(str(c).strip() for c in cameras)
    unknown = [c for c in cameras if c not in ALL_CAMERAS]
    if not cameras or unknown or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras must be 'all' or distinct names among "
                         f"{', '.join(ALL_CAMERAS)}; got {', '.join(cameras) or 'none'}")
    return cameras


def camera_bag_topics(channel: str, topics: BagTopics = BagTopics()) -> Tuple[str, str]:
    """Return the (image, camera_info) topics a camera channel is written to."""
    if channel == CAMERA_CHANNEL:
        return topics.image, topics.camera_info
    return camera_topics(channel)


def _camera_intrinsic(calibration: Mapping) -> np.ndarray:
    K = np.asarray(calibration['camera_intrinsic'], dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise SensorDataError(f"calibrated_sensor {calibration['token']} has camera_intrinsic "
                              f'of shape {K.shape}, expected a finite 3x3 matrix')
    return K


def _image_size(record: Mapping, path: Path) -> Tuple[int, int]:
    width, height = int(record.get('width') or 0), int(record.get('height') or 0)
    if width > 0 and height > 0:
        return width, height
    with PILImage.open(path) as image:  # reads the header only
        return image.size


def convert_scene(nusc, scene: Mapping, path: PathLike, *, storage: str = 'mcap',
                  keyframes_only: bool = False, with_tf: bool = True,
                  topics: BagTopics = BagTopics(),
                  cameras: Sequence[str] = (CAMERA_CHANNEL,)) -> SceneConversion:
    """
    Write one scene of a loaded NuScenes (nuscenes-devkit) as a bag at `path`.

    cameras: the camera channels written (`camera_channels`), each with its images,
    camera_info and mount on /tf_static; CAM_FRONT on topics.image / topics.camera_info,
    the others on `topics.camera_topics(channel)`.
    keyframes_only: 2 Hz keyframes only, else every LiDAR sweep (20 Hz) and camera frame
    (12 Hz); with_tf: also odom -> base_link on /tf at every sample_data stamp. The bag is
    written under a temporary name beside `path` and renamed at the end, so a failed
    conversion leaves nothing behind and can simply be run again.
    """
    started = time.perf_counter()
    path = Path(path)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if path.exists():
        raise FileExistsError(f'{path} exists: rosbag2 bags are never overwritten; '
                              'remove it or choose another output directory')
    partial = partial_path(path)
    if partial.exists():
        shutil.rmtree(partial)  # ours, from a conversion that was killed
    try:
        summary = _write_scene(nusc, scene, partial, storage=storage,
                               keyframes_only=keyframes_only, with_tf=with_tf, topics=topics,
                               cameras=camera_channels(cameras))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(path)
    summary.path = path
    summary.wall_seconds = time.perf_counter() - started
    return summary


def partial_path(path: PathLike) -> Path:
    """Return the temporary name a bag is written under until it is complete."""
    path = Path(path)
    return path.with_name(f'.{path.name}.partial')


def _write_scene(nusc, scene: Mapping, path: Path, *, storage: str, keyframes_only: bool,
                 with_tf: bool, topics: BagTopics, cameras: Tuple[str, ...]
                 ) -> SceneConversion:
    dataroot = Path(nusc.dataroot)
    label_files = {r['sample_data_token']: r['filename'] for r in getattr(nusc, 'lidarseg', [])}
    lookup = lidarseg_lookup(nusc.category) if hasattr(nusc, 'lidarseg') else None
    summary = SceneConversion(scene=scene['name'], description=scene['description'],
                              path=path, storage=storage, labeled=lookup is not None)
    typestore = bag_typestore()

    def calibration(channel_record: Mapping) -> Mapping:
        return nusc.get('calibrated_sensor', channel_record['calibrated_sensor_token'])

    # Calibrations are fixed per scene; looked up before the bag exists, so a scene that
    # lacks a channel fails without leaving a half-written bag behind.
    lidar_cal = calibration(first_keyframe(nusc, scene, LIDAR_CHANNEL))
    static_transforms = [
        (BASE_FRAME, LIDAR_FRAME, pose_matrix(lidar_cal['translation'], lidar_cal['rotation']))]
    for channel in cameras:
        camera_cal = calibration(first_keyframe(nusc, scene, channel))
        # The converters' frame ids are the channel names (CAMERA_FRAME for CAM_FRONT).
        static_transforms.append(
            (BASE_FRAME, channel, pose_matrix(camera_cal['translation'], camera_cal['rotation'])))
    stream = scene_stream(nusc, scene, (LIDAR_CHANNEL,) + cameras, keyframes_only)
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage]) as writer:
        description = dict(
            version=nusc.version, scene=scene['name'], description=scene['description'],
            keyframes_only=bool(keyframes_only),
            label_classes=list(CLASS_NAMES) if lookup is not None else None)
        if cameras != (CAMERA_CHANNEL,):  # absent for the default: that bag stays as it was
            description['cameras'] = list(cameras)
        writer.set_custom_data('mmtta_ros.nuscenes', json.dumps(description))
        plan = [(topics.tf_static, TF_TYPE, TF_STATIC_QOS)]
        for channel in cameras:
            image_topic, info_topic = camera_bag_topics(channel, topics)
            plan += [(info_topic, CAMERA_INFO_TYPE, SENSOR_QOS),
                     (image_topic, IMAGE_TYPE, SENSOR_QOS)]
        plan.append((topics.lidar, CLOUD_TYPE, SENSOR_QOS))
        if lookup is not None:
            plan.append((topics.labels, CLOUD_TYPE, SENSOR_QOS))
        if with_tf:
            plan.append((TF_TOPIC, TF_TYPE, TF_QOS))
        connections = {topic: writer.add_connection(topic, msgtype, typestore=typestore,
                                                    offered_qos_profiles=[qos])
                       for topic, msgtype, qos in plan}

        def write(topic: str, stamp_ns: int, msg) -> None:
            connection = connections[topic]
            writer.write(connection, stamp_ns,
                         typestore.serialize_cdr(msg, connection.msgtype))

        static_written = False
        for channel, record in stream:
            stamp_ns = sample_data_stamp_ns(record)
            if not static_written:
                # Static transforms before any sensor data, at the first stamp.
                write(topics.tf_static, stamp_ns, tf_message(static_transforms, stamp_ns))
                static_written = True
            if with_tf:
                ego = nusc.get('ego_pose', record['ego_pose_token'])
                write(TF_TOPIC, stamp_ns, tf_message(
                    [(ODOM_FRAME, BASE_FRAME, pose_matrix(ego['translation'], ego['rotation']))],
                    stamp_ns))
            file_path = dataroot / record['filename']
            if channel == LIDAR_CHANNEL:
                points = read_lidar_records(file_path)
                write(topics.lidar, stamp_ns,
                      cloud_message(NUSCENES_LAYOUT, points, stamp_ns, LIDAR_FRAME))
                summary.num_points += int(points.shape[0])
                if lookup is not None and record['is_key_frame']:
                    if record['token'] in label_files:
                        labels = read_lidarseg_labels(
                            dataroot / label_files[record['token']], points.shape[0], lookup)
                        write(topics.labels, stamp_ns, cloud_message(
                            LABELS_LAYOUT, labels.view(LABELS_LAYOUT.dtype()), stamp_ns,
                            LIDAR_FRAME))
                    else:
                        summary.unlabeled_keyframes += 1
            else:
                image_topic, info_topic = camera_bag_topics(channel, topics)
                # camera_info first: a reader that pairs by stamp has K when the image comes.
                write(info_topic, stamp_ns, camera_info_message(
                    _camera_intrinsic(calibration(record)), _image_size(record, file_path),
                    stamp_ns, channel))
                write(image_topic, stamp_ns,
                      jpeg_message(file_path.read_bytes(), stamp_ns, channel))
        summary.message_counts = {topic: writer.counts[connection.id]
                                  for topic, connection in connections.items()}
    summary.size_bytes = sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
    return summary


def missing_files(nusc, scene: Mapping, keyframes_only: bool = False,
                  cameras: Sequence[str] = (CAMERA_CHANNEL,)) -> List[Path]:
    """Return the sweep and image files of a scene that are not on disk."""
    dataroot = Path(nusc.dataroot)
    return [dataroot / record['filename']
            for _, record in scene_stream(nusc, scene, (LIDAR_CHANNEL,) + tuple(cameras),
                                          keyframes_only)
            if not (dataroot / record['filename']).is_file()]


def load_nuscenes(dataroot: PathLike, version: str = DEFAULT_VERSION):
    """nuscenes-devkit's NuScenes for `dataroot`, with an install hint when it is missing."""
    try:
        from nuscenes.nuscenes import NuScenes
    except ImportError as error:
        raise ImportError(f'{DEVKIT_INSTALL} ({error})') from error
    table_root = Path(dataroot) / version
    if not table_root.is_dir():
        raise FileNotFoundError(f'no nuScenes tables at {table_root}: check --dataroot and '
                                '--version')
    labels_dir = Path(dataroot) / 'lidarseg' / version
    if (table_root / 'lidarseg.json').is_file() and not labels_dir.is_dir():
        raise FileNotFoundError(
            f'{table_root / "lidarseg.json"} is there but {labels_dir} is not: finish the '
            'nuScenes-lidarseg install, or remove lidarseg.json to convert without labels')
    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except AssertionError as error:  # the devkit checks its tables with assert
        raise ValueError(f'nuscenes-devkit cannot load {table_root}: {error} (an incomplete '
                         f'download? lidarseg/{version}/ needs one .bin per record of '
                         'lidarseg.json)') from None


def convert(dataroot: PathLike, output_dir: PathLike, *, version: str = DEFAULT_VERSION,
            scene_names: Optional[Sequence[str]] = None, split: Optional[str] = None,
            storage: str = 'mcap',
            keyframes_only: bool = False, with_tf: bool = True,
            topics: BagTopics = BagTopics(), cameras: Union[str, Sequence[str]] = (
                CAMERA_CHANNEL,), progress=None) -> List[SceneConversion]:
    """
    Convert scenes of a nuScenes dataset to bags `output_dir/<scene name>`.

    scene_names: scenes to convert, or None for every night scene (of xMUDA's `split`:
    train, val or test, when given); progress: called with each SceneConversion as it is
    done. The other arguments are convert_scene's. Every file the selected scenes need is
    checked before anything is written.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split is not None and scene_names is not None:
        raise ValueError('name scenes or choose a split, not both')
    cameras = camera_channels(cameras)
    nusc = load_nuscenes(dataroot, version)
    scenes = select_scenes(nusc.scene, scene_names, split)
    if not scenes:
        which = f"xMUDA's {split} split" if split else 'the dataset'
        raise ValueError(f'{version} at {dataroot} has no night scene in {which}: name '
                         'scenes to convert')
    for scene in scenes:
        missing = missing_files(nusc, scene, keyframes_only, cameras)
        if missing:
            raise FileNotFoundError(
                f"{scene['name']}: {len(missing)} sample files are missing, e.g. {missing[0]} "
                '(are samples/ and sweeps/ complete?)')
    output_dir = Path(output_dir)
    # Check every target before writing anything: a half-converted selection helps nobody.
    existing = [str(output_dir / s['name']) for s in scenes if (output_dir / s['name']).exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} exist: bags are never overwritten")
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for scene in scenes:
        summary = convert_scene(nusc, scene, output_dir / scene['name'], storage=storage,
                                keyframes_only=keyframes_only, with_tf=with_tf, topics=topics,
                                cameras=cameras)
        summaries.append(summary)
        if progress is not None:
            progress(summary)
    return summaries
