"""
Bag playback timing without ROS: which raw message to send when, and what /clock says.

`play` walks a bag's messages at their log times, scaled by a rate, and hands each raw CDR
message and the /clock times to callbacks; the rclpy player (`player.py`) supplies
callbacks that publish. Kept free of rclpy so the timing is tested with a fake clock.
"""

from dataclasses import dataclass, field
from pathlib import Path
import time
from typing import Callable, Collection, Dict, List, Optional, Union

from rosbags.interfaces import Qos, QosDurability
from rosbags.rosbag2 import Reader

PathLike = Union[str, Path]


@dataclass
class TopicInfo:
    """A topic of a bag: its type, the QoS its publishers offered when recorded, its count."""

    name: str
    msgtype: str
    offered_qos: List[Qos] = field(default_factory=list)
    message_count: int = 0

    @property
    def transient_local(self) -> bool:
        """Whether it was recorded from a latching (transient local) publisher."""
        return any(q.durability == QosDurability.TRANSIENT_LOCAL for q in self.offered_qos)


def read_topics(path: PathLike) -> Dict[str, TopicInfo]:
    """Topics of a bag by name, from its metadata (nothing else is read)."""
    with Reader(Path(path)) as bag:
        topics: Dict[str, TopicInfo] = {}
        for connection in bag.connections:
            info = topics.setdefault(connection.topic,
                                     TopicInfo(connection.topic, connection.msgtype))
            info.offered_qos.extend(getattr(connection.ext, 'offered_qos_profiles', []))
            info.message_count += int(connection.msgcount)
        return topics


@dataclass
class PlaybackOptions:
    """
    How to play a bag.

    rate:           bag seconds per wall second (2.0 plays twice as fast)
    loop:           start again at the end, until stopped
    start_offset_s: skip this many seconds from the bag's start (latched topics are
                    still sent first, so late nodes get the static transforms)
    topics:         play only these topics; None plays every topic
    clock_hz:       /clock publications per wall second
    """

    rate: float = 1.0
    loop: bool = False
    start_offset_s: float = 0.0
    topics: Optional[Collection[str]] = None
    clock_hz: float = 40.0

    def __post_init__(self):
        """Reject values playback cannot honour."""
        if not self.rate > 0:
            raise ValueError(f'rate must be > 0, got {self.rate}')
        if self.start_offset_s < 0:
            raise ValueError(f'start_offset_s must be >= 0, got {self.start_offset_s}')
        if not self.clock_hz > 0:
            raise ValueError(f'clock_hz must be > 0, got {self.clock_hz}')


@dataclass
class PlaybackStats:
    """Messages sent per topic, /clock messages sent, and loops completed."""

    published: Dict[str, int] = field(default_factory=dict)
    clock_messages: int = 0
    loops: int = 0


def play(path: PathLike, options: PlaybackOptions,
         publish: Callable[[str, bytes], None], publish_clock: Callable[[int], None],
         should_stop: Callable[[], bool] = lambda: False,
         now: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep,
         stats: Optional[PlaybackStats] = None) -> PlaybackStats:
    """
    Play a bag: publish(topic, raw_cdr) at each message's log time, scaled by the rate.

    publish_clock(bag_time_ns) is called at clock_hz with the bag time the playback has
    reached (never past the next message's); after a loop restart it goes back in time, as on a
    real replay. Returns when the bag ends (unless looping) or should_stop() is true.
    `stats` is filled as playback goes, so a caller interrupted mid-way still has it.
    """
    stats = PlaybackStats() if stats is None else stats
    wanted = None if options.topics is None else set(options.topics)
    clock_period = 1.0 / options.clock_hz
    with Reader(Path(path)) as bag:
        connections = [c for c in bag.connections if wanted is None or c.topic in wanted]
        if wanted is not None and not connections:
            raise ValueError(f"none of the topics {', '.join(sorted(wanted))} is in {path} "
                             f"(topics: {', '.join(sorted({c.topic for c in bag.connections}))})")
        latched = {c.id for c in connections
                   if any(q.durability == QosDurability.TRANSIENT_LOCAL
                          for q in getattr(c.ext, 'offered_qos_profiles', []))}
        start_ns = bag.start_time + int(round(options.start_offset_s * 1e9))
        while not should_stop():
            wall0 = now()
            next_clock = wall0

            def bag_time(wall: float) -> int:
                return start_ns + int((wall - wall0) * options.rate * 1e9)

            for connection, log_ns, raw in bag.messages(connections=connections):
                before_start = log_ns < start_ns
                if before_start and connection.id not in latched:
                    continue
                # Latched messages before the offset go out at once; the rest on schedule.
                target = wall0 + max(0, log_ns - start_ns) * 1e-9 / options.rate
                while True:
                    if should_stop():
                        return stats
                    wall = now()
                    if wall >= next_clock:
                        publish_clock(min(bag_time(wall), max(log_ns, start_ns)))
                        stats.clock_messages += 1
                        next_clock = max(next_clock + clock_period, wall)
                    if wall >= target:
                        break
                    sleep(min(target, next_clock) - wall)
                publish(connection.topic, bytes(raw))
                stats.published[connection.topic] = stats.published.get(connection.topic, 0) + 1
            stats.loops += 1
            if not options.loop:
                break
    return stats
