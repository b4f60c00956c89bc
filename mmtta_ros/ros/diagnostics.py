"""
The node's figures (input rates, latency, step time, counters) under one lock, and their message.

Callbacks and the worker thread report here; the diagnostics timer reads a consistent
snapshot. Counters say where every message and every pair went; the books close:

    image_received + points_received
        == rejected_messages                         (refused by the pairing on arrival)
         + sync_dropped_stale + sync_dropped_queue_full + sync_dropped_out_of_slop
         + sync_dropped_unmatched + sync_dropped_reset + sync_pending   (never paired)
         + 2 * (pairs_dropped_stale + pairs_pending                 (paired, not taken)
                + frames_processed + rejected_frames + rejected_stamp_skew
                + rejected_no_transform + step_failures + pairs_abandoned
                + pairs_in_step)                                     (what the worker did)
    camera_info_received == camera_info_accepted + rejected_camera_info

`unaccounted_messages` is how far both ledgers are off (absolute): 0 whenever no message is between
two counters (the figures are read one lock at a time, so under traffic it can be off by
the few messages in flight).
"""

from collections import deque
import threading
import time
from typing import Any, Deque, Dict, Mapping, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np

RATE_WINDOW_S = 5.0
# Step and latency figures are means over the last this many frames.
HISTORY = 100
COUNTERS = (
    'frames_processed',      # pairs labeled and published
    'pairs_taken',           # pairs the worker took from the mailbox
    'rejected_messages',     # refused when added to the pairing (bad stamp)
    'rejected_frames',       # pairs that could not be decoded or had too little in view
    'rejected_stamp_skew',   # pairs stamped too far from the node clock
    'rejected_no_transform',  # no camera <- LiDAR in TF and no calibration.T_cam_from_lidar
    'extrinsics_from_parameter',  # frames projected with the parameter: TF lacked the mount
    'frames_without_ego_pose',  # TF lacked an ego pose at a stamp: static projection
    'step_failures',         # unexpected errors in a step (logged with a traceback)
    'pairs_abandoned',       # processed while the node was shutting down: not published
    'camera_info_accepted',  # camera_info messages kept as the current one
    'rejected_camera_info',  # camera_info messages that are unusable (the last good one stays)
    'time_jumps', 'resets', 'saves', 'save_failures',
    'adaptation_steps',      # worker.split: frames the adapter adapted on
    'adaptation_failures',   # worker.split: adapter steps that failed (logged)
    'label_supervised_steps',  # adaptation steps whose loss had answered labels in it
)
# Worker outcomes of a pair taken from the mailbox: each taken pair ends in one of them.
PAIR_OUTCOMES = ('frames_processed', 'rejected_frames', 'rejected_stamp_skew',
                 'rejected_no_transform', 'step_failures', 'pairs_abandoned')
SYNC_DROPS = ('sync_dropped_stale', 'sync_dropped_queue_full', 'sync_dropped_out_of_slop',
              'sync_dropped_unmatched', 'sync_dropped_reset')
# This many backward time jumps within RATE_WINDOW_S is no looping bag but a publisher
# that mixes old and new stamps: every jump clears the pairing queues.
JUMPS_WARN = 3
ADAPTATION_STATS = ('kept_ratio', 'entropy', 'loss', 'resets', 'dominant_fraction',
                    'supervised_loss', 'supervised_points')


