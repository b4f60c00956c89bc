"""
Approximate time synchroniser for camera + camera_info + LiDAR, and a latest-item mailbox.

Pure Python, no rclpy. The node's subscription callbacks call `ApproximateSynchronizer.add`
from any thread. Completed sets come back as its return value, so no user code ever runs
under the synchroniser's lock. message_filters' Python ApproximateTimeSynchronizer, by
contrast, runs the callback while holding its lock and matches by arrival order
(ros2/message_filters #65).

Matching: greedy by spread, and a set is emitted only once that choice is final.
    A candidate set holds one queued message per timed input. Its spread is the latest stamp
    minus the earliest, and only sets with spread <= slop count. The candidates are ranked by
    (spread, earliest stamp, member stamps) and taken tightest first. A set is kept unless it
    shares a message with a kept set, or crosses one (later on one input and earlier on
    another): each input's messages go out in stamp order. In practice each image goes with
    its nearest LiDAR sweep, and a sweep that two images compete for goes to the closer one.
    A set is emitted only when nothing can change that choice. No message still to come
    could form an equally tight set that conflicts with it, and every tighter conflicting set
    seen so far has been ruled out for good. The C++ ApproximateTime policy gives the same
    guarantee (a set is never superseded by a better one), but it reasons about the best
    set around one pivot message. With a large slop and lost messages, that can pair an image
    with one sweep while a nearer sweep exists. Here the result depends only on which messages
    arrived, not on their arrival order.
    Latency: a set waits until every input has a message past it, about one period of the
    slower input. At 12 Hz camera and 20 Hz LiDAR that is a median of 50 ms after its last
    member arrives. Each add() re-plans over the queued messages: roughly 20-80 us for two
    inputs and a queue of 10. The cost grows with queue_size and with slop.
Arrival assumptions: each input's messages arrive in stamp order, or at least every message
    arrives before any message of its own input stamped `reorder_window_ns` or more later.
    Different topics may interleave in any order. A message that breaks the assumption is
    still used (and counted as `late`), unless it is no newer than the last message matched
    or dropped on its input. Then it is stale and dropped.
Latest inputs (`optional_latest`): not matched by time. The most recent message received is
    attached to every set, whatever its stamp, and is None until one arrives. This is meant
    for camera_info, which then works whether it is stamped with each image or latched and
    published once. Time jumps and `reset()` keep it, since calibration outlives a replay loop.
Time jumps: a stamp more than `clock_jump_ns` older than the newest on its input (a looping
    bag replay) clears every queue and is reported as a `TimeJump` event. A message from
    before the loop that arrives after the jump, on another input, is taken for the new
    stretch; the next message on that input then reads as a second jump. A forward gap
    needs no handling: messages that can no longer be matched are dropped.
Bounded memory: each queue holds at most `queue_size` messages; when full, the oldest goes.
Accounting, per timed input:
    received == matched + dropped (stale, queue_full, out_of_slop, unmatched, reset) + pending.
"""

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import product
import operator
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mmtta_ros.errors import SensorDataError

# A queued message's place in its input's order: (stamp_ns, arrival number); the arrival
# number breaks ties between equal stamps without ever comparing the messages themselves.
_Key = Tuple[int, int]
_Members = Tuple[_Key, ...]


@dataclass(frozen=True)
class MatchedSet:
    """
    One message per input, close in time.

    messages:  the messages by input index; an `optional_latest` input holds the newest
               message received on it, or None if none has come yet
    stamps_ns: their stamps, integer nanoseconds (None where the message is None)
    spread_ns: max - min stamp over the time-matched inputs, nanoseconds
    seq:       0, 1, 2, ... in emission (= stamp) order; with several callback threads the
               sets can reach their callers out of order, and seq puts them back in order
    """

    messages: Tuple[Any, ...]
    stamps_ns: Tuple[Optional[int], ...]
    spread_ns: int
    seq: int


