"""
mmtta_adapt: the ROS 2 node. A thin shell: sync, hand the latest pair to a worker, publish.

Inputs (sensor-data QoS): ~/input/image (CompressedImage or Image), ~/input/camera_info,
~/input/points (PointCloud2). Outputs (reliable): ~/output/labeled_points, ~/output/overlay,
/diagnostics. Services: ~/reset, ~/save_state (std_srvs/Trigger). Parameters: see
`mmtta_ros.node_config.PARAMETERS` and config/adapt.yaml.
"""

import threading
import time
import traceback
from typing import Dict, List, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_srvs.srv import Trigger

from mmtta_ros.adapt_core import AdaptationCore, CoreOutput
from mmtta_ros.checkpoint import load_model_checkpoint
from mmtta_ros.errors import SensorDataError
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.node_config import build_config, check_value, PARAMETERS, ParamSpec, SPECS
from mmtta_ros.pipeline import SegmentationPipeline, select_device
from mmtta_ros.sensors.pointcloud import make_pointcloud2
from mmtta_ros.sensors.stamps import stamp_to_ns
from mmtta_ros.sync import ApproximateSynchronizer, LatestSlot, TimeJump
from mmtta_ros.tta import build_method, CollapseGuard

IMAGE, POINTS = 0, 1
RATE_WINDOW_S = 5.0


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    if spec.choices:
        descriptor.additional_constraints = 'one of: ' + ', '.join(spec.choices)
    if spec.low is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            descriptor.integer_range = [IntegerRange(
                from_value=int(spec.low), to_value=int(spec.high), step=0)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
    if spec.name == 'calibration.T_cam_from_lidar':
        descriptor.dynamic_typing = True  # YAML integers such as 0 and 1 are welcome too
    return descriptor


class MMTTANode(Node):
    """Online MM-TTA of a camera+LiDAR segmenter, publishing labeled clouds."""

    def __init__(self, **kwargs):
        super().__init__('mmtta_adapt', **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        values = {spec.name: self._parameter_value(spec.name) for spec in PARAMETERS}
        self.config, problems = build_config(values)
        if problems:
            raise ValueError('invalid parameters: ' + '; '.join(problems))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.counters: Dict[str, int] = {
            'frames_processed': 0, 'pairs_dropped_stale': 0, 'rejected_messages': 0,
            'time_jumps': 0, 'resets': 0, 'saves': 0, 'save_failures': 0,
            'step_failures': 0}
        self._received: Dict[str, List[float]] = {'image': [], 'points': []}
        self._latencies: List[float] = []
        self._step_times: List[float] = []
        self._last_stats: Dict[str, float] = {}
        self._camera_info: Optional[CameraInfo] = None
        self._stats_lock = threading.Lock()
        # Serialises everything that touches the adaptation state (step, reset, save).
        self._method_lock = threading.Lock()

        self.device = select_device(self.config['device'])
        self.method = self._build_method()
        self.pipeline = SegmentationPipeline(
            self.method, self.device, batch_frames=self.config['adaptation.batch_frames'],
            min_depth=self.config['min_depth'])
        self.core = AdaptationCore(
            self.pipeline, self.config.image_size, self.config.palette,
            self.config.T_cam_from_lidar,
            compressed=self.config['image_transport'] == 'compressed',
            include_out_of_view=self.config['output.include_out_of_view'],
            publish_overlay=self.config['output.publish_overlay'])

        self.sync = ApproximateSynchronizer(
            num_inputs=2, slop_ns=int(self.config['sync.slop'] * 1e9),
            queue_size=self.config['sync.queue_size'],
            clock_jump_ns=int(self.config['sync.time_jump'] * 1e9))
        self.slot = LatestSlot()

        image_type = CompressedImage if self.core.compressed else Image
        self.create_subscription(image_type, '~/input/image', self._on_image,
                                 qos_profile_sensor_data)
        self.create_subscription(CameraInfo, '~/input/camera_info', self._on_camera_info,
                                 qos_profile_sensor_data)
        self.create_subscription(PointCloud2, '~/input/points', self._on_points,
                                 qos_profile_sensor_data)
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = self.create_publisher(PointCloud2, '~/output/labeled_points', reliable)
        self.overlay_pub = self.create_publisher(Image, '~/output/overlay', reliable)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_service(Trigger, '~/reset', self._on_reset)
        self.create_service(Trigger, '~/save_state', self._on_save_state)
        self.create_timer(self.config['diagnostics_period'], self._publish_diagnostics)
        self._last_save = time.monotonic()
        self.create_timer(1.0, self._maybe_periodic_save)

        self._running = True
        self._worker = threading.Thread(target=self._work, name='mmtta_worker', daemon=True)
        self._worker.start()
        model = self.config['model.checkpoint'] or f'random {self.config["model.size"]} model'
        width, height = self.config.image_size
        self.get_logger().info(f'ready: {self.config["adaptation.method"]} on {self.device}, '
                               f'{model}, images resized to {width}x{height}')

    # --- setup ---------------------------------------------------------------------------
    def _parameter_value(self, name: str):
        value = self.get_parameter(name).value
        return list(value) if isinstance(value, (list, tuple, np.ndarray)) else value

    def _build_method(self):
        checkpoint = self.config['model.checkpoint']
        if checkpoint:
            model, model_config, _ = load_model_checkpoint(checkpoint, self.device)
            if model_config.num_classes != len(self.config['classes.names']):
                raise ValueError(
                    f'{checkpoint} predicts {model_config.num_classes} classes but '
                    f'classes.names lists {len(self.config["classes.names"])}')
        else:
            self.get_logger().warning(
                'model.checkpoint is empty: running a randomly initialised '
                f'{self.config["model.size"]} segmenter (labels will be meaningless)')
            model = build_segmenter(SegmenterConfig(size=self.config['model.size']))
            model = model.to(self.device)
        params = self.config.method_hyperparameters()
        if self.config['reset.collapse_guard'] and self.config['adaptation.method'] != 'source':
            params['collapse_guard'] = CollapseGuard(
                max_dominant_fraction=self.config['reset.max_dominant_fraction'],
                patience=self.config['reset.patience'])
        method = build_method(self.config['adaptation.method'], model, **params)
        path = self.config['state.save_path']
        if self.config['state.load_on_start'] and path:
            try:
                method.load_state(path)
                self.get_logger().info(f'resumed adapted state from {path}')
            except FileNotFoundError:
                self.get_logger().info(f'no saved state at {path} yet: starting from source')
        return method

    def _on_set_parameters(self, parameters: List[Parameter]) -> SetParametersResult:
        # Parameters rclpy owns (use_sim_time, qos overrides) are not ours to check.
        parameters = [p for p in parameters if p.name in SPECS]
        for parameter in parameters:
            value = parameter.value
            if isinstance(value, (tuple, np.ndarray)):
                value = list(value)
            reason = check_value(parameter.name, value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        for parameter in parameters:
            self.config.values[parameter.name] = parameter.value
        self.sync.configure(slop_ns=int(self.config['sync.slop'] * 1e9),
                            clock_jump_ns=int(self.config['sync.time_jump'] * 1e9))
        self.core.include_out_of_view = self.config['output.include_out_of_view']
        self.core.publish_overlay = self.config['output.publish_overlay']
        return SetParametersResult(successful=True)

    # --- callbacks (small: stamp, hand over, return) --------------------------------------
    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _on_image(self, msg) -> None:
        self._note_received('image')
        self._add(IMAGE, msg)

    def _on_points(self, msg: PointCloud2) -> None:
        self._note_received('points')
        self._add(POINTS, msg)

    def _note_received(self, key: str) -> None:
        now = time.monotonic()
        with self._stats_lock:
            times = self._received[key]
            times.append(now)
            while times and times[0] < now - RATE_WINDOW_S:
                times.pop(0)

    def _add(self, index: int, msg) -> None:
        try:
            events = self.sync.add(index, stamp_to_ns(msg.header.stamp), msg)
        except SensorDataError as error:
            self.counters['rejected_messages'] += 1
            self.get_logger().warning(f'rejected input: {error}', throttle_duration_sec=5.0)
            return
        for event in events:
            if isinstance(event, TimeJump):
                self._on_time_jump(event)
            elif self.slot.put((event, time.monotonic()), order=event.seq):
                # The worker was busy: the older pair it had not started is dropped.
                self.counters['pairs_dropped_stale'] += 1

    def _on_time_jump(self, event: TimeJump) -> None:
        self.counters['time_jumps'] += 1
        self.slot.clear()
        message = (f'time jumped back by {event.jump_ns / 1e9:.2f} s (looping bag?): '
                   'sync queues cleared')
        if self.config['reset.on_time_jump']:
            self._reset_adaptation()
            message += ', adaptation reset to the source model'
        else:
            with self._method_lock:
                self.pipeline.reset_window()
        self.get_logger().warning(message)

    # --- the worker: latest matched pair -> core -> publish ------------------------------
    def _work(self) -> None:
        while self._running:
            item = self.slot.take(timeout=0.1)
            if item is None:
                continue
            matched, received_at = item
            image_msg, cloud_msg = matched.messages[IMAGE], matched.messages[POINTS]
            if not self._stamp_acceptable(cloud_msg):
                continue
            try:
                frame = self.core.frame_from_messages(image_msg, self._camera_info, cloud_msg)
                with self._method_lock:
                    output = self.core.process_frame(frame)
            except SensorDataError as error:
                self.counters['rejected_messages'] += 1
                self.get_logger().warning(f'rejected input: {error}', throttle_duration_sec=5.0)
                continue
            except Exception:  # noqa: B902 - one failed step must not stop the node for good
                self.counters['step_failures'] += 1
                self.get_logger().error('adaptation step failed; frame skipped:\n'
                                        + traceback.format_exc(), throttle_duration_sec=5.0)
                continue
            if not self._running or not self.context.ok():
                break  # Ctrl-C arrived during the step: nothing to publish on any more
            self._publish(output, image_msg, cloud_msg)
            latency = time.monotonic() - received_at
            with self._stats_lock:
                self.counters['frames_processed'] += 1
                self._latencies = (self._latencies + [latency])[-100:]
                self._step_times = (self._step_times + [output.step_seconds])[-100:]
                self._last_stats = dict(output.result.stats)

    def _stamp_acceptable(self, cloud_msg) -> bool:
        skew_limit = self.config['max_stamp_skew']
        if skew_limit <= 0:
            return True
        now_ns = self.get_clock().now().nanoseconds
        skew = (stamp_to_ns(cloud_msg.header.stamp) - now_ns) / 1e9
        if abs(skew) <= skew_limit:
            return True
        self.counters['rejected_messages'] += 1
        self.get_logger().warning(
            f'rejected a frame stamped {skew:+.1f} s from the node clock (max_stamp_skew '
            f'{skew_limit} s; replaying a bag? set use_sim_time)', throttle_duration_sec=5.0)
        return False

    def _publish(self, output: CoreOutput, image_msg, cloud_msg) -> None:
        cloud = make_pointcloud2(PointCloud2, PointField, output.cloud, cloud_msg.header)
        self.cloud_pub.publish(cloud)
        if output.overlay is not None:
            overlay = Image()
            overlay.header = image_msg.header
            overlay.height, overlay.width = output.overlay.shape[:2]
            overlay.encoding, overlay.is_bigendian = 'rgb8', 0
            overlay.step = 3 * overlay.width
            overlay.data = output.overlay.tobytes()
            self.overlay_pub.publish(overlay)

    # --- services, state, diagnostics ----------------------------------------------------
    def _reset_adaptation(self) -> None:
        with self._method_lock:
            self.method.reset()
            self.pipeline.reset_window()
        self.counters['resets'] += 1

    def _on_reset(self, request, response):
        self._reset_adaptation()
        response.success, response.message = True, 'adaptation reset to the source model'
        self.get_logger().info(response.message)
        return response

    def save_state(self) -> str:
        """Save the adapted state atomically to state.save_path; return a message."""
        path = self.config['state.save_path']
        if not path:
            raise ValueError('state.save_path is empty: nowhere to save')
        with self._method_lock:
            self.method.save_state(path)
        self.counters['saves'] += 1
        self._last_save = time.monotonic()
        return f'adapted state saved to {path}'

    def _on_save_state(self, request, response):
        try:
            response.message = self.save_state()
            response.success = True
        except (OSError, ValueError, RuntimeError) as error:
            self.counters['save_failures'] += 1
            response.success, response.message = False, f'save failed: {error}'
        self.get_logger().info(response.message)
        return response

    def _maybe_periodic_save(self) -> None:
        period = self.config['state.save_period']
        if period > 0 and self.config['state.save_path'] and \
                time.monotonic() - self._last_save >= period:
            try:
                self.save_state()
            except (OSError, ValueError, RuntimeError) as error:
                self.counters['save_failures'] += 1
                self.get_logger().error(f'periodic save failed: {error}')

    def diagnostics_values(self) -> Dict[str, float]:
        """Return the figures /diagnostics reports (rates in Hz, times in ms)."""
        now = time.monotonic()
        with self._stats_lock:
            # Count only the window: a sensor that stopped must show 0 Hz, not its last rate.
            rates = {f'{key}_rate_hz': sum(t >= now - RATE_WINDOW_S for t in times) / RATE_WINDOW_S
                     for key, times in self._received.items()}
            latency = float(np.mean(self._latencies)) * 1e3 if self._latencies else float('nan')
            step = float(np.mean(self._step_times)) * 1e3 if self._step_times else float('nan')
            stats = dict(self._last_stats)
        values = {**rates, 'latency_ms': latency, 'step_ms': step, **self.counters}
        for key, value in self.sync.stats.as_dict().items():
            values[f'sync_{key}'] = value
        values['slot_dropped'] = self.slot.dropped
        for key in ('kept_ratio', 'entropy', 'loss', 'resets', 'dominant_fraction'):
            if key in stats:
                values[f'adaptation_{key}'] = stats[key]
        return values

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        status = DiagnosticStatus(name='mmtta_ros: adaptation', hardware_id='mmtta_adapt')
        if not self._worker.is_alive():
            status.level, status.message = DiagnosticStatus.ERROR, 'the worker thread stopped'
        elif values['frames_processed'] == 0:
            status.level, status.message = DiagnosticStatus.WARN, 'no frame processed yet'
        else:
            status.level, status.message = DiagnosticStatus.OK, (
                f'{self.config["adaptation.method"]}: {values["frames_processed"]} frames')
        status.values = [KeyValue(key=key, value=f'{value:.4g}' if isinstance(value, float)
                                  else str(value)) for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    def shutdown(self) -> None:
        """Stop the worker (its last step publishes nothing); save the state if configured."""
        self._running = False
        self.slot.close()
        self._worker.join(timeout=60.0)
        if self._worker.is_alive():
            self.get_logger().warning('the worker is still in a step after 60 s')
        if self.config['state.save_on_shutdown'] and self.config['state.save_path']:
            try:
                self.get_logger().info(self.save_state())
            except (OSError, ValueError, RuntimeError) as error:
                self.get_logger().error(f'could not save the adapted state: {error}')


def main(args=None) -> int:
    """Run the node until Ctrl-C or shutdown; exit quietly."""
    rclpy.init(args=args)
    node = None
    try:
        node = MMTTANode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # bad config / files: say why
        rclpy.logging.get_logger('mmtta_adapt').fatal(str(error))
        return 2
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
