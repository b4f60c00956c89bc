"""mmtta_nuscenes_to_bag: convert nuScenes scenes (night ones by default) to ROS 2 bags."""

import argparse
import sys

from mmtta_ros.bags.nuscenes_convert import (
    ALL_CAMERAS, CAMERA_CHANNEL, convert, DEFAULT_VERSION, SceneConversion, SPLITS)
from mmtta_ros.bags.writer import STORAGES


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--dataroot', required=True,
                        help='nuScenes root (holds the version folder, samples/, sweeps/)')
    parser.add_argument('--version', default=DEFAULT_VERSION,
                        help='the tables folder under --dataroot: v1.0-mini (the 10-scene '
                        f'sample) or v1.0-trainval (the full set) (default: {DEFAULT_VERSION})')
    scenes = parser.add_mutually_exclusive_group()
    scenes.add_argument('--scenes', nargs='+', metavar='NAME',
                        help='scene names (e.g. scene-1077); default: every night scene')
    scenes.add_argument('--split', choices=SPLITS,
                        help="only the night scenes of xMUDA's day/night split: train, val "
                        '(15 scenes) or test (the official val set\'s; what MM-TTA scores)')
    parser.add_argument('--output-dir', required=True, help='one bag per scene is written here')
    parser.add_argument('--storage', default='mcap', choices=sorted(STORAGES))
    parser.add_argument('--keyframes-only', action='store_true',
                        help='2 Hz keyframes only (default: every 20 Hz sweep, 12 Hz image)')
    parser.add_argument('--cameras', default=CAMERA_CHANNEL,
                        help="camera channels to write, comma separated, the primary first, "
                        f"or 'all' ({', '.join(ALL_CAMERAS)}); default: {CAMERA_CHANNEL}")
    parser.add_argument('--no-tf', action='store_true',
                        help='leave out odom -> base_link on /tf (ego poses)')
    return parser


def _report(summary: SceneConversion) -> None:
    counts = ', '.join(f'{topic} {count}' for topic, count in summary.message_counts.items())
    print(f'{summary.scene} ({summary.description}): {summary.path} '
          f'[{summary.storage}, {summary.size_bytes / 1e6:.1f} MB, '
          f'{summary.wall_seconds:.1f} s] {counts}', flush=True)
    if not summary.labeled:
        print(f'  warning: the dataset has no nuScenes-lidarseg labels: {summary.path} has no '
              '/LIDAR_TOP/labels and cannot be scored (it still replays to the node)',
              file=sys.stderr, flush=True)
    elif summary.unlabeled_keyframes:
        print(f'  {summary.unlabeled_keyframes} keyframe sweeps have no lidarseg labels',
              flush=True)


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        convert(args.dataroot, args.output_dir, version=args.version, scene_names=args.scenes,
                split=args.split, storage=args.storage, keyframes_only=args.keyframes_only,
                with_tf=not args.no_tf, cameras=args.cameras, progress=_report)
    except (ImportError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
