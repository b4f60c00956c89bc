"""TENT (Wang et al., ICLR 2021) for two branches: minimise each branch's prediction entropy."""

from typing import Any, Dict, Tuple

import torch

from mmtta_ros.tta.base import NormAdaptationMethod
from mmtta_ros.tta.losses import softmax_entropy


class Tent(NormAdaptationMethod):
    """
    Loss = mean entropy of softmax(2D logits) + mean entropy of softmax(3D logits).

    Batch-norm affine parameters of both branches train; see NormAdaptationMethod for
    the optimisers and their defaults.
    """

    name = 'tent'

    def objective(self, logits_2d: torch.Tensor, logits_3d: torch.Tensor
                  ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Return the summed per-branch entropy."""
        loss_2d = softmax_entropy(logits_2d).mean()
        loss_3d = softmax_entropy(logits_3d).mean()
        return loss_2d + loss_3d, {'loss_2d': loss_2d.detach(), 'loss_3d': loss_3d.detach()}
