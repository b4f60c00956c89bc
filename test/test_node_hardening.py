"""The node over DDS against hostile input: counted by reason, books close (issue 13)."""

from dataclasses import replace

import pytest

rclpy = pytest.importorskip('rclpy', reason='rclpy not installed')
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402

from test_bad_images import png_header_only  # noqa: E402
from mmtta_ros.synth import generate_frames, SequenceConfig  # noqa: E402
from test_node import (  # noqa: E402
    cloud_msg, counts, Harness, IMAGE_SIZE, image_msg, info_msg, send_and_wait)

pytestmark = pytest.mark.dds


@pytest.fixture(scope='module')
def frames():
    config = SequenceConfig(domain='night', seed=3, num_frames=6, image_size=IMAGE_SIZE,
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


def latest_status(harness):
    """Return the last /diagnostics status received (level, message, {key: value})."""
    status = harness.diagnostics[-1].status[0]
    return status.level, status.message, {kv.key: kv.value for kv in status.values}


def test_hostile_messages_are_counted_by_reason_and_the_books_close(frames):
    # Every pair in order (none replaced by a newer one), so each bad one meets the worker.
    harness = Harness(frames, **{'worker.process_every_pair': True})
    try:
        assert send_and_wait(harness, frames[:2], expected=1)
        # A decompression bomb: a 45-byte png that claims 20000x20000 pixels.
        bomb = image_msg(frames[2])
        bomb.format, bomb.data = 'png', png_header_only(20000, 20000)
        harness.send(frames[2], image=bomb)
        # An image bigger than camera_info says, refused before decoding.
        big = image_msg(frames[3])
        big.format, big.data = 'png', png_header_only(9000, 9000)
        harness.send(frames[3], image=big)
        # A bad camera_info (K all zeros) is counted; the last good one stays in use.
        bad_info = info_msg(frames[4])
        bad_info.k = [0.0] * 9
        harness.info_pub.publish(bad_info)
        huge_info = info_msg(frames[4])
        huge_info.width = huge_info.height = 100000
        harness.info_pub.publish(huge_info)
        harness.send(frames[4], info=False)
        # A negative stamp is refused when it arrives.
        negative = cloud_msg(frames[5])
        negative.header.stamp.sec = -5
        harness.cloud_pub.publish(negative)
        harness.send(frames[5], info=False)
        assert harness.spin_until(lambda: counts(harness)['rejected_frames'] >= 2, 30.0), \
            counts(harness)
        assert harness.spin_until(lambda: counts(harness)['frames_processed'] >= 2, 30.0)
        assert harness.spin_until(lambda: not harness.node.mailbox.pending
                                  and not counts(harness)['pairs_in_step'], 30.0)
        values = counts(harness)
        assert values['step_failures'] == 0 and harness.node._worker.is_alive()
        assert values['rejected_camera_info'] == 2
        assert values['camera_info_received'] == values['camera_info_accepted'] + 2
        assert values['rejected_messages'] == 1
        assert values['camera_info_rate_hz'] > 0
        # Every image and cloud received is accounted for by reason.
        assert values['unaccounted_messages'] == 0, values
        assert values['pairs_taken'] == (values['frames_processed'] + values['rejected_frames']
                                         + values['rejected_stamp_skew'])
        # The same figures reach /diagnostics.
        assert harness.spin_until(
            lambda: harness.diagnostics and 'unaccounted_messages' in latest_status(harness)[2]
            and latest_status(harness)[2]['rejected_camera_info'] == '2', 5.0)
        for key in ('camera_info_received', 'camera_info_rate_hz', 'pairs_taken',
                    'pairs_in_step', 'sync_dropped_out_of_slop', 'pairs_dropped_stale'):
            assert key in latest_status(harness)[2]
    finally:
        harness.close()


def test_diagnostics_publish_under_sim_time_without_clock(frames):
    harness = Harness(frames, use_sim_time=True)
    try:
        # Nobody publishes /clock: sim time stays at 0, yet /diagnostics keeps coming.
        assert harness.node.get_clock().now().nanoseconds == 0
        assert harness.spin_until(lambda: len(harness.diagnostics) >= 4, 10.0)
        level, message, values = latest_status(harness)
        assert level == DiagnosticStatus.WARN and values['image_rate_hz'] == '0'
    finally:
        harness.close()


def test_alternating_stamps_are_reported_in_diagnostics(frames):
    harness = Harness(frames)
    try:
        old, new = frames[0], frames[5]
        for i in range(4):  # a peer that mixes old and new stamps, 10 s apart
            back = replace(old, stamp_lidar_ns=old.stamp_lidar_ns - 10 ** 10,
                           stamp_image_ns=old.stamp_image_ns - 10 ** 10)
            harness.send(new, info=(i == 0))
            harness.send(back, info=False)
        assert harness.spin_until(lambda: counts(harness)['time_jumps_recent'] >= 3, 10.0)
        assert harness.spin_until(
            lambda: harness.diagnostics and 'mixes old and new stamps'
            in latest_status(harness)[1], 5.0)
        assert latest_status(harness)[0] == DiagnosticStatus.WARN
        assert counts(harness)['unaccounted_messages'] == 0
    finally:
        harness.close()
