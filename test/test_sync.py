"""
ApproximateSynchronizer and Mailbox: matching, arrival order, drops, time jumps, threads.

The reference for every matching test is `reference_matches`, a brute-force matcher
written independently of the synchroniser: it lists every combination of messages, takes them
tightest first and keeps those that neither share a message with nor cross a kept one.
"""

import itertools
import random
import sys
import threading

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.pairing import ApproximateSynchronizer, Mailbox, MatchedSet, TimeJump

MS = 1_000_000
CAMERA_PERIOD_NS = 1_000_000_000 // 12
LIDAR_PERIOD_NS = 50 * MS
FAR_NS = 4 * 10 ** 18  # sentinel stamps, far after every test stream (2096)


def reference_matches(streams, slop_ns):
    """All sets kept by the brute-force greedy, in time order, as tuples of stamps."""
    candidates = []
    for combo in itertools.product(*streams):
        spread = max(combo) - min(combo)
        if spread <= slop_ns:
            candidates.append((spread, min(combo), combo))
    kept = []
    for _, _, combo in sorted(candidates):
        before = [all(x < y for x, y in zip(combo, other)) for other in kept]
        after = [all(x > y for x, y in zip(combo, other)) for other in kept]
        if all(b or a for b, a in zip(before, after)):
            kept.append(combo)
    return sorted(kept)


def feed(sync, arrivals, finish=False):
    """Add (input, stamp) arrivals; messages are (input, stamp). Return (stamp tuples, jumps)."""
    if finish:
        # Two rounds far in the future settle everything queued; their sets are cut off below.
        arrivals = list(arrivals) + [(i, FAR_NS + r) for r in (0, 1)
                                     for i in range(sync.num_inputs)]
    matches, jumps = [], []
    for index, stamp in arrivals:
        for event in sync.add(index, stamp, (index, stamp)):
            if isinstance(event, TimeJump):
                jumps.append(event)
                continue
            assert isinstance(event, MatchedSet)
            for i in range(sync.num_inputs):
                assert event.messages[i] == (i, event.stamps_ns[i])
            matches.append(tuple(event.stamps_ns))
    return [m for m in matches if m[0] < FAR_NS], jumps


def assert_accounted(sync):
    """Every message of a timed input is matched, dropped or pending."""
    stats = sync.stats
    for i in range(sync.num_inputs):
        assert stats.received[i] == stats.matched[i] + stats.dropped[i] + stats.pending[i], stats
    assert sum(stats.matched) == stats.sets * sync.num_inputs


def camera_lidar_streams(seed, seconds, drop=0.0):
    """Camera 12 Hz and LiDAR 20 Hz stamps, each with +-5 ms jitter; `drop` lost at random."""
    rng = np.random.default_rng(seed)
    t0 = 1_530_000_000 * 10 ** 9
    n_cam, n_lidar = 12 * seconds, 20 * seconds
    cam = t0 + np.arange(n_cam) * CAMERA_PERIOD_NS + rng.integers(-5 * MS, 5 * MS, n_cam)
    lidar = (t0 + int(rng.integers(0, LIDAR_PERIOD_NS)) + np.arange(n_lidar) * LIDAR_PERIOD_NS
             + rng.integers(-5 * MS, 5 * MS, n_lidar))
    cam = cam[rng.random(n_cam) >= drop]
    lidar = lidar[rng.random(n_lidar) >= drop]
    return [int(s) for s in cam], [int(s) for s in lidar]


def arrival_order(streams, delays_ns, rng, reorder_ns=0):
    """(input, stamp) in arrival order: stamp + per-input delay + up to reorder_ns extra."""
    events = [(stamp + delays_ns[i] + rng.uniform(0, reorder_ns), i, stamp)
              for i, stream in enumerate(streams) for stamp in stream]
    return [(i, stamp) for _, i, stamp in sorted(events)]


def nearest(stamps, t):
    """Return the stamp in `stamps` nearest to t."""
    return min(stamps, key=lambda s: abs(s - t))


# -- matching ---------------------------------------------------------------------------

