"""
Source branch: publish one branch's prediction from the frozen source model.

A reusable part around any method (like the source fallback). The method adapts as it
always does, both branches included, so its pseudo-labels still see both; only the
published prediction takes the chosen branch's logits from the source model instead.

Why: on the suite's validation shift (night_harsh) every method that re-estimates
batch-norm statistics raised 2D mIoU by 9-18 points but lowered 3D mIoU by up to 6
(bn_stats: 3D -3.5 / -6.2 / +0.5 and -3.5 / -3.0 / -2.6 per stream of the two source
checkpoints; MM-TTA 0.9: -1.4 / -2.9 / +0.7 and -2.1 / -1.7 / -2.1). A LiDAR sweep is
one scene, and its voxel features' batch statistics follow that scene's layout more
than any change of sensor, so one sweep's statistics are a poor estimate of the
target's. Cost: one forward of the source model's branch per frame.
"""

from contextlib import contextmanager
import dataclasses
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from mmtta_ros.tta.base import check_output, detach_output, prediction_stats, to_numbers
from mmtta_ros.tta.wrapper import MethodWrapper

BRANCHES = ('2d', '3d')


@torch.no_grad()
def source_branch_logits(source_model: nn.Module, inputs: Any, branch: str) -> torch.Tensor:
    """
    Return <float32: M, C> the source model's logits of `branch` ('2d' or '3d').

    Runs that branch alone where the model exposes it as the dual-branch segmenter does
    (net_2d / net_3d with point_features and classifier), else the whole model.
    """
    source_model.eval()
    net = getattr(source_model, f'net_{branch}', None)
    if hasattr(net, 'point_features') and hasattr(net, 'classifier'):
        if branch == '3d':
            # One image per frame: the batch's frame count, as the segmenter passes it.
            features = net.point_features(inputs.points, inputs.batch_index,
                                          inputs.images.shape[0])
        else:
            features = net.point_features(inputs.images, inputs.pixels, inputs.batch_index)
        return net.classifier(features)
    output = source_model(inputs)
    check_output(output, 'source_branch')
    return getattr(output, f'logits_{branch}')


def with_branch(prediction: Any, branch: str, logits: torch.Tensor) -> Any:
    """Return `prediction` with its `branch` logits replaced (the other fields kept)."""
    prediction = detach_output(prediction)
    return dataclasses.replace(prediction, **{f'logits_{branch}': logits.detach()})


@contextmanager
def branch_skipped(models: Iterable[nn.Module], branch: str) -> Iterator[None]:
    """
    Within the block, the segmenters among `models` do not run `branch` (zeros instead).

    For a prediction whose `branch` logits are replaced anyway: on this CPU the sparse 3D
    branch is most of a forward, and the label path would otherwise run it twice (adapted,
    then the source's). Models without the switch (DualBranchSegmenter.skip_branch) run
    whole. Restores the switches on exit.
    """
    switched = [model for model in models if hasattr(model, 'skip_branch')]
    try:
        for model in switched:
            model.skip_branch = branch
        yield
    finally:
        for model in switched:
            model.skip_branch = None


def prediction_models(method) -> Iterable[nn.Module]:
    """Return the models the innermost of wrapped methods (`.method`) predicts with."""
    while not hasattr(method, 'prediction_models') and hasattr(method, 'method'):
        method = method.method
    return method.prediction_models().values() if hasattr(method, 'prediction_models') else ()


class SourceBranch(MethodWrapper):
    """
    Wrap an adaptation method; publish its prediction with `branch` taken from the source.

    source_model: a frozen copy of the source model, taken before the method configured it
    branch:       '3d' or '2d', the branch whose prediction comes from the source model
    """

    def __init__(self, method, source_model: nn.Module, *, branch: str = '3d'):
        if branch not in BRANCHES:
            raise ValueError(f'source_branch: branch must be one of {BRANCHES}, got {branch!r}')
        super().__init__(method, source_model)
        self.branch = branch

    def step(self, inputs: Any) -> Any:
        """Adapt and predict with the method; swap in the source model's branch."""
        adapted = self.method.step(inputs)
        # A source fallback inside has just run the whole source model on these inputs.
        source = self._inner_source_output(inputs)
        logits = (getattr(source, f'logits_{self.branch}') if source is not None
                  else source_branch_logits(self.source_model, inputs, self.branch))
        prediction = with_branch(adapted, self.branch, logits)
        stats = dict(self.method.stats)
        # The published prediction's entropies, as every method reports its own.
        stats.update(to_numbers(prediction_stats(prediction.logits_2d, prediction.logits_3d)))
        stats['source_branch'] = self.branch
        self.stats = stats
        return prediction

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """Return the method's prediction now, the chosen branch from the source."""
        # The method's own forward of that branch would be thrown away: skip it.
        with branch_skipped(prediction_models(self.method), self.branch):
            prediction = self.method.predict(inputs)
        return with_branch(prediction, self.branch,
                           source_branch_logits(self.source_model, inputs, self.branch))
