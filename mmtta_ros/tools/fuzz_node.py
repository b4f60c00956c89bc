"""
mmtta_fuzz_node: publish hostile and valid messages at a running node; check it survives.

Starts the node as a child process (CPU, small images), then, on loopback only and in a
DDS domain of its own, publishes a bounded mix of hostile messages (malformed clouds,
bad encodings, decompression bombs, bad camera_info, stamps from 1970 to 2^31 s, old and
new stamps alternating) and valid ones; then sends valid pairs one at a time and counts
the labeled clouds. Prints: messages sent, node alive, frames labeled afterwards, the
node's RSS (start / max / end) and the /diagnostics accounting balance
(`unaccounted_messages`, 0 when every message is accounted for by reason).
"""

import argparse
import io
import os
from pathlib import Path
import signal
import struct
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional
import zlib

import numpy as np

MAX_MESSAGES = 100_000
MAX_SECONDS = 600.0
IMAGE_SIZE = (128, 72)
NODE = '/mmtta_adapt'


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--messages', type=int, default=3000,
                        help=f'hostile messages to publish (1..{MAX_MESSAGES})')
    parser.add_argument('--seconds', type=float, default=60.0,
                        help=f'time limit of the hostile phase, s (1..{MAX_SECONDS:g})')
    parser.add_argument('--rate', type=float, default=300.0,
                        help='messages per second in the hostile phase (1..10000); sensor '
                        'QoS is best effort, so a faster flood mostly tests DDS dropping')
    parser.add_argument('--valid-pairs', type=int, default=15,
                        help='valid pairs sent one at a time afterwards (1..100)')
    parser.add_argument('--domain-id', type=int, default=int(os.environ.get('ROS_DOMAIN_ID',
                                                                            '51')),
                        help='ROS_DOMAIN_ID of the node and the publisher (0..101)')
    parser.add_argument('--seed', type=int, default=0)
    return parser


def check_arguments(args) -> Optional[str]:
    """Return why the arguments are refused, or None."""
    if not 1 <= args.messages <= MAX_MESSAGES:
        return f'--messages must be in 1..{MAX_MESSAGES}, got {args.messages}'
    if not 1.0 <= args.seconds <= MAX_SECONDS:
        return f'--seconds must be in 1..{MAX_SECONDS:g}, got {args.seconds}'
    if not 1.0 <= args.rate <= 10000.0:
        return f'--rate must be in 1..10000, got {args.rate}'
    if not 1 <= args.valid_pairs <= 100:
        return f'--valid-pairs must be in 1..100, got {args.valid_pairs}'
    if not 0 <= args.domain_id <= 101:
        return f'--domain-id must be in 0..101, got {args.domain_id}'
    return None


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG of a few dozen bytes whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IEND', b'')