def test_exact_stamps_match_as_soon_as_the_set_is_complete():
    sync = ApproximateSynchronizer(3, slop_ns=0, queue_size=5)
    for k in range(4):
        stamp = 1000 + k * 100
        assert sync.add(2, stamp, 'lidar') == []
        assert sync.add(0, stamp, 'image') == []
        (matched,) = sync.add(1, stamp, 'info')
        assert matched.messages == ('image', 'info', 'lidar')
        assert matched.stamps_ns == (stamp,) * 3
        assert matched.spread_ns == 0 and matched.seq == k
    assert sync.stats.pending == (0, 0, 0)
    assert_accounted(sync)


def test_camera_12hz_lidar_20hz_each_image_gets_its_nearest_sweep():
    cam, lidar = camera_lidar_streams(seed=3, seconds=20)
    slop = 30 * MS
    rng = random.Random(0)
    # LiDAR conversion makes sweeps arrive 35-45 ms after their stamp, images 10-15 ms.
    sync = ApproximateSynchronizer(2, slop, queue_size=10)
    arrivals = arrival_order([cam, lidar], [10 * MS, 35 * MS], rng, reorder_ns=5 * MS)
    matches, _ = feed(sync, arrivals)
    assert len(matches) > 200
    for image, sweep in matches:
        assert sweep == nearest(lidar, image)
        assert abs(sweep - image) <= slop
    assert len(set(m[0] for m in matches)) == len(matches)
    assert len(set(m[1] for m in matches)) == len(matches)
    # Every image with a sweep within slop is matched, but for the last few still pending.
    expected = [(c, nearest(lidar, c)) for c in cam if abs(nearest(lidar, c) - c) <= slop]
    assert matches == expected[:len(matches)]
    assert len(expected) - len(matches) <= 1
    assert matches == reference_matches([cam, lidar], slop)[:len(matches)]
    assert sync.stats.late == (0, 0)
    assert_accounted(sync)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_drops_pair_with_the_nearest_sweep_left(seed):
    cam, lidar = camera_lidar_streams(seed=seed, seconds=15, drop=0.3)
    slop = 60 * MS  # larger than half a camera period: sweeps are contested
    sync = ApproximateSynchronizer(2, slop, queue_size=12)
    matches, _ = feed(sync, arrival_order([cam, lidar], [10 * MS, 35 * MS], random.Random(seed)),
                      finish=True)
    assert matches == reference_matches([cam, lidar], slop)
    for image, sweep in matches:
        assert abs(sweep - image) <= slop
        # A nearer sweep went to a tighter pair, or would have crossed one.
        for other in lidar:
            if abs(other - image) < abs(sweep - image):
                assert any(abs(s - c) < abs(sweep - image) and (
                    s == other or (c < image) != (s < other)) for c, s in matches)
    assert_accounted(sync)


def test_a_nearer_sweep_wins_even_when_the_sweep_between_two_images_is_contested():
    # Image 0 and 83 ms, sweeps at 44 and 90 ms: a pivot matcher keeping the best set for
    # the sweep at 44 would pair it with the image at 83, whose nearest sweep is at 90.
    sync = ApproximateSynchronizer(2, slop_ns=50, queue_size=10)
    matches, _ = feed(sync, [(0, 0), (1, 44), (0, 83), (1, 90)], finish=True)
    assert matches == [(0, 44), (83, 90)]


def test_match_is_not_held_back_by_older_messages_it_rules_out():
    sync = ApproximateSynchronizer(2, slop_ns=50, queue_size=10)
    assert sync.add(1, 60, 'sweep 60') == []
    assert sync.add(1, 100, 'sweep 100') == []
    # An image at 100 settles (100, 100); sweep 60 could only pair with a later image,
    # which would cross that set, so it is dropped now instead of waiting for one.
    (matched,) = sync.add(0, 100, 'image 100')
    assert matched.messages == ('image 100', 'sweep 100')
    assert sync.stats.dropped_unmatched == (0, 1)
    assert_accounted(sync)


def test_reorder_window_waits_while_a_tighter_message_may_still_come():
    sync = ApproximateSynchronizer(2, slop_ns=20, queue_size=10, reorder_window_ns=50)
    events = []
    for index, stamp in [(0, 100), (1, 90), (1, 150), (0, 160)]:
        events += sync.add(index, stamp, stamp)
    # (100, 90) is the tightest set so far, but a sweep stamped up to 50 behind 150 may
    # still come and be closer to image 100.
    assert events == []
    events += sync.add(1, 104, 104)
    events += sync.add(1, 160, 160)
    assert [e.messages for e in events] == [(100, 104)]
    assert sync.stats.late == (0, 0)


