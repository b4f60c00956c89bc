"""
mmtta_benchmark: the shift suite -> benchmarks/results.json -> README tables and plot.

Runs every shift x table row x source checkpoint of config/shifts.yaml that is not yet in
the results (resumable: interrupt it and run it again), in parallel processes, then
regenerates the README's suite tables and benchmarks/stream_miou.png from the record.
"""

import argparse
import json
from pathlib import Path
import sys


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--suite', default='config/shifts.yaml')
    parser.add_argument('--results', default='benchmarks/results.json')
    parser.add_argument('--params-file', help='the node params file (default config/adapt.yaml)')
    parser.add_argument('--models-dir', default='data/models')
    parser.add_argument('--cache-dir', default='data/cache')
    parser.add_argument('--jobs', type=int, default=2, help='processes (one torch thread each)')
    parser.add_argument('--shifts', nargs='+', help='only these shifts')
    parser.add_argument('--rows', nargs='+', help='only these rows')
    parser.add_argument('--checkpoints', nargs='+', metavar='PT',
                        help="source checkpoints to use instead of the suite's")
    parser.add_argument('--readme', default='README.md')
    parser.add_argument('--plot', default='benchmarks/stream_miou.png')
    parser.add_argument('--label-plot', default='benchmarks/label_budget.png',
                        help='mIoU against labeled points per frame (label rows only)')
    parser.add_argument('--report-only', action='store_true',
                        help='only regenerate the tables and the plot from the results')
    return parser


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit('--jobs must be >= 1')
    for path in (args.suite, args.readme):
        if not Path(path).is_file():
            raise SystemExit(f'no file {path}')
    from mmtta_ros.eval.report import (
        plot_label_budget, plot_streams, render_tables, update_readme)
    from mmtta_ros.eval.suite import load_suite, run_suite

    try:
        load_suite(args.suite)
        if args.report_only:
            results = json.loads(Path(args.results).read_text())
        else:
            results = run_suite(args.suite, args.results, models_dir=args.models_dir,
                                cache_dir=args.cache_dir, jobs=args.jobs, shifts=args.shifts,
                                rows=args.rows, params_file=args.params_file,
                                checkpoints=args.checkpoints)
    except (ValueError, OSError) as error:
        raise SystemExit(f'mmtta_benchmark: {error}')
    update_readme(Path(args.readme), render_tables(results))
    plot_streams(results, Path(args.plot))
    plot_label_budget(results, Path(args.label_plot))
    print(f'{len(results["records"])} records in {args.results}; tables in {args.readme}, '
          f'plot {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
