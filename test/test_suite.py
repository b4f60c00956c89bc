"""The shift suite end to end on a miniature: config -> runs -> results.json -> tables, plot."""

import json
from pathlib import Path

import pytest
import torch

from mmtta_ros.core.checkpoint import save_model_checkpoint
from mmtta_ros.eval.report import plot_streams, render_tables, update_readme
from mmtta_ros.eval.suite import load_suite, row_values, run_suite, stream_frames
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig

ROOT = Path(__file__).resolve().parents[1]
MINI = """
protocol: {image_size: [64, 36], frame_stride: 2, window: 2, lidar_azimuth_steps: 200}
validation: mini_night
variants:
  mini_dark: {base: night, lighting: {exposure: [0.5, 0.6]}}
shifts:
  mini_night: {segments: [[mini_dark, 3]], seeds: [7]}
  mini_recurring: {segments: [[day, 2], [night, 2]], seeds: [8], rows: [source]}
rows:
  source: {method: source}
  bn_stats: {method: bn_stats, set: {source_weight: 0.5}}
checkpoints: {size: tiny, train_seeds: [0], steps: 1}
"""


def test_the_repository_suite_is_valid():
    suite = load_suite(ROOT / 'config' / 'shifts.yaml')
    assert suite.validation in suite.shifts and 'recurring' in suite.shifts
    assert suite.shifts['recurring'].frames >= 1000
    assert {'source', 'bn_stats', 'tent_ens', 'xmuda_pl', 'mmtta_paper', 'default'} <= set(
        suite.rows)
    values = row_values(suite.rows['mmtta_paper'], 'model.pt')
    assert values['adaptation.method'] == 'mmtta'
    assert values['adaptation.mmtta.momentum'] == 0.99


@pytest.mark.slow
def test_a_miniature_suite_runs_resumes_and_reports(tmp_path):
    suite_path = tmp_path / 'shifts.yaml'
    suite_path.write_text(MINI)
    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny')
    checkpoint = tmp_path / 'source.pt'
    save_model_checkpoint(checkpoint, build_segmenter(config), config)
    results_path = tmp_path / 'results.json'
    kwargs = dict(models_dir=tmp_path, cache_dir=tmp_path / 'cache', jobs=1,
                  checkpoints=[checkpoint], log=lambda _: None)
    results = run_suite(suite_path, results_path, **kwargs)
    records = results['records']
    assert len(records) == 3  # 2 rows on mini_night, source only on mini_recurring
    night = next(r for r in records.values() if r['shift'] == 'mini_night'
                 and r['row'] == 'bn_stats')
    assert night['settings']['adaptation.bn_stats.source_weight'] == 0.5
    assert night['frames'] == 3 and len(night['streams']) == 1
    stream = night['streams'][0]
    assert set(stream['miou']) == {'2d', '3d', '2d3d'} and len(stream['windows_2d3d']) == 2
    assert 0.0 <= night['mean_2d3d'] <= 100.0 and night['seconds_per_frame'] > 0
    recurring = next(r for r in records.values() if r['shift'] == 'mini_recurring')
    assert len(recurring['streams'][0]['segments']['2d3d']) == 2
    # Resumable: nothing left to run, the file is unchanged.
    before = results_path.read_text()
    run_suite(suite_path, results_path, **kwargs)
    assert results_path.read_text() == before
    # Tables and plot come from the record alone.
    readme = tmp_path / 'README.md'
    readme.write_text('# x\n<!-- suite-table:start -->\nold\n<!-- suite-table:end -->\ntail\n')
    update_readme(readme, render_tables(json.loads(before)))
    text = readme.read_text()
    assert '**mini_night** (validation' in text and 'old' not in text and 'tail' in text
    assert '| bn_stats | bn_stats |' in text
    plot_streams(results, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').stat().st_size > 1000
    # The streams are the frames the generator gives for those segments, cached.
    suite = load_suite(suite_path)
    frames = stream_frames(suite, suite.shifts['mini_recurring'], 8, tmp_path / 'cache')
    assert [f.sequence for f in frames] == ['day-s80'] * 2 + ['night-s81'] * 2
