"""
The shared shell of the reusable parts that wrap an adaptation method with the source model.

The source fallback, the source branch and the source calibration each change what a
method publishes and nothing of how it adapts: everything else (the adapted model, its
label replay, reset, prediction and saved state) passes through to the method.
"""

import copy
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.core.persist import atomic_torch_save, load_weights_only, PathLike
from mmtta_ros.tta.norm import freeze


class MethodWrapper:
    """
    Pass-through of an adaptation method, with a frozen source model beside it.

    method:       the wrapped method (or another wrapper)
    source_model: a frozen copy of the source model, taken before the method configured it
    """

    def __init__(self, method, source_model: nn.Module):
        self.method = method
        self.source_model = freeze(source_model)
        self.name = method.name
        self.stats: Dict[str, Any] = {}
        self._last_source: Optional[Tuple[Any, Any]] = None  # (inputs, source output)

    @property
    def model(self) -> nn.Module:
        """Return the adapted model."""
        return self.method.model

    @property
    def device(self) -> torch.device:
        """Return the device of the method's tensors."""
        return self.method.device

    @property
    def supervision(self):
        """Return the wrapped method's label replay (None if it has none)."""
        return getattr(self.method, 'supervision', None)

    def source_output_for(self, inputs: Any) -> Any:
        """
        Return (once) the source model's output of the step just taken on `inputs`, else None.

        A wrapper around this one that needs the same source forward takes it instead of
        running the source model again.
        """
        last, self._last_source = self._last_source, None
        return last[1] if last is not None and last[0] is inputs else None

    def _inner_source_output(self, inputs: Any) -> Any:
        """Return the source output a wrapper inside computed for this step, else None."""
        return getattr(self.method, 'source_output_for', lambda _: None)(inputs)

    def prediction_state(self) -> Dict[str, torch.Tensor]:
        """Return the method's prediction state (the source model never changes)."""
        return self.method.prediction_state()

    def load_prediction_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy another copy's prediction state in."""
        self.method.load_prediction_state(state)

    def reset(self) -> None:
        """Reset the method to the source."""
        self.method.reset()

    def state_dict(self) -> Dict[str, Any]:
        """Return the method's state (nothing of a plain wrapper changes over a stream)."""
        return self.method.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by state_dict."""
        self.method.load_state_dict(copy.copy(state))

    def save_state(self, path: PathLike) -> None:
        """Write the state atomically."""
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path: PathLike) -> None:
        """Restore a state written by save_state."""
        self.load_state_dict(load_weights_only(path, self.method.device))
