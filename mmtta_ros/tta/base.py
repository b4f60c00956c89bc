"""
The one interface every test-time adaptation method implements, and the machinery they share.

A method wraps a source model: any nn.Module whose forward returns an object with
`.logits_2d` and `.logits_3d`, <float32: M, C> each (one row per point of the batch), and,
for the learning methods, with the two branches as `model.net_2d` and `model.net_3d`.
The method takes the model over and configures it in place.

Online protocol: the caller feeds one batch (the last N frames) per `step`; each step
makes at most one optimiser step and returns that batch's prediction. Nothing keeps an
autograd graph across steps: predictions are detached and `stats` holds Python numbers.
"""

import copy
import dataclasses
import math
from typing import Annotated, Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.models.segmenter import fuse_2d3d
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.losses import ensemble_log_probs, softmax_entropy
from mmtta_ros.tta.norm import (
    branch_norm_parameters, configure_norm_adaptation, norm_layers, set_norm_train_mode)
from mmtta_ros.core.persist import atomic_torch_save, load_weights_only, PathLike

# Latte's defaults (the public MM-TTA re-implementation); the MM-TTA paper gives none.
DEFAULT_LR_2D = 6e-6
DEFAULT_LR_3D = 1e-3
# A learning rate or a weight decay: 0 is refused by the constructors, but 1e-12 (the
# "statistics only" setting) is allowed.
Rate = Annotated[float, Range(0.0, 1.0)]


@dataclasses.dataclass
class Prediction:
    """
    Per-point logits of a step, when the model's own output type cannot be kept.

    logits_2d: <float32: M, C> 2D branch
    logits_3d: <float32: M, C> 3D branch
    """

    logits_2d: torch.Tensor
    logits_3d: torch.Tensor

    def probs_2d3d(self, fusion: str = 'mean') -> torch.Tensor:
        """Return <float32: M, C> the 2D+3D prediction (models.segmenter.fuse_2d3d)."""
        return fuse_2d3d(self.logits_2d, self.logits_3d, fusion)

    def prediction_2d3d(self) -> torch.Tensor:
        """Return <int64: M> the 2D+3D class per point."""
        return self.probs_2d3d().argmax(dim=1)


def detach_output(output: Any) -> Any:
    """Return `output` with every tensor field detached; dataclasses keep their type."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        detached = {field.name: getattr(output, field.name).detach()
                    for field in dataclasses.fields(output)
                    if torch.is_tensor(getattr(output, field.name))}
        return dataclasses.replace(output, **detached)
    return Prediction(output.logits_2d.detach(), output.logits_3d.detach())


def check_output(output: Any, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (logits_2d, logits_3d) of a model output after checking the contract."""
    logits_2d = getattr(output, 'logits_2d', None)
    logits_3d = getattr(output, 'logits_3d', None)
    if not (torch.is_tensor(logits_2d) and torch.is_tensor(logits_3d)):
        raise ValueError(f'{method}: the model must return an object with tensors .logits_2d '
                         f'and .logits_3d (M, C); it returned {type(output).__name__}')
    if logits_2d.dim() != 2 or logits_2d.shape != logits_3d.shape:
        raise ValueError(f'{method}: logits_2d {tuple(logits_2d.shape)} and logits_3d '
                         f'{tuple(logits_3d.shape)} must both be (M, C), one row per point')
    if logits_2d.shape[0] == 0:
        raise SensorDataError('the batch has no point in view of the camera: nothing to '
                              'predict or adapt on')
    return logits_2d, logits_3d


@torch.no_grad()
def prediction_stats(logits_2d: torch.Tensor, logits_3d: torch.Tensor) -> Dict[str, torch.Tensor]:
    """
    Return the diagnostics of one prediction as 0-d tensors.

    entropy_2d, entropy_3d: mean per-point entropy of each branch (nats)
    entropy:                mean per-point entropy of the 2D+3D ensemble (nats)
    dominant_fraction:      share of points given the most frequent 2D+3D class
    """
    log_probs = ensemble_log_probs(logits_2d, logits_3d)
    counts = torch.bincount(log_probs.argmax(dim=1), minlength=log_probs.shape[1])
    return {
        'entropy_2d': softmax_entropy(logits_2d).mean(),
        'entropy_3d': softmax_entropy(logits_3d).mean(),
        'entropy': -(log_probs.exp() * log_probs).sum(dim=1).mean(),
        'dominant_fraction': counts.max().float() / log_probs.shape[0],
    }


