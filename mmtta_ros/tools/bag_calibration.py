"""mmtta_bag_calibration: print a bag's LiDAR->camera transform as the node's parameter."""

import argparse
import sys

from rosbags.rosbag2 import ReaderError

from mmtta_ros.bags.reader import bag_calibration
from mmtta_ros.bags.topics import BagTopics, CAMERA_FRAME, LIDAR_FRAME
from mmtta_ros.core.errors import SensorDataError

PARAMETER = 'calibration.T_cam_from_lidar'


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('bag', help='bag directory (or a single .mcap / .db3 file)')
    parser.add_argument('--camera-frame', default=CAMERA_FRAME,
                        help=f'the camera\'s frame id (default {CAMERA_FRAME})')
    parser.add_argument('--lidar-frame', default=LIDAR_FRAME,
                        help=f'the LiDAR\'s frame id (default {LIDAR_FRAME})')
    parser.add_argument('--tf-static-topic', default=BagTopics.tf_static)
    parser.add_argument('--tf-topic', default=BagTopics.tf)
    return parser


def format_calibration(T) -> str:
    """Return the 4x4 transform as a -p argument and as config/adapt.yaml lines (row-major)."""
    numbers = ', '.join(repr(float(v)) for v in T.reshape(-1))
    return (f'-p "{PARAMETER}:=[{numbers}]"\n'
            f'# config/adapt.yaml:\n'
            f'    calibration:\n'
            f'      T_cam_from_lidar: [{numbers}]')


def main(argv=None) -> int:
    """Read the bag's transforms and print the parameter; one line and exit 1 on failure."""
    args = build_parser().parse_args(argv)
    topics = BagTopics(tf_static=args.tf_static_topic, tf=args.tf_topic)
    try:
        T = bag_calibration(args.bag, args.camera_frame, args.lidar_frame, topics)
    except (FileNotFoundError, ReaderError, SensorDataError) as error:
        print(f'mmtta_bag_calibration: {error}', file=sys.stderr)
        return 1
    print(format_calibration(T))
    return 0


if __name__ == '__main__':
    sys.exit(main())
