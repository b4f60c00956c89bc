"""
Source fallback: publish the adapted prediction only while it looks as sound as the source's.

A reusable guard around any method. Each step it also runs the frozen source model and
measures, for both predictions, the cross-modal agreement: the share of points where the
2D and the 3D branch give the same class. Neither branch sees labels, but where a shift
breaks one branch (the camera at night) the branches disagree, and where adaptation
repairs it they agree again; where adaptation makes things worse (statistics pulled
towards a scene the weights were not trained for) agreement drops. Both agreements are
smoothed over the stream (EMA); the adapted prediction is returned while its agreement
is at least the source's minus `margin`, otherwise the source's. Adaptation itself goes
on either way, so the method can recover. Cost: one source forward per step.
"""

import copy
import math
from typing import Any, Dict

import torch
from torch import nn

from mmtta_ros.tta.base import check_output, detach_output, prediction_stats, to_numbers
from mmtta_ros.tta.wrapper import MethodWrapper


def agreement(logits_2d: torch.Tensor, logits_3d: torch.Tensor) -> torch.Tensor:
    """Return the share <0-d> of points whose 2D and 3D classes agree."""
    return (logits_2d.argmax(dim=1) == logits_3d.argmax(dim=1)).float().mean()


class SourceFallback(MethodWrapper):
    """
    Wrap an adaptation method; return its prediction or the source model's, per step.

    source_model: a frozen copy of the source model, taken before the method configured it
    margin:       the adapted agreement may be this much below the source's (0..1)
    smoothing:    EMA weight of the newest step in both agreements (0..1]
    """

    def __init__(self, method, source_model: nn.Module, *, margin: float = 0.0,
                 smoothing: float = 0.1):
        if not 0.0 <= margin <= 1.0 or not 0.0 < smoothing <= 1.0:
            raise ValueError(f'fallback: need margin in [0, 1] and smoothing in (0, 1], got '
                             f'{margin}, {smoothing}')
        super().__init__(method, source_model)
        self.margin = float(margin)
        self.smoothing = float(smoothing)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.agreement_adapted = None
        self.agreement_source = None
        self.fallbacks = 0

    def step(self, inputs: Any) -> Any:
        """Adapt and predict with the method; return that or the source prediction."""
        adapted = self.method.step(inputs)
        with torch.no_grad():
            self.source_model.eval()
            source = detach_output(self.source_model(inputs))
        check_output(source, 'fallback')
        self._last_source = (inputs, source)
        now = to_numbers({'adapted': agreement(adapted.logits_2d, adapted.logits_3d),
                          'source': agreement(source.logits_2d, source.logits_3d)})
        if self.agreement_adapted is None:
            self.agreement_adapted, self.agreement_source = now['adapted'], now['source']
        else:
            w = self.smoothing
            self.agreement_adapted = (1 - w) * self.agreement_adapted + w * now['adapted']
            self.agreement_source = (1 - w) * self.agreement_source + w * now['source']
        use_source = self.agreement_adapted < self.agreement_source - self.margin
        self.fallbacks += int(use_source)
        prediction = source if use_source else adapted
        stats = dict(self.method.stats)
        if use_source:
            stats.update(to_numbers(prediction_stats(source.logits_2d, source.logits_3d)))
        stats.update(fallback=use_source, fallbacks=self.fallbacks,
                     agreement_adapted=self.agreement_adapted,
                     agreement_source=self.agreement_source)
        self.stats = stats
        return prediction

    def _falling_back(self) -> bool:
        return (self.agreement_adapted is not None
                and self.agreement_adapted < self.agreement_source - self.margin)

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """Return the prediction the current decision picks, adapting nothing."""
        if self._falling_back():
            self.source_model.eval()
            output = detach_output(self.source_model(inputs))
            check_output(output, 'fallback')
            return output
        return self.method.predict(inputs)

    def prediction_state(self) -> Dict[str, torch.Tensor]:
        """Return the method's prediction state and the fallback's decision inputs."""
        state = self.method.prediction_state()
        nan = float('nan')
        state['fallback.agreements'] = torch.tensor([
            nan if self.agreement_adapted is None else self.agreement_adapted,
            nan if self.agreement_source is None else self.agreement_source],
            dtype=torch.float64)
        return state

    def load_prediction_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy another copy's prediction state in."""
        state = dict(state)
        adapted, source = state.pop('fallback.agreements').tolist()
        self.method.load_prediction_state(state)
        self.agreement_adapted = None if math.isnan(adapted) else adapted
        self.agreement_source = None if math.isnan(source) else source

    def reset(self) -> None:
        """Reset the method to the source and forget the agreements."""
        self.method.reset()
        self._reset_counters()

    def state_dict(self) -> Dict[str, Any]:
        """Return the method's state plus the fallback's."""
        state = self.method.state_dict()
        state['fallback'] = {'agreement_adapted': self.agreement_adapted,
                             'agreement_source': self.agreement_source,
                             'fallbacks': self.fallbacks}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by state_dict."""
        state = copy.copy(state)
        saved = state.pop('fallback', None) or {}
        self.method.load_state_dict(state)
        self.agreement_adapted = saved.get('agreement_adapted')
        self.agreement_source = saved.get('agreement_source')
        self.fallbacks = int(saved.get('fallbacks', 0))
