"""Saved files: stale temporaries cleaned, umask mode, disk full said plainly, bad ones refused."""

import errno
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip('torch')

from mmtta_ros.core import persist  # noqa: E402
from mmtta_ros.core.persist import (  # noqa: E402
    atomic_torch_save, load_weights_only, remove_stale_temps)


def temps(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith('.tmp'))


def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_writers_are_removed_before_a_save(tmp_path):
    path = tmp_path / 'state.pt'
    stale = [f'.state.pt.{dead_pid()}.0123abcd.tmp', '.state.pt.k2j_x9q1.tmp']  # new, old name
    alive = f'.state.pt.{os.getppid()}.89abcdef.tmp'  # a live writer's: left alone
    others = ['.other.pt.12345.0123abcd.tmp', 'state.pt.notes.tmp']
    for name in stale + [alive] + others:
        (tmp_path / name).write_bytes(b'x' * 1000)
    atomic_torch_save({'a': torch.zeros(3)}, path)
    assert temps(tmp_path) == sorted([alive] + others)
    assert remove_stale_temps(path) == 0


def test_kills_during_saves_leave_no_temporaries_after_the_next_start(tmp_path):
    path = tmp_path / 'state.pt'
    writer = textwrap.dedent(f'''
        import torch
        from mmtta_ros.core.persist import atomic_torch_save
        # Many small tensors: a save takes long, so most kills land inside one.
        payload = {{f'w{{i}}': torch.zeros(8) for i in range(20000)}}
        while True:
            atomic_torch_save(payload, {str(path)!r})
    ''')
    left = []
    for _ in range(6):  # SIGKILL a saving process until a kill lands mid-save
        process = subprocess.Popen([sys.executable, '-c', writer])
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
        process.wait()
        left = temps(tmp_path)
        if left:
            break
    assert left, 'no kill landed during a save: the test proves nothing'
    atomic_torch_save({'w': torch.ones(2)}, path)  # the next save cleans up
    assert temps(tmp_path) == []
    assert load_weights_only(path)['w'].tolist() == [1.0, 1.0]


def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_torch_save({'a': 1}, tmp_path / 'state.pt')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'state.pt').st_mode) == 0o644


def test_a_full_disk_says_no_space_left_with_the_path(tmp_path, monkeypatch):
    path = tmp_path / 'state.pt'
    atomic_torch_save({'a': torch.zeros(3)}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        """A file on a disk that fills up after 100 bytes."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            if self.written + len(data) > 100:
                raise OSError(errno.ENOSPC, 'No space left on device')
            self.written += len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(persist.os, 'fdopen', lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=f'no space left on device: cannot write {path}$') as info:
        atomic_torch_save({'a': torch.zeros(100000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert 'enforce fail' not in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and temps(tmp_path) == []


class Payload:
    def __reduce__(self):
        return os.system, ('true',)


@pytest.mark.parametrize('case', ['empty', 'garbage', 'pickle', 'int', 'list', 'truncated'])
def test_files_that_are_no_saved_state_are_refused_in_one_line(tmp_path, case):
    path = tmp_path / 'state.pt'
    if case == 'empty':
        path.write_bytes(b'')
    elif case == 'garbage':
        path.write_bytes(os.urandom(1000))
    elif case == 'pickle':
        path.write_bytes(pickle.dumps(Payload()))
    elif case == 'int':
        torch.save(7, path)
    elif case == 'list':
        torch.save([1], path)
    else:
        atomic_torch_save({'a': torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError) as info:
        load_weights_only(path)
    message = str(info.value)
    assert str(path) in message and '\n' not in message
    assert 'weights_only' not in message


@pytest.mark.parametrize('case', ['garbage', 'pickle', 'other_method'])
def test_a_bad_state_file_at_start_warns_and_starts_from_source(tmp_path, case):
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import ModelParams, PipelineParams, StateParams
    from mmtta_ros.core.state import REJECTED_SUFFIX, StateKeeper

    path = tmp_path / 'state.pt'
    pipeline = build_pipeline(PipelineParams(model=ModelParams(device='cpu')),
                              warn=lambda message: None)
    source = {k: v.clone() for k, v in pipeline.method.model.state_dict().items()}
    if case == 'garbage':
        path.write_bytes(os.urandom(1000))
    elif case == 'pickle':
        path.write_bytes(pickle.dumps(Payload()))
    else:
        state = pipeline.method.state_dict()
        state['method'] = 'tent'
        torch.save(state, path)
    (tmp_path / f'.state.pt.{dead_pid()}.0123abcd.tmp').write_bytes(b'x')
    warnings = []
    keeper = StateKeeper(pipeline, StateParams(save_path=str(path), load_on_start=True))
    assert temps(tmp_path) == []  # cleaned at start
    assert keeper.resume(warn=warnings.append) is None
    assert len(warnings) == 1 and 'starting from the source model' in warnings[0]
    assert '\n' not in warnings[0]
    # The file is kept aside (evidence), and the next save does not trip over it.
    assert not path.exists() and (tmp_path / ('state.pt' + REJECTED_SUFFIX)).exists()
    for key, value in pipeline.method.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    keeper.save()
    assert StateKeeper(pipeline, StateParams(save_path=str(path), load_on_start=True)
                       ).resume(warn=warnings.append).startswith('resumed')
