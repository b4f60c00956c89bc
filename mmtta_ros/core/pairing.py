"""
The one pairing policy (camera image <-> LiDAR sweep), for the node and the bag reader alike.

An approximate time synchroniser and the mailbox between the node's callbacks and its
worker.

Pure Python, no rclpy. The node's subscription callbacks call `ApproximateSynchronizer.add`
from any thread. Completed sets come back as its return value, so no user code ever runs
under the synchroniser's lock. message_filters' Python ApproximateTimeSynchronizer, by
contrast, runs the callback while holding its lock and matches by arrival order
(ros2/message_filters #65).

Matching: greedy by spread, and a set is emitted only once that choice is final.
    A candidate set holds one queued message per input. Its spread is the latest stamp
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
    Latency: with nothing known about the inputs' rates, a set waits until every input has
    a message past it, about one period of the slower input (at 12 Hz camera and 20 Hz
    LiDAR a median of ~50 ms after its last member arrives). With `period_fraction` f > 0
    the synchroniser assumes no message comes sooner than f times the shortest of its
    input's recent gaps after the newest one: a set is then final as soon as no message
    that early could beat it, usually on arrival of its last member. Sensors publish at a
    fixed rate, so f = 0.5 is safe while jitter stays under half a period; a message that
    breaks the assumption is still matched, but the set it would have beaten may already
    be out. f = 0 keeps the exact guarantee for any stream. Each add() re-plans over the
    queued messages: roughly 20-80 us for two inputs and a queue of 10. The cost grows with
    queue_size and with slop.
Arrival assumptions: each input's messages arrive in stamp order, or at least every message
    arrives before any message of its own input stamped `reorder_window_ns` or more later.
    Different topics may interleave in any order. A message that breaks the assumption is
    still used (and counted as `late`), unless it is no newer than the last message matched
    or dropped on its input. Then it is stale and dropped.
End of stream: `flush()` (offline, at the end of a bag) emits every set that is kept once
    no further message can come.
Time jumps: a stamp more than `clock_jump_ns` older than the newest on its input (a looping
    bag replay) clears every queue and is reported as a `TimeJump` event. A message from
    before the loop that arrives after the jump, on another input, is taken for the new
    stretch; the next message on that input then reads as a second jump. A forward gap
    needs no handling: messages that can no longer be matched are dropped.
Bounded memory: each queue holds at most `queue_size` messages; when full, the oldest goes.
Accounting, per input:
    received == matched + dropped (stale, queue_full, out_of_slop, unmatched, reset) + pending.
"""

from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass
from itertools import product
import operator
import threading
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

from mmtta_ros.core.errors import SensorDataError

# A queued message's place in its input's order: (stamp_ns, arrival number); the arrival
# number breaks ties between equal stamps without ever comparing the messages themselves.
_Key = Tuple[int, int]
_Members = Tuple[_Key, ...]
# period_fraction looks at this many recent gaps per input, and needs this many to act.
_GAP_HISTORY, _MIN_GAPS = 16, 3
# A horizon past every stamp (2262): at the end of a stream nothing more comes.
_NEVER = 2 ** 63 - 1


