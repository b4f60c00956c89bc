"""
MM-TTA (Shin et al., CVPR 2022): fast and slow models, Intra-PG and Inter-PR pseudo-labels.

Fast model F: the wrapped model; batch norm uses the current batch's statistics and its
affine parameters train. Slow model S: a momentum copy of F (Eq. 6), starting from the
source, batch norm in eval mode with its own running statistics; predictions come from S.
Intra-PG: per modality, pseudo-label logits are the mean of the fast and slow logits.
Inter-PR: per point and modality, ζ = Sim(p_fast, p_slow) measures how stable that
modality's prediction is; the steadier modality gives the label (hard) or the two are
mixed with weights ζ2D / (ζ2D + ζ3D) and 1 - that (soft); points where both are unstable
(max ζ < threshold) are ignored. Loss = CE(fast 2D logits, ŷ) + CE(fast 3D logits, ŷ).
"""

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta.base import (
    check_output, DEFAULT_LR_2D, DEFAULT_LR_3D, detach_output, NormAdaptationMethod, Rate)
from mmtta_ros.tta.ema import EMA_TARGETS, ema_update
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.losses import inverse_kl_similarity, masked_cross_entropy
from mmtta_ros.tta.norm import freeze, set_norm_train_mode

SELECTIONS = ('hard', 'soft')


@dataclass
class PseudoLabels:
    """
    Inter-PR output for one batch.

    labels:    <int64: M> refined pseudo-label, IGNORE_INDEX where max(ζ2D, ζ3D) < threshold
    zeta_2d:   <float32: M> Sim(fast, slow) of the 2D branch
    zeta_3d:   <float32: M> Sim(fast, slow) of the 3D branch
    weight_2d: <float32: M> share of the 2D branch in the label: w2D (soft), 1 or 0 (hard)
    probs:     <float32: M, C> w2D·p2D + (1 - w2D)·p3D, the distribution the label is the
               argmax of (before the threshold); None where the producer does not
               fill it in (latte_pseudo_labels)
    """

    labels: torch.Tensor
    zeta_2d: torch.Tensor
    zeta_3d: torch.Tensor
    weight_2d: torch.Tensor
    probs: Optional[torch.Tensor] = None


