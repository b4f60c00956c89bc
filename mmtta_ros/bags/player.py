"""
A `ros2 bag play` stand-in for machines without rosbag2: rosbags reads, rclpy publishes.

Messages go out as the bag's raw CDR bytes (rclpy's Publisher.publish accepts bytes and
sends them as a serialized message), so nothing is deserialized or converted. /clock
follows the bag time for nodes running with use_sim_time. Each topic is offered with the
QoS it was recorded with (best effort sensors, transient local /tf_static).
"""

import importlib
import time
from typing import Dict, Optional

from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import QosReliability
from rosgraph_msgs.msg import Clock

from mmtta_ros.bags.playback import play, PlaybackOptions, PlaybackStats, read_topics, TopicInfo
from mmtta_ros.bags.topics import ns_to_sec_nanosec

# Up to this many latched messages per topic are kept for nodes that join late.
MAX_LATCHED_DEPTH = 100
# Keep-last history of every topic played with --reliable.
RELIABLE_DEPTH = 50


def message_class(msgtype: str):
    """Import the rclpy message class of a type name such as 'sensor_msgs/msg/PointCloud2'."""
    package, kind, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.{kind}'), name)


def playback_qos(topic: TopicInfo, reliable: bool = False) -> QoSProfile:
    """
    Choose the rclpy QoS to offer a topic with: as recorded, else ros2 bag's default.

    Topics recorded without a profile get reliable / volatile (what `ros2 bag play` does),
    except /tf_static, which is latched by convention. reliable: offer every topic
    reliable (a reliable subscriber then loses nothing; a best-effort one still matches).
    """
    recorded = topic.offered_qos[0] if topic.offered_qos else None
    forced = reliable
    reliable = (reliable or recorded is None
                or recorded.reliability != QosReliability.BEST_EFFORT)
    latched = topic.transient_local or (recorded is None and topic.name == '/tf_static')
    depth = max(1, recorded.depth if recorded is not None else 10)
    if forced:
        # A reliable writer overwrites samples a slow reader has not acknowledged yet once
        # its keep-last history is full: hold a few seconds of a sensor, not 5 messages.
        depth = max(depth, RELIABLE_DEPTH)
    if latched:
        # A late subscriber should get every static message of the bag, not only the last.
        depth = max(depth, min(topic.message_count, MAX_LATCHED_DEPTH))
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                    else DurabilityPolicy.VOLATILE))


class BagPlayer(Node):
    """A node that publishes the messages of one bag at their recorded timing."""

    def __init__(self, bag_path: str, options: PlaybackOptions, node_name: str = 'bag_player',
                 reliable: bool = False):
        """Create one publisher per playable topic of the bag (reliable: all so), plus /clock."""
        super().__init__(node_name)
        self.bag_path = bag_path
        self.options = options
        self.stats = PlaybackStats()
        self.skipped: Dict[str, str] = {}
        self._topic_publishers = {}
        wanted = None if options.topics is None else set(options.topics)
        for topic in read_topics(bag_path).values():
            if wanted is not None and topic.name not in wanted:
                continue
            try:
                cls = message_class(topic.msgtype)
            except (ImportError, AttributeError, ValueError):
                # rclpy needs the type's Python package to publish even raw bytes (for its
                # type support); without it the topic is left out, not the whole bag.
                self.skipped[topic.name] = f'the Python package of {topic.msgtype} is missing'
                self.get_logger().warning(f'not playing {topic.name}: {self.skipped[topic.name]}')
                continue
            self._topic_publishers[topic.name] = self.create_publisher(
                cls, topic.name, playback_qos(topic, reliable))
        if not self._topic_publishers:
            raise ValueError(f'nothing to play in {bag_path}: {self.skipped or "no topics"}')
        # ros2 bag play's /clock: keep last 1; reliable also reaches best-effort subscribers.
        self._clock_publisher = self.create_publisher(Clock, '/clock', QoSProfile(depth=1))

    def wait_for_subscribers(self, topics, timeout_s: float) -> list:
        """
        Wait until each of `topics` has a matched subscriber, at most `timeout_s` seconds.

        Return the topics still without one. A volatile subscription misses what was
        published before it matched, so a replay meant to be lossless waits for them.
        """
        unknown = sorted(set(topics) - set(self._topic_publishers))
        if unknown:
            raise ValueError(f'--wait-for: not played from this bag: {", ".join(unknown)}')
        deadline = time.monotonic() + timeout_s
        waiting = list(topics)
        while waiting and time.monotonic() < deadline and self.context.ok():
            waiting = [t for t in waiting
                       if self._topic_publishers[t].get_subscription_count() == 0]
            if waiting:
                time.sleep(0.05)
        return waiting

    def wait_for_acknowledgements(self, timeout_s: float) -> list:
        """
        Wait until every reliable reader has acknowledged what was played, at most `timeout_s`.

        Return the topics still unacknowledged. A process that exits right after its last
        publish takes the samples a slow reliable reader has not fetched yet with it (under
        load the last sweep of a bag went missing this way).
        """
        deadline = time.monotonic() + timeout_s
        unacknowledged = []
        for topic, publisher in sorted(self._topic_publishers.items()):
            left_s = max(0.0, deadline - time.monotonic())
            if not publisher.wait_for_all_acked(Duration(nanoseconds=int(left_s * 1e9))):
                unacknowledged.append(topic)
        return unacknowledged

    def _publish(self, topic: str, raw: bytes) -> None:
        publisher = self._topic_publishers.get(topic)
        if publisher is not None:
            publisher.publish(raw)

    def _publish_clock(self, bag_time_ns: int) -> None:
        sec, nanosec = ns_to_sec_nanosec(bag_time_ns)
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = sec, nanosec
        self._clock_publisher.publish(msg)

    def run(self) -> PlaybackStats:
        """Play the bag (the topics that have publishers) until it ends or rclpy shuts down."""
        options = PlaybackOptions(
            rate=self.options.rate, loop=self.options.loop,
            start_offset_s=self.options.start_offset_s, topics=sorted(self._topic_publishers),
            clock_hz=self.options.clock_hz)
        return play(self.bag_path, options, self._publish, self._publish_clock,
                    should_stop=lambda: not self.context.ok(), stats=self.stats)


def format_summary(stats: PlaybackStats, skipped: Optional[Dict[str, str]] = None) -> str:
    """Messages published per topic, /clock count, loops and skipped topics, as text."""
    lines = [f'{count:8d}  {topic}' for topic, count in sorted(stats.published.items())]
    lines.append(f'{stats.clock_messages:8d}  /clock')
    lines.append(f'loops completed: {stats.loops}')
    for topic, why in sorted((skipped or {}).items()):
        lines.append(f'skipped {topic}: {why}')
    return '\n'.join(['published:'] + lines)
