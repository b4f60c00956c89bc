"""
What the plain and the lifecycle node share: inputs -> pairing -> worker -> publish.

`AdaptationShell` is a mixin for an rclpy `Node` (or `LifecycleNode`) that holds typed
`self.params`. It is split where a lifecycle node splits its life:

- `_load()`: build the pipeline (loads the model), resume a saved state, create the
  pairing, the diagnostics and the ~/reset, ~/save_state services (configure);
- `_start_io()`: subscriptions, publishers, timers and the worker thread (activate);
  with labels.mode set, also ~/output/label_requests out and ~/input/point_labels in
  (core/labels.py: which points to ask, how answers are matched and used);
- `_stop_worker()` / `_drop_io()`: stop the worker; destroy what `_start_io` made and
  forget half-paired messages (deactivate);
- `_unload()`: drop the services and the pipeline (cleanup).

The plain node calls `_load` and `_start_io` in its constructor and `_stop_worker` at
shutdown, as it always did; everything between a matched pair and the arrays to publish
is `core.pipeline.Pipeline`.
"""

import threading
import time
import traceback
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import (
    HistoryPolicy, qos_profile_sensor_data, QoSProfile, ReliabilityPolicy)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_srvs.srv import Trigger

from mmtta_ros.core.builder import build_pipeline, build_synchronizer
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.labels import answer_from_cloud, LabelLoop, request_cloud
from mmtta_ros.core.pairing import Mailbox, TimeJump
from mmtta_ros.core.params import NODE_NAME, node_params, output_params
from mmtta_ros.core.realtime import (
    configure_split_threads, lower_thread_priority, restore_threads, SplitPipeline, splits,
    torch_threads)
from mmtta_ros.core.state import StateKeeper
from mmtta_ros.ros.diagnostics import diagnostic_array, NodeDiagnostics
from mmtta_ros.ros.messages import cloud_message, image_message
from mmtta_ros.ros.params import current_values
from mmtta_ros.ros.tf_lookup import make_tf_calibration, NoTransformError
from mmtta_ros.sensors.image import camera_info_to_intrinsics
from mmtta_ros.sensors.pointcloud import make_pointcloud2
from mmtta_ros.sensors.stamps import stamp_to_ns
from mmtta_ros.viz.overlay import mark_requests

IMAGE, POINTS = 0, 1
THROTTLE_S = 5.0


