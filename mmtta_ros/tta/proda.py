"""
ProDA (Zhang et al., CVPR 2021) online: prototypical pseudo-label denoising on MM-TTA's pair.

ProDA keeps a feature prototype η_c per class (a momentum mean of the momentum encoder's
features of the points pseudo-labelled c) and rectifies each point's soft prediction p by
its distances to them: ω_c = softmax_c(-||f - η_c|| / τ), label argmax_c(ω_c · p_c). A
point whose features sit with another class's points is pulled to that class, one whose
prediction and features agree keeps its label. Here it runs per modality (2D features
re-weight the 2D prediction, 3D features the 3D one) on MM-TTA's Intra-PG probabilities,
before Inter-PR fuses the modalities; f is the slow model's (MM-TTA's momentum model)
per-point feature, the input of its classifier.

On validation (one stream) the prototypes change 7-8 % of the 2D and about 1 % of the 3D
Intra-PG argmaxes per frame in the first frames; sidewalk, which the source 2D branch
never predicted there, gets 2.6 % of the labels (MM-TTA at the same rates: 1.2 %).

Not ported: ProDA's structure-learning consistency (KL between the prototype assignments
of a weakly and a strongly augmented view) needs an augmented forward and backward pass
of the fast model per step, on top of the three passes a step makes now (slow forward,
fast forward and backward), for +1.4 mIoU in the paper's ablation on top of denoising;
its self-distillation stages are offline retraining. Neither fits a per-frame online
budget that this method otherwise holds to within 2 % of MM-TTA's.
"""

from typing import Annotated, Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta.base import Rate
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.losses import inverse_kl_similarity
from mmtta_ros.tta.mmtta import MMTTA, PseudoLabels, refined_pseudo_labels

MODALITIES = ('2d', '3d')


