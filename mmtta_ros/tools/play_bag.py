"""mmtta_play_bag: play a rosbag2 bag (mcap or sqlite3) with rclpy where ros2 bag is missing."""

import argparse
import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException

from mmtta_ros.bags.playback import PlaybackOptions
from mmtta_ros.bags.player import BagPlayer, format_summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('bag', help='bag directory (or a single .mcap / .db3 file)')
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor')
    parser.add_argument('--loop', action='store_true', help='play again at the end, forever')
    parser.add_argument('--start-offset', type=float, default=0.0, metavar='SECONDS',
                        help='skip this much of the bag (latched topics are still sent)')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help='play only these topics (default: all)')
    parser.add_argument('--delay', type=float, default=0.0, metavar='SECONDS',
                        help='wait this long before playing, so subscribers discover the '
                             'new publishers first (as ros2 bag play --delay)')
    parser.add_argument('--wait-for', nargs='+', default=[], metavar='TOPIC',
                        help='first wait until each of these topics has a subscriber (then '
                             '--delay), at most --wait-timeout seconds')
    parser.add_argument('--wait-timeout', type=float, default=60.0, metavar='SECONDS')
    parser.add_argument('--reliable', action='store_true',
                        help='offer every topic reliable (lossless to a reliable subscriber)')
    parser.add_argument('--ack-timeout', type=float, default=30.0, metavar='SECONDS',
                        help='with --reliable: at the end, wait at most this long until every '
                             'reliable reader has acknowledged what was played')
    parser.add_argument('--clock-hz', type=float, default=40.0,
                        help='/clock publications per second')
    return parser


def main(argv=None) -> int:
    """Play the bag; Ctrl-C stops it cleanly. Prints what was published."""
    args = build_parser().parse_args(argv)
    try:
        options = PlaybackOptions(rate=args.rate, loop=args.loop,
                                  start_offset_s=args.start_offset, topics=args.topics,
                                  clock_hz=args.clock_hz)
    except ValueError as error:
        raise SystemExit(f'mmtta_play_bag: {error}')
    if min(args.wait_timeout, args.delay, args.ack_timeout) < 0:
        raise SystemExit('mmtta_play_bag: --delay, --wait-timeout and --ack-timeout '
                         'must be >= 0')
    rclpy.init(args=None)
    player = None
    try:
        player = BagPlayer(args.bag, options, reliable=args.reliable)
        missing = player.wait_for_subscribers(args.wait_for, args.wait_timeout)
        if missing:
            print(f'mmtta_play_bag: no subscriber after {args.wait_timeout:g} s on '
                  f'{", ".join(missing)}; playing anyway', file=sys.stderr, flush=True)
        if args.delay > 0:
            time.sleep(args.delay)
        player.run()
        if args.reliable:
            unacknowledged = player.wait_for_acknowledgements(args.ack_timeout)
            if unacknowledged:
                print(f'mmtta_play_bag: not acknowledged after {args.ack_timeout:g} s on '
                      f'{", ".join(unacknowledged)}', file=sys.stderr, flush=True)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (FileNotFoundError, ValueError) as error:
        print(f'mmtta_play_bag: {error}', file=sys.stderr)
        return 1
    finally:
        if player is not None:
            print(format_summary(player.stats, player.skipped), flush=True)
            player.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
