"""mmtta_train: train the source (day) segmenter on generated labeled frames."""

import argparse
import sys

from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.models.segmenter import SegmenterConfig
from mmtta_ros.core.builder import configure_torch
from mmtta_ros.eval.splits import IMAGE_SIZE, source_configs
from mmtta_ros.eval.training import train_source, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--checkpoint', required=True, help='where to write the checkpoint')
    parser.add_argument('--size', default='tiny', choices=['tiny', 'xmuda'])
    parser.add_argument('--domain', default='day', help='source domain of the generator')
    parser.add_argument('--steps', type=int, default=defaults.steps)
    parser.add_argument('--batch-frames', type=int, default=defaults.batch_frames)
    parser.add_argument('--lr', type=float, default=defaults.lr)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--image-size', type=int, nargs=2, default=IMAGE_SIZE,
                        metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--cache-dir', default='data/cache', help='generated frames cache')
    parser.add_argument('--device', default='auto', help='auto, cuda or cpu')
    parser.add_argument('--no-resume', action='store_true', help='start over')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads (0: torch default). On a loaded 2-core machine '
                             '1 is several times faster than 2: threads wait for each other')
    return parser


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    device = configure_torch(args.device, args.threads)
    frames = synthetic_frames(source_configs(args.domain, args.image_size), args.cache_dir)
    train_config = TrainConfig(steps=args.steps, batch_frames=args.batch_frames, lr=args.lr,
                               seed=args.seed)
    summary = train_source(frames, SegmenterConfig(size=args.size), train_config,
                           args.checkpoint, device, resume=not args.no_resume)
    print(f'trained {summary["steps"]} steps (resumed from {summary["resumed_from"]}) in '
          f'{summary["seconds"]:.0f} s on {len(frames)} frames; final loss 2D '
          f'{summary["loss_2d"]:.3f}, 3D {summary["loss_3d"]:.3f} -> {args.checkpoint}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
