"""
benchmarks/results.json -> the README's suite tables and the mIoU-over-the-stream plot.

Nothing here is typed by hand: `make benchmark` regenerates both from the record.
"""

from pathlib import Path
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

START, END = '<!-- suite-table:start -->', '<!-- suite-table:end -->'


def _streams_by(records: Dict[str, Any], shift: str, row: str) -> Dict[tuple, Dict[str, Any]]:
    """
    Return {(checkpoint, stream index): stream result} of one shift and row.

    A UDA model is keyed by the source checkpoint it pairs with (same seed, same
    initialisation), so its streams compare with that model's streams.
    """
    found = {}
    for record in records.values():
        if record['shift'] == shift and record['row'] == row:
            for index, stream in enumerate(record['streams']):
                found[(record.get('paired_checkpoint', record['checkpoint']), index)] = stream
    return found


def _method_cell(record: Dict[str, Any]) -> str:
    """Return what the method column says of a record."""
    if record.get('uda'):
        return f'{record["method"]}, UDA {record["uda"]} (offline, needs source data)'
    return record['method']


def shift_table(results: Dict[str, Any], shift: str, rows: Sequence[str]) -> List[str]:
    """Return the markdown lines of one shift's table."""
    records = results['records']
    source = _streams_by(records, shift, 'source')
    baseline = _streams_by(records, shift, 'bn_stats')
    oracle = _streams_by(records, shift, 'oracle')

    def mean_2d3d(streams):
        return float(np.mean([s['miou']['2d3d'] for s in streams.values()]))

    def gap_recovered(streams) -> Optional[float]:
        """Return (row - source) / (oracle - source), source = the streams paired with it."""
        paired = {k: s for k, s in source.items() if k in streams} or source
        if not oracle or not paired:
            return None
        gap = mean_2d3d(oracle) - mean_2d3d(paired)
        # An oracle no better than the source (by a point) measures no headroom.
        return (mean_2d3d(streams) - mean_2d3d(paired)) / gap if gap > 1.0 else None
    lines = ['| row | method | 2D | 3D | 2D+3D | Δ source | Δ bn_stats | worst stream Δ source '
             '| streams below source | gap recovered | s/frame |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        streams = _streams_by(records, shift, row)
        if not streams:
            continue
        method = next(_method_cell(r) for r in records.values()
                      if r['shift'] == shift and r['row'] == row)
        cells = []
        for head in ('2d', '3d', '2d3d'):
            values = [s['miou'][head] for s in streams.values()]
            cells.append(f'{np.mean(values):.1f} ± {np.std(values):.1f}')

        def delta(reference):
            pairs = [(s['miou']['2d3d'], reference[k]['miou']['2d3d'])
                     for k, s in streams.items() if k in reference]
            return np.array([a - b for a, b in pairs])
        vs_source, vs_bn = delta(source), delta(baseline)
        seconds = np.mean([s['seconds_per_frame'] for s in streams.values()])
        recovered = gap_recovered(streams)
        lines.append(
            f'| {row} | {method} | ' + ' | '.join(cells)
            + f' | {_signed(vs_source.mean()) if vs_source.size else "–"}'
            + f' | {_signed(vs_bn.mean()) if vs_bn.size else "–"}'
            + f' | {_signed(vs_source.min()) if vs_source.size else "–"}'
            + f' | {int((vs_source < 0).sum()) if vs_source.size else "–"}/{vs_source.size}'
            + (f' | {round(100 * recovered)} %' if recovered is not None else ' | –')
            + f' | {seconds:.3f} |')
    return lines


def _validation(results: Dict[str, Any]) -> List[str]:
    """Return the shifts defaults were chosen on (the validation shift first)."""
    return [results.get('validation'), *results.get('more_validation', [])]


def _signed(value: float) -> str:
    return f'{value:+.1f}'


def recurring_lines(results: Dict[str, Any], shift: str, rows: Sequence[str]) -> List[str]:
    """Return per-segment 2D+3D mIoU lines of a multi-segment stream (forgetting)."""
    lines = []
    for row in rows:
        streams = _streams_by(results['records'], shift, row)
        if not streams:
            continue
        segments = np.mean([s['segments']['2d3d'] for s in streams.values()], axis=0)
        lines.append(f'| {row} | ' + ' | '.join(f'{v:.1f}' for v in segments) + ' |')
    return lines


def render_tables(results: Dict[str, Any]) -> str:
    """Return the markdown of every shift's table, the validation shift first."""
    records = results['records']
    shifts = sorted({r['shift'] for r in records.values()},
                    key=lambda s: (s not in _validation(results), s))
    rows_order = list(dict.fromkeys(r['row'] for r in sorted(
        records.values(), key=lambda r: _ROW_ORDER.get(r['row'], 99))))
    checkpoints = sorted({r['checkpoint'] for r in records.values()
                          if r['row'] != 'oracle' and not r.get('uda')})
    oracles = sorted({r['checkpoint'] for r in records.values() if r['row'] == 'oracle'})
    fused = sorted({r['fused_head_checkpoint'] for r in records.values()
                    if 'fused_head_checkpoint' in r})
    fused_note = (f' Rows with a fused head ran on {", ".join(f"`{c}`" for c in fused)}: the '
                  'source checkpoints with a 2D+3D head fitted on them, same branches.'
                  if fused else '')
    udas = sorted({r['checkpoint'] for r in records.values() if r.get('uda')})
    uda_note = (f' UDA references (offline, need the source data: trained on labeled day '
                f'and unlabeled frames of the shift\'s domain, scored source-only; Δ paired '
                f'with the source model of their seed): {", ".join(f"`{c}`" for c in udas)}.'
                if udas else '')
    out = [f'Source checkpoints: {", ".join(f"`{c}`" for c in checkpoints)}; oracles '
           f'(source-only, trained on the shift\'s labeled domain): '
           f'{", ".join(f"`{c}`" for c in oracles) or "none"}.{uda_note} mIoU % mean ± std '
           'over every stream of every checkpoint; Δ are 2D+3D, paired per stream and '
           'checkpoint; gap '
           'recovered = (row − source) / (oracle − source), source = the streams of the '
           'source models the row is paired with, shown where the oracle is at least a point '
           'above that source.' + fused_note, '']
    for shift in shifts:
        some = next(r for r in records.values() if r['shift'] == shift)
        role = ' (validation: defaults chosen here)' if shift in _validation(results) else ''
        segments = ' → '.join(f'{d} {n}' for d, n in some['segments'])
        out += [f'**{shift}**{role}: {segments} frames, seeds {some["seeds"]}', '']
        out += shift_table(results, shift, rows_order) + ['']
        if len(some['segments']) > 1:
            header = ' | '.join(f'{d} #{i + 1}' for i, (d, _) in enumerate(some['segments']))
            out += ['2D+3D mIoU per segment:', '', f'| row | {header} |',
                    '|---|' + '---|' * len(some['segments'])]
            out += recurring_lines(results, shift, rows_order) + ['']
    out += label_budget_lines(results)
    return '\n'.join(out).rstrip() + '\n'


def label_budget_lines(results: Dict[str, Any]) -> List[str]:
    """Return the label-budget table: per shift and selection, the curve and half the gap."""
    records = results['records']
    lines = []
    for shift in sorted({r['shift'] for r in records.values()
                         if 'label_points_per_frame' in r}):
        oracle = _mean_2d3d(records, shift, 'oracle')
        for mode, prefix in LABEL_ROW_PREFIXES.items():
            curve = label_budget_curve(results, shift, prefix)
            if len(curve) < 2:
                continue
            half = None if oracle is None else points_to_close_gap(curve, oracle)
            points = ', '.join(f'{x:.1f} → {y:.1f}' for x, y in curve)
            lines.append(f'| {shift} | {mode} | {points} | '
                         f'{"–" if oracle is None else f"{oracle:.1f}"} | '
                         f'{"not reached" if half is None else f"{half:.1f}"} |')
    if not lines:
        return []
    baseline = results.get('label_baseline', 'default')
    return [f'**Label budget** (`{baseline}` plus a simulated annotator answering its '
            f'requests one frame later; 0 points = `{baseline}`): labeled points per frame → '
            f'2D+3D mIoU, and the points per frame that close half the gap from `{baseline}` '
            'to the oracle (linear between measured budgets).', '',
            '| shift | selection | points per frame → 2D+3D | oracle | half the gap at |',
            '|---|---|---|---|---|'] + lines + ['']


_ROW_ORDER = {name: index for index, name in enumerate((
    'source', 'bn_stats', 'bn_stats_prior', 'bn_stats_ema', 'bn_stats_fallback',
    'bn_stats_ema_fallback', 'tent_ens', 'xmuda_pl', 'mmtta_paper', 'mmtta_0.9',
    'mmtta_0.9_fallback', 'mmtta_0.9_stats_only', 'mmtta_0.9_lr_x100', 'mmtta_0.9_lr2d_x100',
    'latte', 'cbst', 'proda', 'mic', 'ftd', 'bn_stats_source_3d', 'mmtta_0.9_source_3d',
    'cbst_source_3d', 'source_product', 'mmtta_0.9_product', 'mmtta_0.9_calibrated_mean',
    'mmtta_0.9_calibrated', 'tent_ens_calibrated', 'bn_stats_calibrated',
    'default_paper', 'default', 'default_realtime', 'labor_3', 'labor_10', 'labor_40',
    'labor_100', 'random_3', 'random_10', 'random_40', 'random_100', 'uda_xmuda',
    'uda_adaptsegnet', 'uda_dann', 'oracle'))}
# Label-budget rows: a selection mode's rows are `<prefix>_<budget>` (config/shifts.yaml).
LABEL_ROW_PREFIXES = {'point': 'labor', 'random': 'random'}


def _mean_2d3d(records: Dict[str, Any], shift: str, row: str) -> Optional[float]:
    streams = _streams_by(records, shift, row)
    return float(np.mean([s['miou']['2d3d'] for s in streams.values()])) if streams else None


def label_budget_curve(results: Dict[str, Any], shift: str, prefix: str,
                       baseline: Optional[str] = None) -> List[Tuple[float, float]]:
    """
    Return [(labeled points per frame, 2D+3D mIoU)] of a label-budget family, 0 first.

    prefix: the rows `<prefix>_<K>` (labor, random); the point at 0 is `baseline`, the
    configuration the labels are added to (the results' label_baseline, else `default`).
    Points per frame are those answered and used.
    """
    records = results['records']
    baseline = baseline or results.get('label_baseline', 'default')
    curve = {}
    base = _mean_2d3d(records, shift, baseline)
    if base is not None:
        curve[0.0] = base
    rows = {r['row'] for r in records.values()
            if r['shift'] == shift and r['row'].startswith(prefix + '_')
            and r['row'][len(prefix) + 1:].isdigit()}
    for row in rows:
        spent = [r['label_points_per_frame'] for r in records.values()
                 if r['shift'] == shift and r['row'] == row]
        curve[float(np.mean(spent))] = _mean_2d3d(records, shift, row)
    return sorted(curve.items())


def points_to_close_gap(curve: Sequence[Tuple[float, float]], oracle: float,
                        fraction: float = 0.5) -> Optional[float]:
    """
    Return the labeled points per frame where the curve first closes `fraction` of the gap.

    The gap is oracle − curve at 0 points; linear between measured budgets; None when the
    gap is not positive or no measured budget closes that much.
    """
    if not curve or curve[0][0] != 0.0 or oracle <= curve[0][1]:
        return None
    target = curve[0][1] + fraction * (oracle - curve[0][1])
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0) if y1 != y0 else x1
    return None


