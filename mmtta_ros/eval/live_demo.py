"""
The live demo's parts: source model and bag on demand, node + player over DDS, a recorder.

`run_live` starts the node (`python -m mmtta_ros.ros.node`) and the player
(`mmtta_ros.tools.play_bag`) as separate processes talking DDS on loopback, records the
labeled clouds here, scores them against the bag's labels and measures latency. The demo
(`mmtta_demo`), the node benchmark and the online = offline equivalence test use it.
"""

from pathlib import Path
import resource
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mmtta_ros.core.classes import CLASS_NAMES, CLASS_PALETTE
from mmtta_ros.eval.metrics import ConfusionMatrix
from mmtta_ros.sensors.stamps import stamp_to_ns

NODE_NAME = 'mmtta_adapt'


def log(message: str) -> None:
    print(f'[demo] {message}', flush=True)


def ensure_source_model(path: Path, cache_dir: Path, steps: int) -> None:
    """Train the tiny day model unless a finished checkpoint is already at `path`."""
    import torch

    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.models.segmenter import SegmenterConfig
    from mmtta_ros.eval.splits import source_configs
    from mmtta_ros.eval.training import load_trained, train_source, TrainConfig

    if load_trained(path, torch.device('cpu')) is not None:
        log(f'reusing the source model {path}')
        return
    log('generating labeled day frames and training the tiny source model ...')
    # One thread: on a shared 2-core machine two threads mostly wait for each other.
    torch.set_num_threads(1)
    frames = synthetic_frames(source_configs('day'), cache_dir)
    summary = train_source(frames, SegmenterConfig(size='tiny'), TrainConfig(steps=steps),
                           path, torch.device('cpu'))
    log(f'trained in {summary["seconds"]:.0f} s -> {path}')


def ensure_demo_bag(path: Path, seed: int, duration_s: float) -> None:
    """Write the night demo bag unless it exists."""
    from mmtta_ros.bags.writer import write_demo_bag

    if (path / 'metadata.yaml').is_file():
        log(f'reusing the demo bag {path}')
        return
    log(f'writing a {duration_s:.0f} s synthetic night drive to {path} ...')
    # Two rendering processes: the bag is the same, written twice as fast on 2 cores.
    summary = write_demo_bag(path, domain='night', seed=seed, duration_s=duration_s,
                             workers=2)
    log(f'bag written in {summary.wall_seconds:.0f} s: {summary.num_sweeps} sweeps, '
        f'{summary.num_images} images, {summary.size_bytes / 1e6:.0f} MB')


