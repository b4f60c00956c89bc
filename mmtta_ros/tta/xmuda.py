"""xMUDA (Jaritz et al., CVPR 2020) as test-time adaptation: cross-modal consistency only."""

from typing import Annotated, Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.tta.base import DEFAULT_LR_2D, DEFAULT_LR_3D, NormAdaptationMethod, Rate
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.losses import cross_modal_consistency

# A loss weight.
Weight = Annotated[float, Range(0.0, 100.0)]


class XMUDA(NormAdaptationMethod):
    """
    Loss = consistency_weight · (KL(p3D' || p2D) + KL(p2D' || p3D)), ' = detached.

    Each branch learns to mimic the other's prediction. consistency_weight defaults to
    xMUDA's target-domain weight (0.1, also Latte's TTA setting); with Adam the overall
    scale of a single loss barely matters. Batch-norm affine parameters of both branches
    train; see NormAdaptationMethod for the optimisers.

    consistency_weight: weight of the cross-modal KL consistency (xMUDA target: 0.1)
    """

    name = 'xmuda'

    def __init__(self, model: nn.Module, *, consistency_weight: Weight = 0.1,
                 lr_2d: Rate = DEFAULT_LR_2D, lr_3d: Rate = DEFAULT_LR_3D,
                 weight_decay_2d: Rate = 0.0, predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not consistency_weight > 0.0:
            raise ValueError(f'{self.name}: consistency_weight must be > 0, '
                             f'got {consistency_weight}')
        self.consistency_weight = float(consistency_weight)
        super().__init__(model, lr_2d=lr_2d, lr_3d=lr_3d, weight_decay_2d=weight_decay_2d,
                         predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)

    def objective(self, logits_2d: torch.Tensor, logits_3d: torch.Tensor
                  ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Return the weighted cross-modal KL consistency."""
        consistency = cross_modal_consistency(logits_2d, logits_3d)
        return self.consistency_weight * consistency, {'consistency': consistency.detach()}
