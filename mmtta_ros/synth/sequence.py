"""
Sequences: a drive through a generated street, as raw sensor streams or as paired Frames.

The LiDAR sweeps at 20 Hz and the camera shoots at 12 Hz on its own clock. A Frame pairs a
sweep with the image nearest in time; the image is rendered at its own stamp and pose, so the
static calibration `T_cam_from_lidar` leaves a small ego-motion misalignment, as on a real car
(a Frame carries both true poses, which compensate it). More cameras
(`SequenceConfig.extra_cameras`, named as nuScenes' six) shoot on the same clock, each from
its own mount, and become the Frame's extra CameraViews.
Every sample draws its noise from a random stream keyed by (seed, domain, sensor, index), so a
sample is the same whichever way, and in whatever order, it is generated.
"""

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmtta_ros.core.classes import CLASS_PALETTE
from mmtta_ros.core.frame import CameraView, Frame
from mmtta_ros.synth.camera import CameraModel, render
from mmtta_ros.synth.domains import get_domain, sample_lidar, sample_lighting
from mmtta_ros.synth.scene import build_scene, pose_matrix

# Bump whenever the same config would generate different data (caches key on it).
GENERATOR_VERSION = 1
LIDAR_PERIOD_NS = 50_000_000  # 20 Hz
CAMERA_RATE_HZ = 12
BASE_STAMP_NS = 1_533_151_600_000_000_000  # mid 2018, like nuScenes' logs
# Mounting on the ego car (origin at the rear axle, x forward, z up), after nuScenes' calib.
T_EGO_FROM_LIDAR = pose_matrix(0.943, 0.0, 1.84, 0.0)
# Camera optical frame: x right, y down, z forward.
R_EGO_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
T_EGO_FROM_CAM = np.eye(4)
T_EGO_FROM_CAM[:3, :3] = R_EGO_FROM_OPTICAL
T_EGO_FROM_CAM[:3, 3] = (1.70, 0.016, 1.51)
T_CAM_FROM_LIDAR = np.linalg.inv(T_EGO_FROM_CAM) @ T_EGO_FROM_LIDAR
# The primary camera (the Frame's own image, T_EGO_FROM_CAM) is CAM_FRONT.
PRIMARY_CAMERA = 'CAM_FRONT'
# Further cameras: yaw of the optical axis from the car's x axis (degrees, left positive)
# and mount position (x, y, z), metres, after nuScenes' rig.
CAMERA_MOUNTS = {
    'CAM_FRONT_LEFT': (55.0, (1.52, 0.49, 1.51)),
    'CAM_FRONT_RIGHT': (-55.0, (1.55, -0.49, 1.52)),
    'CAM_BACK': (180.0, (0.03, 0.0, 1.58)),
    'CAM_BACK_LEFT': (110.0, (1.04, 0.48, 1.56)),
    'CAM_BACK_RIGHT': (-110.0, (1.03, -0.48, 1.57)),
}


def ego_from_camera(name: str) -> np.ndarray:
    """T_ego_from_cam <np.float64: 4, 4> (optical frame) of camera `name` (CAMERA_MOUNTS)."""
    if name == PRIMARY_CAMERA:
        return T_EGO_FROM_CAM.copy()
    if name not in CAMERA_MOUNTS:
        raise ValueError(f'unknown camera {name!r}; the generator has {PRIMARY_CAMERA} and '
                         f"{', '.join(CAMERA_MOUNTS)}")
    yaw_deg, position = CAMERA_MOUNTS[name]
    yaw = np.deg2rad(yaw_deg)
    R_yaw = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0],
                      [0.0, 0.0, 1.0]])
    T = np.eye(4)
    T[:3, :3] = R_yaw @ R_EGO_FROM_OPTICAL
    T[:3, 3] = position
    return T


@dataclass
class SequenceConfig:
    """
    What to generate; plain values, buildable from YAML or the command line.

    domain:              'day', 'night', 'city_b' or 'lidar16' (see domains.py)
    seed:                scene and noise seed; day, night and lidar16 share the street per seed
    num_frames:          number of Frames (LiDAR keyframes) to generate
    image_size:          (width, height) of the camera images in pixels
    frame_stride:        keep every k-th LiDAR sweep as a Frame (10: 2 Hz keyframes)
    lidar_azimuth_steps: firings per revolution; None for the domain's LiDAR (1085)
    extra_cameras:       cameras besides CAM_FRONT (names of CAMERA_MOUNTS), rendered at
                         the same stamps; empty (the default) generates what it always did
    """

    domain: str = 'day'
    seed: int = 0
    num_frames: int = 40
    image_size: Tuple[int, int] = (400, 225)
    frame_stride: int = 1
    lidar_azimuth_steps: Optional[int] = None
    extra_cameras: Tuple[str, ...] = ()


