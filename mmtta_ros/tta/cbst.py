"""
CBST (Zou et al., ECCV 2018) online: class-balanced pseudo-labels on MM-TTA's fast/slow pair.

CBST gives each class c its own confidence threshold k_c, the confidence at the top p % of
the points predicted as c, so that a class the model is unsure of (a rare one, or one the
shift hurts most) keeps as large a share of its points as a confident one; a point gets
the label argmax_c p_c / k_c where that ratio is >= 1, else none. Offline, k_c comes from
a pass over the target set each round and p grows from round to round (20 % -> 50 %,
+5 %). Online there is no dataset pass: k_c is a running per-class quantile, read off a
per-class histogram of confidences (a fixed number of bins, decayed each step, so memory
is <C, bins> whatever the stream's length), and p grows per step.

The bins are uniform in u = -log(1 - confidence), not in the confidence: a confident
class piles its points close to 1, where bins uniform over [0, 1] cannot tell its top
20 % from its top 50 %; on the log scale every bin is the same relative step of
1 - confidence. The quantile is the stream's, so one frame's share of a class above k_c
varies around p (validation, one stream, p = 0.3-0.45: 17-83 % per class and frame).
"""

import math
from typing import Annotated, Any, Dict, Literal, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta.base import Rate
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.hyper import Range
from mmtta_ros.tta.mmtta import MMTTA, PseudoLabels

# Top of the histogram's u = -log(1 - confidence) scale: confidences above 1 - 1e-6
# share the last bin (float32 resolves 1 - confidence to ~6e-8, 1e-6 to a few per cent).
MAX_LOG_DOUBT = math.log(1e6)


