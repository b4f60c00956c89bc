"""
bn_stats: test-time batch-norm statistics only, no gradient (AdaBN / "BN adapt").

The honest baseline for every learning method here: on the synthetic night most of their
gain is the switch from source to target statistics (README). Each step, batch norm
measures the current batch's mean and variance; the statistics the prediction is
normalised with are

    stats_t = (1 - momentum) * stats_{t-1} + momentum * batch_stats,  stats_0 = source
    used    = source_weight * source + (1 - source_weight) * stats_t

momentum 1 and source_weight 0 is plain AdaBN (each batch normalised with its own
statistics); a smaller momentum averages over the stream; source_weight > 0 keeps a share
of the source statistics (a prior, as Schneider et al.'s N / (N + n)), which bounds how far
a shift can pull the statistics away from what the weights were trained with.
"""

from typing import Annotated, Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.tta.base import AdaptationMethod, check_output, detach_output
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.norm import freeze, norm_layers, STATISTICS

Fraction = Annotated[float, Range(0.0, 1.0)]


class BatchNormStatistics(AdaptationMethod):
    """
    Normalise with target statistics measured on the stream; nothing trains.

    momentum: weight of the newest batch's statistics in the running target statistics
        (1: each batch normalised with its own, AdaBN)
    source_weight: share of the source statistics mixed into those used to predict
        (0: target statistics only)
    """

    name = 'bn_stats'

    def __init__(self, model: nn.Module, *, momentum: Fraction = 1.0,
                 source_weight: Fraction = 0.0,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not 0.0 < momentum <= 1.0 or not 0.0 <= source_weight <= 1.0:
            raise ValueError(f'{self.name}: need momentum in (0, 1] and source_weight in '
                             f'[0, 1], got {momentum}, {source_weight}')
        self.momentum = float(momentum)
        self.source_weight = float(source_weight)
        super().__init__(model, predict_before_update=True, collapse_guard=collapse_guard)
        freeze(model)
        self._layers = [layer for _, layer in norm_layers(model)]
        # The running target statistics, outside the model so `used` can be written into it.
        self._target = [{name: getattr(layer, name).detach().clone() for name in STATISTICS}
                        for layer in self._layers]
        self._source = [{name: getattr(layer, name).detach().clone() for name in STATISTICS}
                        for layer in self._layers]

    @property
    def _per_batch(self) -> bool:
        return self.momentum == 1.0 and self.source_weight == 0.0

    def _batch_statistics_forward(self, inputs: Any) -> Any:
        """Forward with each batch-norm layer on the batch's own statistics, storing nothing."""
        self.model.eval()
        for layer in self._layers:
            layer.train()
            layer.track_running_stats = False
        output = self.model(inputs)
        for layer in self._layers:
            layer.track_running_stats = True
            layer.eval()
        return output

    def _predict(self, inputs: Any) -> Any:
        if self._per_batch:
            return self._batch_statistics_forward(inputs)
        # The statistics the last step left in the layers (before this batch is folded in).
        self.model.eval()
        return self.model(inputs)

    @torch.no_grad()
    def _adapt(self, inputs: Any) -> Tuple[Any, Dict[str, Any]]:
        self.model.eval()
        if self._per_batch:
            # Plain AdaBN: one forward with batch statistics, nothing to remember.
            output = self._batch_statistics_forward(inputs)
            check_output(output, self.name)
            return detach_output(output), {'updated': False}
        # Measure this batch's statistics (BatchNorm stores them with momentum 1) ...
        saved_momentum = [layer.momentum for layer in self._layers]
        for layer in self._layers:
            layer.train()
            layer.momentum = 1.0
        self.model(inputs)
        # ... fold them into the running target statistics and predict with the blend.
        for layer, target, source, momentum in zip(self._layers, self._target, self._source,
                                                   saved_momentum):
            layer.momentum = momentum
            layer.eval()
            for name in STATISTICS:
                target[name].mul_(1.0 - self.momentum).add_(getattr(layer, name),
                                                            alpha=self.momentum)
                getattr(layer, name).copy_(self.source_weight * source[name]
                                           + (1.0 - self.source_weight) * target[name])
        output = self.model(inputs)
        check_output(output, self.name)
        return detach_output(output), {'updated': False}

    def _reset_extra(self) -> None:
        for target, source in zip(self._target, self._source):
            for name in STATISTICS:
                target[name].copy_(source[name])

    def _extra_state(self) -> Dict[str, Any]:
        return {'target_statistics': [dict(target) for target in self._target]}

    def _load_extra(self, state: Dict[str, Any]) -> None:
        for target, saved in zip(self._target, state['target_statistics']):
            for name in STATISTICS:
                target[name].copy_(saved[name])