@dataclass
class LidarSweep:
    """
    One LiDAR sweep as a driver would publish it (plus ground-truth labels).

    points_lidar:       <np.float32: N, 3> LiDAR frame, metres
    intensity:          <np.float32: N> 0..255
    ring:               <np.int32: N> beam index, 0 = lowest beam
    labels:             <np.int64: N> class index into CLASS_NAMES
    T_world_from_lidar: <np.float64: 4, 4> pose of the LiDAR at `stamp_ns`
    """

    stamp_ns: int
    index: int
    points_lidar: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    labels: np.ndarray
    T_world_from_lidar: np.ndarray


@dataclass
class CameraImage:
    """
    One camera image with its intrinsics and ground truth.

    image:            <np.uint8: H, W, 3> RGB
    labels:           <np.int64: H, W> class of each pixel, IGNORE_INDEX for sky
    depth:            <np.float32: H, W> distance along each pixel's ray, metres, inf for sky
    K:                <np.float64: 3, 3> intrinsics
    T_world_from_cam: <np.float64: 4, 4> pose of the camera (optical frame) at `stamp_ns`
    camera:           which camera: 0 the primary (CAM_FRONT), k extra_cameras[k - 1]
    """

    stamp_ns: int
    index: int
    image: np.ndarray
    labels: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    T_world_from_cam: np.ndarray
    camera: int = 0


SensorSample = Union[LidarSweep, CameraImage]