def to_numbers(values: Dict[str, Any]) -> Dict[str, Any]:
    """Return `values` with every tensor turned into a Python float (one device sync)."""
    numbers = dict(values)
    tensors = {key: value for key, value in values.items() if torch.is_tensor(value)}
    if tensors:
        stacked = torch.stack([value.detach().reshape(()).float() for value in tensors.values()])
        numbers.update(zip(tensors, stacked.tolist()))
    return numbers


def _cloned_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class AdaptationMethod:
    """
    Base of every method: wraps a source model, adapts and predicts one batch per `step`.

    predict_before_update: return the prediction made before this step's update (the
        paper's protocol) rather than a fresh one after it
    collapse_guard: optional CollapseGuard; when it fires the method resets to the
        source and counts it (stats['resets'], stats['reset_reason']).

    stats, after each step (Python numbers only): step, steps_since_reset, resets, reset
    (whether this step ended in a reset), reset_reason (latest, '' if none), updated
    (whether an optimiser step was taken), entropy_2d / entropy_3d / entropy (mean nats,
    of the returned prediction; entropy is the 2D+3D ensemble's), dominant_fraction;
    learning methods add loss and their own terms.
    """

    name = 'base'

    def __init__(self, model: nn.Module, *, predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f'{self.name} wraps a torch nn.Module, got {type(model).__name__}')
        self.model = model
        self.predict_before_update = bool(predict_before_update)
        self.collapse_guard = collapse_guard
        self.steps = 0
        self.steps_since_reset = 0
        self.resets = 0
        self.last_reset_reason = ''
        self.stats: Dict[str, Any] = {}
        # Cloned before any configuration touches the model: reset is exact, bit for bit.
        self._source_state = _cloned_state(model)

    @property
    def device(self) -> torch.device:
        """Return the device of the model's tensors (inputs must live there too)."""
        for tensor in self.model.state_dict().values():
            return tensor.device
        return torch.device('cpu')

    def step(self, inputs: Any) -> Any:
        """Adapt on one batch and return its prediction (an object with .logits_2d/.logits_3d)."""
        prediction, values = self._adapt(inputs)
        values.update(prediction_stats(prediction.logits_2d, prediction.logits_3d))
        stats = to_numbers(values)
        self.steps += 1
        self.steps_since_reset += 1
        reason = None
        if self.collapse_guard is not None:
            reason = self.collapse_guard.update(entropy=stats['entropy'],
                                                dominant_fraction=stats['dominant_fraction'])
        if reason is not None:
            # This batch's prediction is still returned; the next batch starts from source.
            self.reset()
            self.resets += 1
            self.last_reset_reason = reason
        stats.update(step=self.steps, steps_since_reset=self.steps_since_reset,
                     resets=self.resets, reset=reason is not None,
                     reset_reason=self.last_reset_reason)
        self.stats = stats
        return prediction

    def _adapt(self, inputs: Any) -> Tuple[Any, Dict[str, Any]]:
        """Adapt on `inputs`; return (detached prediction, numbers for stats)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """
        Return the prediction the method makes now, without adapting (no update, no stats).

        It is what `step` returns before its update, so a predictor that runs `predict` on
        a copy kept in sync with `prediction_state` labels as the paper's protocol does
        (a wrapper that decides per frame, the source fallback or calibration, decides with
        what the last step left it: `core.realtime.labels_apart`).
        """
        output = self._predict(inputs)
        check_output(output, self.name)
        return detach_output(output)

    def _predict(self, inputs: Any) -> Any:
        self.model.eval()
        return self.model(inputs)

    def prediction_models(self) -> Dict[str, nn.Module]:
        """Return the models whose norm layers `predict` reads and adaptation changes."""
        return {'model': self.model}

    def prediction_state(self) -> Dict[str, torch.Tensor]:
        """Return clones of every tensor `predict` reads that adaptation may change."""
        return {f'{prefix}.{name}.{key}': tensor.detach().clone()
                for prefix, model in self.prediction_models().items()
                for name, layer in norm_layers(model)
                for key, tensor in layer.state_dict().items()}

    def load_prediction_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy tensors from another copy's `prediction_state` into this method, in place."""
        for prefix, model in self.prediction_models().items():
            for name, layer in norm_layers(model):
                for key, tensor in layer.state_dict().items():
                    tensor.copy_(state[f'{prefix}.{name}.{key}'])

    def reset(self) -> None:
        """Go back to the source weights, bit for bit, with fresh optimiser state."""
        self.model.load_state_dict(self._source_state)
        self._reset_extra()
        if self.collapse_guard is not None:
            self.collapse_guard.reset()
        self.steps_since_reset = 0

    def _reset_extra(self) -> None:
        """Reset what a subclass adds (optimisers, slow model)."""

    def state_dict(self) -> Dict[str, Any]:
        """Return a copy of the adapted state: model(s), optimisers, step and reset counts."""
        return copy.deepcopy(self._state())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by state_dict (or saved by save_state)."""
        if state.get('method') != self.name:
            saved_by = state.get('method')
            raise ValueError(f'this state belongs to method {saved_by!r}, not {self.name!r}: '
                             f'build a {saved_by!r} method to load it')
        self.model.load_state_dict(state['model'])
        self._load_extra(state)
        if self.collapse_guard is not None and 'guard' in state:
            self.collapse_guard.load_state_dict(state['guard'])
        self.steps = int(state['steps'])
        self.steps_since_reset = int(state['steps_since_reset'])
        self.resets = int(state['resets'])
        self.last_reset_reason = str(state['reset_reason'])

    def save_state(self, path: PathLike) -> None:
        """Write the adapted state to `path` atomically (old file intact if this fails)."""
        atomic_torch_save(self._state(), path)

    def load_state(self, path: PathLike) -> None:
        """Restore the adapted state written by save_state (weights_only load)."""
        self.load_state_dict(load_weights_only(path, self.device))

    def _state(self) -> Dict[str, Any]:
        state = {
            'method': self.name,
            'steps': self.steps,
            'steps_since_reset': self.steps_since_reset,
            'resets': self.resets,
            'reset_reason': self.last_reset_reason,
            'model': self.model.state_dict(),
        }
        if self.collapse_guard is not None:
            state['guard'] = self.collapse_guard.state_dict()
        state.update(self._extra_state())
        return state

    def _extra_state(self) -> Dict[str, Any]:
        """Return what a subclass adds to the state (optimisers, slow model)."""
        return {}

    def _load_extra(self, state: Dict[str, Any]) -> None:
        """Restore what _extra_state returned."""


class NormAdaptationMethod(AdaptationMethod):
    """
    Base of the learning methods: batch-norm affine parameters trained by gradient.

    The model is configured as tent does (norm.configure_norm_adaptation): batch norm
    normalises with batch statistics, only its affine weight and bias train, everything
    else is frozen and in eval mode (dropout off). Each branch has its own optimiser, as
    in Latte: AdamW for the 2D branch (lr_2d, weight_decay_2d; Latte sets weight decay to
    0 on norm parameters), Adam for the 3D branch (lr_3d). One optimiser step per batch.
    Subclasses give the loss through `objective`; a None or non-finite loss skips the
    update (stats['updated'] False). `use_supervision` gives any learning method a
    tta.supervision.LabelReplay: after its own update, one step on the answered points
    of label requests (stats['updated'] is then True too); the replay is part of the
    state and a reset empties it.

    lr_2d: learning rate of the 2D branch's batch-norm affine parameters (AdamW)
    lr_3d: learning rate of the 3D branch's batch-norm affine parameters (Adam)
    weight_decay_2d: AdamW weight decay of the 2D parameters (Latte: 0 on norm layers)
    """

    # Whether norm-layer buffers must hold the last batch's statistics (for an EMA).
    record_batch_stats = False

    def __init__(self, model: nn.Module, *, lr_2d: Rate = DEFAULT_LR_2D,
                 lr_3d: Rate = DEFAULT_LR_3D, weight_decay_2d: Rate = 0.0,
                 predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        super().__init__(model, predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)
        for name, value in (('lr_2d', lr_2d), ('lr_3d', lr_3d)):
            if not value > 0.0:
                raise ValueError(f'{self.name}: {name} must be > 0, got {value}')
        if weight_decay_2d < 0.0:
            raise ValueError(f'{self.name}: weight_decay_2d must be >= 0, got {weight_decay_2d}')
        params_2d, params_3d = branch_norm_parameters(model, self.name)
        configure_norm_adaptation(model, record_batch_stats=self.record_batch_stats)
        self.optimizers = {
            '2d': torch.optim.AdamW(params_2d, lr=lr_2d, weight_decay=weight_decay_2d),
            '3d': torch.optim.Adam(params_3d, lr=lr_3d),
        }
        self._initial_optimizer_states = {
            key: copy.deepcopy(optimizer.state_dict())
            for key, optimizer in self.optimizers.items()}
        self.supervision = None  # optional LabelReplay (tta/supervision.py)

    def objective(self, logits_2d: torch.Tensor, logits_3d: torch.Tensor
                  ) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """Return (loss to minimise or None if the batch gives nothing to learn, extra stats)."""
        raise NotImplementedError

    @torch.enable_grad()
    def _adapt(self, inputs: Any) -> Tuple[Any, Dict[str, Any]]:
        self._check_grad_mode()
        set_norm_train_mode(self.model)
        output = self.model(inputs)
        logits_2d, logits_3d = check_output(output, self.name)
        loss, values = self.objective(logits_2d, logits_3d)
        values = self._optimise(loss, values)
        if self.predict_before_update or not values['updated']:
            return detach_output(output), values
        with torch.no_grad():
            after = self.model(inputs)
        check_output(after, self.name)
        return detach_output(after), values

    def _predict(self, inputs: Any) -> Any:
        # The fast model as step() predicts before its update: batch-norm batch statistics.
        set_norm_train_mode(self.model)
        return self.model(inputs)

    def _check_grad_mode(self) -> None:
        """Fail early where autograd cannot work: enable_grad does not leave inference mode."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f'{self.name} adapts by gradient: call step() outside '
                               'torch.inference_mode() (torch.no_grad() is fine)')

    def _optimise(self, loss: Optional[torch.Tensor], values: Dict[str, Any]) -> Dict[str, Any]:
        """Take one optimiser step on `loss` unless it is None or not finite; return stats."""
        if loss is not None:
            values = {'loss': loss.detach(), **values}
        numbers = to_numbers(values)
        updated = loss is not None and math.isfinite(numbers['loss'])
        if updated:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in self.optimizers.values():
                optimizer.step()
                # Grads are not needed past this step: keep nothing alive between steps.
                optimizer.zero_grad(set_to_none=True)
        if self.supervision is not None:
            # After the method's own step: the label step's graph is its own.
            supervised = to_numbers(self.supervision.step(self.model, self.name))
            numbers.update(supervised)
            updated = updated or supervised.get('supervised_step', False)
        numbers['updated'] = updated
        return numbers

    def use_supervision(self, replay) -> None:
        """Take answered labels into adaptation: a LabelReplay over this method's parameters."""
        replay.attach(*branch_norm_parameters(self.model, self.name))
        self.supervision = replay

    def _reset_extra(self) -> None:
        for key, optimizer in self.optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer_states[key]))
        if self.supervision is not None:
            self.supervision.clear()

    def _extra_state(self) -> Dict[str, Any]:
        state = {'optimizers': {key: optimizer.state_dict()
                                for key, optimizer in self.optimizers.items()}}
        if self.supervision is not None:
            state['supervision'] = self.supervision.state_dict()
        return state

    def _load_extra(self, state: Dict[str, Any]) -> None:
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state['optimizers'][key])
        if self.supervision is not None:
            if 'supervision' in state:
                self.supervision.load_state_dict(state['supervision'])
            else:
                self.supervision.clear()