def input_qos(reliable: bool, depth: int) -> QoSProfile:
    """Return the inputs' QoS: sensor data (best effort, volatile) or reliable, keep last."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=qos_profile_sensor_data.durability)


class AdaptationShell:
    """Mixin: the subscribe -> pair -> worker -> publish loop around one pipeline."""

    pipeline: Any = None
    _worker: Optional[threading.Thread] = None

    # --- configure / cleanup -------------------------------------------------------------
    def _load(self) -> None:
        """Build the pipeline from self.params, resume a saved state, create the services."""
        pipeline = build_pipeline(self.params.pipeline, warn=self.get_logger().warning)
        # worker.split: label at inference cost, adapt on another thread (core/realtime.py).
        self.split = splits(self.params)
        self._threads_before = configure_split_threads(
            self.params.pipeline.model.threads, pipeline.device) if self.split else None
        if self._threads_before is not None:
            self.get_logger().info(f'worker.split with threads 0: {torch_threads()} torch '
                                   'thread(s) each for the predictor and the adapter')
        self.pipeline = SplitPipeline(pipeline) if self.split else pipeline
        labels = self.params.pipeline.labels
        self.labels = LabelLoop(labels, self.pipeline) if labels.enabled else None
        self.adapt_box = Mailbox(1)
        self._labeled = 0
        self.state = StateKeeper(self.pipeline, self.params.state)
        resumed = self.state.resume(warn=self.get_logger().warning)
        if resumed:
            self.get_logger().info(resumed)
        self.sync = build_synchronizer(self.params.sync,
                                       self.params.pipeline.inputs.num_cameras)
        self.mailbox = Mailbox(self.params.worker_queue_size if self.params.process_every_pair
                               else 1)
        self.diagnostics = NodeDiagnostics()
        # The newest good camera_info of the primary camera, and of each further one.
        self._camera_info = None
        self._extra_camera_infos = [None] * (self.params.pipeline.inputs.num_cameras - 1)
        self.tf_calibration = self._make_tf()
        self._shell_services = [self.create_service(Trigger, '~/reset', self._on_reset),
                                self.create_service(Trigger, '~/save_state',
                                                    self._on_save_state)]

    def _make_tf(self):
        """Return the TF lookups (ros/tf_lookup.py), or None: then the parameter, no poses."""
        inputs = self.params.pipeline.inputs
        if not inputs.use_tf:
            return None
        tf = make_tf_calibration(self, fallback_T_cam_from_lidar=inputs.T_cam_from_lidar,
                                 odom_frame=inputs.odom_frame, timeout_s=inputs.tf_timeout_s,
                                 ego_motion=inputs.ego_motion)
        if tf is None:
            self.get_logger().info(
                'tf2_ros is not importable: extrinsics from calibration.T_cam_from_lidar, '
                'no ego poses (the static projection)')
        return tf

    def _unload(self) -> None:
        """Destroy the services and drop the pipeline (the adapted state goes with it)."""
        for service in getattr(self, '_shell_services', []):
            self.destroy_service(service)
        self._shell_services = []
        listener = getattr(getattr(self, 'tf_calibration', None), 'listener', None)
        if listener is not None:
            listener.unregister()
        self.pipeline = self.state = self.labels = self.tf_calibration = None
        self._restore_threads()

    def _restore_threads(self) -> None:
        """Give torch back the CPU threads the node found (they are the whole process's)."""
        restore_threads(getattr(self, '_threads_before', None))
        self._threads_before = None

    # --- activate / deactivate -----------------------------------------------------------
    def _start_io(self) -> None:
        """Subscribe, create the publishers and timers, start the worker thread."""
        inputs = self.params.pipeline.inputs
        image_type = Image if inputs.raw_image else CompressedImage
        qos = input_qos(inputs.reliable, inputs.depth)
        self._subscriptions_io = [
            self.create_subscription(PointCloud2, '~/input/points', self._on_points, qos)]
        for camera, name in enumerate(inputs.cameras):
            # One camera: ~/input/image as always; named cameras: ~/input/<name>/image.
            prefix = f'~/input/{name}/' if name else '~/input/'
            self._subscriptions_io += [
                self.create_subscription(image_type, prefix + 'image',
                                         lambda msg, k=camera: self._on_image(msg, k), qos),
                self.create_subscription(CameraInfo, prefix + 'camera_info',
                                         lambda msg, k=camera: self._on_camera_info(msg, k),
                                         qos)]
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = self.create_publisher(PointCloud2, '~/output/labeled_points', reliable)
        self.overlay_pub = self.create_publisher(Image, '~/output/overlay', reliable)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.request_pub = None
        if self.labels is not None:
            # Reliable both ways: every request and every answer is worth a human's time.
            self.request_pub = self.create_publisher(PointCloud2, '~/output/label_requests',
                                                     reliable)
            self._subscriptions_io.append(self.create_subscription(
                PointCloud2, '~/input/point_labels', self._on_point_labels,
                QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)))
        # Wall time: a monitor must see stopped inputs even when /clock stops too.
        wall = Clock(clock_type=ClockType.STEADY_TIME)
        self._timers_io = [
            self.create_timer(self.params.diagnostics_period_s, self._publish_diagnostics,
                              clock=wall),
            self.create_timer(1.0, self._maybe_periodic_save, clock=wall)]
        self.mailbox.reopen()
        self.adapt_box.reopen()
        self._running = True
        self._worker = threading.Thread(target=self._work, name='mmtta_worker', daemon=True)
        self._worker.start()
        self._adapter = None
        if self.split:
            self._adapter = threading.Thread(target=self._adapt_loop, name='mmtta_adapter',
                                             daemon=True)
            self._adapter.start()

    def _stop_worker(self) -> None:
        """Stop the worker thread; a step under way finishes and publishes nothing."""
        self._running = False
        if self._worker is None:
            return
        self.mailbox.close()
        self.adapt_box.close()
        for thread in (self._worker, getattr(self, '_adapter', None)):
            if thread is not None:
                thread.join(timeout=60.0)
                if thread.is_alive():
                    self.get_logger().warning(f'{thread.name} is still in a step after 60 s')

    def _drop_io(self) -> None:
        """Destroy the subscriptions, publishers and timers; forget half-paired messages."""
        for timer in self._timers_io:
            self.destroy_timer(timer)
        for subscription in self._subscriptions_io:
            self.destroy_subscription(subscription)
        for publisher in (self.cloud_pub, self.overlay_pub, self.diagnostics_pub,
                          self.request_pub):
            if publisher is not None:
                self.destroy_publisher(publisher)
        self._timers_io, self._subscriptions_io = [], []
        # Counted (sync_dropped_reset, pairs_dropped_stale): the books still close.
        self.sync.reset()
        self.mailbox.clear()
        self.adapt_box.clear()

    # --- parameters ----------------------------------------------------------------------
    def _apply_parameters(self, _parameters) -> None:
        if self.pipeline is None:
            return  # a lifecycle node not configured yet: configure reads them all
        self.params = node_params(current_values(self))
        self.state.params = self.params.state
        sync = self.params.sync
        self.sync.configure(slop_ns=int(round(sync.slop_s * 1e9)),
                            clock_jump_ns=int(round(sync.time_jump_s * 1e9)),
                            period_fraction=sync.period_fraction)
        output = output_params(current_values(self))
        self.pipeline.set_output(include_out_of_view=output.include_out_of_view,
                                 publish_overlay=output.publish_overlay,
                                 label_unseen_3d=output.label_unseen_3d)

    # --- callbacks (small: count, hand over, return) -------------------------------------
    def _on_camera_info(self, msg: CameraInfo, camera: int = 0) -> None:
        self.diagnostics.received('camera_info')
        try:
            camera_info_to_intrinsics(msg, max_pixels=self.params.max_image_pixels)
        except SensorDataError as error:  # keep the last good one
            self.diagnostics.count('rejected_camera_info')
            self.get_logger().warning(f'rejected camera_info: {error}',
                                      throttle_duration_sec=THROTTLE_S)
            return
        if camera:
            self._extra_camera_infos[camera - 1] = msg
        else:
            self._camera_info = msg
        self.diagnostics.count('camera_info_accepted')

    def _on_image(self, msg, camera: int = 0) -> None:
        self.diagnostics.received('image')
        # The pairing's inputs: the primary image 0, the sweep 1, further cameras 2, 3, ...
        self._add(IMAGE if camera == 0 else POINTS + camera, msg)

    def _on_points(self, msg: PointCloud2) -> None:
        self.diagnostics.received('points')
        self._add(POINTS, msg)

    def _on_point_labels(self, msg: PointCloud2) -> None:
        try:
            answer = answer_from_cloud(msg)
        except SensorDataError as error:
            self.labels.malformed()
            self.get_logger().warning(f'rejected point labels: {error}',
                                      throttle_duration_sec=THROTTLE_S)
            return
        outcome = self.labels.answer(answer)
        if outcome.rejected:
            self.get_logger().warning(
                f'rejected point labels stamped {answer.stamp_ns / 1e9:.3f} s: '
                f'{outcome.rejected.replace("_", " ")}', throttle_duration_sec=THROTTLE_S)

    def _add(self, index: int, msg) -> None:
        try:
            events = self.sync.add(index, stamp_to_ns(msg.header.stamp), msg)
        except SensorDataError as error:
            self.diagnostics.count('rejected_messages')
            self.get_logger().warning(f'rejected input: {error}',
                                      throttle_duration_sec=THROTTLE_S)
            return
        for event in events:
            if isinstance(event, TimeJump):
                self._on_time_jump(event)
            else:
                self.mailbox.put((event, time.monotonic()), order=event.seq)

    def _on_time_jump(self, event: TimeJump) -> None:
        self.diagnostics.time_jump()
        self.mailbox.clear()
        message = (f'time jumped back by {event.jump_ns / 1e9:.2f} s (looping bag?): '
                   'sync queues cleared')
        if self.params.reset_on_time_jump:
            self.pipeline.reset()
            self.diagnostics.count('resets')
            message += ', adaptation reset to the source model'
        else:
            self.pipeline.reset_window()
        self.get_logger().warning(message, throttle_duration_sec=THROTTLE_S)

    # --- the worker: matched pair -> pipeline -> publish ---------------------------------
    def _work(self) -> None:
        while self._running:
            item = self.mailbox.take(timeout=0.1)
            if item is None:
                continue
            self.diagnostics.pair_taken()
            pair, complete_at = item
            image_msg, cloud_msg = pair.messages[IMAGE], pair.messages[POINTS]
            extra_msgs = list(pair.messages[POINTS + 1:])
            if not self._stamp_acceptable(cloud_msg):
                self.diagnostics.pair_done('rejected_stamp_skew')
                continue
            try:
                started = time.perf_counter()
                frame = self._decode(image_msg, cloud_msg, extra_msgs)
                decoded = time.perf_counter()
                output = (self.pipeline.predict(frame) if self.split
                          else self.pipeline.process(frame))
                request = self.labels.request(output) if self.labels is not None else None
            except NoTransformError as error:
                self.diagnostics.pair_done('rejected_no_transform')
                self.get_logger().warning(f'rejected input: {error}',
                                          throttle_duration_sec=THROTTLE_S)
                continue
            except SensorDataError as error:
                self.diagnostics.pair_done('rejected_frames')
                self.get_logger().warning(f'rejected input: {error}',
                                          throttle_duration_sec=THROTTLE_S)
                continue
            except Exception:  # noqa: B902 - one failed step must not stop the node for good
                self.diagnostics.pair_done('step_failures')
                self.get_logger().error('adaptation step failed; frame skipped:\n'
                                        + traceback.format_exc(),
                                        throttle_duration_sec=THROTTLE_S)
                continue
            if not self._running or not self.context.ok():
                # Ctrl-C (or deactivate) during the step: nothing to publish on any more.
                self.diagnostics.pair_done('pairs_abandoned')
                break
            published = time.perf_counter()
            self.cloud_pub.publish(cloud_message(output.cloud, cloud_msg.header))
            if request is not None:
                self.request_pub.publish(make_pointcloud2(
                    PointCloud2, PointField, request_cloud(request), cloud_msg.header))
                if output.overlay is not None:
                    output.overlay = mark_requests(output.overlay, request.pixels)
            if output.overlay is not None:
                self.overlay_pub.publish(image_message(output.overlay, image_msg.header))
            # label: from the decoded frame to the labeled cloud, of which project, model
            # and encode are the pipeline's stages (the rest: the label request).
            stages = {'decode': decoded - started, 'label': published - decoded,
                      **output.stage_seconds, 'publish': time.perf_counter() - published}
            self.diagnostics.frame_done(time.monotonic() - complete_at, output.step_seconds,
                                        output.stats, stages)
            self.diagnostics.thread_cpu('worker')
            if self.split:
                # The adapter takes the newest frame handed over whenever it is free.
                if self._labeled % self.params.adapt_every == 0:
                    self.adapt_box.put(frame)
                self._labeled += 1

    def _decode(self, image_msg, cloud_msg, extra_msgs=()):
        """Return the set as a Frame, with its transforms from TF where there is TF."""
        cameras = {}
        if extra_msgs:
            cameras = dict(
                extra_cameras=[self._decode_view(k, msg, info, cloud_msg) for k, (msg, info)
                               in enumerate(zip(extra_msgs, self._extra_camera_infos), 1)],
                camera_name=self.params.pipeline.inputs.cameras[0])
        if self.tf_calibration is None:
            return self.pipeline.frame_from_messages(image_msg, self._camera_info, cloud_msg,
                                                     **cameras)
        calibration = self.tf_calibration.lookup(
            str(image_msg.header.frame_id), str(cloud_msg.header.frame_id),
            stamp_to_ns(image_msg.header.stamp), stamp_to_ns(cloud_msg.header.stamp))
        if calibration.extrinsics_from == 'parameter':
            self.diagnostics.count('extrinsics_from_parameter')
        if self.tf_calibration.ego_motion and calibration.T_odom_from_cam is None:
            self.diagnostics.count('frames_without_ego_pose')
        for problem in calibration.problems:
            self.get_logger().warning(problem, throttle_duration_sec=THROTTLE_S)
        return self.pipeline.frame_from_messages(
            image_msg, self._camera_info, cloud_msg,
            T_cam_from_lidar=calibration.T_cam_from_lidar,
            T_odom_from_lidar=calibration.T_odom_from_lidar,
            T_odom_from_cam=calibration.T_odom_from_cam, **cameras)

    def _decode_view(self, camera: int, image_msg, info_msg, cloud_msg):
        """Return further camera `camera`'s image of the set as a CameraView."""
        inputs = self.params.pipeline.inputs
        name = inputs.cameras[camera]
        # calibration.T_cam_from_lidar is the primary camera's: never another's mount.
        fallback = (inputs.extra_T_cam_from_lidar[camera - 1]
                    if inputs.extra_T_cam_from_lidar else None)
        T_cam_from_lidar, T_odom_from_cam = fallback, None
        if self.tf_calibration is not None:
            try:
                calibration = self.tf_calibration.lookup(
                    str(image_msg.header.frame_id), str(cloud_msg.header.frame_id),
                    stamp_to_ns(image_msg.header.stamp), stamp_to_ns(cloud_msg.header.stamp))
            except NoTransformError:
                if fallback is None:
                    raise
            else:
                T_odom_from_cam = calibration.T_odom_from_cam
                if calibration.extrinsics_from != 'parameter':
                    T_cam_from_lidar = calibration.T_cam_from_lidar
        if T_cam_from_lidar is None:
            raise NoTransformError(
                f'camera {name}: no transform {image_msg.header.frame_id} <- '
                f'{cloud_msg.header.frame_id} in TF and calibration.extra_T_cam_from_lidar '
                'is not set')
        return self.pipeline.camera_view_from_messages(
            name, image_msg, info_msg, T_cam_from_lidar=T_cam_from_lidar,
            T_odom_from_cam=T_odom_from_cam)

    def _adapt_loop(self) -> None:
        """worker.split: adapt on the newest labeled frame handed over, at the adapter's pace."""
        problem = lower_thread_priority(self.params.adapter_nice)
        if problem is not None:
            self.get_logger().warning(problem)
        while self._running:
            frame = self.adapt_box.take(timeout=0.1)
            if frame is None:
                continue
            started = time.perf_counter()
            try:
                stats = self.pipeline.adapt(frame)
            except Exception:  # noqa: B902 - a failed step must not stop adaptation for good
                self.diagnostics.count('adaptation_failures')
                self.get_logger().error('adaptation step failed:\n' + traceback.format_exc(),
                                        throttle_duration_sec=THROTTLE_S)
                continue
            self.diagnostics.adaptation_done(time.perf_counter() - started, stats)
            self.diagnostics.thread_cpu('adapter')

    def _stamp_acceptable(self, cloud_msg) -> bool:
        limit = self.params.max_stamp_skew_s
        if limit <= 0:
            return True
        skew = (stamp_to_ns(cloud_msg.header.stamp) - self.get_clock().now().nanoseconds) / 1e9
        if abs(skew) <= limit:
            return True
        self.get_logger().warning(
            f'rejected a frame stamped {skew:+.1f} s from the node clock (max_stamp_skew '
            f'{limit} s; replaying a bag? set use_sim_time)', throttle_duration_sec=THROTTLE_S)
        return False

    # --- services, state, diagnostics ----------------------------------------------------
    def _on_reset(self, request, response):
        self.pipeline.reset()
        self.diagnostics.count('resets')
        response.success, response.message = True, 'adaptation reset to the source model'
        self.get_logger().info(response.message)
        return response

    def save_state(self) -> str:
        """Save the adapted state atomically to state.save_path; return a message."""
        try:
            message = self.state.save()
        except (OSError, ValueError, RuntimeError):
            self.diagnostics.count('save_failures')
            raise
        self.diagnostics.count('saves')
        return message

    def _on_save_state(self, request, response):
        try:
            response.message, response.success = self.save_state(), True
        except (OSError, ValueError, RuntimeError) as error:
            response.success, response.message = False, f'save failed: {error}'
        self.get_logger().info(response.message)
        return response

    def _maybe_periodic_save(self) -> None:
        if self.state.periodic_save_due():
            try:
                self.save_state()
            except (OSError, ValueError, RuntimeError) as error:
                self.get_logger().error(f'periodic save failed: {error}',
                                        throttle_duration_sec=60.0)

    def _save_at_shutdown(self) -> None:
        if self.state is not None and self.state.save_at_shutdown:
            try:
                self.get_logger().info(self.save_state())
            except (OSError, ValueError, RuntimeError) as error:
                self.get_logger().error(f'could not save the adapted state: {error}')

    def diagnostics_values(self) -> dict:
        """Return the figures /diagnostics reports (rates in Hz, times in ms, counters)."""
        extra = {f'sync_{key}': value for key, value in self.sync.stats.as_dict().items()}
        extra.update(pairs_dropped_stale=self.mailbox.dropped, pairs_pending=self.mailbox.pending,
                     frames_skipped_by_adapter=self.adapt_box.dropped)
        if self.labels is not None:
            extra.update(self.labels.counters())
        return self.diagnostics.values(extra)

    def _publish_diagnostics(self) -> None:
        self.diagnostics_pub.publish(diagnostic_array(
            self.diagnostics_values(), self.get_clock().now().to_msg(),
            method=self.pipeline.method_name, worker_alive=self._worker.is_alive()))

    def _ready_message(self) -> str:
        model = self.params.pipeline.model
        return (f'{self.pipeline.method_name} on {self.pipeline.device}, '
                f'{model.checkpoint or "random " + model.size + " model"}, images resized to '
                f'{model.image_size[0]}x{model.image_size[1]}')


def fatal_reason(error: BaseException) -> str:
    """Return an error as one line: a monitor greps it, and many lines read like a traceback."""
    reason = '; '.join(line.strip() for line in str(error).splitlines() if line.strip())
    return reason or type(error).__name__


def spin_node(make_node, args=None) -> int:
    """Create a node with make_node() and spin it until Ctrl-C; bad start-up: FATAL, exit 2."""
    rclpy.init(args=args)
    node = None
    # Made before the node says it is ready: a Ctrl-C right after that must not land inside
    # the executor's constructor (rclpy then prints a traceback from its __del__).
    executor = SingleThreadedExecutor()
    try:
        node = make_node()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, OSError, RuntimeError) as error:  # bad config / files: say why
        rclpy.logging.get_logger(NODE_NAME).fatal(fatal_reason(error))
        return 2
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
    return 0
