"""The fuzz tool: refuses bad arguments; a short run against a real node holds (issue 13)."""

import os
import re
import subprocess
import sys

import pytest

from mmtta_ros.tools import fuzz_node


def test_bad_arguments_are_refused_before_any_work(capsys):
    assert fuzz_node.main(['--messages', '0']) == 2
    assert fuzz_node.main(['--seconds', '100000']) == 2
    assert fuzz_node.main(['--domain-id', '300']) == 2
    err = capsys.readouterr().err
    assert err.count('error: ') == 3 and 'Traceback' not in err


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_fuzz_run_leaves_the_node_alive_and_the_books_closed():
    pytest.importorskip('rclpy', reason='rclpy not installed')
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    result = subprocess.run(
        [sys.executable, '-m', 'mmtta_ros.tools.fuzz_node', '--messages', '400', '--seconds',
         '20', '--valid-pairs', '3', '--domain-id', os.environ['ROS_DOMAIN_ID']],
        env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert 'node alive: yes' in out and 'frames labeled afterwards: 3/3' in out
    assert 'unaccounted_messages = 0' in out
    warnings = int(re.search(r'node log: (\d+) WARN lines, 0 tracebacks', out).group(1))
    assert warnings < 40, out  # throttled: not one line per hostile message