@dataclass(frozen=True)
class MatchedSet:
    """
    One message per input, close in time.

    messages:  the messages by input index
    stamps_ns: their stamps, integer nanoseconds
    spread_ns: max - min stamp, nanoseconds
    seq:       0, 1, 2, ... in emission (= stamp) order; with several callback threads the
               sets can reach their callers out of order, and seq puts them back in order
    """

    messages: Tuple[Any, ...]
    stamps_ns: Tuple[int, ...]
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
    matched:             messages emitted in a matched set
    dropped_stale:       no newer than the last message matched or dropped on that input
    dropped_queue_full:  pushed out of a full queue, oldest first
    dropped_out_of_slop: no message on some other input within slop of it
    dropped_unmatched:   its candidate sets lost to tighter ones
    dropped_reset:       cleared by a time jump or reset()
    late:                arrived after the reorder window (still used); not a drop
    pending:             queued now
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
                 period_fraction: float = 0.0):
        """
        Build an empty synchroniser.

        num_inputs:        number of inputs
        slop_ns:           largest stamp spread of a matched set, nanoseconds
        queue_size:        most messages held per input; hold at least the messages that
                           arrive within the longest gap of the slowest input plus the
                           reorder window and the transport delay between topics
        clock_jump_ns:     a stamp this much older than its input's newest is a time jump
        reorder_window_ns: how late (in stamp time) a message may arrive behind newer ones of
                           its own input and still be matched as if in order; adds this much
                           latency. 0 when each input's stamps increase (the usual case)
        period_fraction:   0 <= f < 1: assume each input's next message is stamped at least
                           f x its shortest recent gap after its newest (see the module
                           docstring, Latency); 0 assumes nothing
        """
        self.num_inputs = operator.index(num_inputs)
        if self.num_inputs < 1:
            raise ValueError(f'num_inputs must be >= 1, got {num_inputs}')
        self._lock = threading.Lock()
        self.period_fraction = 0.0
        self.configure(slop_ns=slop_ns, queue_size=queue_size, clock_jump_ns=clock_jump_ns,
                       reorder_window_ns=reorder_window_ns, period_fraction=period_fraction)
        self._arrivals = 0
        self._counts: Dict[str, List[int]] = {
            name: [0] * self.num_inputs for name in _COUNTERS}
        self._sets = 0
        self._time_jumps = 0
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
            events: List[SyncEvent] = []
            t = index
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
            if newest is not None and stamp_ns > newest:
                self._gaps[t].append(stamp_ns - newest)
            self._newest[t] = stamp_ns if newest is None else max(newest, stamp_ns)
            events.extend(self._settle())
            # Only after matching: a full queue first gets the chance to match the newcomer.
            if len(self._keys[t]) > self.queue_size:
                while len(self._keys[t]) > self.queue_size:
                    self._pop_front(t, 'dropped_queue_full')
                events.extend(self._settle())
            return events

    def flush(self) -> List[MatchedSet]:
        """End of stream: emit every set kept once no further message can come; clear the rest."""
        with self._lock:
            emitted = self._settle(end_of_stream=True)
            self._drop_all('dropped_unmatched')
            return emitted

    def configure(self, *, slop_ns: Optional[int] = None, queue_size: Optional[int] = None,
                  clock_jump_ns: Optional[int] = None, reorder_window_ns: Optional[int] = None,
                  period_fraction: Optional[float] = None) -> None:
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
        if period_fraction is not None and not 0.0 <= period_fraction < 1.0:
            raise ValueError(f'period_fraction must be in [0, 1), got {period_fraction}')
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)
            if period_fraction is not None:
                self.period_fraction = float(period_fraction)

    def reset(self) -> None:
        """Drop every queued message and forget the stamps seen."""
        with self._lock:
            self._drop_all('dropped_reset')

    @property
    def stats(self) -> SyncStats:
        """Return a snapshot of the counters."""
        with self._lock:
            pending = [len(keys) for keys in self._keys]
            counts = {name: tuple(values) for name, values in self._counts.items()}
            return SyncStats(**counts, pending=tuple(pending), sets=self._sets,
                             time_jumps=self._time_jumps)

    # -- queues -------------------------------------------------------------------------

    def _clear_timed(self) -> None:
        n = self.num_inputs
        self._keys: List[List[_Key]] = [[] for _ in range(n)]
        self._messages: List[List[Any]] = [[] for _ in range(n)]
        # Newest stamp received, and stamp of the last message matched or dropped, per input.
        self._newest: List[Optional[int]] = [None] * n
        self._consumed: List[Optional[int]] = [None] * n
        # Recent gaps between consecutive stamps, per input (for period_fraction).
        self._gaps: List[Deque[int]] = [deque(maxlen=_GAP_HISTORY) for _ in range(n)]

    def _drop_all(self, reason: str) -> int:
        cleared = 0
        for t in range(self.num_inputs):
            self._counts[reason][t] += len(self._keys[t])
            cleared += len(self._keys[t])
        self._clear_timed()
        return cleared

    def _pop_front(self, t: int, reason: str) -> Any:
        key = self._keys[t].pop(0)
        self._counts[reason][t] += 1
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

    def _horizons(self, end_of_stream: bool) -> List[Optional[int]]:
        """Messages still to come on input t are stamped > horizons[t] (None: no bound)."""
        if end_of_stream:
            return [_NEVER] * self.num_inputs
        horizons: List[Optional[int]] = []
        for newest, gaps in zip(self._newest, self._gaps):
            if newest is None:
                horizons.append(None)
                continue
            horizon = newest - self.reorder_window_ns
            if self.period_fraction > 0.0 and len(gaps) >= _MIN_GAPS:
                horizon += int(self.period_fraction * min(gaps))
            horizons.append(horizon)
        return horizons

    def _decide(self, end_of_stream: bool = False) -> Tuple[List[_Members], set, set]:
        """
        Return (final kept sets in time order, messages never to match, messages in any set).

        Runs the greedy over the candidate sets, tightest first, and tracks which verdicts no
        future message can change: a kept set is final when it is safe (`_safe`) and every
        tighter set it conflicts with was rejected by a final set; a rejected set is final
        when a final set rejected it.
        """
        horizons = self._horizons(end_of_stream)
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

    def _settle(self, end_of_stream: bool = False) -> List[MatchedSet]:
        """Emit final sets in time order, dropping messages that will never match."""
        emitted: List[MatchedSet] = []
        final_kept, dead, in_any = self._decide(end_of_stream)
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
        messages = [self._pop_front(t, 'matched') for t in range(self.num_inputs)]
        stamps = [key[0] for key in members]
        spread = _end(members) - min(key[0] for key in members)
        self._sets += 1
        return MatchedSet(tuple(messages), tuple(stamps), spread, self._sets - 1)