@torch.no_grad()
def confidence_bins(probs: torch.Tensor, bins: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return (<int64: M> argmax class, <int64: M> bin of its confidence) of `probs` <M, C>.

    Bin floor(u / MAX_LOG_DOUBT · bins), clamped to the last, u = -log(1 - max prob).
    1 - max prob is summed from the other classes' probabilities, not subtracted from 1,
    so it keeps its precision when the confidence is within float32's step of 1.
    """
    confidence, predicted = probs.max(dim=1)
    doubt = probs.scatter(1, predicted[:, None], 0.0).sum(dim=1)
    log_doubt = -torch.log(doubt.clamp_min(torch.finfo(probs.dtype).tiny))
    bin_index = torch.floor(log_doubt * (bins / MAX_LOG_DOUBT)).long().clamp(0, bins - 1)
    return predicted, bin_index


def bin_confidence(bin_index: torch.Tensor, bins: int) -> torch.Tensor:
    """Return <float32> the confidence at the lower edge of bins `bin_index` (1 - e^-u)."""
    return -torch.expm1(-bin_index.to(torch.float64) * (MAX_LOG_DOUBT / bins)).float()


@torch.no_grad()
def update_confidence_histogram(histogram: torch.Tensor, probs: torch.Tensor,
                                decay: float) -> torch.Tensor:
    """
    Return <float64: C, B> decay · histogram + this batch's counts per (class, confidence bin).

    histogram: <float64: C, B> (new_confidence_histogram to start)
    probs:     <float32: M, C> class probabilities; a point counts for its argmax class,
               in the bin of its confidence (confidence_bins)
    """
    num_classes, bins = histogram.shape
    if probs.dim() != 2 or probs.shape[1] != num_classes:
        raise ValueError(f'probs {tuple(probs.shape)} must be (M, {num_classes}) for a '
                         f'histogram of {num_classes} classes')
    predicted, bin_index = confidence_bins(probs, bins)
    counts = torch.bincount(predicted * bins + bin_index, minlength=num_classes * bins)
    return histogram * decay + counts.reshape(num_classes, bins).to(histogram.dtype)


def new_confidence_histogram(num_classes: int, bins: int,
                             device: Optional[torch.device] = None) -> torch.Tensor:
    """Return an empty <float64: num_classes, bins> confidence histogram."""
    return torch.zeros(num_classes, bins, dtype=torch.float64, device=device)


@torch.no_grad()
def class_thresholds(histogram: torch.Tensor, portion: float) -> torch.Tensor:
    """
    Return <float32: C> k_c: the confidence above which the top `portion` of class c lies.

    Read off the histogram <C, B>: the lower edge (bin_confidence) of the highest bin b
    whose tail (mass in bins >= b) holds at least portion · (mass of class c), so at
    least that share of the class clears k_c (more by up to one bin's mass). k_c is at
    least 1/C, the lowest confidence a top class can have. A class with no mass has
    k_c = inf: it gets no pseudo-label until the model predicts it somewhere.
    """
    if not 0.0 < portion <= 1.0:
        raise ValueError(f'portion must be in (0, 1], got {portion}')
    num_classes, bins = histogram.shape
    tail = histogram.flip(1).cumsum(1).flip(1)
    total = tail[:, 0]
    # The tail shrinks as b grows: the bins that hold enough are 0 .. b*, a prefix.
    highest = (tail >= portion * total[:, None]).sum(dim=1) - 1
    thresholds = bin_confidence(highest, bins).clamp_min(1.0 / num_classes)
    return torch.where(total > 0, thresholds, torch.full_like(thresholds, float('inf')))


@torch.no_grad()
def class_balanced_labels(probs: torch.Tensor, thresholds: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return (<int64: M> labels, <float32: M> best ratio): argmax_c p_c / k_c, or IGNORE_INDEX.

    probs: <float32: M, C>; thresholds: <float32: C> k_c (inf: class never predicted).
    A point keeps its label where max_c p_c / k_c >= 1: it is in the top portion of some
    class, the one where it stands highest relative to that class's threshold.
    """
    ratio = probs / thresholds[None, :]
    best_ratio, labels = ratio.max(dim=1)
    labels = labels.masked_fill(best_ratio < 1.0, IGNORE_INDEX)
    return labels, best_ratio


class CBST(MMTTA):
    """
    MM-TTA (fast/slow pair, Intra-PG, Inter-PR) with CBST's class-balanced label selection.

    A subclass of MMTTA: everything but the pseudo-labels is MM-TTA's. Per step, the
    distribution Inter-PR labels by (w2D·p2D + w3D·p3D, PseudoLabels.probs) goes into the
    per-class confidence histogram, k_c are read off it at the current portion p, and a
    point's label is argmax_c p_c / k_c where that is >= 1 AND MM-TTA's consistency
    threshold keeps the point: the two filters catch different errors (fast and slow
    disagree; the point is weak for its class), so a label must pass both (MM-TTA's
    threshold 0.3 keeps every point on validation; CBST keeps 49 %).
    What it does not do here: give the rare classes more labels. A class gets a threshold
    only once it is the fused argmax somewhere, and terrain seldom is (validation, one
    stream, 60 frames: terrain labeled in 16 frames, MM-TTA at the same rates 31;
    the driveable surface took 53 % of the labels, MM-TTA's 47 %). Its gain there comes
    with dropping about half of the points, each class's weaker ones.

    portion:       p at the start (after a reset), share of each class's points kept
                   (CBST: 0.2)
    portion_growth: p grows by this much per step (CBST: +0.05 per round)
    portion_max:   p stops growing here (CBST: 0.5)
    histogram_bins: bins of the per-class confidence histogram (k_c resolution: 1000
                   bins step 1 - k_c by 1.4 %)
    histogram_decay: share of the histogram kept per step (1: the whole stream since the
                   last reset; 0.99: the last ~100 steps dominate)
    momentum:      λ of MM-TTA's slow model (Eq. 6); 0.9, the node's MM-TTA setting
                   chosen on the validation shift
    lr_2d, lr_3d:  AdamW (2D) / Adam (3D) learning rates of the batch-norm affine
                   parameters: 6e-4 / 1e-2, 100x / 10x MM-TTA's (Latte's), chosen on the
                   validation shift (with MM-TTA's own labels that step gives 53.5, with
                   CBST's 54.7; at MM-TTA's rates CBST gives 53.7)
    Validation (night_harsh, 2 checkpoints x 3 streams, mean 2D+3D mIoU): 54.7 with these
    defaults (histogram_decay 0.9: 54.7; MM-TTA's rates: 53.7); node default MM-TTA 53.7,
    bn_stats 52.3. Per frame about 1 % over MM-TTA (interleaved, one core).
    """

    name = 'cbst'

    def __init__(self, model: nn.Module, *,
                 portion: Annotated[float, Range(0.001, 1.0)] = 0.2,
                 portion_growth: Annotated[float, Range(0.0, 1.0)] = 0.005,
                 portion_max: Annotated[float, Range(0.001, 1.0)] = 0.5,
                 histogram_bins: Annotated[int, Range(2, 100000)] = 1000,
                 histogram_decay: Annotated[float, Range(0.0, 1.0)] = 0.99,
                 momentum: Annotated[float, Range(0.0, 1.0)] = 0.9,
                 ema_targets: Literal['affine', 'stats', 'both'] = 'both',
                 selection: Literal['hard', 'soft'] = 'soft',
                 threshold: Annotated[float, Range(0.0, 1e6)] = 0.3,
                 eps: Annotated[float, Range(1e-12, 1.0)] = 1e-6,
                 lr_2d: Rate = 6e-4, lr_3d: Rate = 1e-2,
                 weight_decay_2d: Rate = 0.0, predict_before_update: bool = True,
                 collapse_guard: Optional[CollapseGuard] = None):
        if not 0.0 < portion <= portion_max <= 1.0:
            raise ValueError(f'{self.name}: need 0 < portion <= portion_max <= 1, got '
                             f'{portion}, {portion_max}')
        if portion_growth < 0.0 or not 0.0 <= histogram_decay <= 1.0:
            raise ValueError(f'{self.name}: need portion_growth >= 0 and histogram_decay in '
                             f'[0, 1], got {portion_growth}, {histogram_decay}')
        if int(histogram_bins) != histogram_bins or histogram_bins < 2:
            raise ValueError(f'{self.name}: histogram_bins must be an integer >= 2, got '
                             f'{histogram_bins}')
        self.portion = float(portion)
        self.portion_growth = float(portion_growth)
        self.portion_max = float(portion_max)
        self.histogram_bins = int(histogram_bins)
        self.histogram_decay = float(histogram_decay)
        # <float64: C, bins>; allocated at the first step, when C is known.
        self.confidence_histogram: Optional[torch.Tensor] = None
        super().__init__(model, momentum=momentum, ema_targets=ema_targets,
                         selection=selection, threshold=threshold, eps=eps, lr_2d=lr_2d,
                         lr_3d=lr_3d, weight_decay_2d=weight_decay_2d,
                         predict_before_update=predict_before_update,
                         collapse_guard=collapse_guard)

    def current_portion(self) -> float:
        """Return p of this step: portion + portion_growth · (steps since reset), capped."""
        return min(self.portion_max,
                   self.portion + self.portion_growth * self.steps_since_reset)

    @torch.no_grad()
    def pseudo_labels(self, fast_output: Any, slow_output: Any
                      ) -> Tuple[PseudoLabels, Dict[str, Any]]:
        """Return MM-TTA's pseudo-labels re-selected class by class (see the class doc)."""
        pseudo, extra = super().pseudo_labels(fast_output, slow_output)
        if self.confidence_histogram is None:
            self.confidence_histogram = new_confidence_histogram(
                pseudo.probs.shape[1], self.histogram_bins, pseudo.probs.device)
        # This batch counts before its thresholds are read: the first step has its own
        # per-class quantiles instead of none.
        self.confidence_histogram = update_confidence_histogram(
            self.confidence_histogram, pseudo.probs, self.histogram_decay)
        portion = self.current_portion()
        thresholds = class_thresholds(self.confidence_histogram, portion)
        balanced, _ = class_balanced_labels(pseudo.probs, thresholds)
        consistent = pseudo.labels != IGNORE_INDEX
        labels = torch.where(consistent, balanced, torch.full_like(balanced, IGNORE_INDEX))
        kept = labels[labels != IGNORE_INDEX]
        extra.update({
            'portion': portion,
            'consistent_ratio': consistent.float().mean(),
            # How many classes get any pseudo-label this step: what CBST is for.
            'labeled_classes': torch.unique(kept).numel(),
            'relabeled_ratio': ((labels != pseudo.labels) & (labels != IGNORE_INDEX)
                                ).float().mean(),
        })
        pseudo.labels = labels
        return pseudo, extra

    def _reset_extra(self) -> None:
        super()._reset_extra()
        self.confidence_histogram = None

    def _extra_state(self) -> Dict[str, Any]:
        state = super()._extra_state()
        state['confidence_histogram'] = self.confidence_histogram
        return state

    def _load_extra(self, state: Dict[str, Any]) -> None:
        super()._load_extra(state)
        histogram = state['confidence_histogram']
        if histogram is not None and histogram.shape[1] != self.histogram_bins:
            raise ValueError(f'{self.name}: the saved confidence histogram has '
                             f'{histogram.shape[1]} bins, this method {self.histogram_bins}: '
                             f'build it with histogram_bins={histogram.shape[1]}')
        self.confidence_histogram = None if histogram is None else histogram.clone()
