"""
mmtta_dds_delivery: clouds delivered / clouds sent over DDS on this host, per DDS setting.

For each setting (Fast DDS defaults, the shipped profile, FASTDDS_BUILTIN_TRANSPORTS=...)
and each repeat, interleaved: a counting subscriber process (best effort, keep last 5:
the node's default input QoS; raw bytes, so its callback never falls behind) and a
sender process, both started with that setting's environment. The sender is the bag
player at --rate (best effort, as recorded) or, with --fresh, a fresh publisher that
sends --count clouds of --size-kb at --hz as soon as it is created. Prints one line per
run and a table; measured figures, no thresholds.
"""

import argparse
import json
import os
from pathlib import Path
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

from mmtta_ros.ros.dds_profile import dds_environment, PROFILES_VARIABLE, SWITCH_VARIABLE

# setting name -> (use the shipped profile, FASTDDS_BUILTIN_TRANSPORTS value or None)
SETTINGS = {
    'default': (False, None),
    'profile': (True, None),
    'large_data': (False, 'LARGE_DATA'),
}
READY = 'counter ready'
STARTUP_TIMEOUT_S = 120.0


def mapped_shm_segments() -> List[int]:
    """
    Return the sizes (bytes) of the Fast DDS shared-memory segments this process maps.

    Its own participant's segments and those of the live writers it received from: how
    one checks which segment size Fast DDS really used (an XML it rejects leaves 512 KB).
    """
    sizes = {}
    for line in Path('/proc/self/maps').read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ''
        name = Path(path).name
        if path.startswith('/dev/shm/fastdds_') and 'port' not in name and '_el' not in name:
            sizes[path] = Path(path).stat().st_size if Path(path).exists() else 0
    return sorted(sizes.values())


def setting_environment(name: str, base: Dict[str, str]) -> Dict[str, str]:
    """Return the environment of both processes for one setting (a name or an XML path)."""
    env = {k: v for k, v in base.items()
           if k not in (PROFILES_VARIABLE, 'FASTDDS_BUILTIN_TRANSPORTS', SWITCH_VARIABLE)}
    env['PYTHONUNBUFFERED'] = '1'
    if name.endswith('.xml'):
        env[PROFILES_VARIABLE] = str(Path(name).resolve())
        return env
    if name not in SETTINGS:
        raise SystemExit(f'unknown setting {name!r}: one of {sorted(SETTINGS)} or an .xml path')
    profile, transports = SETTINGS[name]
    env = dds_environment(env, enabled=profile)
    if transports:
        env['FASTDDS_BUILTIN_TRANSPORTS'] = transports
    return env


