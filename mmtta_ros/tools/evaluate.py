"""
mmtta_evaluate: run a method online over target streams and print mIoU 2D / 3D / 2D+3D.

Streams are generated synthetic sequences (--domain, --seeds) or rosbag2 bags (--bag,
e.g. from mmtta_make_demo_bag or mmtta_nuscenes_to_bag); with --output-bag the labeled
clouds of a bag run are written to a new bag. The same pipeline as the node, no DDS.
"""

import argparse
import json
from pathlib import Path
import sys

import numpy as np
import yaml

from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.bags.writer import write_labeled_clouds
from mmtta_ros.checkpoint import load_model_checkpoint
from mmtta_ros.datasets import synthetic_frames
from mmtta_ros.pipeline import configure_torch, SegmentationPipeline
from mmtta_ros.protocol import IMAGE_SIZE, target_config, TARGET_FRAMES, TARGET_SEEDS
from mmtta_ros.frame import CLASS_PALETTE
from mmtta_ros.scoring import format_report, HEADS, score_stream
from mmtta_ros.sensors.pointcloud import encode_labeled_cloud
from mmtta_ros.sensors.projection import parse_extrinsics
from mmtta_ros.tta import build_method, METHODS


def parse_assignments(pairs):
    """Turn ['momentum=0.9', 'selection=soft'] into a dict, values read as YAML."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise SystemExit(f'--set expects key=value, got {pair!r}')
        params[key.strip()] = yaml.safe_load(value)
    return params


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--domain', default='night', help='generator domain of the streams')
    parser.add_argument('--seeds', type=int, nargs='+', default=list(TARGET_SEEDS))
    parser.add_argument('--frames', type=int, default=TARGET_FRAMES, help='frames per stream')
    parser.add_argument('--method', default='source', choices=sorted(METHODS))
    parser.add_argument('--set', dest='params', action='append', metavar='KEY=VALUE',
                        help='a hyperparameter of the method (repeatable)')
    parser.add_argument('--batch-frames', type=int, default=1,
                        help='adapt on the last N frames (online batch)')
    parser.add_argument('--image-size', type=int, nargs=2, default=IMAGE_SIZE,
                        metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--cache-dir', default='data/cache')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--json', help='write the full report here')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: default)')
    parser.add_argument('--bag', nargs='+', help='score these rosbag2 bags instead of '
                        'generated streams (labels from /LIDAR_TOP/labels where present)')
    parser.add_argument('--extrinsics', type=float, nargs='+', metavar='V',
                        help='T_cam_from_lidar (16 or 7 numbers) when a bag has no /tf_static')
    parser.add_argument('--output-bag', help='with one --bag: write the labeled clouds here')
    return parser


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    device = configure_torch(args.device, args.threads)
    params = parse_assignments(args.params)
    if args.output_bag and len(args.bag or []) != 1:
        raise SystemExit('--output-bag needs exactly one --bag')
    reports = []
    for name, frames in _streams(args):
        # Each stream starts from the source model: adaptation never leaks across streams.
        model, _, _ = load_model_checkpoint(args.checkpoint, device)
        method = build_method(args.method, model, **params)
        pipeline = SegmentationPipeline(method, device, batch_frames=args.batch_frames)
        recorded = []

        def record(frame, result):
            recorded.append((frame.stamp_lidar_ns, frame.lidar_frame_id, encode_labeled_cloud(
                frame.points_lidar, result.labels_full(), result.confidence_full(),
                frame.intensity, CLASS_PALETTE)))
        report = score_stream(pipeline, frames, on_result=record if args.output_bag else None)
        report['stream'] = name
        reports.append(report)
        print(format_report(f'{args.method} on {name}', report))
        if report['frames'] == report['unlabeled_frames']:
            print(f'  {name} has no ground-truth labels: nothing scored')
        if args.output_bag:
            count = write_labeled_clouds(args.output_bag, recorded)
            print(f'  wrote {count} labeled clouds to {args.output_bag}')
    summary = {head: [100 * r['miou'][head] for r in reports
                      if r['frames'] > r['unlabeled_frames']] for head in HEADS}
    line = ' / '.join(f'{np.mean(v):.1f}±{np.std(v):.1f}' if v else 'n/a'
                      for v in summary.values())
    source = 'bags' if args.bag else args.domain
    print(f'{args.method} on {source}, {len(reports)} streams: mIoU 2D / 3D / 2D+3D = {line}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            'method': args.method, 'params': params, 'domain': args.domain,
            'checkpoint': str(args.checkpoint), 'streams': reports,
            'miou_mean': {h: float(np.mean(v)) if v else None for h, v in summary.items()},
            'miou_std': {h: float(np.std(v)) if v else None for h, v in summary.items()},
        }, indent=2))
    return 0


def _streams(args):
    """Yield (name, frames) of every stream the arguments ask for."""
    if args.bag:
        T = parse_extrinsics(args.extrinsics) if args.extrinsics else None
        for path in args.bag:
            yield Path(path).name, BagFrameReader(path, image_size=tuple(args.image_size),
                                                  T_cam_from_lidar=T)
        return
    for seed in args.seeds:
        yield f'{args.domain} seed {seed}', synthetic_frames(
            [target_config(args.domain, seed, args.image_size, args.frames)], args.cache_dir)


if __name__ == '__main__':
    sys.exit(main())