def test_a_chain_of_ever_tighter_sets_is_resolved_before_anything_is_emitted():
    # (0, 10) loses to (19, 10), which loses to (19, 27), which loses to (34, 27): whether
    # (0, 10) is matched depends on an image (34) that has not come yet.
    sync = ApproximateSynchronizer(2, slop_ns=20, queue_size=10, reorder_window_ns=100)
    arrivals = [(0, 0), (1, 10), (0, 19), (1, 27), (1, 115), (0, 125)]
    assert feed(sync, arrivals)[0] == []
    matches, _ = feed(sync, [(0, 34)], finish=True)
    assert matches == [(19, 10), (34, 27), (125, 115)]
    assert matches == reference_matches([[0, 19, 34, 125], [10, 27, 115]], 20)


def test_three_timed_inputs_match_the_reference():
    rng = random.Random(5)
    streams = [sorted(rng.sample(range(0, 3000, 3), 60)),
               sorted(rng.sample(range(1, 3000, 3), 80)),
               sorted(rng.sample(range(2, 3000, 3), 40))]
    sync = ApproximateSynchronizer(3, slop_ns=40, queue_size=50)
    matches, _ = feed(sync, arrival_order(streams, [0, 30, 70], rng), finish=True)
    assert matches == reference_matches(streams, 40)
    assert len(matches) > 10
    assert_accounted(sync)


# -- arrival order ----------------------------------------------------------------------

def test_out_of_order_arrival_gives_the_same_matches_as_in_order():
    cam, lidar = camera_lidar_streams(seed=7, seconds=10, drop=0.1)
    slop = 40 * MS
    in_order = sorted([(0, s) for s in cam] + [(1, s) for s in lidar], key=lambda a: a[1])
    expected, _ = feed(ApproximateSynchronizer(2, slop, 12), in_order, finish=True)
    assert len(expected) > 80
    rng = random.Random(1)
    # Topics interleave any way: LiDAR held back 0.3 s behind the camera.
    sync = ApproximateSynchronizer(2, slop, 24)
    assert feed(sync, arrival_order([cam, lidar], [0, 300 * MS], rng), finish=True)[0] == expected
    # Within each topic too: shuffled over 120 ms, absorbed by the reorder window.
    sync = ApproximateSynchronizer(2, slop, 24, reorder_window_ns=120 * MS)
    arrivals = arrival_order([cam, lidar], [0, 20 * MS], rng, reorder_ns=119 * MS)
    assert arrivals != sorted(arrivals, key=lambda a: (a[0], a[1]))
    per_input = [[s for i, s in arrivals if i == k] for k in (0, 1)]
    assert per_input[0] != cam and per_input[1] != lidar  # really out of order
    assert feed(sync, arrivals, finish=True)[0] == expected
    assert sync.stats.late == (0, 0)
    assert_accounted(sync)


def test_a_message_inside_the_reorder_window_is_not_dropped_early():
    # Sweep 180 has no image within slop, but a sweep stamped between 150 and 180 may still
    # come (reorder window 50 behind 200): dropping 180 now would make that one stale.
    sync = ApproximateSynchronizer(2, slop_ns=10, queue_size=10, reorder_window_ns=50)
    arrivals = [(0, 165), (1, 180), (1, 200), (0, 240), (1, 163)]
    matches, _ = feed(sync, arrivals, finish=True)
    assert matches == [(165, 163)] == reference_matches([[165, 240], [163, 180, 200]], 10)
    stats = sync.stats
    assert stats.dropped_stale == (0, 0) and stats.late == (0, 0)
    assert_accounted(sync)


def test_late_message_is_counted_and_used_stale_message_is_dropped():
    sync = ApproximateSynchronizer(2, slop_ns=20, queue_size=10)
    assert sync.add(0, 100, 'image') == []
    assert sync.add(1, 110, 'sweep 110') == []
    assert sync.add(1, 115, 'sweep 115') == []
    assert sync.add(1, 105, 'sweep 105') == []  # behind 115 with no reorder window: late
    assert sync.stats.late == (0, 1)
    (matched,) = sync.add(0, 200, 'next image')
    assert matched.messages == ('image', 'sweep 105')
    assert sync.add(1, 104, 'older than the match') == []
    stats = sync.stats
    assert stats.dropped_stale == (0, 1)
    assert stats.dropped_unmatched == (0, 2)  # 110 and 115 lost to 105
    assert_accounted(sync)


