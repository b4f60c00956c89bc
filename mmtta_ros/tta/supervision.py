"""
Answered labels as a supervised step of any learning method: a small replay of labeled points.

LabOR (Shin et al., ICCV 2021) trains on a few dozen labeled points per image; online, the
answers to the node's label requests (core/labels.py) come a few frames late and are few,
so each answered frame is kept (bounded, oldest out first) and replayed at every
adaptation step: after the method's own update, the wrapped model runs on the answered
frames and the cross-entropy on their labeled points, both branches, takes one step of
the replay's own optimisers over the same batch-norm affine parameters.

Its own step size, not a weight in the method's loss: Adam's step is about its learning
rate whatever the loss scale, so a weight only tilts the direction, and at the methods'
validated rates (Latte's 6e-6 for 2D) trusted labels move the model no more than noisy
pseudo-labels (night_harsh validation, 40 points a frame, 2D+3D mIoU: weight 1 or 10 in
the summed loss, 53.0 either way, against 52.8 without labels; their own step at the
rates below, 57.6; the oracle, 56.2). Torch only; the caller hands in
the model's input of the answered frame and the rows of its labeled points.
"""

from collections import deque
import copy
import dataclasses
from typing import Any, Callable, Deque, Dict, Optional, Sequence

import torch
from torch import nn

from mmtta_ros.tta.base import check_output
from mmtta_ros.tta.losses import masked_cross_entropy
from mmtta_ros.tta.norm import norm_layers

# Step sizes of the label step, chosen on the suite's validation shift (night_harsh, 40
# points a frame, one checkpoint; 2D+3D mIoU): 2D 6e-5 / 6e-4 / 6e-3 / 6e-2 with 3D 1e-2
# gave 54.9 / 55.5 / 57.6 / 55.1; 3D 1e-1 with 2D 6e-3 gave 56.0. 1000x and 10x the
# methods' default 2D / 3D rates: the camera branch is the one night breaks.
DEFAULT_LABEL_LR_2D = 6e-3
DEFAULT_LABEL_LR_3D = 1e-2


@dataclasses.dataclass
class Answered:
    """
    One answered frame: the model's input and its labeled points.

    inputs:    the model's input of that frame alone (a dataclass of tensors)
    rows:      <int64: L> rows of the labeled points among the M points of `inputs`
    labels:    <int64: L> their classes
    """

    inputs: Any
    rows: torch.Tensor
    labels: torch.Tensor


class LabelReplay:
    """
    The last `capacity` answered frames, one supervised step on them per adaptation step.

    lr_2d, lr_3d: learning rates of the label step on the 2D (AdamW, no weight decay)
        and 3D (Adam) batch-norm affine parameters, as the methods' own optimisers
    input_type: the model's input dataclass, to rebuild saved entries (load_state_dict)
    `attach` hands it the parameters (NormAdaptationMethod.use_supervision does).
    """

    def __init__(self, *, capacity: int = 4, lr_2d: float = DEFAULT_LABEL_LR_2D,
                 lr_3d: float = DEFAULT_LABEL_LR_3D,
                 input_type: Optional[Callable[..., Any]] = None):
        if capacity < 1 or not (lr_2d > 0.0 and lr_3d > 0.0):
            raise ValueError(f'label replay: need capacity >= 1 and learning rates > 0, got '
                             f'{capacity}, {lr_2d}, {lr_3d}')
        self.capacity = int(capacity)
        self.lr_2d, self.lr_3d = float(lr_2d), float(lr_3d)
        self.input_type = input_type
        self.entries: Deque[Answered] = deque(maxlen=self.capacity)
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self._initial_optimizer_states: Dict[str, Any] = {}

    def attach(self, params_2d: Sequence[nn.Parameter], params_3d: Sequence[nn.Parameter]
               ) -> None:
        """Create the label step's optimisers over the method's trainable parameters."""
        self.optimizers = {'2d': torch.optim.AdamW(params_2d, lr=self.lr_2d, weight_decay=0.0),
                           '3d': torch.optim.Adam(params_3d, lr=self.lr_3d)}
        self._initial_optimizer_states = {key: copy.deepcopy(optimizer.state_dict())
                                          for key, optimizer in self.optimizers.items()}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def points(self) -> int:
        """Return the labeled points held."""
        return int(sum(entry.rows.numel() for entry in self.entries))

    def add(self, inputs: Any, rows: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep one answered frame (the oldest goes when full)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=rows.device)
        if rows.dim() != 1 or rows.shape != labels.shape or rows.numel() == 0:
            raise ValueError(f'label replay: rows {tuple(rows.shape)} and labels '
                             f'{tuple(labels.shape)} must be the same non-empty (L,)')
        self.entries.append(Answered(inputs, rows, labels))

    def clear(self) -> None:
        """Forget every answered frame and the step's optimiser state (a reset)."""
        self.entries.clear()
        for key, optimizer in self.optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_states[key]))

    @torch.enable_grad()
    def step(self, model: nn.Module, method: str = 'supervision') -> Dict[str, Any]:
        """
        Take one step on the mean over frames of CE 2D + CE 3D; return its stats ({} if empty).

        Batch norm normalises each replayed frame with its own statistics (train mode, as
        the method's own forward) but records nothing: buffers that hold the last batch's
        statistics (for a slow model's EMA) keep the current batch's. A non-finite loss
        takes no step.
        """
        if not self.entries:
            return {}
        if not self.optimizers:
            raise RuntimeError('label replay: attach() the parameters before stepping')
        total = None
        with _untracked_batch_norm(model):
            for entry in self.entries:
                logits_2d, logits_3d = check_output(model(entry.inputs), method)
                term = (masked_cross_entropy(logits_2d[entry.rows], entry.labels)
                        + masked_cross_entropy(logits_3d[entry.rows], entry.labels))
                total = term if total is None else total + term
        loss = total / len(self.entries)
        stepped = bool(torch.isfinite(loss))
        if stepped:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in self.optimizers.values():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # keep nothing alive between steps
        return {'supervised_loss': loss.detach(), 'supervised_frames': len(self.entries),
                'supervised_points': self.points, 'supervised_step': stepped}

    def state_dict(self) -> Dict[str, Any]:
        """Return the held frames as plain tensors and the optimisers (weights_only loadable)."""
        return {'entries': [{'inputs': _fields(entry.inputs), 'rows': entry.rows,
                             'labels': entry.labels} for entry in self.entries],
                'optimizers': {key: optimizer.state_dict()
                               for key, optimizer in self.optimizers.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what state_dict returned (this replay's capacity and rates stay)."""
        if state['entries'] and self.input_type is None:
            raise ValueError('label replay: give input_type to load saved answered frames')
        self.entries.clear()
        for entry in state['entries']:
            self.add(self.input_type(**entry['inputs']), entry['rows'], entry['labels'])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state['optimizers'][key])


def _fields(inputs: Any) -> Dict[str, torch.Tensor]:
    if not (dataclasses.is_dataclass(inputs) and not isinstance(inputs, type)):
        raise TypeError(f'label replay saves dataclass inputs; got {type(inputs).__name__}')
    return {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)}


class _untracked_batch_norm:
    """Context: batch norm leaves its running statistics alone (neither read nor written)."""

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in norm_layers(model)]
        self.tracked = [layer.track_running_stats for layer in self.layers]

    def __enter__(self):
        # In train mode an untracked layer normalises with batch statistics, as before.
        for layer in self.layers:
            layer.track_running_stats = False
        return self

    def __exit__(self, *exc_info):
        for layer, tracked in zip(self.layers, self.tracked):
            layer.track_running_stats = tracked
        return False