@torch.no_grad()
def prototype_weights(features: torch.Tensor, prototypes: torch.Tensor, seen: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """
    Return <float32: M, C> ω: softmax over classes of -||f - η_c|| / τ; rows sum to 1.

    features:   <float32: M, D> per-point features f
    prototypes: <float32: C, D> class prototypes η_c (rows of unseen classes are unused)
    seen:       <bool: C> classes that have a prototype
    A class without a prototype gets 1/C, the weight of a uniform ω, so it neither wins
    nor loses by having none; the seen classes share the rest, S/C for S of them, by the
    softmax over their distances. No class seen: ω uniform, the prediction is unchanged.
    """
    num_classes = prototypes.shape[0]
    distances = torch.cdist(features, prototypes)
    logits = (-distances / temperature).masked_fill(~seen[None, :], float('-inf'))
    uniform = torch.full_like(distances, 1.0 / num_classes)
    if not bool(seen.any()):
        return uniform
    share_seen = seen.sum().to(features.dtype) / num_classes
    return torch.where(seen[None, :], share_seen * F.softmax(logits, dim=1), uniform)


@torch.no_grad()
def rectify(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return <float32: M, C> ω · p renormalised per point (argmax: ProDA's rectified label)."""
    weighted = weights * probs
    return weighted / weighted.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, seen: torch.Tensor, features: torch.Tensor,
                      labels: torch.Tensor, momentum: float
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return (<C, D> prototypes, <bool: C> seen) after one batch: η_c ← m·η_c + (1 - m)·mean.

    mean: the batch mean of `features` <M, D> over the points labelled c (`labels` <M>,
    IGNORE_INDEX points left out). A class seen for the first time starts at its batch
    mean; a class absent from the batch keeps its prototype.
    """
    kept = labels != IGNORE_INDEX
    labels, features = labels[kept], features[kept]
    num_classes = prototypes.shape[0]
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros_like(prototypes).index_add_(0, labels, features.to(prototypes.dtype))
    means = sums / counts.clamp_min(1)[:, None].to(prototypes.dtype)
    present = counts > 0
    followed = torch.where(seen[:, None], momentum * prototypes + (1.0 - momentum) * means,
                           means)
    return torch.where(present[:, None], followed, prototypes), seen | present


def point_features(output: Any, modality: str, method: str, num_points: int) -> torch.Tensor:
    """Return <float32: M, D> output.features_<modality>, or fail saying what is missing."""
    features = getattr(output, f'features_{modality}', None)
    if not torch.is_tensor(features) or features.dim() != 2 or features.shape[0] != num_points:
        shape = tuple(features.shape) if torch.is_tensor(features) else features
        raise ValueError(f'{method} needs per-point features: the model output must carry '
                         f'.features_{modality} of shape (M={num_points}, D) as '
                         f'SegmenterOutput does; got {shape}')
    return features


class ProDA(MMTTA):
    """
    MM-TTA (fast/slow pair, Intra-PG, Inter-PR) with ProDA's prototypical denoising.

    A subclass of MMTTA. Per step and modality m: ω_m from the slow model's features and
    the prototypes of the steps before (prototype_weights), p_m (Intra-PG) rectified to
    ω_m · p_m (renormalised); Inter-PR then weighs and thresholds the rectified
    predictions as MM-TTA does. After the labels, each modality's prototypes move toward
    the batch mean of the slow features of the points labelled c (update_prototypes).
    Initialisation: no prototype at all before the first step, so the first step's
    labels are MM-TTA's; each class's prototype starts at the mean of the first batch in
    which it is pseudo-labelled (ProDA computes them with a pass of the source model over
    the target set, which an online stream does not have).

    prototype_momentum: m of η_c ← m·η_c + (1 - m)·batch mean (ProDA: 0.9999 over a long
                   offline training; a stream of tens of frames needs far less)
    temperature:   τ of ω = softmax(-||f - η|| / τ) (ProDA: 1)
    momentum:      λ of MM-TTA's slow model (Eq. 6); 0.9, the node's MM-TTA setting
                   chosen on the validation shift
    lr_2d, lr_3d:  AdamW (2D) / Adam (3D) learning rates of the batch-norm affine
                   parameters: 6e-4 / 1e-2, 100x / 10x MM-TTA's (Latte's), chosen on the
                   validation shift (with MM-TTA's own labels that step gives 53.5, with
                   ProDA's 54.2; at MM-TTA's rates ProDA gives 53.8)
    Validation (night_harsh, 2 checkpoints x 3 streams, mean 2D+3D mIoU): 54.2 with these
    defaults (temperature 3: 54.0; MM-TTA's rates: 53.8); node default MM-TTA 53.7,
    bn_stats 52.3. Per frame about 2 % over MM-TTA (interleaved, one core).
    """

    name = 'proda'

    def __init__(self, model: nn.Module, *,
                 prototype_momentum: Annotated[float, Range(0.0, 1.0)] = 0.9,
                 temperature: Annotated[float, Range(1e-6, 1e6)] = 1.0,
                 momentum: Annotated[float, Range(0.0, 1.0)] = 0.9,
                 ema_targets: Literal['affine', 'stats', 'both'] = 'both',
                 selection: Literal['hard', 'soft'] = 'soft',
                 threshold: Annotated[float, Range(0.0, 1e6)] = 0.3,
                 eps: Annotated[float, Range(1e-12, 1.0)] = 1e-6,
                 lr_2d: Rate = 6e-4, lr_3d: Rate = 1e-2,
                 weight_decay_2d: Rate = 0.0, predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not 0.0 <= prototype_momentum <= 1.0 or not temperature > 0.0:
            raise ValueError(f'{self.name}: need prototype_momentum in [0, 1] and '
                             f'temperature > 0, got {prototype_momentum}, {temperature}')
        self.prototype_momentum = float(prototype_momentum)
        self.temperature = float(temperature)
        # Per modality: <float32: C, D> prototypes and <bool: C> which classes have one;
        # None until the first step, when C and D are known.
        self.prototypes: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(MODALITIES)
        self.prototype_seen: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(MODALITIES)
        super().__init__(model, momentum=momentum, ema_targets=ema_targets,
                         selection=selection, threshold=threshold, eps=eps, lr_2d=lr_2d,
                         lr_3d=lr_3d, weight_decay_2d=weight_decay_2d,
                         predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)

    @torch.no_grad()
    def pseudo_labels(self, fast_output: Any, slow_output: Any
                      ) -> Tuple[PseudoLabels, Dict[str, Any]]:
        """Return MM-TTA's pseudo-labels from prototype-rectified predictions (class doc)."""
        rectified, zeta, features, extra = {}, {}, {}, {}
        for modality in MODALITIES:
            fast = getattr(fast_output, f'logits_{modality}').detach()
            slow = getattr(slow_output, f'logits_{modality}')
            features[modality] = point_features(slow_output, modality, self.name,
                                                slow.shape[0])
            if self.prototypes[modality] is None:
                self.prototypes[modality] = torch.zeros(
                    slow.shape[1], features[modality].shape[1], device=slow.device)
                self.prototype_seen[modality] = torch.zeros(
                    slow.shape[1], dtype=torch.bool, device=slow.device)
            # Intra-PG and Sim exactly as mmtta_pseudo_labels.
            probs = F.softmax(0.5 * (fast + slow), dim=1)
            zeta[modality] = inverse_kl_similarity(fast, slow, self.eps)
            weights = prototype_weights(features[modality], self.prototypes[modality],
                                        self.prototype_seen[modality], self.temperature)
            rectified[modality] = rectify(probs, weights)
            extra[f'rectified_{modality}'] = (rectified[modality].argmax(dim=1)
                                              != probs.argmax(dim=1)).float().mean()
            extra[f'prototypes_{modality}'] = self.prototype_seen[modality].sum()
        pseudo = refined_pseudo_labels(rectified['2d'], rectified['3d'], zeta['2d'],
                                       zeta['3d'], selection=self.selection,
                                       threshold=self.threshold)
        for modality in MODALITIES:
            self.prototypes[modality], self.prototype_seen[modality] = update_prototypes(
                self.prototypes[modality], self.prototype_seen[modality],
                features[modality], pseudo.labels, self.prototype_momentum)
        return pseudo, extra

    def _reset_extra(self) -> None:
        super()._reset_extra()
        self.prototypes = dict.fromkeys(MODALITIES)
        self.prototype_seen = dict.fromkeys(MODALITIES)

    def _extra_state(self) -> Dict[str, Any]:
        state = super()._extra_state()
        state['prototypes'] = dict(self.prototypes)
        state['prototype_seen'] = dict(self.prototype_seen)
        return state

    def _load_extra(self, state: Dict[str, Any]) -> None:
        super()._load_extra(state)
        self.prototypes = {modality: None if tensor is None else tensor.clone()
                           for modality, tensor in state['prototypes'].items()}
        self.prototype_seen = {modality: None if tensor is None else tensor.clone()
                               for modality, tensor in state['prototype_seen'].items()}
