"""mmtta_evaluate: run a checkpoint over target streams online and print mIoU 2D / 3D / 2D+3D."""

import argparse
import json
from pathlib import Path
import sys

import numpy as np
import torch
import yaml

from mmtta_ros.checkpoint import load_model_checkpoint
from mmtta_ros.datasets import synthetic_frames
from mmtta_ros.pipeline import SegmentationPipeline, select_device
from mmtta_ros.protocol import IMAGE_SIZE, target_config, TARGET_FRAMES, TARGET_SEEDS
from mmtta_ros.scoring import format_report, HEADS, score_stream
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
    return parser


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    params = parse_assignments(args.params)
    reports = []
    for seed in args.seeds:
        # Each stream starts from the source model: adaptation never leaks across streams.
        model, _, _ = load_model_checkpoint(args.checkpoint, device)
        method = build_method(args.method, model, **params)
        pipeline = SegmentationPipeline(method, device, batch_frames=args.batch_frames)
        frames = synthetic_frames(
            [target_config(args.domain, seed, args.image_size, args.frames)], args.cache_dir)
        report = score_stream(pipeline, frames)
        report['seed'] = seed
        reports.append(report)
        print(format_report(f'{args.method} on {args.domain} seed {seed}', report))
    summary = {head: [100 * r['miou'][head] for r in reports] for head in HEADS}
    line = ' / '.join(f'{np.mean(v):.1f}±{np.std(v):.1f}' for v in summary.values())
    print(f'{args.method} on {args.domain}, {len(reports)} streams: mIoU 2D / 3D / 2D+3D = {line}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            'method': args.method, 'params': params, 'domain': args.domain,
            'checkpoint': str(args.checkpoint), 'streams': reports,
            'miou_mean': {h: float(np.mean(v)) for h, v in summary.items()},
            'miou_std': {h: float(np.std(v)) for h, v in summary.items()},
        }, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