def modality_weights(zeta_2d: torch.Tensor, zeta_3d: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return <M> w2D = ζ2D / (ζ2D + ζ3D) and <M> w3D = 1 - w2D; they sum to 1 per point.

    (Latte normalises w3D with the already-normalised w2D, so its weights do not sum to
    1; the paper's do.)
    """
    total = (zeta_2d + zeta_3d).clamp_min(torch.finfo(zeta_2d.dtype).tiny)
    weight_2d = zeta_2d / total
    return weight_2d, 1.0 - weight_2d


@torch.no_grad()
def inter_modal_pseudo_labels(probs_2d: torch.Tensor, probs_3d: torch.Tensor,
                              zeta_2d: torch.Tensor, zeta_3d: torch.Tensor, *,
                              selection: str = 'soft', threshold: float = 0.3
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return (<int64: M> labels, <float32: M> 2D weight) by Inter-PR.

    probs_2d, probs_3d: <float32: M, C> Intra-PG pseudo-label probabilities per modality
    zeta_2d, zeta_3d:   <float32: M> consistency of each modality
    hard: the 2D label where ζ2D >= ζ3D, else the 3D label.
    soft: argmax(w2D·p2D + w3D·p3D) with modality_weights.
    Points where max(ζ2D, ζ3D) < threshold get IGNORE_INDEX.
    """
    if selection == 'hard':
        weight_2d = (zeta_2d >= zeta_3d).to(probs_2d.dtype)
        labels = torch.where(zeta_2d >= zeta_3d, probs_2d.argmax(dim=1), probs_3d.argmax(dim=1))
    elif selection == 'soft':
        weight_2d, weight_3d = modality_weights(zeta_2d, zeta_3d)
        mixed = weight_2d[:, None] * probs_2d + weight_3d[:, None] * probs_3d
        labels = mixed.argmax(dim=1)
    else:
        raise ValueError(f'selection must be one of {SELECTIONS}, got {selection!r}')
    unreliable = torch.maximum(zeta_2d, zeta_3d) < threshold
    labels = labels.masked_fill(unreliable, IGNORE_INDEX)
    return labels, weight_2d


@torch.no_grad()
def mmtta_pseudo_labels(fast_2d: torch.Tensor, slow_2d: torch.Tensor, fast_3d: torch.Tensor,
                        slow_3d: torch.Tensor, *, selection: str = 'soft',
                        threshold: float = 0.3, eps: float = 1e-6) -> PseudoLabels:
    """
    Return the MM-TTA pseudo-labels of a batch from fast and slow logits <float32: M, C>.

    Intra-PG: p_m = softmax((fast_m + slow_m) / 2). Inter-PR: ζ_m = Sim(softmax(fast_m),
    softmax(slow_m)) (losses.inverse_kl_similarity, ε = eps), then
    inter_modal_pseudo_labels(selection, threshold).
    """
    probs_2d = F.softmax(0.5 * (fast_2d + slow_2d), dim=1)
    probs_3d = F.softmax(0.5 * (fast_3d + slow_3d), dim=1)
    zeta_2d = inverse_kl_similarity(fast_2d, slow_2d, eps)
    zeta_3d = inverse_kl_similarity(fast_3d, slow_3d, eps)
    return refined_pseudo_labels(probs_2d, probs_3d, zeta_2d, zeta_3d, selection=selection,
                                 threshold=threshold)


@torch.no_grad()
def refined_pseudo_labels(probs_2d: torch.Tensor, probs_3d: torch.Tensor,
                          zeta_2d: torch.Tensor, zeta_3d: torch.Tensor, *,
                          selection: str = 'soft', threshold: float = 0.3) -> PseudoLabels:
    """Return inter_modal_pseudo_labels (same arguments) with ζ and the mixed distribution."""
    labels, weight_2d = inter_modal_pseudo_labels(probs_2d, probs_3d, zeta_2d, zeta_3d,
                                                  selection=selection, threshold=threshold)
    probs = weight_2d[:, None] * probs_2d + (1.0 - weight_2d)[:, None] * probs_3d
    return PseudoLabels(labels, zeta_2d, zeta_3d, weight_2d, probs)


class MMTTA(NormAdaptationMethod):
    """
    MM-TTA: pseudo-labels from fast/slow agreement across modalities (see module docstring).

    momentum:    λ of Eq. 6, Ω_S(t) = (1 - λ)·Ω_F(t) + λ·Ω_S(t - 1). Default 0.99 (Latte;
                 the paper's value is not public).
    ema_targets: what Ω covers: 'affine' (batch-norm weight and bias, what Latte averages),
                 'stats' (running mean and variance: the slow model's statistics become an
                 EMA of the fast model's batch statistics) or 'both' (default: the paper has
                 the fast model update its BN statistics at once and the slow model follow
                 by momentum).
    selection:   Inter-PR 'soft' (default) or 'hard'.
    threshold:   ignore points with max(ζ2D, ζ3D) below it. Default 0.3 (Latte).
    eps:         ε of Sim. Default 1e-6 (the paper gives none; Latte uses none, which is
                 inf when fast and slow agree exactly).
    lr_2d, lr_3d, weight_decay_2d: AdamW (2D) and Adam (3D), defaults 6e-6 / 1e-3 / 0
                 from Latte (its 2D head ×10 does not apply: only norm layers train).
    predict_before_update: True (default, the paper's protocol) returns the slow model's
                 prediction made before this step's update; False runs the slow model
                 again after it.
    Two models live in memory (the slow one is a deep copy of the source model).
    """

    name = 'mmtta'

    def __init__(self, model: nn.Module, *,
                 momentum: Annotated[float, Range(0.0, 1.0)] = 0.99,
                 ema_targets: Literal['affine', 'stats', 'both'] = 'both',
                 selection: Literal['hard', 'soft'] = 'soft',
                 threshold: Annotated[float, Range(0.0, 1e6)] = 0.3,
                 eps: Annotated[float, Range(1e-12, 1.0)] = 1e-6,
                 lr_2d: Rate = DEFAULT_LR_2D, lr_3d: Rate = DEFAULT_LR_3D,
                 weight_decay_2d: Rate = 0.0, predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f'{self.name}: momentum must be in [0, 1], got {momentum}')
        if ema_targets not in EMA_TARGETS:
            raise ValueError(f'{self.name}: ema_targets must be one of {EMA_TARGETS}, '
                             f'got {ema_targets!r}')
        if selection not in SELECTIONS:
            raise ValueError(f'{self.name}: selection must be one of {SELECTIONS}, '
                             f'got {selection!r}')
        if threshold < 0.0 or not eps > 0.0:
            raise ValueError(f'{self.name}: need threshold >= 0 and eps > 0, '
                             f'got {threshold}, {eps}')
        self.momentum = float(momentum)
        self.ema_targets = ema_targets
        self.selection = selection
        self.threshold = float(threshold)
        self.eps = float(eps)
        # The fast model's buffers must carry its batch statistics for a 'stats' EMA.
        self.record_batch_stats = ema_targets in ('stats', 'both')
        # Copied before the fast model is configured: S starts as the source model.
        self.slow_model = freeze(copy.deepcopy(model))
        super().__init__(model, lr_2d=lr_2d, lr_3d=lr_3d, weight_decay_2d=weight_decay_2d,
                         predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)

    @torch.enable_grad()
    def _adapt(self, inputs: Any) -> Tuple[Any, Dict[str, Any]]:
        self._check_grad_mode()
        set_norm_train_mode(self.model)
        self.slow_model.eval()
        with torch.no_grad():
            slow_output = self.slow_model(inputs)
        check_output(slow_output, self.name)
        fast_output = self.model(inputs)
        check_output(fast_output, self.name)
        loss, values = self.pair_objective(inputs, fast_output, slow_output)
        values = self._optimise(loss, values)
        if values['updated']:
            ema_update(self.slow_model, self.model, self.momentum, self.ema_targets)
        if self.predict_before_update or not values['updated']:
            return detach_output(slow_output), values
        with torch.no_grad():
            after = self.slow_model(inputs)
        check_output(after, self.name)
        return detach_output(after), values

    @torch.no_grad()
    def pseudo_labels(self, fast_output: Any, slow_output: Any
                      ) -> Tuple[PseudoLabels, Dict[str, Any]]:
        """
        Return (this batch's pseudo-labels, extra stats) from the fast and slow outputs.

        Both outputs carry .logits_2d / .logits_3d <float32: M, C> (the fast ones with a
        graph, detached here). Methods built on MM-TTA's pair (cbst, proda) refine this.
        """
        pseudo = mmtta_pseudo_labels(fast_output.logits_2d.detach(), slow_output.logits_2d,
                                     fast_output.logits_3d.detach(), slow_output.logits_3d,
                                     selection=self.selection, threshold=self.threshold,
                                     eps=self.eps)
        return pseudo, {}

    def pair_objective(self, inputs: Any, fast_output: Any, slow_output: Any
                       ) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """
        Return (loss or None, stats) of one batch from the fast and slow models' outputs.

        fast_output carries the graph (the fast model in batch-norm train mode), slow_output
        is the slow model's prediction without one. MM-TTA's loss: CE of each fast branch
        against the Inter-PR pseudo-labels; None where every point is ignored. Methods built
        on the fast/slow pair (mic, ftd) change or extend this; cbst and proda refine
        the pseudo-labels alone (pseudo_labels).
        """
        fast_2d, fast_3d = fast_output.logits_2d, fast_output.logits_3d
        pseudo, extra = self.pseudo_labels(fast_output, slow_output)
        kept = pseudo.labels != IGNORE_INDEX
        loss = None
        if bool(kept.any()):
            loss = (masked_cross_entropy(fast_2d, pseudo.labels)
                    + masked_cross_entropy(fast_3d, pseudo.labels))
        return loss, {
            'kept_ratio': kept.float().mean(),
            # Medians: ζ reaches 1/eps where fast and slow agree, which swamps a mean.
            'zeta_2d': pseudo.zeta_2d.median(),
            'zeta_3d': pseudo.zeta_3d.median(),
            'weight_2d': pseudo.weight_2d.mean(),
            **extra,
        }

    def _predict(self, inputs: Any) -> Any:
        self.slow_model.eval()
        return self.slow_model(inputs)

    def prediction_models(self) -> Dict[str, nn.Module]:
        """Return the slow model: it alone predicts."""
        return {'slow_model': self.slow_model}

    def _reset_extra(self) -> None:
        super()._reset_extra()
        self.slow_model.load_state_dict(self._source_state)

    def _extra_state(self) -> Dict[str, Any]:
        state = super()._extra_state()
        state['slow_model'] = self.slow_model.state_dict()
        return state

    def _load_extra(self, state: Dict[str, Any]) -> None:
        super()._load_extra(state)
        self.slow_model.load_state_dict(state['slow_model'])