class LiveRecorder:
    """An rclpy node that records the node's labeled clouds and scores them live."""

    def __init__(self, context, bag_path: Path):
        import rclpy
        from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image, PointCloud2

        self.node = rclpy.create_node('mmtta_demo_recorder', context=context)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.outputs: List = []
        self.ground_truth: Dict[int, object] = {}
        self.overlay = None
        # Wall-clock arrival of each sweep (by stamp) at this process, in and out: the
        # end-to-end latency of the node as a subscriber sees it.
        self.input_arrivals: Dict[int, float] = {}
        self.output_arrivals: Dict[int, float] = {}
        self.node.create_subscription(PointCloud2, f'/{NODE_NAME}/output/labeled_points',
                                      self._on_output, reliable)
        # raw=True: the CDR bytes only, no deserialisation of 35k points at 20 Hz here.
        self.node.create_subscription(PointCloud2, '/LIDAR_TOP', self._on_input_raw,
                                      qos_profile_sensor_data, raw=True)
        self.node.create_subscription(PointCloud2, '/LIDAR_TOP/labels', self._on_labels,
                                      qos_profile_sensor_data)
        self.node.create_subscription(Image, f'/{NODE_NAME}/output/overlay', self._on_overlay,
                                      reliable)
        self.diagnostics: Dict[str, str] = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.bag_path = bag_path

    def _on_output(self, msg) -> None:
        self.output_arrivals[stamp_to_ns(msg.header.stamp)] = time.monotonic()
        self.outputs.append(msg)

    def _on_input_raw(self, data: bytes) -> None:
        # CDR: a 4-byte encapsulation header, then header.stamp (int32 sec, uint32 nanosec).
        sec, nanosec = struct.unpack_from('<iI', data, 4)
        self.input_arrivals[sec * 1_000_000_000 + nanosec] = time.monotonic()

    def latencies(self) -> np.ndarray:
        """Return <float: K> seconds from a sweep's arrival to its labeled cloud's arrival."""
        return np.array([arrived - self.input_arrivals[stamp]
                         for stamp, arrived in self.output_arrivals.items()
                         if stamp in self.input_arrivals])

    def _on_labels(self, msg) -> None:
        self.ground_truth[stamp_to_ns(msg.header.stamp)] = msg

    def _on_overlay(self, msg) -> None:
        self.overlay = msg

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith('mmtta_ros'):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def score(self) -> Dict[str, object]:
        """Score every recorded output that has ground truth with the same stamp."""
        from mmtta_ros.core.decode import labels_from_message
        from mmtta_ros.core.classes import IGNORE_INDEX
        from mmtta_ros.sensors.pointcloud import cloud_to_numpy, UNLABELED

        matrix = ConfusionMatrix(len(CLASS_NAMES))
        scored = 0
        for msg in self.outputs:
            truth = self.ground_truth.get(stamp_to_ns(msg.header.stamp))
            if truth is None or truth.width != msg.width:
                continue
            predicted = cloud_to_numpy(msg).fields['label'].astype(np.int64)
            labels = labels_from_message(truth)
            keep = (predicted != UNLABELED) & (labels != IGNORE_INDEX)
            matrix.update(labels[keep], predicted[keep])
            scored += 1
        report = matrix.report(CLASS_NAMES)
        report.update(outputs=len(self.outputs), scored=scored)
        return report

    def write_bag(self) -> None:
        """Record the labeled clouds (raw CDR) as a rosbag2 mcap, like `ros2 bag record`."""
        from rclpy.serialization import serialize_message
        from rosbags.rosbag2 import StoragePlugin, Writer

        from mmtta_ros.bags.topics import bag_typestore

        if self.bag_path.exists():
            import shutil
            shutil.rmtree(self.bag_path)
        with Writer(self.bag_path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
            connection = writer.add_connection(
                f'/{NODE_NAME}/output/labeled_points', 'sensor_msgs/msg/PointCloud2',
                typestore=bag_typestore())
            for msg in self.outputs:
                writer.write(connection, stamp_to_ns(msg.header.stamp), serialize_message(msg))


def _spin_until(executor, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        executor.spin_once(timeout_sec=0.05)
    return condition()


def _cpu_seconds(before: Dict[str, Any], children, own) -> Dict[str, Optional[float]]:
    """Return CPU seconds (user + system) of the player, the node and this process, and wall."""
    def used(usage) -> float:
        return usage.ru_utime + usage.ru_stime
    after_player = before.get('after_player')
    return {'player': None if after_player is None
            else used(after_player) - used(before['children']),
            'node': None if after_player is None else used(children) - used(after_player),
            'recorder': used(own) - used(before['self']),
            'wall': time.monotonic() - before['wall']}


def run_live(method: str, checkpoint: Path, bag: Path, out_dir: Path, rate: float,
             env: Dict[str, str], pictures: bool = True,
             parameters: Optional[Mapping[str, object]] = None,
             player_args: Sequence[str] = (), settle_timeout: float = 30.0
             ) -> Dict[str, object]:
    """
    Start node + player for one method, record and score the output; return a report.

    parameters: extra node parameters {name: value} (-p name:=value); player_args: extra
    arguments of mmtta_play_bag (e.g. --reliable); settle_timeout: how long to wait after
    the bag for the node to finish (a queue of pairs takes a while).
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from mmtta_ros.synth import T_CAM_FROM_LIDAR

    T = ','.join(repr(float(v)) for v in T_CAM_FROM_LIDAR.reshape(-1))
    share = Path(__file__).resolve().parents[2]
    node_cmd = [
        sys.executable, '-m', 'mmtta_ros.ros.node', '--ros-args',
        '--params-file', str(share / 'config' / 'adapt.yaml'),
        '-p', f'model.checkpoint:={checkpoint}', '-p', f'adaptation.method:={method}',
        '-p', f'calibration.T_cam_from_lidar:=[{T}]', '-p', 'use_sim_time:=true',
        '-r', '~/input/image:=/CAM_FRONT/image_rect_compressed',
        '-r', '~/input/camera_info:=/CAM_FRONT/camera_info',
        '-r', '~/input/points:=/LIDAR_TOP']
    for name, value in (parameters or {}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        node_cmd[node_cmd.index('-r'):node_cmd.index('-r')] = ['-p', f'{name}:={text}']
    player_cmd = [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), '--rate', str(rate),
                  *player_args]
    context = rclpy.context.Context()
    rclpy.init(context=context)
    recorder = LiveRecorder(context, out_dir / f'{method}_labeled_points')
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(recorder.node)
    node_log = open(out_dir / f'{method}_node.log', 'w')
    # CPU seconds by process: the children's usage grows as each is reaped (player, node).
    cpu = {'children': resource.getrusage(resource.RUSAGE_CHILDREN),
           'self': resource.getrusage(resource.RUSAGE_SELF), 'wall': time.monotonic()}
    node = subprocess.Popen(node_cmd, env=env, stdout=node_log, stderr=subprocess.STDOUT)
    player = None
    try:
        ready = _spin_until(executor, lambda: recorder.node.count_subscribers('/LIDAR_TOP') > 0
                            and recorder.node.count_publishers(
                                f'/{NODE_NAME}/output/labeled_points') > 0, 120.0)
        if not ready:
            raise RuntimeError(f'the node did not come up; see {node_log.name}')
        log(f'{method}: node up (pid {node.pid}); playing the bag at {rate}x')
        player = subprocess.Popen(player_cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        _spin_until(executor, lambda: player.poll() is not None, 600.0)
        if player.poll() is not None:  # reaped: its CPU is in the children's usage now
            cpu['after_player'] = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Let the node finish the pair it is working on (or every queued one).
        last = [len(recorder.outputs), time.monotonic()]

        def settled():
            if len(recorder.outputs) != last[0]:
                last[:] = [len(recorder.outputs), time.monotonic()]
            idle = recorder.diagnostics.get('pairs_pending', '0') == '0'
            return idle and time.monotonic() - last[1] > 3.0
        _spin_until(executor, settled, settle_timeout)
    finally:
        if player is not None and player.poll() is None:
            player.send_signal(signal.SIGINT)
        node.send_signal(signal.SIGINT)  # Ctrl-C: the node must exit cleanly
        try:
            node_rc = node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node_rc = node.wait()
        node_log.close()
    player_out = player.communicate(timeout=30)[0] if player is not None else ''
    cpu_seconds = _cpu_seconds(cpu, resource.getrusage(resource.RUSAGE_CHILDREN),
                               resource.getrusage(resource.RUSAGE_SELF))
    report = recorder.score()
    latencies = recorder.latencies()
    report.update(sweeps_seen=len(recorder.input_arrivals), diagnostics=recorder.diagnostics,
                  cpu_seconds=cpu_seconds,
                  labeled_stamps=sorted(stamp_to_ns(m.header.stamp) for m in recorder.outputs),
                  latency_ms_median=float(np.median(latencies) * 1e3) if latencies.size else None,
                  latency_ms_p90=float(np.percentile(latencies, 90) * 1e3)
                  if latencies.size else None)
    recorder.write_bag()
    node_text = (out_dir / f'{method}_node.log').read_text()
    report.update(method=method, node_exit_code=node_rc,
                  node_traceback='Traceback' in node_text,
                  player_summary=player_out.strip().splitlines()[-3:])
    if pictures and recorder.outputs and recorder.overlay is not None:
        _save_pictures(method, recorder, out_dir)
    executor.shutdown()
    recorder.node.destroy_node()
    rclpy.try_shutdown(context=context)
    return report


def score_labeled_bag(labeled_bag: Path, truth_bag: Path, stamps: Sequence[int],
                      topic: str = f'/{NODE_NAME}/output/labeled_points') -> Dict[str, object]:
    """Score the recorded labeled clouds of `stamps` against the demo bag's labels."""
    from rosbags.rosbag2 import Reader

    from mmtta_ros.bags.reader import read_clouds
    from mmtta_ros.bags.topics import bag_typestore
    from mmtta_ros.core.classes import IGNORE_INDEX
    from mmtta_ros.core.decode import labels_from_message
    from mmtta_ros.sensors.pointcloud import UNLABELED

    wanted = set(stamps)
    truth = {}
    typestore = bag_typestore()
    with Reader(truth_bag) as reader:
        # The labels topic carries only a label field: no points to decode, just labels.
        connections = [c for c in reader.connections if c.topic == '/LIDAR_TOP/labels']
        for connection, _, raw in reader.messages(connections=connections):
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            stamp = stamp_to_ns(msg.header.stamp)
            if stamp in wanted:
                truth[stamp] = labels_from_message(msg)
    matrix = ConfusionMatrix(len(CLASS_NAMES))
    scored = 0
    for stamp, _, cloud in read_clouds(labeled_bag, topic=topic):
        labels = truth.get(stamp)
        if labels is None or stamp not in wanted or labels.shape[0] != cloud.points.shape[0]:
            continue
        predicted = cloud.fields['label'].astype(np.int64)
        keep = (predicted != UNLABELED) & (labels != IGNORE_INDEX)
        matrix.update(labels[keep], predicted[keep])
        scored += 1
    report = matrix.report(CLASS_NAMES)
    report.update(scored=scored)
    return report


def _save_pictures(method: str, recorder: LiveRecorder, out_dir: Path) -> None:
    from PIL import Image as PILImage

    from mmtta_ros.sensors.image import image_to_rgb
    from mmtta_ros.sensors.pointcloud import cloud_to_numpy, UNLABELED

    PILImage.fromarray(image_to_rgb(recorder.overlay)).save(out_dir / f'{method}_overlay.png')
    cloud = cloud_to_numpy(recorder.outputs[-1])
    labels = cloud.fields['label'].astype(np.int64)
    colors = np.full((len(labels), 3), 90, np.uint8)
    known = labels != UNLABELED
    colors[known] = CLASS_PALETTE[labels[known]]
    try:
        from mmtta_ros.viz.render3d import render_cloud
        render_cloud(cloud.points, colors, out_dir / f'{method}_cloud3d.png')
    except (ImportError, RuntimeError, OSError) as error:
        log(f'3D view not rendered ({error}); install open3d with its system libraries')


def format_live_table(reports: List[Dict[str, object]]) -> str:
    """Render the live results as a text table (IoU in %)."""
    lines = [f'{"method":<8}{"outputs":>8}{"scored":>7}'
             + ''.join(f'{n[:10]:>11}' for n in CLASS_NAMES) + f'{"mIoU":>8}']
    for report in reports:
        cells = ''.join(f'{100 * report["iou"][n]:>11.1f}' if report['iou'][n] is not None
                        else f'{"-":>11}' for n in CLASS_NAMES)
        miou = report['miou']
        lines.append(f'{report["method"]:<8}{report["outputs"]:>8}{report["scored"]:>7}{cells}'
                     f'{100 * miou if miou is not None else float("nan"):>8.1f}')
    return '\n'.join(lines)
