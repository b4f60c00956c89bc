"""
node_benchmark: the node on the demo bag at 1x replay against the pipeline step alone.

Prints the end-to-end latency per frame (a sweep arriving at a subscriber -> its labeled
cloud arriving there), the node's own step time, the same pipeline step run offline on
the same bag's frames, and how many sweeps were labeled vs dropped. Figures, not asserts.
"""

import argparse
import os
from pathlib import Path
import statistics
import sys
import time

import torch

from mmtta_ros.bags.playback import read_topics
from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.params import default_params_file, node_params, read_params_file
from mmtta_ros.eval.live_demo import ensure_demo_bag, ensure_source_model, run_live
from mmtta_ros.synth import T_CAM_FROM_LIDAR


def offline_step_seconds(checkpoint: Path, bag: Path, method: str, frames: int) -> float:
    """Median seconds of Pipeline.process on the bag's frames (warm), the node's settings."""
    values = read_params_file(default_params_file())
    values.update({'adaptation.method': method, 'model.checkpoint': str(checkpoint),
                   'device': 'cpu'})
    params = node_params(values)
    pipeline = build_pipeline(params.pipeline)
    times = []
    reader = BagFrameReader(bag, image_size=params.pipeline.model.image_size, sync=params.sync,
                            T_cam_from_lidar=T_CAM_FROM_LIDAR)
    for i, frame in enumerate(reader):
        start = time.perf_counter()
        pipeline.process(frame)
        if i >= 2:
            times.append(time.perf_counter() - start)
        if len(times) >= frames:
            break
    return statistics.median(times)


def main(argv=None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--out-dir', default='runs/node_benchmark')
    parser.add_argument('--method', default='mmtta')
    parser.add_argument('--rate', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=100)
    parser.add_argument('--duration', type=float, default=20.0)
    parser.add_argument('--offline-frames', type=int, default=20)
    args = parser.parse_args(argv)
    data, out_dir = Path(args.data_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = (data / 'models' / 'source_tiny_day_s0.pt').resolve()
    bag = (data / 'bags' / f'night_demo_s{args.seed}_{args.duration:.0f}s').resolve()
    ensure_source_model(checkpoint, data / 'cache', 300)
    ensure_demo_bag(bag, args.seed, args.duration)
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    env.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                      ROS_DOMAIN_ID=env['ROS_DOMAIN_ID'])

    live = run_live(args.method, checkpoint, bag, out_dir, args.rate, env, pictures=False)
    step = offline_step_seconds(checkpoint, bag, args.method, args.offline_frames)
    diagnostics = live['diagnostics']
    node_step = float(diagnostics.get('step_ms', 'nan'))
    print(f'node benchmark: {args.method}, tiny model, demo bag {bag.name} at {args.rate}x, '
          f'CPU ({torch.get_num_threads()} threads)')
    in_bag = read_topics(bag)['/LIDAR_TOP'].message_count
    print(f'  sweeps in the bag (20 Hz)            {in_bag}')
    print(f'  labeled clouds published by the node {live["outputs"]}  '
          f'(the rest dropped: the node labels the latest pair, never a backlog)')
    print(f'  pairs replaced before processing     {diagnostics.get("pairs_dropped_stale")}')
    print(f'  end-to-end latency, median / p90     {live["latency_ms_median"]:.1f} / '
          f'{live["latency_ms_p90"]:.1f} ms  (sweep in -> labeled cloud out, at a subscriber)')
    print(f'  node step time (its diagnostics)     {node_step:.1f} ms')
    print(f'  pipeline step alone, offline         {step * 1e3:.1f} ms  '
          f'(median of {args.offline_frames} frames of the same bag)')
    overhead = live['latency_ms_median'] - step * 1e3
    print(f'  latency beyond the offline step      {overhead:.1f} ms  (sync wait for the '
          'next message, decode, DDS, publish; CPU shared with the player)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