@dataclass(frozen=True)
class TimeJump:
    """
    Time went backwards on one input (a looping replay); every queue was cleared.

    input_index: the input whose stamp jumped
    stamp_ns:    the stamp that jumped back (its message is kept: it starts the new stretch)
    newest_ns:   the newest stamp seen on that input before the jump
    cleared:     number of queued messages dropped, over all inputs
    """

    input_index: int
    stamp_ns: int
    newest_ns: int
    cleared: int

    @property
    def jump_ns(self) -> int:
        """Return how far time went back, nanoseconds (positive)."""
        return self.newest_ns - self.stamp_ns


SyncEvent = Union[MatchedSet, TimeJump]


@dataclass(frozen=True)
class SyncStats:
    """
    Counters of an ApproximateSynchronizer, one entry per input unless said otherwise.

    received:            messages passed to add()
    matched:             messages emitted in a matched set (latest inputs: 0)
    dropped_stale:       no newer than the last message matched or dropped on that input
    dropped_queue_full:  pushed out of a full queue, oldest first
    dropped_out_of_slop: no message on some other input within slop of it
    dropped_unmatched:   its candidate sets lost to tighter ones
    dropped_reset:       cleared by a time jump or reset()
    late:                arrived after the reorder window (still used); not a drop
    pending:             queued now (latest inputs: 1 if a message is held)
    sets:                matched sets emitted (one number)
    time_jumps:          backward time jumps seen (one number)
    """

    received: Tuple[int, ...]
    matched: Tuple[int, ...]
    dropped_stale: Tuple[int, ...]
    dropped_queue_full: Tuple[int, ...]
    dropped_out_of_slop: Tuple[int, ...]
    dropped_unmatched: Tuple[int, ...]
    dropped_reset: Tuple[int, ...]
    late: Tuple[int, ...]
    pending: Tuple[int, ...]
    sets: int
    time_jumps: int

    @property
    def dropped(self) -> Tuple[int, ...]:
        """Return the messages dropped for any reason, per input."""
        return tuple(map(sum, zip(self.dropped_stale, self.dropped_queue_full,
                                  self.dropped_out_of_slop, self.dropped_unmatched,
                                  self.dropped_reset)))

    def as_dict(self) -> Dict[str, int]:
        """Return every counter summed over the inputs, by name (e.g. for diagnostics)."""
        return {name: (value if isinstance(value, int) else sum(value))
                for name, value in vars(self).items()}


_COUNTERS = ('received', 'matched', 'dropped_stale', 'dropped_queue_full',
             'dropped_out_of_slop', 'dropped_unmatched', 'dropped_reset', 'late')


def _end(members: Sequence[_Key]) -> int:
    """Return the latest stamp of a set's members, nanoseconds."""
    return max(key[0] for key in members)


def _safe(members: _Members, spread: int, horizons: Sequence[Optional[int]]) -> bool:
    """
    Return whether no message still to come can form a set as tight as `members` that conflicts.

    Messages still to come on input j are stamped > horizons[j]. Such a set T (spread(T) <=
    spread) has every member > horizons[j] - spread, so it lies wholly after `members` when
    horizons[j] >= the member on j and >= every other member + spread.
    """
    stamps = [key[0] for key in members]
    for j, horizon in enumerate(horizons):
        others = stamps[:j] + stamps[j + 1:]
        if horizon is None or horizon < stamps[j] or (others and horizon < max(others) + spread):
            return False
    return True


def _conflict(a: _Members, b: _Members) -> bool:
    """Return whether two sets share a message or cross (one is not wholly before the other)."""
    return not (all(x < y for x, y in zip(a, b)) or all(x > y for x, y in zip(a, b)))


