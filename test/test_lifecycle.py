"""The lifecycle node driven over DDS by a peer through lifecycle_msgs ChangeState/GetState."""

import time

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
pytest.importorskip('lifecycle_msgs', reason='lifecycle_msgs not installed')
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2  # noqa: E402
import torch  # noqa: E402

from mmtta_ros.core.checkpoint import save_model_checkpoint  # noqa: E402
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig  # noqa: E402
from mmtta_ros.ros import lifecycle  # noqa: E402
from mmtta_ros.ros.lifecycle import MMTTALifecycleNode  # noqa: E402
from mmtta_ros.synth import generate_frames, SequenceConfig  # noqa: E402
from test_node import cloud_msg, IMAGE_SIZE, image_msg, info_msg  # noqa: E402

pytestmark = pytest.mark.dds
NS = '/mmtta_adapt'


@pytest.fixture(scope='module')
def frames():
    config = SequenceConfig(domain='night', seed=3, num_frames=6, image_size=IMAGE_SIZE,
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


class LifecycleHarness:
    """The lifecycle node plus a peer that feeds it, records its output and drives it."""

    def __init__(self, frames, **overrides):
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context)
        T = [float(v) for v in frames[0].T_cam_from_lidar.reshape(-1)]
        params = {'calibration.T_cam_from_lidar': T, 'model.image_width': IMAGE_SIZE[0],
                  'model.image_height': IMAGE_SIZE[1], 'device': 'cpu',
                  'worker.process_every_pair': True,
                  # Adapt-then-label in one step: step counts follow the frames exactly
                  # (worker.split is tested in test_node.py).
                  'worker.split': False, **overrides}
        self.node = MMTTALifecycleNode(context=self.context, parameter_overrides=[
            Parameter(name, value=value) for name, value in params.items()])
        self.peer = rclpy.create_node('lifecycle_peer', context=self.context)
        self.image_pub = self.peer.create_publisher(
            CompressedImage, f'{NS}/input/image', qos_profile_sensor_data)
        self.info_pub = self.peer.create_publisher(
            CameraInfo, f'{NS}/input/camera_info', qos_profile_sensor_data)
        self.cloud_pub = self.peer.create_publisher(
            PointCloud2, f'{NS}/input/points', qos_profile_sensor_data)
        self.clouds = []
        self.peer.create_subscription(PointCloud2, f'{NS}/output/labeled_points',
                                      self.clouds.append, 10)
        self.change = self.peer.create_client(ChangeState, f'{NS}/change_state')
        self.get = self.peer.create_client(GetState, f'{NS}/get_state')
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        assert self.spin_until(lambda: self.change.service_is_ready()
                               and self.get.service_is_ready(), 20.0)

    def spin_until(self, condition, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            self.executor.spin_once(timeout_sec=0.05)
        return condition()

    def _call(self, client, request, timeout=60.0):
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout), 'no answer from the lifecycle node'
        return future.result()

    def transition(self, transition_id) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self._call(self.change, request).success

    def state(self) -> int:
        return self._call(self.get, GetState.Request()).current_state.id

    def subscribed(self) -> bool:
        return self.cloud_pub.get_subscription_count() > 0

    def send_frames(self, frames):
        """Send frames one by one; the last one only completes the pair before it."""
        for frame in frames:
            self.info_pub.publish(info_msg(frame))
            self.spin_until(lambda: False, 0.05)
            self.cloud_pub.publish(cloud_msg(frame))
            self.image_pub.publish(image_msg(frame))
            self.spin_until(lambda: False, 0.3)

    def close(self):
        self.node.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture
def source_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny')
    model = build_segmenter(config)
    path = tmp_path / 'source.pt'
    save_model_checkpoint(path, model, config)
    return path, {key: value.clone() for key, value in model.state_dict().items()}


def model_state(node):
    return {key: value.detach().clone()
            for key, value in node.pipeline.method.model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_release_cached_memory_empties_the_cuda_cache_only_for_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: emptied.append(True))
    lifecycle.release_cached_memory(torch.device('cpu'))
    assert emptied == []
    lifecycle.release_cached_memory(torch.device('cuda', 0))
    assert emptied == [True]


