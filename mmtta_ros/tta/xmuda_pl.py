"""xMUDA-PL as test-time adaptation: cross-modal consistency plus intra-modal pseudo-labels."""

from typing import Annotated, Any, Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta.base import DEFAULT_LR_2D, DEFAULT_LR_3D, NormAdaptationMethod, Rate
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.xmuda import Weight
from mmtta_ros.tta.losses import cross_modal_consistency, masked_cross_entropy


@torch.no_grad()
def class_confident_pseudo_labels(logits: torch.Tensor, quantile: float = 0.5,
                                  max_threshold: float = 0.9) -> torch.Tensor:
    """
    Return <int64: M> argmax labels, IGNORE_INDEX where the prediction is not confident enough.

    Per-class threshold, as xMUDA's refine_pseudo_labels: among the points predicted as
    class c, the threshold is the `quantile` of their confidence (max softmax; 0.5 = the
    lower median, as torch.median), capped at `max_threshold`; points below it are ignored.
    A per-class threshold keeps rare classes, which a global one would starve.
    """
    confidence, labels = F.softmax(logits, dim=1).max(dim=1)
    num_classes = logits.shape[1]
    # Sort by confidence, then stably by class: each class's confidences end up
    # contiguous and ascending, so one gather reads every class's quantile.
    confidence_sorted, order = confidence.sort()
    labels_sorted, regroup = labels[order].sort(stable=True)
    confidence_grouped = confidence_sorted[regroup]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    offsets = torch.floor((counts - 1).clamp_min(0).to(torch.float64) * quantile).long()
    index = (starts + offsets).clamp(max=labels.shape[0] - 1)
    thresholds = confidence_grouped[index].clamp(max=max_threshold)
    keep = confidence >= thresholds[labels]
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


class XMUDAPseudoLabel(NormAdaptationMethod):
    """
    Loss = consistency_weight · xMUDA consistency + pseudo_label_weight · (CE2D + CE3D).

    Each branch's CE is against its own pseudo-labels (intra-modal): the argmax of its
    detached prediction on the current batch, kept where confidence clears the per-class
    threshold of class_confident_pseudo_labels (quantile, max_threshold). Weights default
    to xMUDA's target-domain ones (0.1 consistency, 1.0 pseudo-labels). Batch-norm affine
    parameters of both branches train; see NormAdaptationMethod for the optimisers.

    consistency_weight: weight of the cross-modal KL consistency (xMUDA target: 0.1)
    pseudo_label_weight: weight of the two branches' pseudo-label cross-entropy (xMUDA: 1)
    quantile: per-class confidence quantile a point must reach to keep its pseudo-label
    max_threshold: cap of that per-class confidence threshold
    """

    name = 'xmuda_pl'

    def __init__(self, model: nn.Module, *, consistency_weight: Weight = 0.1,
                 pseudo_label_weight: Weight = 1.0,
                 quantile: Annotated[float, Range(0.0, 1.0)] = 0.5,
                 max_threshold: Annotated[float, Range(0.0, 1.0)] = 0.9,
                 lr_2d: Rate = DEFAULT_LR_2D, lr_3d: Rate = DEFAULT_LR_3D,
                 weight_decay_2d: Rate = 0.0,
                 predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if consistency_weight < 0.0 or not pseudo_label_weight > 0.0:
            raise ValueError(f'{self.name}: need consistency_weight >= 0 and '
                             f'pseudo_label_weight > 0, got {consistency_weight}, '
                             f'{pseudo_label_weight}')
        if not 0.0 <= quantile <= 1.0 or not 0.0 < max_threshold <= 1.0:
            raise ValueError(f'{self.name}: need quantile in [0, 1] and max_threshold in '
                             f'(0, 1], got {quantile}, {max_threshold}')
        self.consistency_weight = float(consistency_weight)
        self.pseudo_label_weight = float(pseudo_label_weight)
        self.quantile = float(quantile)
        self.max_threshold = float(max_threshold)
        super().__init__(model, lr_2d=lr_2d, lr_3d=lr_3d, weight_decay_2d=weight_decay_2d,
                         predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)

    def objective(self, logits_2d: torch.Tensor, logits_3d: torch.Tensor
                  ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Return the weighted consistency plus both branches' pseudo-label CE."""
        labels_2d = class_confident_pseudo_labels(logits_2d.detach(), self.quantile,
                                                  self.max_threshold)
        labels_3d = class_confident_pseudo_labels(logits_3d.detach(), self.quantile,
                                                  self.max_threshold)
        consistency = cross_modal_consistency(logits_2d, logits_3d)
        pseudo_label = (masked_cross_entropy(logits_2d, labels_2d)
                        + masked_cross_entropy(logits_3d, labels_3d))
        loss = self.consistency_weight * consistency + self.pseudo_label_weight * pseudo_label
        kept_2d = (labels_2d != IGNORE_INDEX).float().mean()
        kept_3d = (labels_3d != IGNORE_INDEX).float().mean()
        return loss, {
            'consistency': consistency.detach(),
            'pseudo_label_loss': pseudo_label.detach(),
            'kept_ratio_2d': kept_2d,
            'kept_ratio_3d': kept_3d,
            'kept_ratio': 0.5 * (kept_2d + kept_3d),
        }