# -- drops, jumps, end of stream --------------------------------------------------------

def test_time_jump_clears_queues_is_reported_and_matching_resumes():
    cam, lidar = camera_lidar_streams(seed=11, seconds=3)
    slop = 30 * MS
    sync = ApproximateSynchronizer(2, slop, 10)
    arrivals = arrival_order([cam, lidar], [10 * MS, 35 * MS], random.Random(2))
    first_loop, jumps = feed(sync, arrivals)
    assert jumps == [] and len(first_loop) > 25
    pending = sync.stats.pending
    assert sum(pending) > 0
    # The bag loops: the same stamps again, 3 s back.
    second_loop, jumps = feed(sync, arrivals, finish=True)
    (jump,) = jumps
    assert (jump.input_index, jump.stamp_ns) == arrivals[0]
    assert jump.newest_ns == max((cam, lidar)[arrivals[0][0]])
    assert jump.cleared == sum(pending)
    assert jump.jump_ns == jump.newest_ns - jump.stamp_ns > 2 * 10 ** 9
    stats = sync.stats
    assert stats.time_jumps == 1
    assert sum(stats.dropped_reset) == sum(pending) == stats.as_dict()['dropped_reset']
    assert stats.as_dict()['sets'] == stats.sets == len(first_loop) + len(second_loop) + 2
    assert second_loop == reference_matches([cam, lidar], slop)
    assert first_loop == second_loop[:len(first_loop)]
    assert_accounted(sync)


def test_forward_gap_breaks_nothing():
    cam, lidar = camera_lidar_streams(seed=12, seconds=2)
    gap = 100 * 10 ** 9
    cam2, lidar2 = [s + gap for s in cam], [s + gap for s in lidar]
    slop = 30 * MS
    sync = ApproximateSynchronizer(2, slop, 10, clock_jump_ns=500 * MS)
    streams = [cam + cam2, lidar + lidar2]
    matches, jumps = feed(sync, arrival_order(streams, [0, 25 * MS], random.Random(3)),
                          finish=True)
    assert jumps == []
    assert matches == reference_matches(streams, slop)
    middle = cam[-1] + gap // 2
    assert any(m[0] > middle for m in matches) and any(m[0] < middle for m in matches)
    assert_accounted(sync)


def test_queue_overflow_drops_the_oldest_and_is_counted():
    sync = ApproximateSynchronizer(2, slop_ns=5, queue_size=5)
    for k in range(12):  # the camera is silent: sweeps pile up
        assert sync.add(1, 1000 + 100 * k, k) == []
    stats = sync.stats
    assert stats.dropped_queue_full == (0, 7)
    assert stats.pending == (0, 5)
    (matched,) = sync.add(0, 1000 + 100 * 10 + 2, 'image')
    assert matched.messages == ('image', 10)
    assert sync.add(1, 1000 + 100 * 3, 'older than a dropped sweep') == []
    assert sync.stats.dropped_stale == (0, 1)
    assert_accounted(sync)


def latency_after_last_member(sync, arrivals):
    """Feed (arrival_ns, input, stamp); return (matches, waits after a set's last member)."""
    last_arrival, matches, waits = {}, [], []
    for arrival, index, stamp in arrivals:
        last_arrival[(index, stamp)] = arrival
        for event in sync.add(index, stamp, (index, stamp)):
            assert isinstance(event, MatchedSet)
            matches.append(tuple(event.stamps_ns))
            waits.append(arrival - max(last_arrival[(i, s)]
                                       for i, s in enumerate(event.stamps_ns)))
    return matches, waits


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_known_periods_make_pairs_final_at_once_and_still_optimal(seed):
    cam, lidar = camera_lidar_streams(seed=30 + seed, seconds=20, drop=0.1)
    slop = 50 * MS
    rng = random.Random(seed)
    arrivals = sorted([(s + 10 * MS + int(rng.uniform(0, 3 * MS)), 0, s) for s in cam]
                      + [(s + 35 * MS + int(rng.uniform(0, 3 * MS)), 1, s) for s in lidar])
    exact, waits_exact = latency_after_last_member(ApproximateSynchronizer(2, slop, 10), arrivals)
    fast_sync = ApproximateSynchronizer(2, slop, 10, period_fraction=0.5)
    fast, waits_fast = latency_after_last_member(fast_sync, arrivals)
    reference = reference_matches([cam, lidar], slop)
    # Every pair either emits is in the brute-force optimal matching ...
    assert set(exact) <= set(reference) and set(fast) <= set(reference)
    assert len(fast) >= len(exact) - 1
    # ... and with known periods most pairs are final when their last member arrives.
    assert np.median(waits_exact) > 20 * MS
    assert np.median(waits_fast) == 0
    assert np.median(waits_fast) < np.median(waits_exact)


