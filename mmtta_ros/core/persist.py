"""
Save and load an adapted state so that a crash while saving never leaves a broken file.

States hold tensors, numbers, strings, lists and dicts only, so they load with
`torch.load(..., weights_only=True)`: never pickled code. A file that holds anything else,
or that is not a torch file at all, is refused with a ValueError that says so.
"""

import errno
import os
import pickle
import re
import secrets
from typing import Any, Optional, Set, Union

import torch

PathLike = Union[str, os.PathLike]
# A save writes `.<name>.<pid>.<random>.tmp` beside `<name>`; the pid says whose it is.
_TEMP_NAME = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$')
# Older versions wrote `.<name>.<8 mkstemp characters>.tmp` (no pid): ours as well.
_OLD_TEMP_NAME = re.compile(r'^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$')
_DISK_FULL = (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))
# Temporary files this process is writing now (never cleaned as stale).
_writing: Set[str] = set()


def atomic_torch_save(payload: Any, path: PathLike) -> None:
    """
    Write `payload` to `path` atomically: the old file or the new one, never half of one.

    torch.save writes a temporary file in the same directory (a rename is atomic only
    within one file system), which is fsynced and then renamed over `path`; the directory
    is fsynced too so the rename itself survives a power cut. Temporary files left by
    writers that died (a SIGKILL during a save) are removed first. The file gets the
    umask's mode, like any other file the user writes. A full disk raises
    OSError(ENOSPC) naming the path.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    tmp_path = os.path.join(
        directory, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    _writing.add(tmp_path)
    try:
        # O_EXCL: never follow or reuse someone else's file; 0o666 & ~umask is the mode.
        handle = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, 'wb') as tmp:
            recorder = _WriteRecorder(tmp)
            try:
                torch.save(payload, recorder)
            except RuntimeError as error:
                # torch reports a failed write as "[enforce fail ...] unexpected pos";
                # the OSError behind it is the useful part.
                if recorder.error is not None:
                    raise recorder.error from error
                raise
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        _unlink_quietly(tmp_path)
        if error.errno in _DISK_FULL:
            raise OSError(error.errno, f'no space left on device: cannot write {path}') from None
        raise
    except BaseException:
        _unlink_quietly(tmp_path)
        raise
    finally:
        _writing.discard(tmp_path)
    _fsync_directory(directory)


def remove_stale_temps(path: PathLike) -> int:
    """
    Remove temporary files of saves to `path` whose writer is gone; return how many.

    Only files of our own naming are touched; one whose writing process is still alive
    (another process saving the same file) is left alone.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0  # no directory yet: nothing to clean
    removed = 0
    for entry in entries:
        match = _TEMP_NAME.match(entry)
        if match is None or match.group('name') != name:
            old = _OLD_TEMP_NAME.match(entry)
            if old is None or old.group('name') != name:
                continue
            pid = None
        else:
            pid = int(match.group('pid'))
        full = os.path.join(directory, entry)
        if full in _writing or (pid is not None and _alive(pid)):
            continue
        if _unlink_quietly(full):
            removed += 1
    return removed


def load_weights_only(path: PathLike, device: Union[str, torch.device] = 'cpu') -> dict:
    """
    Load a dict written by atomic_torch_save, tensors mapped to `device`.

    FileNotFoundError if missing; ValueError (one line saying what is wrong) for an empty,
    corrupt or foreign file, one holding pickled objects (never run) or not a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{path} is empty (an interrupted copy?)')
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: never the advice for a file
        # that holds code.
        raise ValueError(f'{path} holds pickled objects, not only tensors and plain values: '
                         'refused without loading it (use a file written by mmtta_ros)'
                         ) from None
    except OSError:
        raise
    except Exception as error:  # noqa: B902 - torch raises many types for foreign bytes
        raise ValueError(f'{path} is not a readable torch file (corrupt or truncated?): '
                         f'{type(error).__name__}') from None
    if not isinstance(payload, dict):
        raise ValueError(f'{path} holds a {type(payload).__name__}, not the dict mmtta_ros '
                         'writes')
    return payload


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write (torch hides it)."""

    def __init__(self, file):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, and not in _writing: left by an earlier failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_directory(directory: str) -> None:
    flags = os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0)
    try:
        handle = os.open(directory, flags)
    except OSError:
        return  # platforms that cannot open a directory (Windows) have no such fsync
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
