"""Header stamps (builtin_interfaces/Time) to and from integer nanoseconds."""

from typing import Tuple


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (sec, nanosec) to integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_sec_nanosec(stamp_ns: int) -> Tuple[int, int]:
    """Integer nanoseconds to builtin_interfaces/Time (sec, nanosec), nanosec in [0, 1e9)."""
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return sec, nanosec
