"""The shift suite end to end on a miniature: config -> runs -> results.json -> tables, plot."""

import json
from pathlib import Path

import pytest
import torch

from mmtta_ros.core.checkpoint import load_model_checkpoint, save_model_checkpoint
from mmtta_ros.eval.report import plot_streams, render_tables, update_readme
from mmtta_ros.eval.suite import (
    checkpoint_id, load_suite, row_values, run_suite, scored_values, settings_hash,
    stream_frames)
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
  ftd: {method: ftd, fused_head: true}
checkpoints: {size: tiny, train_seeds: [0], steps: 1, fused_head_steps: 2}
"""


def test_the_repository_suite_is_valid():
    suite = load_suite(ROOT / 'config' / 'shifts.yaml')
    assert suite.validation in suite.shifts and 'recurring' in suite.shifts
    assert suite.shifts['recurring'].frames >= 1000
    assert {'source', 'bn_stats', 'tent_ens', 'xmuda_pl', 'mmtta_paper', 'default'} <= set(
        suite.rows)
    assert suite.rows['ftd'].fused_head and suite.rows['ftd'].method == 'ftd'
    assert not suite.rows['mic'].fused_head and suite.fused_head_steps == 300
    values = row_values(suite.rows['mmtta_paper'], 'model.pt')
    assert values['adaptation.method'] == 'mmtta'
    assert values['adaptation.mmtta.momentum'] == 0.99
    for method in ('xmuda', 'adaptsegnet', 'dann'):
        row = suite.rows[f'uda_{method}']
        assert row.uda == method and row_values(row, 'm.pt')['adaptation.method'] == 'source'
        assert [s.name for s in suite.shifts.values() if row.applies_to(s)] == [
            'night', 'city_b']
    assert suite.uda_seeds == (0,)


def _miniature(tmp_path, document):
    """Write a miniature suite and a fresh tiny source checkpoint; return run_suite's kwargs."""
    suite_path = tmp_path / 'shifts.yaml'
    suite_path.write_text(document)
    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny')
    checkpoint = tmp_path / 'source.pt'
    save_model_checkpoint(checkpoint, build_segmenter(config), config)
    kwargs = dict(models_dir=tmp_path, cache_dir=tmp_path / 'cache', jobs=1,
                  checkpoints=[checkpoint], log=lambda _: None)
    return suite_path, checkpoint, kwargs


