"""
The node's figures (input rates, latency, step time, counters) under one lock, and their message.

Callbacks and the worker thread report here; the diagnostics timer reads a consistent
snapshot. Counters say where every message and every pair went.
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
    'rejected_camera_info',  # camera_info messages that are unusable (the last good one stays)
    'step_failures',         # unexpected errors in a step (logged with a traceback)
    'time_jumps', 'resets', 'saves', 'save_failures',
)
ADAPTATION_STATS = ('kept_ratio', 'entropy', 'loss', 'resets', 'dominant_fraction')


class NodeDiagnostics:
    """Thread-safe rates, latencies and counters of the node."""

    def __init__(self, inputs=('image', 'points', 'camera_info')):
        self._lock = threading.Lock()
        self._arrivals: Dict[str, Deque[float]] = {key: deque() for key in inputs}
        self._received = {key: 0 for key in inputs}
        self._counters = {key: 0 for key in COUNTERS}
        self._latencies: Deque[float] = deque(maxlen=HISTORY)
        self._steps: Deque[float] = deque(maxlen=HISTORY)
        self._last_stats: Dict[str, Any] = {}

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

    def frame_done(self, latency_s: float, step_s: float, stats: Mapping[str, Any]) -> None:
        """Note one labeled frame: latency since its pair was complete, step time, stats."""
        with self._lock:
            self._counters['frames_processed'] += 1
            self._latencies.append(latency_s)
            self._steps.append(step_s)
            self._last_stats = dict(stats)

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
            values.update(self._counters)
            for key in ADAPTATION_STATS:
                if key in self._last_stats:
                    values[f'adaptation_{key}'] = self._last_stats[key]
        values.update(extra or {})
        return values


def diagnostic_array(values: Mapping[str, Any], stamp, *, method: str,
                     worker_alive: bool) -> DiagnosticArray:
    """Return the /diagnostics message of `values`."""
    status = DiagnosticStatus(name='mmtta_ros: adaptation', hardware_id='mmtta_adapt')
    if not worker_alive:
        status.level, status.message = DiagnosticStatus.ERROR, 'the worker thread stopped'
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