class NodeDiagnostics:
    """Thread-safe rates, latencies and counters of the node."""

    def __init__(self, inputs=('image', 'points', 'camera_info')):
        self._lock = threading.Lock()
        self._arrivals: Dict[str, Deque[float]] = {key: deque() for key in inputs}
        self._received = {key: 0 for key in inputs}
        self._counters = {key: 0 for key in COUNTERS}
        self._jumps: Deque[float] = deque()
        self._in_step = 0
        self._latencies: Deque[float] = deque(maxlen=HISTORY)
        self._steps: Deque[float] = deque(maxlen=HISTORY)
        self._stages: Dict[str, Deque[float]] = {}
        self._last_stats: Dict[str, Any] = {}
        self._thread_cpu: Dict[str, float] = {}

    def received(self, key: str) -> None:
        """Note one message on input `key`."""
        now = time.monotonic()
        with self._lock:
            self._received[key] += 1
            times = self._arrivals[key]
            times.append(now)
            while times and times[0] < now - RATE_WINDOW_S:
                times.popleft()

    def count(self, name: str, amount: int = 1) -> None:
        """Add to counter `name`."""
        with self._lock:
            self._counters[name] += amount

    def time_jump(self) -> None:
        """Note one backward time jump (counted, and kept for the recent-jumps figure)."""
        now = time.monotonic()
        with self._lock:
            self._counters['time_jumps'] += 1
            self._jumps.append(now)
            while self._jumps and self._jumps[0] < now - RATE_WINDOW_S:
                self._jumps.popleft()

    def pair_taken(self) -> None:
        """Note that the worker took a pair; it is in its step until `pair_done`."""
        with self._lock:
            self._counters['pairs_taken'] += 1
            self._in_step = 1

    def pair_done(self, outcome: str) -> None:
        """Note how the pair in the step ended (one of PAIR_OUTCOMES but frames_processed)."""
        with self._lock:
            self._counters[outcome] += 1
            self._in_step = 0

    def frame_done(self, latency_s: float, step_s: float, stats: Mapping[str, Any],
                   stages: Optional[Mapping[str, float]] = None) -> None:
        """Note one labeled frame: latency since its pair was complete, step time, stats."""
        with self._lock:
            self._counters['frames_processed'] += 1
            self._in_step = 0
            self._latencies.append(latency_s)
            self._steps.append(step_s)
            if stats:  # a predictor's frame has none: the adapter reports them
                self._note_stats(stats)
            self._note_stages(stages or {})

    def adaptation_done(self, seconds: float, stats: Mapping[str, Any]) -> None:
        """Note one adapter step (worker.split): its time and the method's stats."""
        with self._lock:
            self._counters['adaptation_steps'] += 1
            self._note_stats(stats)
            self._note_stages({'adapt': seconds})

    def thread_cpu(self, name: str) -> None:
        """
        Note the CPU seconds the calling thread (`name`: worker, adapter) has used so far.

        Against the wall time of its stages it says whether a slow stage did more work or
        waited for a core (the node's process CPU minus these is the executor's and DDS's).
        """
        seconds = time.thread_time()
        with self._lock:
            self._thread_cpu[name] = seconds

    def _note_stats(self, stats: Mapping[str, Any]) -> None:
        self._last_stats = dict(stats)
        if stats.get('supervised_points'):
            self._counters['label_supervised_steps'] += 1

    def _note_stages(self, stages: Mapping[str, float]) -> None:
        for name, seconds in stages.items():
            self._stages.setdefault(name, deque(maxlen=HISTORY)).append(seconds)

    def values(self, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Return every figure (rates Hz, times ms, counters) plus `extra` (pairing, mailbox)."""
        now = time.monotonic()
        with self._lock:
            # Count only the window: a sensor that stopped must show 0 Hz, not its last rate.
            values: Dict[str, Any] = {
                f'{key}_rate_hz': sum(t >= now - RATE_WINDOW_S for t in times) / RATE_WINDOW_S
                for key, times in self._arrivals.items()}
            values.update({f'{key}_received': count for key, count in self._received.items()})
            values['latency_ms'] = (float(np.mean(self._latencies)) * 1e3
                                    if self._latencies else float('nan'))
            values['step_ms'] = float(np.mean(self._steps)) * 1e3 if self._steps else float('nan')
            for name, times in self._stages.items():
                values[f'{name}_ms'] = float(np.mean(times)) * 1e3
            values.update(self._counters)
            values.update({f'cpu_{name}_s': seconds
                           for name, seconds in self._thread_cpu.items()})
            values['cpu_process_s'] = time.process_time()
            values['pairs_in_step'] = self._in_step
            values['time_jumps_recent'] = sum(t >= now - RATE_WINDOW_S for t in self._jumps)
            for key in ADAPTATION_STATS:
                if key in self._last_stats:
                    values[f'adaptation_{key}'] = self._last_stats[key]
        values.update(extra or {})
        if all(key in values for key in ('sync_received', 'pairs_pending')):
            values['unaccounted_messages'] = unaccounted_messages(values)
        return values


def unaccounted_messages(values: Mapping[str, Any]) -> int:
    """Return received messages minus those accounted for by reason (module docstring): 0."""
    received = values['image_received'] + values['points_received']
    pairs = (values['pairs_dropped_stale'] + values['pairs_pending'] + values['pairs_in_step']
             + sum(values[key] for key in PAIR_OUTCOMES))
    accounted = (values['rejected_messages'] + sum(values[key] for key in SYNC_DROPS)
                 + values['sync_pending'] + 2 * pairs)
    info = values['camera_info_received'] - (values['camera_info_accepted']
                                             + values['rejected_camera_info'])
    return int(abs(received - accounted) + abs(info))


def diagnostic_array(values: Mapping[str, Any], stamp, *, method: str,
                     worker_alive: bool) -> DiagnosticArray:
    """Return the /diagnostics message of `values`."""
    status = DiagnosticStatus(name='mmtta_ros: adaptation', hardware_id='mmtta_adapt')
    jumps = values.get('time_jumps_recent', 0)
    if not worker_alive:
        status.level, status.message = DiagnosticStatus.ERROR, 'the worker thread stopped'
    elif jumps >= JUMPS_WARN:
        status.level = DiagnosticStatus.WARN
        status.message = (f'stamps jumped back {jumps} times in {RATE_WINDOW_S:g} s: a '
                          'publisher mixes old and new stamps? each jump clears the pairing')
    elif values['frames_processed'] == 0:
        status.level, status.message = DiagnosticStatus.WARN, 'no frame processed yet'
    else:
        status.level = DiagnosticStatus.OK
        status.message = f'{method}: {values["frames_processed"]} frames'
    status.values = [KeyValue(key=key, value=f'{value:.4g}' if isinstance(value, float)
                              else str(value)) for key, value in values.items()]
    array = DiagnosticArray(status=[status])
    array.header.stamp = stamp
    return array