@pytest.mark.slow
def test_a_miniature_suite_runs_resumes_and_reports(tmp_path):
    suite_path, checkpoint, kwargs = _miniature(tmp_path, MINI)
    results_path = tmp_path / 'results.json'
    results = run_suite(suite_path, results_path, **kwargs)
    records = results['records']
    assert len(records) == 4  # 3 rows on mini_night, source only on mini_recurring
    night = next(r for r in records.values() if r['shift'] == 'mini_night'
                 and r['row'] == 'bn_stats')
    assert night['settings']['adaptation.bn_stats.source_weight'] == 0.5
    assert night['frames'] == 3 and len(night['streams']) == 1
    stream = night['streams'][0]
    assert set(stream['miou']) == {'2d', '3d', '2d3d'} and len(stream['windows_2d3d']) == 2
    assert 0.0 <= night['mean_2d3d'] <= 100.0 and night['seconds_per_frame'] > 0
    # ftd ran on a fused head fitted next to the source checkpoint, on the same branches,
    # and is keyed by the source checkpoint so the tables pair it with the other rows.
    ftd = next(r for r in records.values() if r['row'] == 'ftd')
    assert ftd['method'] == 'ftd' and ftd['checkpoint'] == night['checkpoint']
    fused_path = tmp_path / 'source_fused.pt'
    assert ftd['fused_head_checkpoint'] == checkpoint_id(fused_path)
    fused_model, fused_config, payload = load_model_checkpoint(fused_path)
    assert fused_config.fused_head and payload['step'] == 2
    source_state = torch.load(checkpoint, weights_only=True)['model']
    fused_state = fused_model.state_dict()
    assert set(fused_state) - set(source_state) == {k for k in fused_state
                                                    if k.startswith('fused_head.')}
    assert all(torch.equal(fused_state[k], v) for k, v in source_state.items())
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
    assert '| ftd | ftd |' in text and ftd['fused_head_checkpoint'] in text
    plot_streams(results, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').stat().st_size > 1000
    # The streams are the frames the generator gives for those segments, cached.
    suite = load_suite(suite_path)
    frames = stream_frames(suite, suite.shifts['mini_recurring'], 8, tmp_path / 'cache')
    assert [f.sequence for f in frames] == ['day-s80'] * 2 + ['night-s81'] * 2


def test_a_record_depends_on_its_method_and_checkpoint_content_not_on_other_settings():
    suite = load_suite(ROOT / 'config' / 'shifts.yaml')
    shift = suite.shifts['night']
    values = row_values(suite.rows['default'], 'data/models/a.pt')
    before = settings_hash(values, shift)
    # Another method's hyperparameters (a new method's section), the checkpoint's path
    # (the record's key names its content) and topics do not change what is scored.
    other = dict(values, **{'adaptation.tent.lr_3d': 0.5, 'model.checkpoint': '/x/a.pt',
                            'topics.points': '/elsewhere', 'adaptation.new_method.x': 1})
    assert settings_hash(other, shift) == before
    method = values['adaptation.method']
    own = next(name for name in values if name.startswith(f'adaptation.{method}.'))
    changed = dict(values, **{own: 0.31})
    assert settings_hash(changed, shift) != before
    assert settings_hash(dict(values, **{'adaptation.fallback': False}), shift) != before
    assert own in scored_values(values)
    assert 'model.checkpoint' not in scored_values(values)


MINI_UDA = """
protocol: {image_size: [64, 36], frame_stride: 2, window: 2, lidar_azimuth_steps: 200}
validation: mini_night
shifts:
  mini_night: {segments: [[night, 2]], seeds: [7]}
  mini_city: {segments: [[city_b, 2]], seeds: [9]}
  mini_recurring: {segments: [[day, 1], [night, 1]], seeds: [8]}
rows:
  source: {method: source}
  uda_adaptsegnet: {uda: adaptsegnet, shifts: [mini_night]}
  uda_xmuda: {uda: xmuda}
checkpoints: {size: tiny, train_seeds: [0], steps: 2, uda_seeds: [0], train_sequences: 1,
              train_frames: 2}
"""


@pytest.mark.slow  # two steps of training, but process pools: 30-100 s on 2 loaded cores
def test_uda_rows_train_on_demand_per_shift_and_score_source_only(tmp_path):
    suite_path, checkpoint, kwargs = _miniature(tmp_path, MINI_UDA)
    results_path = tmp_path / 'results.json'
    records = run_suite(suite_path, results_path, **kwargs)['records']
    # No UDA on a stream that starts in the source domain; adaptsegnet on its one shift.
    assert sorted((r['shift'], r['row']) for r in records.values()) == [
        ('mini_city', 'source'), ('mini_city', 'uda_xmuda'), ('mini_night', 'source'),
        ('mini_night', 'uda_adaptsegnet'), ('mini_night', 'uda_xmuda'),
        ('mini_recurring', 'source')]
    uda = next(r for r in records.values() if r['row'] == 'uda_adaptsegnet')
    assert uda['method'] == 'source' and uda['uda'] == 'adaptsegnet'
    assert uda['target_domain'] == 'night' and uda['checkpoint'].startswith(
        'uda_adaptsegnet_tiny_night_s0@')
    assert uda['paired_checkpoint'] == checkpoint_id(checkpoint)
    payload = torch.load(tmp_path / 'uda_xmuda_tiny_city_b_s0.pt', weights_only=True)
    assert payload['uda']['target_domain'] == 'city_b' and payload['step'] == 2
    # The unlabeled target frames are UDA seeds (200-), the labeled ones source seeds (0-7).
    cached = {'-'.join(p.name.split('-')[:2]) for p in (tmp_path / 'cache').iterdir()}
    assert {'day-s0', 'night-s200', 'city_b-s200'} <= cached
    # Resumable: nothing trained or scored again.
    before = results_path.read_text()
    run_suite(suite_path, results_path, **kwargs)
    assert results_path.read_text() == before
    # The table names the reference and pairs it with the source model of its seed.
    text = render_tables(json.loads(before))
    line = next(line for line in text.splitlines() if line.startswith('| uda_adaptsegnet |'))
    assert 'source, UDA adaptsegnet (offline, needs source data)' in line
    assert line.split('|')[6].strip() != '–', 'Δ source is paired'
    assert 'UDA references' in text and '`source@' in text


@pytest.mark.parametrize('row, message', [
    ('{uda: minent}', 'unknown UDA method'),
    ('{uda: dann, shifts: [mini_recurring]}', 'start in the source domain'),
    ('{uda: dann, shifts: [nowhere]}', 'unknown shifts'),
    ('{uda: dann, oracle: true}', 'scored source-only'),
])
def test_bad_uda_rows_are_refused(row, message, tmp_path):
    path = tmp_path / 'shifts.yaml'
    path.write_text(MINI_UDA.replace('{uda: xmuda}', row))
    with pytest.raises(ValueError, match=message):
        load_suite(path)
    path.write_text(MINI_UDA.replace('train_sequences: 1', 'train_sequences: 9'))
    with pytest.raises(ValueError, match='train_sequences <= 8'):
        load_suite(path)


def test_a_uda_row_is_compared_with_the_source_model_of_its_seed():
    def record(row, checkpoint, miou, **extra):
        stream = {'miou': {'2d': miou, '3d': miou, '2d3d': miou}, 'seconds_per_frame': 0.1}
        return {'shift': 'night', 'row': row, 'checkpoint': checkpoint, 'method': 'source',
                'segments': [['night', 60]], 'seeds': [100], 'streams': [stream], **extra}
    results = {'validation': 'night', 'records': {
        'a': record('source', 's0', 40.0), 'b': record('source', 's1', 30.0),
        'c': record('oracle', 'o0', 60.0),
        'd': record('uda_dann', 'u0', 45.0, uda='dann', paired_checkpoint='s0')}}
    line = next(line for line in render_tables(results).splitlines()
                if line.startswith('| uda_dann |'))
    cells = [cell.strip() for cell in line.split('|')]
    # Against the seed-0 source alone: Δ +5.0, gap (45 - 40) / (60 - 40) = 25 % (not the
    # (45 - 35) / (60 - 35) = 40 % of the mean over both source models).
    assert cells[6] == '+5.0' and cells[10] == '25 %'
    source = next(line for line in render_tables(results).splitlines()
                  if line.startswith('| source |'))
    assert source.split('|')[10].strip() == '0 %'


MINI_LABELS = """
protocol: {image_size: [64, 36], frame_stride: 2, window: 2, lidar_azimuth_steps: 200}
validation: mini_night
shifts:
  mini_night: {segments: [[night, 4]], seeds: [7]}
rows:
  mmtta: {method: mmtta}
  labor_8: {method: mmtta, set: {labels.mode: point, labels.budget: 8},
            annotator: {delay: 0}}
  random_8: {method: mmtta, set: {labels.mode: random, labels.budget: 8},
             annotator: {delay: 1, error_rate: 0.5}}
checkpoints: {size: tiny, train_seeds: [0], steps: 1}
"""


def test_label_rows_hash_their_annotator_and_rows_without_labels_keep_their_hash(tmp_path):
    from mmtta_ros.eval.suite import settings_hash

    suite_path = tmp_path / 'shifts.yaml'
    suite_path.write_text(MINI_LABELS)
    suite = load_suite(suite_path)
    shift = suite.shifts['mini_night']
    plain = row_values(suite.rows['mmtta'], 'model.pt')
    other_budget = dict(plain, **{'labels.budget': 99})
    assert settings_hash(plain, shift) == settings_hash(other_budget, shift)
    labor = row_values(suite.rows['labor_8'], 'model.pt')
    assert labor['labels.mode'] == 'point' and labor['labels.budget'] == 8
    assert settings_hash(labor, shift, {'delay': 0}) != settings_hash(labor, shift,
                                                                      {'delay': 2})
    suite_path.write_text(MINI_LABELS.replace('delay: 0', 'lag: 0'))
    with pytest.raises(ValueError, match='unknown annotator settings'):
        load_suite(suite_path)


@pytest.mark.slow
def test_label_rows_spend_their_budget_and_record_it(tmp_path):
    suite_path, _, kwargs = _miniature(tmp_path, MINI_LABELS)
    results = run_suite(suite_path, tmp_path / 'results.json', **kwargs)
    records = {r['row']: r for r in results['records'].values()}
    assert 'label_points_per_frame' not in records['mmtta']
    assert not any(k.startswith('labels.') for k in records['mmtta']['settings'])
    labor, random = records['labor_8'], records['random_8']
    assert labor['settings']['labels.mode'] == 'point'
    assert labor['annotator'] == {'delay': 0, 'error_rate': 0.0, 'seed': 0}
    assert random['annotator']['error_rate'] == 0.5
    labels = labor['streams'][0]['labels']
    # A request on each of the 4 frames; delay 0: each answered before the next frame.
    assert labels['requests'] == 4 and 0 < labels['points_requested'] <= 32
    assert labels['points_accepted'] == labels['points_answered'] > 0
    assert labor['label_points_per_frame'] == labels['points_accepted'] / 4
    # Delay 1: the last frame's request is never answered; half the answers are wrong.
    labels = random['streams'][0]['labels']
    assert labels['requests'] == 4 and labels['points_answered'] < labels['points_requested']
    assert 0 < labels['points_wrong'] < labels['points_answered']
    for record in records.values():
        assert 0.0 <= record['mean_2d3d'] <= 100.0


def test_the_label_budget_curve_and_the_points_that_close_half_the_gap(tmp_path):
    from mmtta_ros.eval.report import label_budget_curve, label_budget_lines, \
        plot_label_budget, points_to_close_gap

    def record(row, miou, spent=None):
        record = {'shift': 'night', 'row': row, 'checkpoint': 'c',
                  'streams': [{'miou': {'2d3d': miou}}]}
        if spent is not None:
            record['label_points_per_frame'] = spent
        return record
    results = {'records': {str(i): r for i, r in enumerate([
        record('default', 50.0), record('oracle', 60.0), record('labor_10', 52.0, 9.5),
        record('labor_40', 56.0, 38.0), record('random_40', 51.0, 40.0),
        record('labor_extra', 99.0, 1.0)])}}
    curve = label_budget_curve(results, 'night', 'labor')
    assert curve == [(0.0, 50.0), (9.5, 52.0), (38.0, 56.0)]
    # Half the gap is 55: between 9.5 (52) and 38 (56), three quarters of the way.
    assert points_to_close_gap(curve, 60.0) == pytest.approx(9.5 + 0.75 * 28.5)
    assert points_to_close_gap(curve, 60.0, fraction=0.9) is None
    assert points_to_close_gap(curve, 49.0) is None  # no gap to close
    assert label_budget_curve(results, 'night', 'random') == [(0.0, 50.0), (40.0, 51.0)]
    plot_label_budget(results, tmp_path / 'budget.png')
    assert (tmp_path / 'budget.png').stat().st_size > 1000
    # The README's table says the same.
    table = [line for line in label_budget_lines(results) if line.startswith('| night')]
    assert table == ['| night | point | 0.0 → 50.0, 9.5 → 52.0, 38.0 → 56.0 | 60.0 | 30.9 |',
                     '| night | random | 0.0 → 50.0, 40.0 → 51.0 | 60.0 | not reached |']


def test_the_suite_scores_the_static_transform_and_every_record_keeps_its_hash():
    from mmtta_ros.core.params import read_params_file
    from mmtta_ros.eval.suite import fused_checkpoint, Row

    suite = load_suite(ROOT / 'config' / 'shifts.yaml')
    # The node compensates ego motion by default; the suite pins what its records used.
    assert read_params_file(ROOT / 'config' / 'adapt.yaml')['calibration.ego_motion'] is True
    shift = suite.shifts[suite.validation]
    static = row_values(suite.rows['default'], 'data/models/a.pt')
    assert static['calibration.ego_motion'] is False
    assert 'calibration.ego_motion' not in scored_values(static)
    compensated = row_values(Row('default_ego', settings={'calibration.ego_motion': True}),
                             'data/models/a.pt')
    assert compensated['calibration.ego_motion'] is True
    assert settings_hash(compensated, shift) != settings_hash(static, shift)
    # Every record of benchmarks/results.json whose shift and row are still declared keeps
    # the hash it was stored with: none runs again, and a rerun would score the same.
    records = json.loads((ROOT / 'benchmarks' / 'results.json').read_text())['records']
    checked = 0
    for key, record in records.items():
        shift_name, row_name, checkpoint = key.split('|')
        if shift_name not in suite.shifts or row_name not in suite.rows:
            continue
        row = suite.rows[row_name]
        path = ROOT / 'data' / 'models' / f"{checkpoint.split('@')[0]}.pt"
        extra = ({'fused_head_checkpoint': record['fused_head_checkpoint']}
                 if row.fused_head else {})
        values = row_values(row, fused_checkpoint(path) if row.fused_head else path)
        assert settings_hash(values, suite.shifts[shift_name], extra, row.annotator) == \
            record['settings_hash'], key
        checked += 1
    assert checked >= 100
