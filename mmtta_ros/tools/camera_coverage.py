"""mmtta_camera_coverage: share of sweep points labeled (not 65535) with 1, 2, ... N cameras."""

import argparse
import sys

from mmtta_ros.bags.nuscenes_convert import camera_bag_topics, camera_channels
from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.bags.topics import BagTopics
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.eval.coverage import coverage_table
from mmtta_ros.synth import generate_frames, SequenceConfig


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--bag', help='a bag written by mmtta_nuscenes_to_bag --cameras ...')
    source.add_argument('--synthetic', metavar='DOMAIN',
                        help='a generated drive of this domain (day, night, city_b, lidar16)')
    parser.add_argument('--cameras', default='all',
                        help="camera names, comma separated, the primary first, or 'all' "
                        '(the six nuScenes cameras; default)')
    parser.add_argument('--frames', type=int, default=20,
                        help='synthetic: sweeps generated (default 20)')
    parser.add_argument('--seed', type=int, default=0, help='synthetic: seed (default 0)')
    return parser


def main(argv=None) -> int:
    """Print one line per camera count; one line and exit 1 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        cameras = camera_channels(args.cameras)
        if args.bag:
            image, info = camera_bag_topics(cameras[0])
            frames = list(BagFrameReader(args.bag, topics=BagTopics(
                image=image, camera_info=info, extra_cameras=cameras[1:])))
        else:
            if cameras[0] != 'CAM_FRONT':
                raise ValueError('the generator\'s primary camera is CAM_FRONT: list it first')
            frames = list(generate_frames(SequenceConfig(
                domain=args.synthetic, seed=args.seed, num_frames=args.frames,
                extra_cameras=cameras[1:])))
        for line in coverage_table(frames):
            print(line)
    except (FileNotFoundError, SensorDataError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
