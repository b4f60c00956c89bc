"""Labels over DDS with real processes: player -> node -> annotator -> node, labels used."""

import signal
import subprocess
import sys

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402

from dds_helpers import (  # noqa: E402
    INPUT_TOPICS, listening, node_command, process_env, small_night_bag, spin_until)
NS = '/mmtta_adapt'
pytestmark = pytest.mark.e2e


def test_the_node_learns_from_a_simulated_annotator_process(tmp_path):
    import torch

    bag = small_night_bag(tmp_path / 'night')
    env = process_env()
    state = tmp_path / 'state.pt'
    node_cmd = node_command('use_sim_time:=true', 'model.image_width:=160',
                            'model.image_height:=90', 'labels.mode:=point', 'labels.budget:=20',
                            # Labels train by gradient: the YAML's bn_stats learns nothing.
                            'adaptation.method:=mmtta',
                            # A random model's predictions degenerate; a guard reset would
                            # clear the answers this test looks for in the saved state.
                            'reset.collapse_guard:=false',
                            'inputs.reliable:=true', 'worker.process_every_pair:=true',
                            f'state.save_path:={state}')
    annotator_cmd = [sys.executable, '-m', 'mmtta_ros.tools.annotator', '--delay', '1']
    with listening('e2e_labels_listener') as (listener, executor, processes):
        diagnostics = {}

        def on_diagnostics(msg):
            for status in msg.status:
                if status.name.startswith('mmtta_ros'):
                    diagnostics.update({kv.key: kv.value for kv in status.values})
        listener.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)

        def figure(name):
            return int(diagnostics.get(name, 0))
        node_log, annotator_log = tmp_path / 'node.log', tmp_path / 'annotator.log'
        with open(node_log, 'w') as log:
            node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(node)
        with open(annotator_log, 'w') as log:
            annotator = subprocess.Popen(annotator_cmd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        processes.append(annotator)
        # Everyone has found everyone: node <- player topics, node <-> annotator.
        assert spin_until(executor, lambda: (
            listener.count_subscribers('/LIDAR_TOP') >= 2
            and listener.count_subscribers(f'{NS}/output/label_requests') >= 1
            and listener.count_publishers(f'{NS}/output/label_requests') >= 1
            and listener.count_subscribers(f'{NS}/input/point_labels') >= 1
            and listener.count_publishers(f'{NS}/input/point_labels') >= 1), 90.0), \
            node_log.read_text() + annotator_log.read_text()
        player = subprocess.Popen(
            [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(bag), '--rate', '0.25',
             '--reliable', '--wait-for', *INPUT_TOPICS, '--delay', '5'],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(player)
        assert spin_until(executor, lambda: player.poll() is not None, 120.0)
        assert spin_until(executor, lambda: figure('label_supervised_steps') >= 1, 60.0), \
            f'{diagnostics}\n{node_log.read_text()}'
        for process in (annotator, node):
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0

    text = node_log.read_text()
    assert 'Traceback' not in text, text
    assert figure('label_requests') >= 3 and figure('label_answers_accepted') >= 1
    assert figure('label_points_accepted') > 0 and figure('label_answers_rejected') == 0
    summary = annotator_log.read_text()
    assert 'mmtta_annotator:' in summary and ' 0 answers' not in summary, summary
    # The answers are in the adapted state saved at Ctrl-C: they took part in adaptation.
    saved = torch.load(state, map_location='cpu', weights_only=True)
    entries = saved['supervision']['entries']
    assert entries and all(len(entry['labels']) > 0 for entry in entries)
