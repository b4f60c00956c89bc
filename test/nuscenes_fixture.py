"""
Write a tiny but valid nuScenes (+ lidarseg) dataset on disk for the converter tests.

The layout is the one `nuscenes.nuscenes.NuScenes` loads: the 13 tables and
lidarseg.json in `<dataroot>/<version>/`, label files in `lidarseg/<version>/`, a map
mask in `maps/`, keyframes in `samples/<channel>/` and the rest in `sweeps/<channel>/`.
Two scenes, one by day and one at night ("Night" in the description), each with a few
keyframes, LiDAR sweeps between them (also one before the first and one after the last
keyframe, as in the real data) and camera frames between keyframes. CAM_BACK keyframes
are there too, so a converter that must ignore other channels can be caught out. With
`six_cameras`, the four other nuScenes cameras shoot too (real mounts, rounded), at CAM_FRONT's
rate a few ms apart, so all six cameras can be written and read back together.
Calibrations are the real nuScenes ones (rounded) perturbed per scene; quaternions are
w, x, y, z as in nuScenes.
"""

from dataclasses import dataclass, field
import json
from pathlib import Path
import random
from typing import Dict, List
import uuid

import numpy as np
from PIL import Image

VERSION = 'v1.0-mini'
LIDAR = 'LIDAR_TOP'
CAMERA = 'CAM_FRONT'
OTHER_CAMERA = 'CAM_BACK'
# nuScenes-lidarseg classes in the order of their `index` in category.json (0..31).
LIDARSEG_NAMES = (
    'noise', 'animal', 'human.pedestrian.adult', 'human.pedestrian.child',
    'human.pedestrian.construction_worker', 'human.pedestrian.personal_mobility',
    'human.pedestrian.police_officer', 'human.pedestrian.stroller',
    'human.pedestrian.wheelchair', 'movable_object.barrier', 'movable_object.debris',
    'movable_object.pushable_pullable', 'movable_object.trafficcone',
    'static_object.bicycle_rack', 'vehicle.bicycle', 'vehicle.bus.bendy', 'vehicle.bus.rigid',
    'vehicle.car', 'vehicle.construction', 'vehicle.emergency.ambulance',
    'vehicle.emergency.police', 'vehicle.motorcycle', 'vehicle.trailer', 'vehicle.truck',
    'flat.driveable_surface', 'flat.other', 'flat.sidewalk', 'flat.terrain', 'static.manmade',
    'static.other', 'static.vegetation', 'vehicle.ego',
)
# Real v1.0-mini values, rounded: translation (m), rotation (w, x, y, z), intrinsic at 1600x900.
LIDAR_TRANSLATION = (0.985793, 0.0, 1.84019)
LIDAR_ROTATION_WXYZ = (0.706749, -0.015300, 0.017140, -0.707085)
CAMERA_TRANSLATION = (1.700797, 0.015936, 1.511084)
CAMERA_ROTATION_WXYZ = (0.499805, -0.503033, 0.499716, -0.497418)
CAMERA_INTRINSIC_FULL = ((1266.417203, 0.0, 816.267019), (0.0, 1266.417203, 491.507066),
                         (0.0, 0.0, 1.0))
FULL_SIZE = (1600, 900)
# six_cameras: the other four cameras' mounts (translation, rotation w, x, y, z; v1.0-mini,
# rounded) and their lag after the LiDAR keyframe, microseconds.
SIDE_CAMERAS = {
    'CAM_FRONT_RIGHT': ((1.5508, -0.4939, 1.4959), (0.2060, -0.2076, 0.6760, -0.6763), -5_000),
    'CAM_BACK_RIGHT': ((1.0149, -0.4807, 1.5624), (0.1260, -0.1320, -0.6964, 0.6940), 5_000),
    'CAM_BACK_LEFT': ((1.0357, 0.4849, 1.5910), (0.6924, -0.7031, -0.1180, 0.1164), -20_000),
    'CAM_FRONT_LEFT': ((1.5239, 0.4946, 1.5093), (0.6757, -0.6737, 0.2180, -0.2147), -15_000),
}
KEYFRAME_PERIOD_US = 500_000  # 2 Hz


