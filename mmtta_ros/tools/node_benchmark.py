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
from typing import Tuple


from mmtta_ros.bags.playback import read_topics
from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.params import default_params_file, node_params, read_params_file
from mmtta_ros.core.realtime import configure_split_threads, splits
from mmtta_ros.eval.live_demo import ensure_demo_bag, ensure_source_model, run_live
from mmtta_ros.ros.dds_profile import dds_environment, PROFILES_VARIABLE
from mmtta_ros.synth import T_CAM_FROM_LIDAR


def offline_step_seconds(checkpoint: Path, bag: Path, method: str, frames: int,
                         threads: int = 0, device: str = 'cpu') -> Tuple[float, float]:
    """
    Return median seconds of a step and of a prediction alone on the bag's frames (warm).

    The node's settings, its torch threads included (a split node's threads 0: half the
    cores); the step is Pipeline.process (adapt, then label), the prediction
    Pipeline.predict right after it (what the node's predictor runs with worker.split).
    """
    values = read_params_file(default_params_file())
    values.update({'adaptation.method': method, 'model.checkpoint': str(checkpoint),
                   'device': device, 'threads': threads})
    params = node_params(values)
    pipeline = build_pipeline(params.pipeline)
    if splits(params):  # the node's threads, as the node sets them
        configure_split_threads(threads, pipeline.device)
    steps, predictions = [], []
    reader = BagFrameReader(bag, image_size=params.pipeline.model.image_size, sync=params.sync,
                            T_cam_from_lidar=T_CAM_FROM_LIDAR)
    for i, frame in enumerate(reader):
        start = time.perf_counter()
        pipeline.process(frame)
        stepped = time.perf_counter()
        pipeline.predict(frame)
        if i >= 2:
            steps.append(stepped - start)
            predictions.append(time.perf_counter() - stepped)
        if len(steps) >= frames:
            break
    return statistics.median(steps), statistics.median(predictions)


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
    parser.add_argument('--param', action='append', default=[], metavar='NAME=VALUE',
                        help='a node parameter for the run (repeatable), e.g. threads=1')
    parser.add_argument('--no-dds-profile', action='store_true',
                        help='leave Fast DDS its defaults (also MMTTA_DDS_PROFILE=0); default: '
                             'node, player and recorder load config/fastdds_large_data.xml')
    args = parser.parse_args(argv)
    parameters = {}
    for pair in args.param:
        name, sep, value = pair.partition('=')
        if not sep or not name:
            raise SystemExit(f'--param expects NAME=VALUE, got {pair!r}')
        parameters[name] = value
    data, out_dir = Path(args.data_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = (data / 'models' / 'source_tiny_day_s0.pt').resolve()
    bag = (data / 'bags' / f'night_demo_s{args.seed}_{args.duration:.0f}s').resolve()
    ensure_source_model(checkpoint, data / 'cache', 300)
    ensure_demo_bag(bag, args.seed, args.duration)
    env = dds_environment(enabled=False if args.no_dds_profile else None)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
    os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                      ROS_DOMAIN_ID=env['ROS_DOMAIN_ID'])
    if env.get(PROFILES_VARIABLE):  # this process's recorder too
        os.environ[PROFILES_VARIABLE] = env[PROFILES_VARIABLE]

    live = run_live(args.method, checkpoint, bag, out_dir, args.rate, env, pictures=False,
                    parameters=parameters)
    step, predict = offline_step_seconds(checkpoint, bag, args.method, args.offline_frames,
                                         threads=int(parameters.get('threads', 0)),
                                         device=str(parameters.get('device', 'cpu')))
    values = live['diagnostics']

    def figure(name, default='nan'):
        return float(values.get(name, default))
    print(f'node benchmark: {args.method}, tiny model, demo bag {bag.name} at {args.rate}x, '
          f'CPU, node parameters {parameters or "as configured"}, Fast DDS profile '
          f'{env.get(PROFILES_VARIABLE) or "none"}')
    in_bag = read_topics(bag)['/LIDAR_TOP'].message_count
    print(f'  sweeps in the bag (20 Hz)             {in_bag}')
    print(f'  sweeps received by the node           {values.get("points_received")}')
    print(f'  image-sweep pairs matched             {values.get("sync_sets")}')
    print(f'  pairs labeled and published           {values.get("frames_processed")}  '
          f'(replaced before the worker took them: {values.get("pairs_dropped_stale")})')
    print(f'  adaptation steps                      {values.get("adaptation_steps", "-")}  '
          f'(labeled frames the adapter skipped: {values.get("frames_skipped_by_adapter")})')
    label_ms = figure('label_ms')
    print(f'  latency, pair complete -> published   {figure("latency_ms"):.1f} ms (mean, node)')
    print(f'  end-to-end latency, median / p90      {live["latency_ms_median"]:.1f} / '
          f'{live["latency_ms_p90"]:.1f} ms  (sweep in -> labeled cloud out, at a subscriber)')
    print(f'  per stage in the node (mean)          decode {figure("decode_ms"):.1f}, label '
          f'{label_ms:.1f} (project {figure("project_ms"):.1f}, model {figure("model_ms"):.1f}, '
          f'encode {figure("encode_ms"):.1f}), publish {figure("publish_ms"):.1f}, adapt '
          f'{figure("adapt_ms"):.1f} ms')

    def rate(name):  # per second of the replay: the bag's duration at this rate
        return float(values.get(name, 0)) / args.duration * args.rate
    print(f'  rates over the bag\'s duration         {rate("adaptation_steps"):.1f} Hz adapted, '
          f'{rate("frames_processed"):.1f} Hz labeled, of {rate("sync_sets"):.1f} Hz matched')
    print(f'  median end-to-end / label stage       {live["latency_ms_median"] / label_ms:.2f}')
    cpu = live['cpu_seconds']
    labeled = max(1, int(values.get('frames_processed', 0)))
    node_cpu, worker, adapter = (figure('cpu_process_s'), figure('cpu_worker_s', '0'),
                                 figure('cpu_adapter_s', '0'))
    player = 'n/a' if cpu['player'] is None else f'{cpu["player"]:.1f}'
    print(f'  CPU seconds over the run ({cpu["wall"]:.1f} s wall, {os.cpu_count()} CPUs)     '
          f'node {node_cpu:.1f} (worker {worker:.1f}, adapter {adapter:.1f}, the rest '
          f'{node_cpu - worker - adapter:.1f}: start-up, executor, DDS), player '
          f'{player}, this recorder {cpu["recorder"]:.1f}')
    print(f'  worker CPU per labeled pair           {worker / labeled * 1e3:.1f} ms  (against '
          f'{label_ms + figure("decode_ms") + figure("publish_ms"):.1f} ms wall: the rest is '
          'waiting for a core, or for the GPU on cuda)')
    print(f'  adapt-and-label step alone, offline   {step * 1e3:.1f} ms  '
          f'(median of {args.offline_frames} frames of the same bag)')
    print(f'  prediction alone, offline             {predict * 1e3:.1f} ms  (the same frames; '
          f'median end-to-end / it: {live["latency_ms_median"] / (predict * 1e3):.2f})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