def count_main(topic: str) -> int:
    """Child: count the clouds arriving on `topic` until SIGINT; print them as JSON."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    rclpy.init()
    node = rclpy.create_node('mmtta_delivery_counter')
    received = []
    segments = []

    def on_cloud(data: bytes) -> None:
        if not received:
            # While the writer lives: its segment is mapped here if the cloud came that way.
            segments.extend(mapped_shm_segments())
        received.append(len(data))
    node.create_subscription(PointCloud2, topic, on_cloud, qos_profile_sensor_data, raw=True)
    print(READY, flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        print(json.dumps({'received': len(received),
                          'mean_kb': statistics.fmean(received) / 1e3 if received else 0.0,
                          'shm_segments': segments or mapped_shm_segments()}), flush=True)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def publish_main(topic: str, size_kb: float, hz: float, count: int,
                 wait_match_s: float = 0.0) -> int:
    """
    Child: a fresh publisher: `count` clouds of `size_kb` at `hz`, from its start.

    wait_match_s: first wait up to this long for a matched subscriber (0: do not wait).
    """
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2, PointField

    rclpy.init()
    node = rclpy.create_node('mmtta_fresh_publisher')
    publisher = node.create_publisher(PointCloud2, topic, qos_profile_sensor_data)
    points = int(size_kb * 1000) // 16  # x, y, z, intensity float32
    fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, name in enumerate(('x', 'y', 'z', 'intensity'))]
    msg = PointCloud2(height=1, width=points, is_dense=True, point_step=16,
                      row_step=16 * points, fields=fields)
    msg.header.frame_id = 'lidar'
    msg.data = np.random.default_rng(0).random(points * 4, np.float32).tobytes()
    deadline = time.monotonic() + wait_match_s
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(count):
        msg.header.stamp = node.get_clock().now().to_msg()
        publisher.publish(msg)
        time.sleep(1.0 / hz)
    time.sleep(1.0)  # let the last cloud leave before the participant goes away
    node.destroy_node()
    rclpy.try_shutdown()
    print(json.dumps({'sent': count}), flush=True)
    return 0


def run_once(setting: str, args, base_env: Dict[str, str]) -> Dict[str, object]:
    """Start counter then sender with one setting; return sent, received and the ratio."""
    env = setting_environment(setting, base_env)
    me = [sys.executable, '-m', 'mmtta_ros.tools.dds_delivery']
    counter = subprocess.Popen(me + ['count', '--topic', args.topic], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Its output, read as it comes: Fast DDS may log (XML errors, say) before READY.
    lines: List[str] = []
    reader = threading.Thread(target=lambda: lines.extend(counter.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not any(READY in line for line in lines) and time.monotonic() < deadline:
            if counter.poll() is not None:
                break
            time.sleep(0.05)
        if not any(READY in line for line in lines):
            raise RuntimeError(f'the counter did not start:\n{"".join(lines)}')
        if args.fresh:
            sender_cmd = me + ['publish', '--topic', args.topic, '--size-kb', str(args.size_kb),
                               '--hz', str(args.hz), '--count', str(args.count),
                               '--wait-match', str(args.wait_match)]
        else:
            sender_cmd = [sys.executable, '-m', 'mmtta_ros.tools.play_bag', str(args.bag),
                          '--rate', str(args.rate), '--topics', args.topic,
                          '--delay', str(args.delay)]
        started = time.monotonic()
        sender = subprocess.run(sender_cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
        seconds = time.monotonic() - started
        if sender.returncode != 0:
            raise RuntimeError(f'the sender failed ({sender.returncode}):\n{sender.stdout}')
        time.sleep(2.0)  # clouds still in flight
    finally:
        counter.send_signal(signal.SIGINT)
        try:
            counter.wait(timeout=30)
        except subprocess.TimeoutExpired:
            counter.kill()
            counter.wait()
        reader.join(timeout=10)
    out = ''.join(lines)
    if args.fresh:
        sent = json.loads(sender.stdout.strip().splitlines()[-1])['sent']
    else:
        found = re.search(rf'^\s+(\d+)\s+{re.escape(args.topic)}$', sender.stdout, re.MULTILINE)
        if found is None:
            raise RuntimeError(f'no count of {args.topic} in the player output:\n{sender.stdout}')
        sent = int(found.group(1))
    reports = [line for line in out.splitlines() if line.startswith('{')]
    if not reports:
        raise RuntimeError(f'the counter exited with {counter.returncode} and no count:\n{out}')
    result = json.loads(reports[-1])
    return {'setting': setting, 'sent': sent, 'received': result['received'],
            'ratio': result['received'] / sent if sent else float('nan'),
            'mean_kb': result['mean_kb'], 'seconds': seconds,
            'shm_segments': result['shm_segments'], 'counter_log': out}


def format_table(runs: List[Dict[str, object]]) -> str:
    """One row per setting: runs, delivered / sent per run, mean ratio."""
    lines = [f'{"setting":<14}{"runs":>5}  {"delivered / sent per run":<34}{"mean":>7}']
    for setting in dict.fromkeys(r['setting'] for r in runs):
        mine = [r for r in runs if r['setting'] == setting]
        cells = ', '.join(f'{r["received"]}/{r["sent"]}' for r in mine)
        mean = statistics.fmean(r['ratio'] for r in mine)
        lines.append(f'{Path(setting).name:<14}{len(mine):>5}  {cells:<34}{100 * mean:>6.1f}%')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments (the `count` and `publish` children are internal)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('bag', nargs='?', help='bag to replay (not with --fresh)')
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS),
                        help=f'{", ".join(SETTINGS)} or paths of Fast DDS XML files')
    parser.add_argument('--repeat', type=int, default=2, help='runs per setting, interleaved')
    parser.add_argument('--topic', default='/LIDAR_TOP')
    parser.add_argument('--rate', type=float, default=1.0, help='replay speed')
    parser.add_argument('--delay', type=float, default=3.0,
                        help='the player waits this long for discovery before playing')
    parser.add_argument('--fresh', action='store_true',
                        help='a fresh publisher instead of the bag (--size-kb, --hz, --count)')
    parser.add_argument('--size-kb', type=float, default=621.0)
    parser.add_argument('--hz', type=float, default=2.0)
    parser.add_argument('--count', type=int, default=10)
    parser.add_argument('--wait-match', type=float, default=0.0, metavar='SECONDS',
                        help='the fresh publisher first waits for a subscriber (default: no)')
    parser.add_argument('--timeout', type=float, default=600.0, help='seconds per sender')
    parser.add_argument('--json', type=Path, help='also write the runs here')
    return parser


def main(argv=None) -> int:
    """Entry point (and the children's, by their first argument)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['count']:
        return count_main(argv[argv.index('--topic') + 1])
    if argv[:1] == ['publish']:
        value = {k: argv[argv.index(k) + 1]
                 for k in ('--topic', '--size-kb', '--hz', '--count', '--wait-match')}
        return publish_main(value['--topic'], float(value['--size-kb']), float(value['--hz']),
                            int(value['--count']), float(value['--wait-match']))
    args = build_parser().parse_args(argv)
    if not args.fresh and args.bag is None:
        raise SystemExit('mmtta_dds_delivery: give a bag, or --fresh')
    base = dict(os.environ)
    base.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    runs = []
    for repeat in range(args.repeat):
        for setting in args.settings:
            run = run_once(setting, args, base)
            runs.append(run)
            print(f'{Path(setting).name:<14} run {repeat + 1}: {run["received"]}/{run["sent"]} '
                  f'clouds of {run["mean_kb"]:.0f} KB in {run["seconds"]:.1f} s; shared-memory '
                  f'segments mapped by the counter (MB): '
                  f'{[round(b / 2**20, 1) for b in run["shm_segments"]]}', flush=True)
    print(format_table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
