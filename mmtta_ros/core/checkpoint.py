"""
Checkpoints: weights plus the model config in plain types, written atomically.

Loaded with `torch.load(..., weights_only=True)`: a checkpoint holds tensors, numbers,
strings, lists and dicts, never pickled code. A file that is not such a checkpoint is
refused with a one-line ValueError.
"""

import os
from typing import Any, Dict, Tuple, Union

import torch

from mmtta_ros.models.segmenter import (
    build_segmenter, DualBranchSegmenter, SegmenterConfig)
from mmtta_ros.core.persist import atomic_torch_save, load_weights_only

PathLike = Union[str, os.PathLike]


def save_model_checkpoint(path: PathLike, model: DualBranchSegmenter, config: SegmenterConfig,
                          **extra: Any) -> None:
    """Save the model weights, its config (plain dict) and any extra plain values."""
    payload = {'model': model.state_dict(), 'model_config': config.to_dict(), **extra}
    atomic_torch_save(payload, path)


def load_model_checkpoint(path: PathLike, device: Union[str, torch.device] = 'cpu'
                          ) -> Tuple[DualBranchSegmenter, SegmenterConfig, Dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights: (model, config, payload)."""
    payload = load_weights_only(path, device)
    if not isinstance(payload.get('model'), dict) or \
            not isinstance(payload.get('model_config'), dict):
        raise ValueError(f'{path} is not an mmtta_ros model checkpoint (no model / model_config)')
    try:
        config = SegmenterConfig.from_dict(payload['model_config'])
        model = build_segmenter(config).to(device)
        model.load_state_dict(payload['model'])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        # load_state_dict lists every mismatch over many lines: the first says enough.
        first = str(error).strip().splitlines()[0] if str(error).strip() else ''
        raise ValueError(f'{path}: the weights do not fit the model config they came with '
                         f'({type(error).__name__}: {first})') from None
    return model, config, payload
