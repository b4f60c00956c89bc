"""
mmtta_demo: the whole product on a synthetic night drive, live over DDS on loopback.

1. a `tiny` day (source) model: reused from data/models, or trained (about 5 min here);
2. a night demo bag (rosbag2 mcap) written from the generator;
3. for source-only and MM-TTA in turn: the node (`mmtta_adapt`) and the player
   (`mmtta_play_bag`) as separate processes talking DDS, while this process records the
   labeled output (to a bag) and scores it against the bag's ground-truth labels;
4. prints live mIoU of both, writes pictures (overlay, offscreen 3D view), exits.
"""

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import time

from mmtta_ros.bags.topics import BagTopics
from mmtta_ros.core.params import default_params_file, read_params_file
from mmtta_ros.eval.live_demo import (
    ensure_demo_bag, ensure_source_model, format_live_table, log, run_live,
    score_labeled_bag)
from mmtta_ros.ros.dds_profile import dds_environment, PROFILES_VARIABLE


def main(argv=None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', default='data', help='models, bags and caches')
    parser.add_argument('--out-dir', default='runs/demo', help='results and pictures')
    parser.add_argument('--seed', type=int, default=100, help='night drive of the demo bag')
    parser.add_argument('--duration', type=float, default=20.0, help='bag length, seconds')
    parser.add_argument('--rate', type=float, default=1.0, help='replay speed')
    parser.add_argument('--train-steps', type=int, default=300)
    parser.add_argument('--methods', nargs='+', default=None,
                        help='adaptation methods to run, one node each (default: source and '
                             'the node\'s own method from config/adapt.yaml)')
    parser.add_argument('--momentum', type=float, default=None,
                        help='MM-TTA slow-model momentum (default: config/adapt.yaml)')
    parser.add_argument('--latest-only', action='store_true',
                        help='the node labels only the newest pair, as it does live (the runs '
                             'then label different sweeps); default: every pair, in order')
    parser.add_argument('--no-dds-profile', action='store_true',
                        help='leave Fast DDS its defaults (also MMTTA_DDS_PROFILE=0); default: '
                             'every process loads config/fastdds_large_data.xml')
    args = parser.parse_args(argv)
    if args.methods is None:
        # Source-only against the node's own configuration: what a user gets by default.
        args.methods = ['source', read_params_file(default_params_file())['adaptation.method']]

    started = time.monotonic()
    data, out_dir = Path(args.data_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = (data / 'models' / 'source_tiny_day_s0.pt').resolve()
    bag = (data / 'bags' / f'night_demo_s{args.seed}_{args.duration:.0f}s').resolve()
    writer = None
    if not (bag / 'metadata.yaml').is_file() and not checkpoint.is_file():
        # Both are needed: render the bag in another process while this one trains (one
        # core each), instead of one after the other.
        log(f'writing the night demo bag {bag} in the background (pid follows) ...')
        writer = subprocess.Popen([
            sys.executable, '-m', 'mmtta_ros.tools.make_demo_bag', str(bag), '--domain',
            'night', '--seed', str(args.seed), '--duration', str(args.duration),
            '--workers', '1'])
        log(f'bag writer pid {writer.pid}')
    try:
        ensure_source_model(checkpoint, data / 'cache', args.train_steps)
    except BaseException:
        if writer is not None:
            writer.terminate()  # our own child: do not leave it rendering
            writer.wait()
        raise
    if writer is not None and writer.wait() != 0:
        raise SystemExit(f'writing the demo bag failed (exit code {writer.returncode})')
    ensure_demo_bag(bag, args.seed, args.duration)

    # The node, the player and this process's recorder: shared memory that holds the clouds.
    env = dds_environment(enabled=False if args.no_dds_profile else None)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                      ROS_DOMAIN_ID=env['ROS_DOMAIN_ID'])
    if env.get(PROFILES_VARIABLE):
        os.environ[PROFILES_VARIABLE] = env[PROFILES_VARIABLE]
        log(f'Fast DDS profile: {env[PROFILES_VARIABLE]}')
    parameters = {'adaptation.mmtta.momentum': args.momentum} if args.momentum else {}
    player_args = []
    if not args.latest_only:
        # Every pair, in order, in every run: the methods label the same sweeps. The player
        # waits for discovery, or the first messages are lost to the new subscriptions.
        parameters['worker.process_every_pair'] = True
        # Reliable both ends: best-effort ~700 KB clouds over loopback lose about half the
        # sweeps on this machine, and each run would lose different ones.
        parameters['inputs.reliable'] = True
        # Keep last: a reliable reader whose callbacks fall more than `depth` messages behind
        # still drops the oldest, so the depth covers the whole bag.
        parameters['inputs.depth'] = 1000
        player_args = ['--wait-for', BagTopics.image, BagTopics.camera_info, BagTopics.lidar,
                       '--delay', '5', '--reliable']
    reports = [run_live(method, checkpoint, bag, out_dir, args.rate, env,
                        parameters=parameters, player_args=player_args, settle_timeout=300.0)
               for method in args.methods]
    common = sorted(set.intersection(*(set(r['labeled_stamps']) for r in reports)))
    for report in reports:
        same = score_labeled_bag(out_dir / f'{report["method"]}_labeled_points', bag, common)
        report['same_sweeps'] = {'sweeps': same['scored'], 'miou': same['miou'],
                                 'iou': same['iou']}
    (out_dir / 'live_results.json').write_text(json.dumps(reports, indent=2))
    print()
    print(f'Live mIoU (2D+3D, in-view points) on the night demo bag, replayed at {args.rate}x:')
    print(format_live_table(reports))
    print(f'On the {len(common)} sweeps every run labeled: ' + ', '.join(
        f'{r["method"]} {100 * r["same_sweeps"]["miou"]:.1f}' for r in reports
        if r['same_sweeps']['miou'] is not None))
    for report in reports:
        clean = report['node_exit_code'] == 0 and not report['node_traceback']
        print(f'  {report["method"]}: node exited with {report["node_exit_code"]}'
              f'{"" if clean else " (NOT clean: see its log)"}; player: '
              f'{" | ".join(report["player_summary"])}')
    print(f'Pictures and recorded bags in {out_dir}/ ; total {time.monotonic() - started:.0f} s')
    return 0 if all(r['node_exit_code'] == 0 and not r['node_traceback'] for r in reports) else 1


if __name__ == '__main__':
    sys.exit(main())
