"""
Source calibration: an adapted branch keeps the source model's confidence on each frame.

A reusable part around any method (like the source fallback and the source branch). The
method adapts as it always does; before its prediction is published, each adapted
branch's logits are divided by the one temperature per frame that makes that branch's
mean top-class probability equal the source model's on the same frame. A temperature
never changes a point's top class, so the 2D and the 3D labels are the method's own;
only how much each branch weighs in the 2D+3D fusion follows the source.

Why (measured on the suite's validation shifts, the node's default before this part):
re-estimated batch-norm statistics make the 2D branch confident at night while it is
still mostly wrong (2D 29-35 % mIoU against the 3D's 52-64 %), so in the 2D+3D fusion
it outvotes the better 3D branch: 2D+3D 46.7-56.7 against 3D alone 52.2-63.5. The
source model is unsure at night and says so; on city_b (a layout shift the statistics
barely move) both confidences are alike and nothing changes. Matched, night_harsh 2D+3D
went from 52.8 to 58.7 (mean fusion) and 60.5 (product fusion) on three streams of one
checkpoint, city_b held-out seeds unchanged. Cost: the source forward of the calibrated
branches (the fallback's, where one runs, is reused in the step).

Predicting apart from adapting (`predict`, the node's real-time predictor) costs no
source forward: the target confidences come from the newest adaptation step, handed over
with the prediction state, so a label costs what the method's own prediction costs. That
target is the source's confidence on the adapter's last frame, not on the frame being
labeled; only before the first step does `predict` run the source model itself.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from mmtta_ros.tta.base import detach_output, prediction_stats, to_numbers
from mmtta_ros.tta.source_branch import BRANCHES, source_branch_logits
from mmtta_ros.tta.wrapper import MethodWrapper

# Bisection on log T over [1/20, 20]: 30 halvings pin T to 1e-8 relative.
LOG_T_RANGE = (-3.0, 3.0)
ITERATIONS = 30


def mean_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Return the mean top-class probability of <float: M, C> logits (a 0-d tensor)."""
    return logits.float().softmax(dim=1).max(dim=1).values.mean()


@torch.no_grad()
def match_confidence(logits: torch.Tensor, target: torch.Tensor,
                     iterations: int = ITERATIONS) -> torch.Tensor:
    """
    Return logits / T, T the temperature whose mean top-class probability is `target`.

    logits: <float: M, C>; target: a 0-d tensor in [1/C, 1]. The mean top-class
    probability falls as T grows, so a bisection on log T finds it; a target out of
    reach gives the nearest end of the range. No points: the logits unchanged.
    """
    if logits.shape[0] == 0:
        return logits
    logits = logits.float()
    low, high = LOG_T_RANGE
    low = torch.tensor(low, device=logits.device)
    high = torch.tensor(high, device=logits.device)
    for _ in range(iterations):
        middle = (low + high) / 2
        too_confident = mean_confidence(logits / middle.exp()) > target
        # Too confident: a hotter temperature; else a colder one (tensors: no host sync).
        low = torch.where(too_confident, middle, low)
        high = torch.where(too_confident, high, middle)
    return logits / ((low + high) / 2).exp()


class SourceCalibration(MethodWrapper):
    """
    Wrap an adaptation method; publish its branches at the source model's confidence.

    source_model: a frozen copy of the source model, taken before the method configured it
    branches:     the branches to calibrate ('2d', '3d'); a branch published from the
                  source model (the source branch) needs none
    """

    def __init__(self, method, source_model: nn.Module, *, branches: Sequence[str] = BRANCHES):
        if not branches or any(branch not in BRANCHES for branch in branches):
            raise ValueError(f'calibration: branches must be some of {BRANCHES}, got '
                             f'{list(branches)!r}')
        super().__init__(method, source_model)
        self.branches = tuple(branches)
        # The source's mean top-class probability per branch on the last step's frame.
        self.targets: Optional[Dict[str, float]] = None

    def step(self, inputs: Any) -> Any:
        """Adapt and predict with the method; calibrate its branches to the source."""
        adapted = self.method.step(inputs)
        # A source fallback inside has just run the whole source model on these inputs;
        # it is passed on to a source branch outside.
        source = self._inner_source_output(inputs)
        self._last_source = (inputs, source) if source is not None else None
        targets = {branch: mean_confidence(
            getattr(source, f'logits_{branch}') if source is not None
            else source_branch_logits(self.source_model, inputs, branch))
            for branch in self.branches}
        prediction = self._calibrated(adapted, targets)
        self.targets = {branch: float(target) for branch, target in targets.items()}
        stats = dict(self.method.stats)
        stats.update(to_numbers(prediction_stats(prediction.logits_2d, prediction.logits_3d)))
        stats.update({f'confidence_source_{branch}': target
                      for branch, target in self.targets.items()})
        self.stats = stats
        return prediction

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """
        Return the method's prediction now, its branches at the source's confidence.

        The confidences are those of the newest step (this copy's, or handed over by
        `load_prediction_state`); before any step, the source model's on these inputs.
        """
        prediction = self.method.predict(inputs)
        device = prediction.logits_2d.device
        # A fill on the device, not a copy to it: no host sync in the label path.
        targets = ({branch: torch.full((), target, device=device)
                    for branch, target in self.targets.items()}
                   if self.targets is not None else
                   {branch: mean_confidence(source_branch_logits(self.source_model, inputs,
                                                                 branch))
                    for branch in self.branches})
        return self._calibrated(prediction, targets)

    def prediction_state(self) -> Dict[str, torch.Tensor]:
        """Return the method's prediction state and the newest step's target confidences."""
        state = self.method.prediction_state()
        state['calibration.targets'] = torch.tensor(
            [math.nan if self.targets is None else self.targets[branch]
             for branch in self.branches], dtype=torch.float64)
        return state

    def load_prediction_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy another copy's prediction state (and its target confidences) in."""
        state = dict(state)
        targets = state.pop('calibration.targets').tolist()
        self.method.load_prediction_state(state)
        self.targets = (None if any(math.isnan(target) for target in targets)
                        else dict(zip(self.branches, targets)))

    def reset(self) -> None:
        """Reset the method to the source; forget the targets."""
        self.method.reset()
        self.targets = None

    def state_dict(self) -> Dict[str, Any]:
        """Return the method's state plus the targets (a saved state predicts the same)."""
        state = self.method.state_dict()
        state['calibration'] = {'targets': None if self.targets is None else dict(self.targets)}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by state_dict (one saved before the targets: none)."""
        state = dict(state)
        saved = state.pop('calibration', None) or {}
        self.method.load_state_dict(state)
        targets = saved.get('targets')
        # As load_prediction_state: a missing or NaN target means none.
        self.targets = None if targets is None or any(
            math.isnan(float(targets.get(branch, math.nan))) for branch in self.branches) \
            else {branch: float(targets[branch]) for branch in self.branches}

    @staticmethod
    def _calibrated(prediction: Any, targets: Dict[str, torch.Tensor]) -> Any:
        """Return the prediction with each branch at its target mean confidence."""
        prediction = detach_output(prediction)
        return dataclasses.replace(prediction, **{
            f'logits_{branch}': match_confidence(getattr(prediction, f'logits_{branch}'), target)
            for branch, target in targets.items()})
