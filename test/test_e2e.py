"""End to end with real processes over DDS on loopback: player -> node -> a subscriber here."""

import signal
import subprocess
import sys

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from dds_helpers import (  # noqa: E402
    INPUT_TOPICS, listening, node_command, process_env, small_night_bag, spin_until)
from mmtta_ros.bags.reader import read_clouds  # noqa: E402
from mmtta_ros.sensors.pointcloud import cloud_to_numpy, UNLABELED  # noqa: E402
from mmtta_ros.sensors.stamps import stamp_to_ns  # noqa: E402
from mmtta_ros.synth import T_CAM_FROM_LIDAR  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    return small_night_bag(tmp_path_factory.mktemp('e2e') / 'night')


def test_player_node_subscriber(bag, tmp_path):
    env = process_env()
    node_cmd = node_command('use_sim_time:=true', 'model.image_width:=160',
                            'model.image_height:=90', f'state.save_path:={tmp_path / "state.pt"}')
    with listening('e2e_listener') as (listener, executor, processes):
        clouds = []
        listener.create_subscription(
            PointCloud2, '/mmtta_adapt/output/labeled_points', clouds.append,
            QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
        node_log = tmp_path / 'node.log'
        with open(node_log, 'w') as log:
            node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(node)
        assert spin_until(executor, lambda: listener.count_subscribers('/LIDAR_TOP') > 0,
                          90.0), node_log.read_text()
        # Quarter speed: the node on a 2-core machine keeps up with most pairs (its first
        # step, which warms torch up, takes a second or two).
        player = subprocess.Popen(
            [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), '--rate', '0.25'],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(player)
        assert spin_until(executor, lambda: player.poll() is not None, 120.0)
        spin_until(executor, lambda: False, 3.0)  # the last pair in flight
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=30) == 0

    text = node_log.read_text()
    assert 'Traceback' not in text, text
    assert (tmp_path / 'state.pt').is_file(), 'state.save_on_shutdown must save at Ctrl-C'
    sent = {stamp: decoded for stamp, _, decoded in read_clouds(bag, topic='/LIDAR_TOP')}
    assert len(clouds) >= 3, f'only {len(clouds)} labeled clouds came back:\n{text}'
    for cloud in clouds:
        # Each output is an input sweep, same stamp, same frame, same points.
        stamp = stamp_to_ns(cloud.header.stamp)
        assert stamp in sent and cloud.header.frame_id == 'LIDAR_TOP'
        decoded = cloud_to_numpy(cloud)
        np.testing.assert_allclose(decoded.points, sent[stamp].points)
        labels = decoded.fields['label']
        assert set(np.unique(labels)) <= set(range(6)) | {UNLABELED}
        assert np.any(labels != UNLABELED)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    import torch

    from mmtta_ros.core.checkpoint import save_model_checkpoint
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig

    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny')
    path = tmp_path_factory.mktemp('model') / 'source.pt'
    save_model_checkpoint(path, build_segmenter(config), config)
    return path


@pytest.mark.parametrize('method', ['source', 'mmtta'])
def test_the_node_over_dds_labels_what_the_offline_scorer_labels(
        bag, checkpoint, tmp_path, method):
    """One bag through player -> node -> recorder and through mmtta_evaluate --bag."""
    from mmtta_ros.eval.live_demo import run_live
    from mmtta_ros.tools import evaluate

    env = process_env()
    # In order: a worker that processes every pair (a queue) instead of only the newest,
    # small clouds at a quarter of real time (nothing is lost on loopback). One torch
    # thread on both sides, so the arithmetic is the same.
    report = run_live(method, checkpoint, bag, tmp_path, rate=0.25, env=env, pictures=False,
                      parameters={'model.image_width': 160, 'model.image_height': 90,
                                  'device': 'cpu', 'threads': 1,
                                  'worker.process_every_pair': True,
                                  # The paper's protocol: adapt, then label, each pair.
                                  'worker.split': False},
                      player_args=['--wait-for', *INPUT_TOPICS, '--delay', '5'])
    assert report['node_exit_code'] == 0 and not report['node_traceback']
    # CPU by process over the run: the player and the node, each reaped once.
    assert report['cpu_seconds']['player'] > 0 and report['cpu_seconds']['node'] > 0
    live = {stamp: cloud for stamp, _, cloud in read_clouds(
        tmp_path / f'{method}_labeled_points', topic='/mmtta_adapt/output/labeled_points')}

    offline_bag = tmp_path / 'offline'
    T = [repr(float(v)) for v in T_CAM_FROM_LIDAR.reshape(-1)]
    assert evaluate.main(['--checkpoint', str(checkpoint), '--bag', str(bag), '--method', method,
                          '--image-size', '160', '90', '--device', 'cpu', '--threads', '1',
                          '--extrinsics', *T, '--output-bag', str(offline_bag),
                          '--set', 'worker.split=false']) == 0
    offline = {stamp: cloud for stamp, _, cloud in read_clouds(offline_bag)}

    # The same pairs: every pair offline was labeled live, in order, but for the last one,
    # which only the end of the bag settles offline.
    stamps = sorted(offline)
    assert len(stamps) >= 10
    assert sorted(live) in (stamps, stamps[:-1]), (sorted(live), stamps)
    for stamp in sorted(live):
        a, b = live[stamp], offline[stamp]
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.fields['label'], b.fields['label'], err_msg=str(stamp))
        np.testing.assert_array_equal(a.fields['rgb'], b.fields['rgb'])
        if method == 'source':
            np.testing.assert_array_equal(a.fields['confidence'], b.fields['confidence'])
        else:
            np.testing.assert_allclose(a.fields['confidence'], b.fields['confidence'],
                                       atol=1e-5)