def test_flush_emits_what_the_end_of_the_stream_settles():
    cam, lidar = camera_lidar_streams(seed=5, seconds=4)
    slop = 30 * MS
    sync = ApproximateSynchronizer(2, slop, 20)
    matches, _ = feed(sync, arrival_order([cam, lidar], [10 * MS, 35 * MS], random.Random(1)))
    assert sum(sync.stats.pending) > 0
    matches += [tuple(event.stamps_ns) for event in sync.flush()]
    assert matches == reference_matches([cam, lidar], slop)
    assert sync.stats.pending == (0, 0)
    assert_accounted(sync)


def test_configure_changes_settings_while_running():
    sync = ApproximateSynchronizer(2, slop_ns=5, queue_size=10)
    assert sync.add(0, 100, 'image') == []
    sync.configure(slop_ns=20)  # the image waits for a sweep within 20, no longer within 5
    assert sync.add(1, 110, 'sweep') == []
    (matched,) = sync.add(0, 200, 'next image')
    assert matched.messages == ('image', 'sweep') and sync.slop_ns == 20
    for k in range(6):
        sync.add(1, 1000 + 100 * k, k)
    sync.configure(queue_size=2)
    sync.add(1, 2000, 'newest')
    assert sync.stats.pending == (0, 2) and sync.stats.dropped_queue_full == (0, 5)
    with pytest.raises(ValueError, match='clock_jump_ns must be >= 1'):
        sync.configure(clock_jump_ns=0)
    assert sync.clock_jump_ns == 1_000_000_000
    assert_accounted(sync)


def test_bad_input_is_rejected_with_a_clear_error():
    sync = ApproximateSynchronizer(2, slop_ns=10)
    with pytest.raises(SensorDataError, match='negative stamp'):
        sync.add(0, -1, 'image')
    with pytest.raises(ValueError, match='outside 0..1'):
        sync.add(2, 10, 'image')
    with pytest.raises(ValueError, match='queue_size'):
        ApproximateSynchronizer(2, slop_ns=10, queue_size=0)
    with pytest.raises(ValueError, match='period_fraction'):
        ApproximateSynchronizer(2, slop_ns=10, period_fraction=1.0)
    assert sync.stats.received == (0, 0)