class ApproximateSynchronizer:
    """
    Match messages of several inputs by stamp; thread-safe, never calls user code.

    Inputs are numbered 0..num_inputs-1 in the order the caller chooses. See the module
    docstring for the matching policy and the arrival assumptions.
    """

    def __init__(self, num_inputs: int, slop_ns: int, queue_size: int = 10, *,
                 clock_jump_ns: int = 1_000_000_000, reorder_window_ns: int = 0,
                 optional_latest: Iterable[int] = ()):
        """
        Build an empty synchroniser.

        num_inputs:        number of inputs, time-matched and latest together
        slop_ns:           largest stamp spread of a matched set, nanoseconds
        queue_size:        most messages held per input; hold at least the messages that
                           arrive within the longest gap of the slowest input plus the
                           reorder window and the transport delay between topics
        clock_jump_ns:     a stamp this much older than its input's newest is a time jump
        reorder_window_ns: how late (in stamp time) a message may arrive behind newer ones of
                           its own input and still be matched as if in order; adds this much
                           latency. 0 when each input's stamps increase (the usual case)
        optional_latest:   indices of inputs attached as "latest received", not matched
        """
        self.num_inputs = operator.index(num_inputs)
        latest = sorted({operator.index(i) for i in optional_latest})
        if self.num_inputs < 1:
            raise ValueError(f'num_inputs must be >= 1, got {num_inputs}')
        self._lock = threading.Lock()
        self.configure(slop_ns=slop_ns, queue_size=queue_size, clock_jump_ns=clock_jump_ns,
                       reorder_window_ns=reorder_window_ns)
        if any(not 0 <= i < self.num_inputs for i in latest):
            raise ValueError(f'optional_latest {latest} has indices outside 0..{num_inputs - 1}')
        self.latest_inputs: Tuple[int, ...] = tuple(latest)
        self.timed_inputs: Tuple[int, ...] = tuple(
            i for i in range(self.num_inputs) if i not in latest)
        if not self.timed_inputs:
            raise ValueError('at least one input must be matched by time: all inputs are '
                             'optional_latest')
        self._arrivals = 0
        self._counts: Dict[str, List[int]] = {
            name: [0] * self.num_inputs for name in _COUNTERS}
        self._sets = 0
        self._time_jumps = 0
        self._latest: Dict[int, Tuple[int, Any]] = {}
        self._clear_timed()

    # -- public -------------------------------------------------------------------------

    def add(self, index: int, stamp_ns: int, message: Any) -> List[SyncEvent]:
        """
        Queue one message; return the events it completed, oldest first.

        index:    input number; stamp_ns: the message's header stamp, integer nanoseconds.
        Returns MatchedSet and TimeJump events (usually none or one). Raises SensorDataError
        for a negative stamp, ValueError for an unknown input.
        """
        index = operator.index(index)
        stamp_ns = operator.index(stamp_ns)
        if not 0 <= index < self.num_inputs:
            raise ValueError(f'input index {index} is outside 0..{self.num_inputs - 1}')
        if stamp_ns < 0:
            raise SensorDataError(f'negative stamp {stamp_ns} ns on input {index}')
        with self._lock:
            self._counts['received'][index] += 1
            if index in self.latest_inputs:
                self._latest[index] = (stamp_ns, message)
                return []
            events: List[SyncEvent] = []
            t = self.timed_inputs.index(index)
            newest = self._newest[t]
            if newest is not None and stamp_ns < newest - self.clock_jump_ns:
                cleared = self._drop_all('dropped_reset')
                self._time_jumps += 1
                events.append(TimeJump(index, stamp_ns, newest, cleared))
            elif self._consumed[t] is not None and stamp_ns <= self._consumed[t]:
                self._counts['dropped_stale'][index] += 1
                return events
            elif newest is not None and stamp_ns <= newest - self.reorder_window_ns:
                self._counts['late'][index] += 1
            self._arrivals += 1
            key = (stamp_ns, self._arrivals)
            position = bisect_right(self._keys[t], key)
            self._keys[t].insert(position, key)
            self._messages[t].insert(position, message)
            newest = self._newest[t]  # None again after a time jump
            self._newest[t] = stamp_ns if newest is None else max(newest, stamp_ns)
            events.extend(self._settle())
            # Only after matching: a full queue first gets the chance to match the newcomer.
            if len(self._keys[t]) > self.queue_size:
                while len(self._keys[t]) > self.queue_size:
                    self._pop_front(t, 'dropped_queue_full')
                events.extend(self._settle())
            return events

    def configure(self, *, slop_ns: Optional[int] = None, queue_size: Optional[int] = None,
                  clock_jump_ns: Optional[int] = None,
                  reorder_window_ns: Optional[int] = None) -> None:
        """
        Change settings while running (None keeps one); they apply from the next add().

        Queued messages stay: the next add() plans again with the new settings, and a queue
        longer than a smaller queue_size loses its oldest messages then.
        """
        values = {'slop_ns': slop_ns, 'queue_size': queue_size, 'clock_jump_ns': clock_jump_ns,
                  'reorder_window_ns': reorder_window_ns}
        values = {name: operator.index(value) for name, value in values.items()
                  if value is not None}
        minimum = {'slop_ns': 0, 'queue_size': 1, 'clock_jump_ns': 1, 'reorder_window_ns': 0}
        for name, value in values.items():
            if value < minimum[name]:
                raise ValueError(f'{name} must be >= {minimum[name]}, got {value}')
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def reset(self, clear_latest: bool = False) -> None:
        """Drop every queued message and forget the stamps seen (optionally the latest too)."""
        with self._lock:
            self._drop_all('dropped_reset')
            if clear_latest:
                self._latest.clear()

    @property
    def stats(self) -> SyncStats:
        """Return a snapshot of the counters."""
        with self._lock:
            pending = [0] * self.num_inputs
            for t, i in enumerate(self.timed_inputs):
                pending[i] = len(self._keys[t])
            for i in self._latest:
                pending[i] = 1
            counts = {name: tuple(values) for name, values in self._counts.items()}
            return SyncStats(**counts, pending=tuple(pending), sets=self._sets,
                             time_jumps=self._time_jumps)

    # -- queues -------------------------------------------------------------------------

    def _clear_timed(self) -> None:
        num_timed = len(self.timed_inputs)
        self._keys: List[List[_Key]] = [[] for _ in range(num_timed)]
        self._messages: List[List[Any]] = [[] for _ in range(num_timed)]
        # Newest stamp received, and stamp of the last message matched or dropped, per input.
        self._newest: List[Optional[int]] = [None] * num_timed
        self._consumed: List[Optional[int]] = [None] * num_timed

    def _drop_all(self, reason: str) -> int:
        cleared = 0
        for t, i in enumerate(self.timed_inputs):
            self._counts[reason][i] += len(self._keys[t])
            cleared += len(self._keys[t])
        self._clear_timed()
        return cleared

    def _pop_front(self, t: int, reason: str) -> Any:
        key = self._keys[t].pop(0)
        self._counts[reason][self.timed_inputs[t]] += 1
        self._consumed[t] = key[0]
        return self._messages[t].pop(0)

    # -- matching -----------------------------------------------------------------------

    def _candidate_sets(self) -> List[Tuple[int, int, _Members]]:
        """Every set with spread <= slop as (spread, start, members), tightest first."""
        sets = []
        stamps = [[key[0] for key in keys] for keys in self._keys]
        for a, keys_a in enumerate(self._keys):
            for anchor in keys_a:
                # Enumerate each set once, from its earliest member (lowest input on ties).
                ranges = []
                for t, stamps_t in enumerate(stamps):
                    if t == a:
                        ranges.append((anchor,))
                        continue
                    first = (bisect_right if t < a else bisect_left)(stamps_t, anchor[0])
                    last = bisect_right(stamps_t, anchor[0] + self.slop_ns)
                    ranges.append(self._keys[t][first:last])
                for members in product(*ranges):
                    end = max(key[0] for key in members)
                    sets.append((end - anchor[0], anchor[0], members))
        sets.sort()
        return sets

    def _decide(self) -> Tuple[List[_Members], set, set]:
        """
        Return (final kept sets in time order, messages never to match, messages in any set).

        Runs the greedy over the candidate sets, tightest first, and tracks which verdicts no
        future message can change: a kept set is final when it is safe (`_safe`) and every
        tighter set it conflicts with was rejected by a final set; a rejected set is final
        when a final set rejected it.
        """
        # Messages still to come on input t are stamped > horizons[t].
        horizons = [None if newest is None else newest - self.reorder_window_ns
                    for newest in self._newest]
        kept: List[Tuple[_Members, bool]] = []
        rejected: List[Tuple[_Members, bool]] = []
        undecided = set()  # messages of a kept set, or of a set not surely rejected
        in_any = set()
        for spread, _, members in self._candidate_sets():
            in_any.update(members)
            beaten_by = [final for other, final in kept if _conflict(members, other)]
            if beaten_by:
                rejected.append((members, any(beaten_by)))
                if not any(beaten_by):
                    undecided.update(members)
                continue
            final = _safe(members, spread, horizons) and all(
                final for other, final in rejected if _conflict(members, other))
            kept.append((members, final))
            undecided.update(members)
        final_kept = sorted(members for members, final in kept if final)
        dead = set()
        for t, keys in enumerate(self._keys):
            others = horizons[:t] + horizons[t + 1:]
            for key in keys:
                # Unsettled (a message stamped before it may still come): dropping it now
                # would turn that message stale.
                if key in undecided or key[0] > horizons[t]:
                    continue
                # A message still to come could join it, unless a final set later on this
                # input would be crossed by every set that holds a message still to come.
                future_possible = any(h is None or h < key[0] + self.slop_ns for h in others)
                if future_possible and not any(key < s[t] for s in final_kept):
                    continue
                dead.add(key)
        return final_kept, dead, in_any

    def _settle(self) -> List[MatchedSet]:
        """Emit final sets in time order, dropping messages that will never match."""
        emitted: List[MatchedSet] = []
        final_kept, dead, in_any = self._decide()
        final_kept.reverse()
        while True:
            for t, keys in enumerate(self._keys):
                while keys and keys[0] in dead:
                    reason = 'dropped_unmatched' if keys[0] in in_any else 'dropped_out_of_slop'
                    self._pop_front(t, reason)
            if not final_kept:
                break
            members = final_kept[-1]
            if any(keys[0] != key for keys, key in zip(self._keys, members)):
                break  # an older message here is still undecided: keep time order
            final_kept.pop()
            emitted.append(self._emit(members))
        return emitted

    def _emit(self, members: _Members) -> MatchedSet:
        messages: List[Any] = [None] * self.num_inputs
        stamps: List[Optional[int]] = [None] * self.num_inputs
        for t, i in enumerate(self.timed_inputs):
            messages[i] = self._pop_front(t, 'matched')
            stamps[i] = members[t][0]
        for i, (stamp, message) in self._latest.items():
            messages[i], stamps[i] = message, stamp
        spread = _end(members) - min(key[0] for key in members)
        self._sets += 1
        return MatchedSet(tuple(messages), tuple(stamps), spread, self._sets - 1)