class SyntheticSequence:
    """A generated drive: its scene, sensors, lighting and clocks; renders samples on demand."""

    def __init__(self, config: SequenceConfig):
        """Build the scene and draw the sequence's lighting and LiDAR for `config`."""
        if config.num_frames < 1 or config.frame_stride < 1:
            raise ValueError('num_frames and frame_stride must be >= 1, got '
                             f'{config.num_frames} and {config.frame_stride}')
        width, height = (int(v) for v in config.image_size)
        if width < 8 or height < 8:
            raise ValueError(f'image_size must be at least 8 x 8 pixels, got {config.image_size}')
        self.config = config
        self.domain = get_domain(config.domain)
        self.name = f'{config.domain}-s{config.seed}'
        self._key = (int(config.seed), zlib.crc32(config.domain.encode()))
        self.num_sweeps = (config.num_frames - 1) * config.frame_stride + 1
        duration_s = self.num_sweeps * LIDAR_PERIOD_NS * 1e-9 + 1.0
        self.scene = build_scene(self.domain.layout, int(config.seed), duration_s)
        self.lighting = sample_lighting(self.domain.lighting, self._rng(12))
        self.lidar = sample_lidar(self.domain.lidar, self._rng(13), texture_seed=int(config.seed),
                                  azimuth_steps=config.lidar_azimuth_steps)
        self.camera = CameraModel(width=width, height=height)
        self.K = self.camera.K
        self.T_cam_from_lidar = T_CAM_FROM_LIDAR.copy()
        names = tuple(str(name) for name in config.extra_cameras)
        if PRIMARY_CAMERA in names or len(set(names)) != len(names):
            raise ValueError(f'extra_cameras must be distinct and exclude {PRIMARY_CAMERA}, '
                             f'got {list(names)}')
        self.camera_names = (PRIMARY_CAMERA,) + names
        self.T_ego_from_cams = [ego_from_camera(name) for name in self.camera_names]
        self.stamp0_ns = BASE_STAMP_NS + int(config.seed) * 600_000_000_000
        # The camera's clock runs on its own phase relative to the LiDAR's.
        self.camera_phase_ns = int(self._rng(14).integers(0, 1_000_000_000 // CAMERA_RATE_HZ))

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([*self._key, *keys])

    def lidar_stamp(self, index: int) -> int:
        """Stamp of sweep `index`, integer nanoseconds."""
        return self.stamp0_ns + index * LIDAR_PERIOD_NS

    def camera_stamp(self, index: int) -> int:
        """Stamp of image `index` (may be negative: before the first sweep), nanoseconds."""
        return self.stamp0_ns + self.camera_phase_ns + (index * 1_000_000_000) // CAMERA_RATE_HZ

    def nearest_camera_index(self, stamp_ns: int) -> int:
        """Index of the image nearest in time to `stamp_ns`."""
        guess = (stamp_ns - self.stamp0_ns - self.camera_phase_ns) * CAMERA_RATE_HZ
        guess //= 1_000_000_000
        return min((guess - 1, guess, guess + 1, guess + 2),
                   key=lambda j: (abs(self.camera_stamp(j) - stamp_ns), j))

    def _time_s(self, stamp_ns: int) -> float:
        return (stamp_ns - self.stamp0_ns) * 1e-9

    def ego_pose(self, stamp_ns: int) -> np.ndarray:
        """T_world_from_ego <np.float64: 4, 4> at `stamp_ns` (the world is the drive's odom)."""
        return self.scene.ego_pose(self._time_s(stamp_ns))

    def lidar_pose(self, index: int) -> np.ndarray:
        """T_world_from_lidar <np.float64: 4, 4> of sweep `index`, without ray casting it."""
        return self.ego_pose(self.lidar_stamp(index)) @ T_EGO_FROM_LIDAR

    def camera_pose(self, stamp_ns: int, camera: int = 0) -> np.ndarray:
        """T_world_from_cam <np.float64: 4, 4> (optical frame) at `stamp_ns`, without rendering."""
        return self.ego_pose(stamp_ns) @ self.T_ego_from_cams[camera]

    def camera_from_lidar(self, camera: int = 0) -> np.ndarray:
        """T_cam_from_lidar <np.float64: 4, 4> of camera `camera` (static mounts)."""
        if camera == 0:
            return self.T_cam_from_lidar.copy()
        return np.linalg.inv(self.T_ego_from_cams[camera]) @ T_EGO_FROM_LIDAR

    def lidar_sweep(self, index: int) -> LidarSweep:
        """Sweep `index` (0 at the sequence start)."""
        stamp = self.lidar_stamp(index)
        time_s = self._time_s(stamp)
        T_world_from_lidar = self.lidar_pose(index)
        scan = self.lidar.scan(self.scene.primitives_at(time_s), self.scene.ground,
                               T_world_from_lidar, self._rng(10, index))
        return LidarSweep(stamp_ns=stamp, index=index, points_lidar=scan.points_lidar,
                          intensity=scan.intensity, ring=scan.ring, labels=scan.labels,
                          T_world_from_lidar=T_world_from_lidar)

    def camera_image(self, index: int, camera: int = 0) -> CameraImage:
        """Image `index` of the camera clock, rendered at its own stamp and pose."""
        return self.render_camera_at(self.camera_stamp(index), index, camera)

    def render_camera_at(self, stamp_ns: int, index: int = -1, camera: int = 0) -> CameraImage:
        """Render camera `camera` (0: the primary) at any stamp (noise keyed by `index`)."""
        time_s = self._time_s(stamp_ns)
        T_world_from_ego = self.scene.ego_pose(time_s)
        # Offset keeps the stream key non-negative for images before the first sweep; an
        # extra camera adds its number to the key (the primary's stays as it always was).
        keys = (11, index + 1_000_000) + ((camera,) if camera else ())
        rendering = render(self.scene, time_s, T_world_from_ego, self.T_ego_from_cams[camera],
                           self.camera, self.lighting, self._rng(*keys))
        return CameraImage(stamp_ns=stamp_ns, index=index, image=rendering.image,
                           labels=rendering.labels, depth=rendering.depth, K=self.K.copy(),
                           T_world_from_cam=self.camera_pose(stamp_ns, camera), camera=camera)

    def frame(self, number: int) -> Frame:
        """Frame `number`: sweep number * frame_stride and the image nearest to it."""
        sweep = self.lidar_sweep(number * self.config.frame_stride)
        image_index = self.nearest_camera_index(sweep.stamp_ns)
        image = self.camera_image(image_index)
        extra = []
        for camera in range(1, len(self.camera_names)):
            view = self.camera_image(image_index, camera)
            extra.append(CameraView(
                name=self.camera_names[camera], image=view.image, K=view.K,
                T_cam_from_lidar=self.camera_from_lidar(camera), stamp_image_ns=view.stamp_ns,
                T_odom_from_cam=view.T_world_from_cam.copy()))
        return Frame(image=image.image, points_lidar=sweep.points_lidar, K=self.K.copy(),
                     T_cam_from_lidar=self.T_cam_from_lidar.copy(),
                     stamp_lidar_ns=sweep.stamp_ns, stamp_image_ns=image.stamp_ns,
                     intensity=sweep.intensity, labels=sweep.labels, lidar_frame_id='lidar',
                     sequence=self.name, index=number,
                     T_odom_from_lidar=sweep.T_world_from_lidar.copy(),
                     T_odom_from_cam=image.T_world_from_cam.copy(),
                     extra_cameras=tuple(extra),
                     camera_name=PRIMARY_CAMERA if extra else '')

    def frame_pose(self, number: int) -> np.ndarray:
        """T_odom_from_lidar <np.float64: 4, 4> of Frame `number`, without rendering it."""
        return self.lidar_pose(number * self.config.frame_stride)

    def camera_indices(self) -> range:
        """Images whose stamps fall within the sweeps' time span, padded by half a period."""
        half = 1_000_000_000 // (2 * CAMERA_RATE_HZ)
        first = self.nearest_camera_index(self.lidar_stamp(0))
        last = self.nearest_camera_index(self.lidar_stamp(self.num_sweeps - 1))
        while self.camera_stamp(first - 1) >= self.lidar_stamp(0) - half:
            first -= 1
        while self.camera_stamp(last + 1) <= self.lidar_stamp(self.num_sweeps - 1) + half:
            last += 1
        return range(first, last + 1)


def generate_frames(config: SequenceConfig) -> Iterator[Frame]:
    """Frames of a sequence, in order; the same config gives bit-identical frames."""
    sequence = SyntheticSequence(config)
    for number in range(config.num_frames):
        yield sequence.frame(number)


def generate_streams(config: SequenceConfig) -> Iterator[SensorSample]:
    """
    Every sweep (20 Hz) and image (12 Hz, each camera) of the sequence, ordered by stamp.

    The sweeps are those the Frames come from (all of them, not only every frame_stride-th);
    the images cover the same time span; the cameras of one stamp come primary first.
    """
    sequence = SyntheticSequence(config)
    for _, is_camera, index, camera in stream_events(sequence):
        yield (sequence.camera_image(index, camera) if is_camera
               else sequence.lidar_sweep(index))


def stream_events(sequence: SyntheticSequence) -> List[Tuple[int, bool, int, int]]:
    """Return (stamp_ns, is_camera, index, camera) of every sample of a sequence, in order."""
    events = [(sequence.lidar_stamp(i), False, i, 0) for i in range(sequence.num_sweeps)]
    events += [(sequence.camera_stamp(j), True, j, camera) for j in sequence.camera_indices()
               for camera in range(len(sequence.camera_names))]
    return sorted(events)


def project_points(points_lidar: np.ndarray, K: np.ndarray, T_cam_from_lidar: np.ndarray,
                   image_size: Tuple[int, int]):
    """
    Pixels of LiDAR points in front of the camera and inside the image.

    points_lidar: <np.float32: N, 3>; returns <np.float64: M, 2> pixels (u, v) and
    <np.int64: M> indices of those points
    """
    points_cam = points_lidar.astype(np.float64) @ T_cam_from_lidar[:3, :3].T + \
        T_cam_from_lidar[:3, 3]
    ahead = np.flatnonzero(points_cam[:, 2] > 0.1)
    uvw = points_cam[ahead] @ K.T
    pixels = uvw[:, :2] / uvw[:, 2:3]
    width, height = image_size
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0) & (
        pixels[:, 1] < height)
    return pixels[inside], ahead[inside]


def save_previews(out_dir: Union[str, Path] = '/tmp/synth_preview',
                  domains: Sequence[str] = ('day', 'night', 'city_b', 'lidar16'), seed: int = 0,
                  image_size: Tuple[int, int] = (400, 225), frame_number: int = 0) -> List[Path]:
    """
    Save previews of one frame per domain and return the written paths.

    `<domain>.png` is the camera image, `<domain>_lidar.png` the same image with the LiDAR
    points drawn on it, coloured by label with CLASS_PALETTE (a check of the calibration).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for domain in domains:
        config = SequenceConfig(domain=domain, seed=seed, num_frames=frame_number + 1,
                                image_size=image_size)
        frame = SyntheticSequence(config).frame(frame_number)
        overlay = frame.image.copy()
        pixels, index = project_points(frame.points_lidar, frame.K, frame.T_cam_from_lidar,
                                       frame.image_size)
        px = pixels.astype(np.int64)
        overlay[px[:, 1], px[:, 0]] = CLASS_PALETTE[frame.labels[index]]
        for suffix, array in (('', frame.image), ('_lidar', overlay)):
            path = out_dir / f'{domain}{suffix}.png'
            Image.fromarray(array).save(path)
            written.append(path)
    return written
