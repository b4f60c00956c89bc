"""
Save and load an adapted state so that a crash while saving never leaves a broken file.

States hold tensors, numbers, strings, lists and dicts only, so they load with
`torch.load(..., weights_only=True)`: never pickled code.
"""

import os
import tempfile
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_torch_save(payload: Any, path: PathLike) -> None:
    """
    Write `payload` to `path` atomically: the old file or the new one, never half of one.

    torch.save writes a temporary file in the same directory (a rename is atomic only
    within one file system), which is fsynced and then renamed over `path`; the directory
    is fsynced too so the rename itself survives a power cut.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                                        suffix='.tmp', dir=directory)
    try:
        with os.fdopen(handle, 'wb') as tmp:
            torch.save(payload, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def load_weights_only(path: PathLike, device: Union[str, torch.device] = 'cpu') -> Any:
    """Load a file written by atomic_torch_save, tensors mapped to `device`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    return torch.load(path, map_location=device, weights_only=True)


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
