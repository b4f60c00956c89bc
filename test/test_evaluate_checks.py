"""mmtta_evaluate refuses bad arguments before any work, in one line (issue 13, 11)."""

import os

import pytest

from mmtta_ros.eval.scoring import format_report, HEADS
from mmtta_ros.tools import evaluate


def refused(argv):
    """Return the message mmtta_evaluate exits with (it must exit, not raise)."""
    with pytest.raises(SystemExit) as info:
        evaluate.main([str(a) for a in argv])
    message = str(info.value.code)
    assert '\n' not in message and 'Traceback' not in message
    return message


def fake_bag(path):
    path.mkdir()
    (path / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}\n')
    return path


def test_bad_paths_are_refused_up_front(tmp_path):
    checkpoint = tmp_path / 'model.pt'
    checkpoint.write_bytes(os.urandom(256))
    bag = fake_bag(tmp_path / 'bag')
    assert 'no checkpoint at' in refused(['--checkpoint', tmp_path / 'none.pt', '--bag', bag])
    assert 'no bag at' in refused(['--checkpoint', checkpoint, '--bag', tmp_path / 'nobag'])
    (tmp_path / 'folder').mkdir()
    assert 'is not a rosbag2 bag' in refused(['--checkpoint', checkpoint, '--bag',
                                              tmp_path / 'folder'])
    existing = fake_bag(tmp_path / 'out')
    assert 'never overwritten' in refused(['--checkpoint', checkpoint, '--bag', bag,
                                           '--output-bag', existing])


def test_a_checkpoint_that_is_no_checkpoint_ends_the_run_before_any_frame(tmp_path):
    checkpoint = tmp_path / 'model.pt'
    checkpoint.write_bytes(b'PK\x03\x04' + bytes(252))  # a zip header, then nothing
    message = refused(['--checkpoint', checkpoint, '--device', 'cpu', '--frames', '1',
                       '--seeds', '0', '--cache-dir', tmp_path / 'cache'])
    assert 'not a readable torch file' in message
    assert not (tmp_path / 'cache').exists()


def test_the_report_says_how_many_frames_were_scored():
    per_class = {head: {'iou': {}} for head in HEADS}
    report = {'frames': 21, 'unlabeled_frames': 18, 'seconds': 1.0,
              'miou': {head: 0.5 for head in HEADS}, 'per_class': per_class}
    title = format_report('mmtta on scene-1077', report, class_names=()).splitlines()[0]
    assert title.startswith('mmtta on scene-1077: 21 frames, 3 of them labeled and scored')
