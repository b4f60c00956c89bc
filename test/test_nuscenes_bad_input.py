"""The nuScenes converter on a broken dataset, as a new user meets it (issue 13, 11)."""

import os
import shutil

import numpy as np
import pytest

from mmtta_ros.bags.nuscenes_convert import convert, partial_path, XMUDA_VAL_NIGHT
from mmtta_ros.bags.topics import BagTopics
from mmtta_ros.tools import nuscenes_to_bag
from nuscenes_fixture import write_tiny_nuscenes

pytest.importorskip('nuscenes.nuscenes', exc_type=ImportError,
                    reason='nuscenes-devkit not importable')


@pytest.fixture
def dataset(tmp_path):
    return write_tiny_nuscenes(tmp_path / 'data', keyframes=2)


def run_tool(capsys, *args):
    rc = nuscenes_to_bag.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_missing_sweeps_fail_before_writing_and_the_retry_works(dataset, tmp_path, capsys):
    out = tmp_path / 'bags'
    moved = tmp_path / 'sweeps_elsewhere'
    shutil.move(dataset.dataroot / 'sweeps', moved)
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir', out)
    assert rc == 1 and 'sample files are missing' in err and 'sweeps' in err
    assert 'Traceback' not in err
    assert not out.exists() or os.listdir(out) == []
    shutil.move(moved, dataset.dataroot / 'sweeps')
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir', out)
    assert rc == 0, err
    assert (out / dataset.night_scene.name / 'metadata.yaml').is_file()


def test_a_truncated_sweep_leaves_no_half_bag(dataset, tmp_path, capsys):
    out = tmp_path / 'bags'
    # Every sweep truncated: the bag exists (tf_static written) when the first one fails.
    sweeps = sorted((dataset.dataroot / 'sweeps' / 'LIDAR_TOP').iterdir())
    originals = {sweep: sweep.read_bytes() for sweep in sweeps}
    for sweep, data in originals.items():
        sweep.write_bytes(data[:len(data) - 7])
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir', out)
    assert rc == 1 and 'not a whole number' in err
    bag = out / dataset.night_scene.name
    assert not bag.exists() and not partial_path(bag).exists()
    for sweep, data in originals.items():
        sweep.write_bytes(data)
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir', out)
    assert rc == 0, err


def test_one_missing_label_file_is_a_clear_error(dataset, tmp_path, capsys):
    label_files = sorted((dataset.dataroot / 'lidarseg' / dataset.version).iterdir())
    label_files[0].unlink()
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir',
                          tmp_path / 'bags')
    assert rc == 1 and 'lidarseg' in err and 'Traceback' not in err


@pytest.mark.parametrize('how', ['no_lidarseg_folder', 'no_lidarseg_at_all'])
def test_without_lidarseg_it_converts_and_warns_or_says_what_to_fix(
        dataset, tmp_path, capsys, how):
    shutil.rmtree(dataset.dataroot / 'lidarseg')
    if how == 'no_lidarseg_at_all':
        (dataset.dataroot / dataset.version / 'lidarseg.json').unlink()
    rc, out, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir',
                            tmp_path / 'bags')
    if how == 'no_lidarseg_folder':  # a half-installed lidarseg: say how to finish it
        assert rc == 1 and 'finish the nuScenes-lidarseg install' in err
    else:
        assert rc == 0 and 'cannot be scored' in err
        assert (tmp_path / 'bags' / dataset.night_scene.name / 'metadata.yaml').is_file()


def test_split_selects_xmuda_night_scenes_and_version_has_help(dataset, tmp_path, capsys):
    # The fixture's night scene (scene-1077) is in the official train set: xMUDA train.
    summaries = convert(dataset.dataroot, tmp_path / 'train', split='train',
                        topics=BagTopics())
    assert [s.scene for s in summaries] == [dataset.night_scene.name]
    rc, _, err = run_tool(capsys, '--dataroot', dataset.dataroot, '--output-dir',
                          tmp_path / 'test', '--split', 'test')
    assert rc == 1 and "no night scene in xMUDA's test split" in err
    assert len(XMUDA_VAL_NIGHT) == 15 and XMUDA_VAL_NIGHT[0] == 'scene-1044'
    help_text = nuscenes_to_bag.build_parser().format_help()
    assert 'v1.0-trainval' in help_text and '--split' in help_text
    assert np.all([name.startswith('scene-10') for name in XMUDA_VAL_NIGHT])