def test_configure_activate_deactivate_cleanup_over_dds(frames, source_checkpoint,
                                                        monkeypatch):
    checkpoint, source = source_checkpoint
    released = []
    monkeypatch.setattr(lifecycle, 'release_cached_memory', released.append)
    h = LifecycleHarness(frames, **{'model.checkpoint': str(checkpoint)})
    try:
        # Unconfigured: no model, no subscriptions.
        assert h.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert h.node.pipeline is None and not h.subscribed()
        # configure loads the model (the source weights) and checks the parameters ...
        assert h.transition(Transition.TRANSITION_CONFIGURE)
        assert h.state() == State.PRIMARY_STATE_INACTIVE
        assert same_state(model_state(h.node), source)
        # ... but only activate subscribes.
        assert not h.spin_until(h.subscribed, 1.0)
        assert h.transition(Transition.TRANSITION_ACTIVATE)
        assert h.state() == State.PRIMARY_STATE_ACTIVE
        assert h.spin_until(h.subscribed, 10.0)
        h.send_frames(frames[:4])
        assert h.spin_until(lambda: len(h.clouds) >= 3, 60.0), h.node.diagnostics_values()
        pipeline = h.node.pipeline
        assert h.spin_until(lambda: pipeline.method.steps >= 3, 30.0)

        # deactivate: no subscriptions, no output, the adapted state kept as it was.
        assert released == []
        assert h.transition(Transition.TRANSITION_DEACTIVATE)
        assert h.state() == State.PRIMARY_STATE_INACTIVE
        assert released == [pipeline.device]  # cached GPU memory freed (a no-op on CPU)
        assert h.spin_until(lambda: not h.subscribed(), 10.0)
        steps, adapted = pipeline.method.steps, model_state(h.node)
        assert not same_state(adapted, source), 'three steps changed nothing'
        received = len(h.clouds)
        h.send_frames(frames[2:6])
        h.spin_until(lambda: False, 2.0)
        assert len(h.clouds) == received
        assert h.node.pipeline is pipeline and pipeline.method.steps == steps
        assert same_state(model_state(h.node), adapted)

        # activate again: it goes on from the adapted state, not from the source.
        assert h.transition(Transition.TRANSITION_ACTIVATE)
        assert h.spin_until(h.subscribed, 10.0)
        h.send_frames(frames[2:5])
        assert h.spin_until(lambda: len(h.clouds) >= received + 2, 60.0)
        assert h.spin_until(lambda: pipeline.method.steps >= steps + 2, 30.0)

        # cleanup drops the pipeline; configure starts from the source model again.
        assert h.transition(Transition.TRANSITION_DEACTIVATE)
        assert h.transition(Transition.TRANSITION_CLEANUP)
        assert h.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert h.node.pipeline is None
        assert h.transition(Transition.TRANSITION_CONFIGURE)
        assert h.node.pipeline is not pipeline and h.node.pipeline.method.steps == 0
        assert same_state(model_state(h.node), source)

        # shutdown from inactive ends in finalized.
        assert h.transition(Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert h.state() == State.PRIMARY_STATE_FINALIZED
        assert h.node.pipeline is None
    finally:
        h.close()


def test_a_bad_checkpoint_fails_configure_and_leaves_it_unconfigured(frames, tmp_path):
    h = LifecycleHarness(frames, **{'model.checkpoint': str(tmp_path / 'missing.pt')})
    try:
        assert not h.transition(Transition.TRANSITION_CONFIGURE)
        assert h.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert 'missing.pt' in h.node.configure_error and h.node.pipeline is None
        assert not h.transition(Transition.TRANSITION_ACTIVATE)  # not from unconfigured
        assert h.transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert h.state() == State.PRIMARY_STATE_FINALIZED
    finally:
        h.close()


def test_shutdown_from_active_unsubscribes_and_saves_the_state(frames, tmp_path):
    path = tmp_path / 'state.pt'
    h = LifecycleHarness(frames, **{'state.save_path': str(path)})
    try:
        assert h.transition(Transition.TRANSITION_CONFIGURE)
        assert h.transition(Transition.TRANSITION_ACTIVATE)
        assert h.spin_until(h.subscribed, 10.0)
        assert not path.exists()
        assert h.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN)
        assert h.state() == State.PRIMARY_STATE_FINALIZED
        assert path.is_file() and h.node.pipeline is None
        assert h.spin_until(lambda: not h.subscribed(), 10.0)
    finally:
        h.close()