@dataclass
class TinyScene:
    """What the fixture wrote for one scene, in time order per channel."""

    name: str
    description: str
    token: str
    lidar_tokens: List[str] = field(default_factory=list)
    lidar_keyframe_tokens: List[str] = field(default_factory=list)
    camera_tokens: List[str] = field(default_factory=list)
    camera_keyframe_tokens: List[str] = field(default_factory=list)


@dataclass
class TinyNuScenes:
    """Where the dataset is and what it holds."""

    dataroot: Path
    version: str
    image_size: tuple  # (width, height) of every camera image, pixels
    scenes: Dict[str, TinyScene]  # by scene name

    @property
    def night_scene(self) -> TinyScene:
        """Return the only night scene."""
        night = [s for s in self.scenes.values() if 'night' in s.description.lower()]
        assert len(night) == 1
        return night[0]

    @property
    def day_scene(self) -> TinyScene:
        """Return the only day scene."""
        day = [s for s in self.scenes.values() if 'night' not in s.description.lower()]
        assert len(day) == 1
        return day[0]


class _Tokens:
    """Deterministic 32-hex-digit tokens, the nuScenes form."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)

    def __call__(self) -> str:
        return uuid.UUID(int=self._random.getrandbits(128)).hex


def _unit_quaternion(q_wxyz, rng, jitter: float) -> List[float]:
    q = np.asarray(q_wxyz, dtype=np.float64) + rng.normal(scale=jitter, size=4)
    return (q / np.linalg.norm(q)).tolist()


def _write_json(path: Path, records) -> None:
    path.write_text(json.dumps(records, indent=1))


def _write_sweep(path: Path, rng, num_points: int) -> np.ndarray:
    """Write a .pcd.bin (x, y, z, intensity, ring as float32) and return <float32: N, 5>."""
    points = np.empty((num_points, 5), dtype=np.float32)
    points[:, :3] = rng.uniform([-40, -40, -3], [40, 40, 5], size=(num_points, 3))
    points[:, 3] = rng.integers(0, 256, num_points)
    points[:, 4] = rng.integers(0, 32, num_points)
    path.write_bytes(points.tobytes())
    return points


def _write_image(path: Path, rng, size) -> None:
    width, height = size
    gradient = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    noise = rng.integers(0, 40, (height, width, 3))
    pixels = np.clip(gradient * np.array([0.3, 0.5, 0.8]) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format='JPEG', quality=90)


def write_tiny_nuscenes(dataroot, *, version: str = VERSION, seed: int = 0,
                        keyframes: int = 3, lidar_sweeps_between: int = 2,
                        camera_sweeps_between: int = 1, image_size=(96, 54),
                        points_range=(40, 120), camera_lag_us: int = -12_000,
                        six_cameras: bool = False) -> TinyNuScenes:
    """
    Write the two-scene dataset under `dataroot` and describe what was written.

    The ego drives at 8 m/s turning at 0.1 rad/s, with an ego pose at every sample_data
    stamp; CAM_FRONT shoots camera_lag_us after each LiDAR keyframe (negative: before),
    so a sweep and its image are that far apart, as nuScenes' are (~35 ms).
    six_cameras: also write SIDE_CAMERAS (the default dataset is unchanged without it).
    """
    side = dict(SIDE_CAMERAS) if six_cameras else {}
    dataroot = Path(dataroot)
    rng = np.random.default_rng(seed)
    token = _Tokens(seed)
    table_dir = dataroot / version
    lidarseg_dir = dataroot / 'lidarseg' / version
    for folder in (table_dir, lidarseg_dir, dataroot / 'maps'):
        folder.mkdir(parents=True, exist_ok=True)
    for kind in ('samples', 'sweeps'):
        for channel in (LIDAR, CAMERA, OTHER_CAMERA, *side):
            (dataroot / kind / channel).mkdir(parents=True, exist_ok=True)

    tables = {name: [] for name in (
        'attribute', 'calibrated_sensor', 'category', 'ego_pose', 'instance', 'log', 'map',
        'sample', 'sample_annotation', 'sample_data', 'scene', 'sensor', 'visibility',
        'lidarseg')}
    tables['attribute'] = [
        {'token': token(), 'name': 'vehicle.moving', 'description': 'Vehicle is moving.'},
        {'token': token(), 'name': 'vehicle.parked', 'description': 'Vehicle is parked.'}]
    tables['visibility'] = [
        {'token': str(i + 1), 'level': level, 'description': f'visibility {level}'}
        for i, level in enumerate(('v0-40', 'v40-60', 'v60-80', 'v80-100'))]
    # Records in a shuffled order: readers must go by the `index` field, not the position.
    categories = [{'token': token(), 'name': name, 'description': name, 'index': index}
                  for index, name in enumerate(LIDARSEG_NAMES)]
    tables['category'] = [categories[i] for i in rng.permutation(len(categories))]
    sensors = {channel: {'token': token(), 'channel': channel, 'modality': modality}
               for channel, modality in ((LIDAR, 'lidar'), (CAMERA, 'camera'),
                                         (OTHER_CAMERA, 'camera'),
                                         *((name, 'camera') for name in side))}
    tables['sensor'] = list(sensors.values())

    scale = image_size[0] / FULL_SIZE[0], image_size[1] / FULL_SIZE[1]
    intrinsic = np.array(CAMERA_INTRINSIC_FULL)
    intrinsic[0] *= scale[0]
    intrinsic[1] *= scale[1]

    scene_specs = (('scene-0061', 'Parked truck, construction, intersection, day', 1532402927),
                   ('scene-1077', 'Night, big street, bus stop, high speed', 1542800367))
    logs, scenes = [], {}
    for scene_index, (name, description, start_sec) in enumerate(scene_specs):
        log = {'token': token(), 'logfile': f'n0{scene_index}-tiny', 'vehicle': 'n015',
               'date_captured': '2018-07-24', 'location': 'singapore-onenorth'}
        logs.append(log)
        scene = TinyScene(name=name, description=description, token=token())
        scenes[name] = scene
        prefix = f"{log['logfile']}__"
        calib = {
            LIDAR: {'token': token(), 'sensor_token': sensors[LIDAR]['token'],
                    'translation': list(LIDAR_TRANSLATION + rng.normal(scale=0.01, size=3)),
                    'rotation': _unit_quaternion(LIDAR_ROTATION_WXYZ, rng, 0.01),
                    'camera_intrinsic': []},
            CAMERA: {'token': token(), 'sensor_token': sensors[CAMERA]['token'],
                     'translation': list(CAMERA_TRANSLATION + rng.normal(scale=0.01, size=3)),
                     'rotation': _unit_quaternion(CAMERA_ROTATION_WXYZ, rng, 0.01),
                     'camera_intrinsic': intrinsic.tolist()},
            OTHER_CAMERA: {'token': token(), 'sensor_token': sensors[OTHER_CAMERA]['token'],
                           'translation': [0.0, 0.0, 1.5], 'rotation': [0.5, -0.5, -0.5, 0.5],
                           'camera_intrinsic': intrinsic.tolist()},
        }
        for channel, (translation, rotation, _) in side.items():
            calib[channel] = {'token': token(), 'sensor_token': sensors[channel]['token'],
                              'translation': list(translation), 'rotation': list(rotation),
                              'camera_intrinsic': intrinsic.tolist()}
        tables['calibrated_sensor'].extend(calib.values())

        t0 = start_sec * 1_000_000 + int(rng.integers(0, 1_000_000))
        samples = [{'token': token(), 'timestamp': t0 + k * KEYFRAME_PERIOD_US,
                    'scene_token': scene.token, 'prev': '', 'next': ''}
                   for k in range(keyframes)]
        for before, after in zip(samples[:-1], samples[1:]):
            before['next'], after['prev'] = after['token'], before['token']
        tables['sample'].extend(samples)
        tables['scene'].append({
            'token': scene.token, 'log_token': log['token'], 'nbr_samples': len(samples),
            'first_sample_token': samples[0]['token'],
            'last_sample_token': samples[-1]['token'], 'name': name,
            'description': description})

        def channel_times(lag_us, between, lead_us=0, trail_us=0):
            """(timestamp, sample index, is_key_frame) of one channel, in time order."""
            times = []
            if lead_us:
                times.append((samples[0]['timestamp'] - lead_us, 0, False))
            for k, sample in enumerate(samples):
                times.append((sample['timestamp'] + lag_us, k, True))
                if k + 1 < len(samples):
                    step = KEYFRAME_PERIOD_US // (between + 1)
                    times.extend((sample['timestamp'] + lag_us + j * step, k + 1, False)
                                 for j in range(1, between + 1))
            if trail_us:
                times.append((samples[-1]['timestamp'] + trail_us, len(samples) - 1, False))
            return times

        channels = (
            (LIDAR, channel_times(0, lidar_sweeps_between, 50_000, 50_000)),
            (CAMERA, channel_times(camera_lag_us, camera_sweeps_between)),
            (OTHER_CAMERA, channel_times(-30_000, 0)),
            *((channel, channel_times(lag_us, camera_sweeps_between))
              for channel, (_, _, lag_us) in side.items()),
        )
        for channel, times in channels:
            records = []
            for timestamp, sample_index, is_key_frame in times:
                sd_token = token()
                is_lidar = channel == LIDAR
                folder = 'samples' if is_key_frame else 'sweeps'
                suffix = '.pcd.bin' if is_lidar else '.jpg'
                filename = f'{folder}/{channel}/{prefix}{channel}__{timestamp}{suffix}'
                if is_lidar:
                    num_points = int(rng.integers(*points_range))
                    _write_sweep(dataroot / filename, rng, num_points)
                else:
                    _write_image(dataroot / filename, rng, image_size)
                records.append({
                    'token': sd_token, 'sample_token': samples[sample_index]['token'],
                    'ego_pose_token': sd_token, 'calibrated_sensor_token': calib[channel]['token'],
                    'timestamp': timestamp, 'fileformat': 'pcd' if is_lidar else 'jpg',
                    'is_key_frame': is_key_frame,
                    'height': 0 if is_lidar else image_size[1],
                    'width': 0 if is_lidar else image_size[0],
                    'filename': filename, 'prev': '', 'next': ''})
                seconds = (timestamp - t0) * 1e-6
                yaw = 0.1 * seconds
                tables['ego_pose'].append({
                    'token': sd_token, 'timestamp': timestamp,
                    'translation': [400.0 + 8.0 * seconds, 1100.0 + 0.5 * seconds, 0.0],
                    'rotation': [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]})
                if is_lidar and is_key_frame:
                    # The first 32 points carry every lidarseg class once, the rest are random.
                    labels = rng.integers(0, len(LIDARSEG_NAMES), num_points, dtype=np.uint8)
                    labels[:len(LIDARSEG_NAMES)] = np.arange(len(LIDARSEG_NAMES))
                    label_file = f'lidarseg/{version}/{sd_token}_lidarseg.bin'
                    (dataroot / label_file).write_bytes(labels.tobytes())
                    tables['lidarseg'].append({'token': sd_token, 'sample_data_token': sd_token,
                                               'filename': label_file})
            for before, after in zip(records[:-1], records[1:]):
                before['next'], after['prev'] = after['token'], before['token']
            tables['sample_data'].extend(records)
            tokens = [r['token'] for r in records]
            key_tokens = [r['token'] for r in records if r['is_key_frame']]
            if channel == LIDAR:
                scene.lidar_tokens, scene.lidar_keyframe_tokens = tokens, key_tokens
            elif channel == CAMERA:
                scene.camera_tokens, scene.camera_keyframe_tokens = tokens, key_tokens

    tables['log'] = logs
    map_token = token()
    map_file = f'maps/{map_token}.png'
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(dataroot / map_file)
    tables['map'] = [{'token': map_token, 'log_tokens': [log['token'] for log in logs],
                      'category': 'semantic_prior', 'filename': map_file}]
    for name, records in tables.items():
        _write_json(table_dir / f'{name}.json', records)
    return TinyNuScenes(dataroot=dataroot, version=version, image_size=tuple(image_size),
                        scenes=scenes)