class LatestSlot:
    """
    A one-item mailbox between threads: a new item replaces one not yet taken.

    The subscription side puts matched sets; a worker takes the newest, so processing
    always runs on the latest data and nothing queues up without bound. Counters:
    put_count (calls to put), taken, dropped (replaced or cleared before being taken, or
    refused as older than an item already put); put_count == taken + dropped + pending.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False
        self._last_order: Optional[int] = None
        self.put_count = 0
        self.taken = 0
        self.dropped = 0

    def put(self, item: Any, order: Optional[int] = None) -> bool:
        """
        Store `item`, replacing any item not yet taken; return whether an item was dropped.

        order: optional rank (e.g. MatchedSet.seq); an item ranked no higher than the last
        stored one is refused (and counted dropped), so a slow producer thread cannot
        replace newer data with older.
        """
        with self._cond:
            self.put_count += 1
            if order is not None and self._last_order is not None and order <= self._last_order:
                self.dropped += 1
                return True
            if order is not None:
                self._last_order = order
            replaced = self._full
            self.dropped += int(replaced)
            self._item, self._full = item, True
            self._cond.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[Any]:
        """Return the newest item, waiting up to `timeout` s (None: forever); None if none."""
        with self._cond:
            self._cond.wait_for(lambda: self._full or self._closed, timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self.taken += 1
            return item

    def clear(self) -> bool:
        """Drop the item not yet taken, if any (counted); return whether there was one."""
        with self._cond:
            had_item = self._full
            self.dropped += int(had_item)
            self._item, self._full = None, False
            return had_item

    def close(self) -> None:
        """Wake every waiting take() (at shutdown); later takes return without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Return whether close() was called."""
        return self._closed

    @property
    def pending(self) -> bool:
        """Return whether an item is waiting to be taken."""
        with self._cond:
            return self._full