# -- threads ----------------------------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1])
def test_two_threads_adding_concurrently_lose_nothing(seed):
    cam, lidar = camera_lidar_streams(seed=20 + seed, seconds=30, drop=0.1)
    slop = 40 * MS
    sync = ApproximateSynchronizer(2, slop, queue_size=len(lidar))
    start = threading.Barrier(2)
    results = {0: [], 1: []}

    def producer(index, stamps):
        start.wait()
        for stamp in stamps:
            results[index].extend(sync.add(index, stamp, (index, stamp)))

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the adds really interleave
    try:
        threads = [threading.Thread(target=producer, args=(i, s))
                   for i, s in enumerate((cam, lidar))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    events = results[0] + results[1]
    assert all(isinstance(e, MatchedSet) for e in events)
    assert sorted(e.seq for e in events) == list(range(len(events)))
    tail, _ = feed(sync, [], finish=True)
    matches = sorted(e.stamps_ns for e in events) + tail
    assert matches == reference_matches([cam, lidar], slop)
    assert_accounted(sync)


def test_mailbox_keeps_the_newest_and_counts_drops():
    slot = Mailbox()
    assert slot.take(timeout=0) is None
    assert [slot.put('a'), slot.put('b'), slot.put('c')] == [False, True, True]
    assert slot.pending == 1
    assert slot.take(timeout=0) == 'c'
    assert slot.take(timeout=0.01) is None
    assert (slot.put_count, slot.taken, slot.dropped) == (3, 1, 2)
    # Ordered puts: an older item from a slow thread never replaces a newer one.
    assert not slot.put('set 5', order=5)
    assert slot.put('set 4', order=4)  # refused: dropped
    assert slot.take(timeout=0) == 'set 5'
    assert (slot.put_count, slot.taken, slot.dropped) == (5, 2, 3)
    # clear() (after a time jump) drops what was not taken.
    assert not slot.put('before the jump', order=6)
    assert slot.clear() == 1 and slot.clear() == 0
    assert slot.take(timeout=0) is None
    assert (slot.put_count, slot.taken, slot.dropped) == (6, 2, 4)


def test_mailbox_fifo_keeps_every_item_in_order_until_full():
    box = Mailbox(capacity=3)
    assert [box.put(k, order=k) for k in range(4)] == [False, False, False, True]
    assert box.pending == 3
    assert [box.take(timeout=0) for _ in range(4)] == [1, 2, 3, None]
    assert (box.put_count, box.taken, box.dropped) == (4, 3, 1)
    with pytest.raises(ValueError, match='at least 1'):
        Mailbox(capacity=0)


def test_mailbox_hands_items_to_a_worker_thread():
    slot = Mailbox()
    received = []
    done = threading.Event()

    def worker():
        while True:
            item = slot.take()
            if item is None:
                break
            received.append(item)
            if item == 'last':
                done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    for k in range(200):
        slot.put(k)
    slot.put('last')
    assert done.wait(timeout=10)
    slot.close()  # wakes the worker blocked in take()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert received[-1] == 'last' and received == sorted(received[:-1]) + ['last']
    assert slot.taken == len(received)
    assert slot.taken + slot.dropped == slot.put_count


# -- against the brute-force reference --------------------------------------------------

@st.composite
def stream_cases(draw):
    """Small random streams, a slop, a reorder window and arrival delays."""
    num_inputs = draw(st.integers(1, 3))
    streams = [sorted(draw(st.sets(st.integers(0, 500), max_size=10)))
               for _ in range(num_inputs)]
    slop = draw(st.integers(0, 60))
    reorder = draw(st.sampled_from([0, 0, 25, 80, 200]))
    delays = [draw(st.integers(0, 200)) for _ in range(num_inputs)]
    return streams, slop, reorder, delays, draw(st.randoms(use_true_random=False))


@settings(max_examples=300, deadline=None)
@given(stream_cases())
def test_matches_equal_the_brute_force_reference(case):
    streams, slop, reorder, delays, rng = case
    sync = ApproximateSynchronizer(len(streams), slop, queue_size=32, reorder_window_ns=reorder)
    arrivals = arrival_order(streams, delays, rng, reorder_ns=max(reorder - 1, 0))
    matches, jumps = feed(sync, arrivals, finish=True)
    assert jumps == []
    assert matches == reference_matches(streams, slop)
    assert sync.stats.late == (0,) * len(streams)
    assert_accounted(sync)


def test_seeded_random_streams_match_the_reference():
    """Many more, larger random cases than hypothesis runs, seeded so a failure repeats."""
    rng = random.Random(5)
    for _ in range(1500):
        num_inputs = rng.choice([1, 2, 2, 3])
        streams = [sorted(rng.sample(range(500), rng.randint(0, 12))) for _ in range(num_inputs)]
        slop, reorder = rng.randint(0, 60), rng.choice([0, 0, 10, 25, 80, 200])
        delays = [rng.randint(0, 200) for _ in range(num_inputs)]
        sync = ApproximateSynchronizer(num_inputs, slop, 64, reorder_window_ns=reorder)
        arrivals = arrival_order(streams, delays, rng, reorder_ns=max(reorder - 1, 0))
        matches, _ = feed(sync, arrivals, finish=True)
        assert matches == reference_matches(streams, slop), (streams, slop, reorder, arrivals)
        assert sync.stats.late == (0,) * num_inputs
        assert_accounted(sync)
