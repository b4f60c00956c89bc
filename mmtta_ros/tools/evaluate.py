"""
mmtta_evaluate: run a method online over target streams and print mIoU 2D / 3D / 2D+3D.

Streams are generated synthetic sequences (--domain, --seeds) or rosbag2 bags (--bag,
e.g. from mmtta_make_demo_bag or mmtta_nuscenes_to_bag); with --output-bag the labeled
clouds of a bag run are written to a new bag. The settings are the node's: its params
file (config/adapt.yaml unless --params-file) with the overrides given here, built into
the same pipeline and, for bags, paired by the same policy. No DDS.
"""

import argparse
import json
from pathlib import Path
import sys
from typing import Any, Dict, List

import numpy as np
import yaml

from mmtta_ros.core.params import (
    default_params_file, node_params, NodeParams, read_params_file, SPECS)
from mmtta_ros.eval.splits import target_config, TARGET_FRAMES, TARGET_SEEDS
from mmtta_ros.eval.scoring import format_report, HEADS, score_stream
from mmtta_ros.tta import METHODS


def parse_assignments(pairs: List[str], method: str) -> Dict[str, Any]:
    """
    Turn ['momentum=0.9', 'sync.slop=0.1'] into {parameter name: value}, values read as YAML.

    A bare name is a hyperparameter of `method` (adaptation.<method>.<name>); a dotted name
    is any node parameter.
    """
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition('=')
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f'--set expects key=value, got {pair!r}')
        name = key if '.' in key else f'adaptation.{method}.{key}'
        if name not in SPECS:
            known = sorted(n.rsplit('.', 1)[1] for n in SPECS
                           if n.startswith(f'adaptation.{method}.'))
            raise SystemExit(f'--set {key}: no such parameter (hyperparameters of {method}: '
                             f'{", ".join(known) or "none"}; or a node parameter name)')
        try:
            values[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise SystemExit(f'--set {key}: cannot read {value!r}: {error}') from None
    return values


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--params-file', default=None,
                        help='the node\'s ROS 2 params file (default: config/adapt.yaml)')
    parser.add_argument('--domain', default='night', help='generator domain of the streams')
    parser.add_argument('--seeds', type=int, nargs='+', default=list(TARGET_SEEDS))
    parser.add_argument('--frames', type=int, default=TARGET_FRAMES, help='frames per stream')
    parser.add_argument('--method', default=None, choices=sorted(METHODS),
                        help='adaptation method (default: the params file\'s)')
    parser.add_argument('--set', dest='params', action='append', metavar='KEY=VALUE',
                        help='a hyperparameter of the method, or any node parameter by its '
                             'dotted name (repeatable)')
    parser.add_argument('--batch-frames', type=int, help='adapt on the last N frames')
    parser.add_argument('--image-size', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--cache-dir', default='data/cache')
    parser.add_argument('--device', default=None, help='auto, cuda or cpu')
    parser.add_argument('--json', help='write the full report here')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (0: default)')
    parser.add_argument('--bag', nargs='+', help='score these rosbag2 bags instead of '
                        'generated streams (labels from /LIDAR_TOP/labels where present)')
    parser.add_argument('--extrinsics', type=float, nargs='+', metavar='V',
                        help='T_cam_from_lidar (16 or 7 numbers) when a bag has no /tf_static')
    parser.add_argument('--output-bag', help='with one --bag: write the labeled clouds here')
    return parser


def resolve_params(args) -> NodeParams:
    """Return the node parameters the arguments describe (SystemExit with the reason)."""
    path = Path(args.params_file) if args.params_file else default_params_file()
    try:
        values = read_params_file(path)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.method:
        values['adaptation.method'] = args.method
    values['model.checkpoint'] = str(args.checkpoint)
    optional = {'device': args.device, 'threads': args.threads,
                'adaptation.batch_frames': args.batch_frames,
                'calibration.T_cam_from_lidar': args.extrinsics}
    values.update({name: value for name, value in optional.items() if value is not None})
    if args.image_size:
        values['model.image_width'], values['model.image_height'] = args.image_size
    values.update(parse_assignments(args.params, values.get('adaptation.method', 'mmtta')))
    try:
        return node_params(values)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def check_paths(args) -> None:
    """Refuse missing inputs and an existing output before any work."""
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f'no checkpoint at {args.checkpoint}')
    for bag in args.bag or []:
        if not Path(bag).exists():
            raise SystemExit(f'no bag at {bag}')
        if not (Path(bag) / 'metadata.yaml').is_file() and not Path(bag).is_file():
            raise SystemExit(f'{bag} is not a rosbag2 bag (no metadata.yaml)')
    if args.output_bag:
        if len(args.bag or []) != 1:
            raise SystemExit('--output-bag needs exactly one --bag')
        if Path(args.output_bag).exists():
            raise SystemExit(f'{args.output_bag} exists: bags are never overwritten')


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    check_paths(args)
    params = resolve_params(args)
    # Heavy imports after the arguments are known to be good.
    from mmtta_ros.core.builder import build_pipeline

    from mmtta_ros.core.realtime import node_protocol

    try:  # the checkpoint is read here, before any frame: a bad one ends the run now
        # Labeled as the node labels (worker.split: the predictor, adaptation behind it).
        pipeline = node_protocol(build_pipeline(params.pipeline), params)
    except (ValueError, OSError) as error:
        raise SystemExit(f'error: {error}') from None
    method = params.pipeline.adaptation.method
    reports = []
    for name, frames in _streams(args, params):
        # Each stream starts from the source model: adaptation never leaks across streams.
        pipeline.reset()
        recorded = []

        def record(output):
            recorded.append((output.frame.stamp_lidar_ns, output.frame.lidar_frame_id,
                             output.cloud))
        report = score_stream(pipeline, frames, on_result=record if args.output_bag else None)
        report['stream'] = name
        reports.append(report)
        print(format_report(f'{method} on {name}', report))
        if report['frames'] == report['unlabeled_frames']:
            print(f'  {name} has no ground-truth labels: nothing scored')
        if args.output_bag:
            from mmtta_ros.bags.writer import write_labeled_clouds
            count = write_labeled_clouds(args.output_bag, recorded)
            print(f'  wrote {count} labeled clouds to {args.output_bag}')
    summary = {head: [100 * r['miou'][head] for r in reports
                      if r['frames'] > r['unlabeled_frames']] for head in HEADS}
    line = ' / '.join(f'{np.mean(v):.1f}±{np.std(v):.1f}' if v else 'n/a'
                      for v in summary.values())
    source = 'bags' if args.bag else args.domain
    print(f'{method} on {source}, {len(reports)} streams: mIoU 2D / 3D / 2D+3D = {line}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            'method': method, 'params': dict(params.pipeline.adaptation.hyperparameters),
            'domain': args.domain, 'checkpoint': str(args.checkpoint), 'streams': reports,
            'miou_mean': {h: float(np.mean(v)) if v else None for h, v in summary.items()},
            'miou_std': {h: float(np.std(v)) if v else None for h, v in summary.items()},
        }, indent=2))
    return 0


def _streams(args, params: NodeParams):
    """Yield (name, frames) of every stream the arguments ask for."""
    image_size = params.pipeline.model.image_size
    if args.bag:
        from mmtta_ros.bags.reader import BagFrameReader
        for path in args.bag:
            yield Path(path).name, BagFrameReader(
                path, image_size=image_size, sync=params.sync,
                T_cam_from_lidar=params.pipeline.inputs.T_cam_from_lidar)
        return
    from mmtta_ros.eval.frame_cache import synthetic_frames
    for seed in args.seeds:
        yield f'{args.domain} seed {seed}', synthetic_frames(
            [target_config(args.domain, seed, image_size, args.frames)], args.cache_dir)


if __name__ == '__main__':
    sys.exit(main())
