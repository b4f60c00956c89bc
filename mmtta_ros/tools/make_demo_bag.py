"""mmtta_make_demo_bag: write a synthetic camera + LiDAR drive as a nuScenes-like rosbag2 bag."""

import argparse
import os
import sys
import time

from rosbags.rosbag2 import WriterError

from mmtta_ros.bags.writer import STORAGES, write_demo_bag
from mmtta_ros.synth import DOMAINS


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('output', help='bag directory to create (must not exist)')
    parser.add_argument('--domain', default='night', choices=sorted(DOMAINS))
    parser.add_argument('--seed', type=int, default=0)
    length = parser.add_mutually_exclusive_group()
    length.add_argument('--duration', type=float, metavar='SECONDS',
                        help='length of the drive (default 20 s)')
    length.add_argument('--sweeps', type=int, help='length as a number of LiDAR sweeps')
    parser.add_argument('--storage', default='mcap', choices=sorted(STORAGES))
    parser.add_argument('--image-size', type=int, nargs=2, default=(800, 450),
                        metavar=('WIDTH', 'HEIGHT'), help='size of the written jpegs')
    parser.add_argument('--render-size', type=int, nargs=2, default=(400, 225),
                        metavar=('WIDTH', 'HEIGHT'),
                        help='size the generator renders at, upscaled to --image-size')
    parser.add_argument('--render-native', action='store_true',
                        help='render at --image-size (slow: ~2 s an 800x450 image)')
    parser.add_argument('--jpeg-quality', type=int, default=90)
    parser.add_argument('--lidar-azimuth-steps', type=int,
                        help="LiDAR firings per revolution (default: the domain's)")
    parser.add_argument('--latency-ms', type=float, nargs=2, default=(1.0, 6.0),
                        metavar=('MIN', 'MAX'), help='stamp-to-log-time delay range')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='rendering processes (the bag is the same for any number)')
    parser.add_argument('--with-tf', action='store_true',
                        help='also write the ego pose (odom -> base_link) on /tf')
    return parser


def main(argv=None) -> int:
    """Write the bag and print what it holds."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f'{done}/{total} sweeps, {time.perf_counter() - started:.0f} s', flush=True)

    try:
        summary = write_demo_bag(
            args.output, domain=args.domain, seed=args.seed, duration_s=args.duration,
            num_sweeps=args.sweeps, image_size=tuple(args.image_size),
            render_size=None if args.render_native else tuple(args.render_size),
            storage=args.storage, jpeg_quality=args.jpeg_quality,
            lidar_azimuth_steps=args.lidar_azimuth_steps, latency_ms=tuple(args.latency_ms),
            workers=args.workers, with_tf=args.with_tf, progress=progress)
    except (FileExistsError, ValueError, WriterError) as error:
        print(f'mmtta_make_demo_bag: {error}', file=sys.stderr)
        return 1
    print(f'wrote {summary.path} ({summary.storage}, {summary.size_bytes / 1e6:.1f} MB) in '
          f'{summary.wall_seconds:.1f} s: {summary.num_sweeps} sweeps, {summary.num_images} '
          f'images, {summary.duration_s:.2f} s of bag time')
    for topic, count in summary.message_counts.items():
        print(f'{count:8d}  {topic}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