class Mailbox:
    """
    The hand-over between the subscription callbacks and the worker thread.

    capacity 1 (the node's default): a new item replaces one not yet taken, so processing
    always runs on the latest data and nothing queues up. capacity N: a FIFO of up to N
    items, the oldest dropped when full (process every pair of a replay in order).
    Counters: put_count (calls to put), taken, dropped (replaced, pushed out or cleared
    before being taken, or refused as older than an item already put);
    put_count == taken + dropped + pending.
    """

    def __init__(self, capacity: int = 1):
        if int(capacity) < 1:
            raise ValueError(f'a mailbox holds at least 1 item, got capacity={capacity}')
        self.capacity = int(capacity)
        self._cond = threading.Condition()
        self._items: Deque[Any] = deque()
        self._closed = False
        self._last_order: Optional[int] = None
        self.put_count = 0
        self.taken = 0
        self.dropped = 0

    def put(self, item: Any, order: Optional[int] = None) -> bool:
        """
        Store `item`, dropping the oldest item if full; return whether an item was dropped.

        order: optional rank (e.g. MatchedSet.seq); an item ranked no higher than the last
        stored one is refused (and counted dropped), so a slow producer thread cannot
        put older data behind newer.
        """
        with self._cond:
            self.put_count += 1
            if order is not None and self._last_order is not None and order <= self._last_order:
                self.dropped += 1
                return True
            if order is not None:
                self._last_order = order
            replaced = len(self._items) >= self.capacity
            if replaced:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return replaced

    def take(self, timeout: Optional[float] = None) -> Optional[Any]:
        """Return the oldest item held, waiting up to `timeout` s (None: forever); None if none."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            self.taken += 1
            return self._items.popleft()

    def clear(self) -> int:
        """Drop every item not yet taken (counted); return how many there were."""
        with self._cond:
            count = len(self._items)
            self.dropped += count
            self._items.clear()
            return count

    def close(self) -> None:
        """Wake every waiting take() (at shutdown); later takes return without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        """Let take() wait again after close() (a lifecycle node activated again)."""
        with self._cond:
            self._closed = False

    @property
    def pending(self) -> int:
        """Return the number of items waiting to be taken."""
        with self._cond:
            return len(self._items)
