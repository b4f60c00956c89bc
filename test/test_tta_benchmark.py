"""tta_benchmark runs every method (ftd needs a fused head) and the node's default, briefly."""

from mmtta_ros.tools import tta_benchmark


def test_every_row_of_the_tta_benchmark_runs(tmp_path, capsys):
    assert tta_benchmark.main(['--sizes', 'tiny', '--frames', '1', '--warmup', '0',
                               '--image-size', '64', '36', '--threads', '1',
                               '--cache-dir', str(tmp_path)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [line[2] for line in lines] == list(tta_benchmark.ORDER)
    assert all('predict' in line for line in lines)
