"""TENT-ENS: TENT on the 2D+3D ensemble, the MM-TTA paper's multi-modal TENT baseline."""

from typing import Any, Dict, Tuple

import torch

from mmtta_ros.tta.base import NormAdaptationMethod
from mmtta_ros.tta.losses import ensemble_entropy


class TentEnsemble(NormAdaptationMethod):
    """
    Loss = mean entropy of the ensemble, the mean of the 2D and 3D softmaxes.

    Batch-norm affine parameters of both branches train; see NormAdaptationMethod for
    the optimisers and their defaults.
    """

    name = 'tent_ens'

    def objective(self, logits_2d: torch.Tensor, logits_3d: torch.Tensor
                  ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Return the ensemble's mean entropy."""
        return ensemble_entropy(logits_2d, logits_3d).mean(), {}
