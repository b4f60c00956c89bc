"""
mmtta_train: train the source (day) segmenter on generated labeled frames.

--fused-head trains a model with a fused 2D+3D head (FtD++, the `ftd` method);
--fit-fused-head --init SOURCE.pt fits only such a head on a frozen source checkpoint,
so `ftd` runs on the same 2D and 3D weights as every other method.

With --uda METHOD --target-domain D: offline UDA, the same recipe plus unlabeled frames of
D (seeds eval.splits.UDA_TARGET_SEEDS, never a scored stream's) and METHOD's loss: xmuda
(cross-modal KL with mimicry heads), adaptsegnet (output-space adversary) or dann
(feature adversary behind gradient reversal).
"""

import argparse
import sys

from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.models.segmenter import SegmenterConfig
from mmtta_ros.core.builder import configure_torch
from mmtta_ros.eval.splits import IMAGE_SIZE, source_configs, uda_target_configs
from mmtta_ros.eval.training import fit_fused_head, train_source, train_uda, TrainConfig
from mmtta_ros.eval.uda import UDA_METHODS, UdaConfig

# Steps of --fit-fused-head when --steps is not given: the head alone converges quickly.
FIT_FUSED_HEAD_STEPS = 300


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--checkpoint', required=True, help='where to write the checkpoint')
    parser.add_argument('--size', default='tiny', choices=['tiny', 'xmuda'])
    parser.add_argument('--domain', default='day', help='source domain of the generator')
    parser.add_argument('--uda', choices=UDA_METHODS,
                        help='offline UDA method (needs --target-domain)')
    parser.add_argument('--target-domain',
                        help='domain of the unlabeled target frames of --uda')
    parser.add_argument('--steps', type=int,
                        help=f'optimiser steps (default {defaults.steps}; '
                             f'{FIT_FUSED_HEAD_STEPS} with --fit-fused-head)')
    parser.add_argument('--batch-frames', type=int, default=defaults.batch_frames)
    parser.add_argument('--lr', type=float, default=defaults.lr)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--image-size', type=int, nargs=2, default=IMAGE_SIZE,
                        metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--cache-dir', default='data/cache', help='generated frames cache')
    parser.add_argument('--device', default='auto', help='auto, cuda or cpu')
    parser.add_argument('--no-resume', action='store_true', help='start over')
    parser.add_argument('--fused-head', action='store_true',
                        help='train a fused 2D+3D head with the model (for the ftd method)')
    parser.add_argument('--fit-fused-head', action='store_true',
                        help='fit only a fused head on the frozen checkpoint --init')
    parser.add_argument('--init', help='source checkpoint for --fit-fused-head')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads (0: torch default). On a loaded 2-core machine '
                             '1 is several times faster than 2: threads wait for each other')
    return parser


def main(argv=None) -> int:
    """Entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fit_fused_head != bool(args.init):
        parser.error('--fit-fused-head and --init SOURCE.pt go together')
    if args.fit_fused_head and args.fused_head:
        parser.error('--fused-head trains a whole model; --fit-fused-head only the head')
    uda = _uda_config(parser, args)
    if (args.steps is not None and args.steps < 1) or args.batch_frames < 1 \
            or args.threads < 0:
        parser.error('need --steps >= 1, --batch-frames >= 1 and --threads >= 0')
    device = configure_torch(args.device, args.threads)
    frames = synthetic_frames(source_configs(args.domain, args.image_size), args.cache_dir)
    steps = args.steps or (FIT_FUSED_HEAD_STEPS if args.fit_fused_head else TrainConfig.steps)
    train_config = TrainConfig(steps=steps, batch_frames=args.batch_frames, lr=args.lr,
                               seed=args.seed)
    if args.fit_fused_head:
        summary = fit_fused_head(frames, args.init, train_config, args.checkpoint, device)
        print(f'fitted a fused head on {args.init} in {summary["steps"]} steps '
              f'({summary["seconds"]:.0f} s) on {len(frames)} frames; final loss '
              f'{summary["loss_fused"]:.3f} -> {args.checkpoint}')
        return 0
    model_config = SegmenterConfig(size=args.size, fused_head=args.fused_head)
    try:
        if uda is None:
            summary = train_source(frames, model_config, train_config, args.checkpoint,
                                   device, resume=not args.no_resume)
        else:
            target = synthetic_frames(uda_target_configs(args.target_domain, args.image_size),
                                      args.cache_dir)
            summary = train_uda(frames, target, model_config, train_config, uda,
                                args.checkpoint, device, resume=not args.no_resume)
            frames = frames + target
    except ValueError as error:
        raise SystemExit(f'mmtta_train: {error}')
    terms = ', '.join(f'{key} {value:.3f}' for key, value in summary.items()
                      if key not in ('steps', 'resumed_from', 'seconds'))
    print(f'trained {summary["steps"]} steps (resumed from {summary["resumed_from"]}) in '
          f'{summary["seconds"]:.0f} s on {len(frames)} frames; final {terms} '
          f'-> {args.checkpoint}')
    return 0


def _uda_config(parser: argparse.ArgumentParser, args):
    """Return the UdaConfig the arguments ask for (None: source training), or exit."""
    from mmtta_ros.synth.domains import get_domain

    if (args.uda is None) != (args.target_domain is None):
        parser.error('--uda and --target-domain go together')
    for domain in filter(None, (args.domain, args.target_domain)):
        try:
            get_domain(domain)
        except ValueError as error:
            parser.error(str(error))
    if args.uda is None:
        return None
    if args.fused_head or args.fit_fused_head:
        parser.error('--uda trains the two branches only; fit a fused head on its checkpoint '
                     'afterwards (--fit-fused-head --init)')
    if args.target_domain == args.domain:
        parser.error(f'--target-domain {args.target_domain} is the source domain: '
                     'UDA needs another one')
    return UdaConfig(method=args.uda, target_domain=args.target_domain)


if __name__ == '__main__':
    sys.exit(main())
