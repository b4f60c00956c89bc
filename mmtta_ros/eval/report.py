"""
benchmarks/results.json -> the README's suite tables and the mIoU-over-the-stream plot.

Nothing here is typed by hand: `make benchmark` regenerates both from the record.
"""

from pathlib import Path
import re
from typing import Any, Dict, List, Sequence

import numpy as np

START, END = '<!-- suite-table:start -->', '<!-- suite-table:end -->'


def _streams_by(records: Dict[str, Any], shift: str, row: str) -> Dict[tuple, Dict[str, Any]]:
    """Return {(checkpoint, stream index): stream result} of one shift and row."""
    found = {}
    for record in records.values():
        if record['shift'] == shift and record['row'] == row:
            for index, stream in enumerate(record['streams']):
                found[(record['checkpoint'], index)] = stream
    return found


def shift_table(results: Dict[str, Any], shift: str, rows: Sequence[str]) -> List[str]:
    """Return the markdown lines of one shift's table."""
    records = results['records']
    source = _streams_by(records, shift, 'source')
    baseline = _streams_by(records, shift, 'bn_stats')
    oracle = _streams_by(records, shift, 'oracle')

    def mean_2d3d(streams):
        return float(np.mean([s['miou']['2d3d'] for s in streams.values()]))
    gap = mean_2d3d(oracle) - mean_2d3d(source) if oracle and source else None
    # An oracle no better than the source (by a point) measures no headroom.
    gap = gap if gap is not None and gap > 1.0 else None
    lines = ['| row | method | 2D | 3D | 2D+3D | Δ source | Δ bn_stats | worst stream Δ source '
             '| streams below source | gap recovered | s/frame |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        streams = _streams_by(records, shift, row)
        if not streams:
            continue
        method = next(r['method'] for r in records.values()
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
        lines.append(
            f'| {row} | {method} | ' + ' | '.join(cells)
            + f' | {_signed(vs_source.mean()) if vs_source.size else "–"}'
            + f' | {_signed(vs_bn.mean()) if vs_bn.size else "–"}'
            + f' | {_signed(vs_source.min()) if vs_source.size else "–"}'
            + f' | {int((vs_source < 0).sum()) if vs_source.size else "–"}/{vs_source.size}'
            + (f' | {100 * (mean_2d3d(streams) - mean_2d3d(source)) / gap:.0f} %'
               if gap else ' | –')
            + f' | {seconds:.3f} |')
    return lines


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
                    key=lambda s: (s != results.get('validation'), s))
    rows_order = list(dict.fromkeys(r['row'] for r in sorted(
        records.values(), key=lambda r: _ROW_ORDER.get(r['row'], 99))))
    checkpoints = sorted({r['checkpoint'] for r in records.values() if r['row'] != 'oracle'})
    oracles = sorted({r['checkpoint'] for r in records.values() if r['row'] == 'oracle'})
    out = [f'Source checkpoints: {", ".join(f"`{c}`" for c in checkpoints)}; oracles '
           f'(source-only, trained on the shift\'s labeled domain): '
           f'{", ".join(f"`{c}`" for c in oracles) or "none"}. mIoU % mean ± std over every '
           'stream of every checkpoint; Δ are 2D+3D, paired per stream and checkpoint; gap '
           'recovered = (row − source) / (oracle − source), shown where the oracle is at '
           'least a point above the source.', '']
    for shift in shifts:
        some = next(r for r in records.values() if r['shift'] == shift)
        role = ' (validation: defaults chosen here)' if shift == results.get('validation') else ''
        segments = ' → '.join(f'{d} {n}' for d, n in some['segments'])
        out += [f'**{shift}**{role}: {segments} frames, seeds {some["seeds"]}', '']
        out += shift_table(results, shift, rows_order) + ['']
        if len(some['segments']) > 1:
            header = ' | '.join(f'{d} #{i + 1}' for i, (d, _) in enumerate(some['segments']))
            out += ['2D+3D mIoU per segment:', '', f'| row | {header} |',
                    '|---|' + '---|' * len(some['segments'])]
            out += recurring_lines(results, shift, rows_order) + ['']
    return '\n'.join(out).rstrip() + '\n'


_ROW_ORDER = {name: index for index, name in enumerate((
    'source', 'bn_stats', 'bn_stats_prior', 'bn_stats_ema', 'bn_stats_fallback',
    'bn_stats_ema_fallback', 'tent_ens', 'xmuda_pl', 'mmtta_paper', 'mmtta_0.9',
    'mmtta_0.9_fallback', 'mmtta_0.9_stats_only', 'mmtta_0.9_lr_x100', 'default',
    'default_realtime', 'oracle'))}


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