def plot_label_budget(results: Dict[str, Any], path: Path) -> None:
    """Plot 2D+3D mIoU against labeled points per frame, requested vs random, per shift."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = results['records']
    shifts = sorted({r['shift'] for r in records.values()
                     if any(r['row'].startswith(p + '_') for p in LABEL_ROW_PREFIXES.values())})
    if not shifts:
        return
    figure, axes = plt.subplots(1, len(shifts), figsize=(4 * len(shifts), 3), squeeze=False)
    for axis, shift in zip(axes.flat, shifts):
        for mode, prefix in LABEL_ROW_PREFIXES.items():
            curve = label_budget_curve(results, shift, prefix)
            if len(curve) > 1:
                axis.plot(*zip(*curve), marker='o', label=f'mmtta + {mode} labels')
        oracle = _mean_2d3d(records, shift, 'oracle')
        if oracle is not None:
            axis.axhline(oracle, color='k', linestyle='--', linewidth=1, label='oracle')
        axis.set_title(shift)
        axis.set_xlabel('labeled points per frame')
        axis.set_ylabel('2D+3D mIoU %')
        axis.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(handles, labels, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def update_readme(readme: Path, tables: str) -> None:
    """Replace what lies between the suite-table markers of the README."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f'{readme} has no {START} ... {END} markers')
    text = re.sub(re.escape(START) + '.*?' + re.escape(END),
                  lambda _: f'{START}\n{tables}{END}', text, flags=re.S)
    readme.write_text(text)


def plot_streams(results: Dict[str, Any], path: Path) -> None:
    """Plot 2D+3D mIoU over the stream (windows of frames) per row, one panel per shift."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = results['records']
    shifts = sorted({r['shift'] for r in records.values()})
    rows = sorted({r['row'] for r in records.values()}, key=lambda r: _ROW_ORDER.get(r, 99))
    columns = 4
    lines = (len(shifts) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines),
                                squeeze=False)
    colours = plt.get_cmap('tab20')
    for axis, shift in zip(axes.flat, shifts):
        for index, row in enumerate(rows):
            streams = _streams_by(records, shift, row)
            if not streams:
                continue
            curve = np.mean([s['windows_2d3d'] for s in streams.values()], axis=0)
            axis.plot(np.arange(len(curve)) * 10 + 5, curve, label=row, color=colours(index),
                      linewidth=2.5 if row in ('default', 'source', 'oracle') else 1.0)
        axis.set_title(shift)
        axis.set_xlabel('frame')
        axis.set_ylabel('2D+3D mIoU %')
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(shifts):]:
        axis.axis('off')
    handles, labels = [], []
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    figure.legend(handles, labels, loc='center right', fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