class Messages:
    """Builds valid and hostile sensor messages from synthetic frames."""

    def __init__(self, frames, rng: np.random.Generator):
        from PIL import Image as PILImage
        from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2, PointField

        from mmtta_ros.sensors.pointcloud import NUSCENES_LAYOUT

        self.frames, self.rng = frames, rng
        self._types = CameraInfo, CompressedImage, PointCloud2, PointField
        self._layout = NUSCENES_LAYOUT
        self._jpegs = []
        for frame in frames:
            buffer = io.BytesIO()
            PILImage.fromarray(frame.image).save(buffer, format='JPEG', quality=85)
            self._jpegs.append(buffer.getvalue())

    @staticmethod
    def _stamp(msg, stamp_ns: int, frame_id: str):
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        msg.header.frame_id = frame_id
        return msg

    def cloud(self, index: int, stamp_ns: int):
        """Return a valid PointCloud2 of frame `index`."""
        _, _, PointCloud2, PointField = self._types
        frame = self.frames[index]
        records = np.zeros(frame.num_points, dtype=self._layout.dtype())
        for axis, name in enumerate('xyz'):
            records[name] = frame.points_lidar[:, axis]
        records['intensity'] = frame.intensity
        msg = self._stamp(PointCloud2(), stamp_ns, 'LIDAR_TOP')
        msg.height, msg.width = 1, frame.num_points
        msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype,
                                 count=f.count) for f in self._layout.fields]
        msg.point_step = self._layout.point_step
        msg.row_step = msg.point_step * msg.width
        msg.is_dense = True
        msg.data = records.tobytes()
        return msg

    def image(self, index: int, stamp_ns: int):
        """Return a valid jpeg CompressedImage of frame `index`."""
        msg = self._stamp(self._types[1](), stamp_ns, 'CAM_FRONT')
        msg.format, msg.data = 'jpeg', self._jpegs[index]
        return msg

    def info(self, index: int, stamp_ns: int):
        """Return a valid CameraInfo of frame `index`."""
        frame = self.frames[index]
        msg = self._stamp(self._types[0](), stamp_ns, 'CAM_FRONT')
        msg.width, msg.height = frame.image_size
        msg.k = [float(v) for v in frame.K.reshape(-1)]
        msg.distortion_model, msg.d = 'plumb_bob', [0.0] * 5
        return msg

    def hostile(self, stamp_ns: int):
        """Return (kind, input name, message) of one randomly chosen hostile message."""
        rng, index = self.rng, int(self.rng.integers(len(self.frames)))
        kind = str(rng.choice(HOSTILE_KINDS))
        if kind.startswith('stamp_'):
            stamp_ns = {'stamp_1970': 0, 'stamp_2038': (2 ** 31 - 1) * 10 ** 9,
                        'stamp_old': stamp_ns - 30 * 10 ** 9}[kind]
            target = str(rng.choice(['image', 'points']))
            msg = (self.image(index, stamp_ns) if target == 'image'
                   else self.cloud(index, stamp_ns))
            if kind == 'stamp_1970':
                msg.header.stamp.sec = -int(rng.integers(1, 10 ** 9))  # before 1970
            return kind, target, msg
        if kind.startswith('cloud_'):
            msg = self.cloud(index, stamp_ns)
            data = bytes(msg.data)
            if kind == 'cloud_truncated':
                msg.data = data[:int(rng.integers(0, max(len(data), 1)))]
            elif kind == 'cloud_huge_width':
                msg.width = 2 ** 31 - 1
            elif kind == 'cloud_bad_step':
                msg.point_step = int(rng.integers(0, 4))
            elif kind == 'cloud_no_xyz':
                msg.fields = msg.fields[3:]
            elif kind == 'cloud_bad_datatype':
                msg.fields[0].datatype = 99
            elif kind == 'cloud_nan':
                points = np.frombuffer(data, dtype=self._layout.dtype()).copy()
                points['x'] = np.nan
                msg.data = points.tobytes()
            elif kind == 'cloud_empty':
                msg.width, msg.row_step, msg.data = 0, 0, b''
            return kind, 'points', msg
        if kind.startswith('image_'):
            msg = self.image(index, stamp_ns)
            if kind == 'image_garbage':
                msg.data = rng.integers(0, 256, int(rng.integers(1, 5000)),
                                        dtype=np.uint8).tobytes()
            elif kind == 'image_tiff':
                msg.format = 'tiff'
            elif kind == 'image_empty':
                msg.data = b''
            elif kind == 'image_bomb':
                msg.format, msg.data = 'png', png_header_only(20000, 20000)
            elif kind == 'image_too_big':
                msg.format, msg.data = 'png', png_header_only(9000, 9000)
            elif kind == 'image_truncated':
                msg.data = bytes(msg.data)[:len(msg.data) // 2]
            return kind, 'image', msg
        msg = self.info(index, stamp_ns)
        if kind == 'info_zero_k':
            msg.k = [0.0] * 9
        elif kind == 'info_nan_k':
            msg.k = [float('nan')] * 9
        elif kind == 'info_huge':
            msg.width = msg.height = 100_000
        elif kind == 'info_zero_size':
            msg.width = 0
        return kind, 'camera_info', msg


HOSTILE_KINDS = (
    'stamp_1970', 'stamp_2038', 'stamp_old',
    'cloud_truncated', 'cloud_huge_width', 'cloud_bad_step', 'cloud_no_xyz',
    'cloud_bad_datatype', 'cloud_nan', 'cloud_empty',
    'image_garbage', 'image_tiff', 'image_empty', 'image_bomb', 'image_too_big',
    'image_truncated',
    'info_zero_k', 'info_nan_k', 'info_huge', 'info_zero_size',
)


def rss_mb(pid: int) -> float:
    """Return the resident set size of process `pid` in MB (nan if unreadable)."""
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float('nan')


class Peer:
    """The publishing side: a node in this process that feeds the node and listens to it."""

    def __init__(self, context):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2

        self.node = rclpy.create_node('mmtta_fuzz', context=context)
        sensor = qos_profile_sensor_data
        self.publishers = {
            'image': self.node.create_publisher(CompressedImage, f'{NODE}/input/image', sensor),
            'camera_info': self.node.create_publisher(
                CameraInfo, f'{NODE}/input/camera_info', sensor),
            'points': self.node.create_publisher(PointCloud2, f'{NODE}/input/points', sensor),
        }
        self.labeled = 0
        self.diagnostics: Dict[str, str] = {}
        self.diagnostics_count = 0
        self.node.create_subscription(PointCloud2, f'{NODE}/output/labeled_points',
                                      self._on_cloud, 10)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def _on_cloud(self, _msg) -> None:
        self.labeled += 1

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.hardware_id == 'mmtta_adapt':
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diagnostics['_message'] = status.message
                self.diagnostics_count += 1

    def spin_until(self, condition: Callable[[], bool], timeout: float,
                   tick: Callable[[], None] = lambda: None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            self.executor.spin_once(timeout_sec=0.02)
            tick()
        return condition()

    def publish(self, name: str, msg) -> None:
        self.publishers[name].publish(msg)


def start_node(env: Dict[str, str], T_cam_from_lidar) -> subprocess.Popen:
    """Start the node under test as a child process (CPU, small images)."""
    T = ','.join(repr(float(v)) for v in np.asarray(T_cam_from_lidar).reshape(-1))
    command = [sys.executable, '-m', 'mmtta_ros.ros.node', '--ros-args',
               '-p', 'device:=cpu', '-p', f'calibration.T_cam_from_lidar:=[{T}]',
               '-p', f'model.image_width:={IMAGE_SIZE[0]}',
               '-p', f'model.image_height:={IMAGE_SIZE[1]}',
               '-p', 'diagnostics_period:=0.5', '-p', 'threads:=1']
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run(args) -> int:
    """Fuzz one node; print the figures; return 0 if it held, 1 if not."""
    # Before rclpy is imported: loopback only, in the chosen domain.
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_DOMAIN_ID'] = str(args.domain_id)
    import rclpy

    from mmtta_ros.synth import generate_frames, SequenceConfig

    frames = list(generate_frames(SequenceConfig(
        domain='night', seed=args.seed, num_frames=6, image_size=IMAGE_SIZE, frame_stride=2,
        lidar_azimuth_steps=300)))
    messages = Messages(frames, np.random.default_rng(args.seed))
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    node = start_node(env, frames[0].T_cam_from_lidar)
    stderr_lines: List[str] = []
    context = rclpy.context.Context()
    rclpy.init(context=context)
    peer = Peer(context)
    rss = []
    try:
        # Ready: its /diagnostics arrive.
        if not peer.spin_until(lambda: peer.diagnostics_count > 0 or node.poll() is not None,
                               120.0):
            print('the node did not come up within 120 s', file=sys.stderr)
            return 1
        if node.poll() is not None:
            print(f'the node exited at start: {node.stderr.read()[-2000:]}', file=sys.stderr)
            return 1
        rss.append(rss_mb(node.pid))
        sent, kinds = 0, {}
        stamp_ns = time.time_ns()
        started = time.monotonic()
        last_sample = started
        peer.publish('camera_info', messages.info(0, stamp_ns))
        while sent < args.messages and time.monotonic() - started < args.seconds:
            stamp_ns += 25_000_000
            if messages.rng.random() < 0.3:  # valid messages in between
                index = int(messages.rng.integers(len(frames)))
                peer.publish('points', messages.cloud(index, stamp_ns))
                peer.publish('image', messages.image(index, stamp_ns + 1_000_000))
                sent += 2
                kinds['valid'] = kinds.get('valid', 0) + 2
            else:
                kind, name, msg = messages.hostile(stamp_ns)
                peer.publish(name, msg)
                sent += 1
                kinds[kind] = kinds.get(kind, 0) + 1
            # Paced: spin (and so receive /diagnostics) while waiting for the next slot.
            next_slot = started + sent / args.rate
            while time.monotonic() < next_slot:
                peer.executor.spin_once(timeout_sec=max(0.0, next_slot - time.monotonic()))
            if time.monotonic() - last_sample > 0.2:
                rss.append(rss_mb(node.pid))
                last_sample = time.monotonic()
        flood_seconds = time.monotonic() - started
        # Valid pairs, one at a time, stamped after everything before.
        before = peer.labeled
        stamp_ns = max(stamp_ns, time.time_ns()) + 10 ** 9
        info_sent = False
        for k in range(args.valid_pairs + 1):  # one more: it completes the last pair
            index = k % len(frames)
            stamp_ns += 100_000_000
            if not info_sent:
                peer.publish('camera_info', messages.info(index, stamp_ns))
                info_sent = True
            peer.publish('points', messages.cloud(index, stamp_ns))
            peer.publish('image', messages.image(index, stamp_ns + 1_000_000))
            target = before + k
            peer.spin_until(lambda: peer.labeled >= target, 15.0,
                            tick=lambda: rss.append(rss_mb(node.pid)))
        peer.spin_until(lambda: peer.labeled - before >= args.valid_pairs, 15.0)
        labeled = min(peer.labeled - before, args.valid_pairs)
        # Quiet: the books are read once nothing is in flight.
        count = peer.diagnostics_count
        peer.spin_until(lambda: peer.diagnostics_count >= count + 3, 10.0)
        alive = node.poll() is None and peer.diagnostics_count > count
        rss.append(rss_mb(node.pid))
        values = peer.diagnostics
    finally:
        peer.executor.shutdown()
        peer.node.destroy_node()
        rclpy.try_shutdown(context=context)
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        stderr_lines = (node.stderr.read() or '').splitlines()
    balance = values.get('unaccounted_messages', 'missing')
    warnings = sum('[WARN]' in line for line in stderr_lines)
    tracebacks = sum('Traceback' in line for line in stderr_lines)
    finite = [v for v in rss if v == v]
    print(f'messages sent: {sent} in {flood_seconds:.1f} s ({len(kinds)} kinds: '
          + ', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) + ')')
    print(f'node alive: {"yes" if alive else "NO"} (exit code '
          f'{node.returncode} after SIGINT)')
    print(f'frames labeled afterwards: {labeled}/{args.valid_pairs}')
    print(f'RSS start/max/end: {finite[0]:.0f} / {max(finite):.0f} / {finite[-1]:.0f} MB')
    print(f'diagnostics accounting balance: unaccounted_messages = {balance} '
          f'(image {values.get("image_received")} + points {values.get("points_received")} '
          f'received; rejected_messages {values.get("rejected_messages")}, rejected_frames '
          f'{values.get("rejected_frames")}, frames_processed '
          f'{values.get("frames_processed")}, step_failures {values.get("step_failures")}, '
          f'time_jumps {values.get("time_jumps")}, rejected_camera_info '
          f'{values.get("rejected_camera_info")})')
    print(f'node log: {warnings} WARN lines, {tracebacks} tracebacks')
    held = (alive and labeled == args.valid_pairs and str(balance) == '0'
            and values.get('step_failures') == '0')
    return 0 if held else 1


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    problem = check_arguments(args)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
