"""Source-only: the source model as trained, no adaptation (the paper's lower baseline)."""

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.tta.base import AdaptationMethod, check_output, detach_output
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.norm import freeze


class SourceOnly(AdaptationMethod):
    """Predict with the source model in eval mode (batch norm uses its running statistics)."""

    name = 'source'

    def __init__(self, model: nn.Module, *, collapse_guard: Optional[CollapseGuard] = None):
        super().__init__(model, predict_before_update=True, collapse_guard=collapse_guard)
        freeze(model)

    def prediction_models(self) -> Dict[str, nn.Module]:
        """Return nothing: the source model never changes."""
        return {}

    @torch.no_grad()
    def _adapt(self, inputs: Any) -> Tuple[Any, Dict[str, Any]]:
        self.model.eval()
        output = self.model(inputs)
        check_output(output, self.name)
        return detach_output(output), {'updated': False}
