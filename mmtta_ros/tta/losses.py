"""
Losses and divergences the adaptation methods compose, on per-point logits <float32: M, C>.

All reductions are means over points; class dimension 1. Functions that return one value
per point say so (<M>).
"""

import math

import torch
import torch.nn.functional as F

from mmtta_ros.core.classes import IGNORE_INDEX


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Return <M> entropy (nats) of softmax(logits) per point."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def ensemble_log_probs(logits_2d: torch.Tensor, logits_3d: torch.Tensor) -> torch.Tensor:
    """Return <M, C> log of the 2D+3D ensemble, the mean of the two softmaxes."""
    both = torch.stack((F.log_softmax(logits_2d, dim=1), F.log_softmax(logits_3d, dim=1)))
    # logsumexp keeps the log of a mean of probabilities finite and exact.
    return torch.logsumexp(both, dim=0) - math.log(2.0)


def ensemble_entropy(logits_2d: torch.Tensor, logits_3d: torch.Tensor) -> torch.Tensor:
    """Return <M> entropy (nats) of the 2D+3D ensemble (mean of the softmaxes) per point."""
    log_probs = ensemble_log_probs(logits_2d, logits_3d)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Return <M> KL(p || q) per point, p = softmax(logits_p), q = softmax(logits_q)."""
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def cross_modal_consistency(logits_2d: torch.Tensor, logits_3d: torch.Tensor) -> torch.Tensor:
    """
    Return the xMUDA cross-modal loss KL(p3D' || p2D) + KL(p2D' || p3D), means over points.

    ' marks a detached prediction: each branch learns to mimic the other, never the reverse.
    """
    mimic_3d = kl_divergence(logits_3d.detach(), logits_2d).mean()
    mimic_2d = kl_divergence(logits_2d.detach(), logits_3d).mean()
    return mimic_3d + mimic_2d


def inverse_kl_similarity(logits_x: torch.Tensor, logits_y: torch.Tensor,
                          eps: float = 1e-6) -> torch.Tensor:
    """
    Return <M> Sim(x, y) = ½·(1 / (KL(x || y) + ε) + 1 / (KL(y || x) + ε)) per point.

    The MM-TTA consistency of two predictions of one point (x, y = their softmaxes):
    large when they agree, at most 1/ε. KL is clamped at 0 so that rounding cannot make
    the denominator vanish or turn negative.
    """
    kl_xy = kl_divergence(logits_x, logits_y).clamp_min(0.0)
    kl_yx = kl_divergence(logits_y, logits_x).clamp_min(0.0)
    return 0.5 * (1.0 / (kl_xy + eps) + 1.0 / (kl_yx + eps))


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """
    Return the cross-entropy of `logits` <M, C> against `labels` <int64: M>, mean over kept points.

    Points labeled `ignore_index` do not count; with no kept point the loss is 0 (still
    attached to the graph) rather than torch's 0/0 = NaN.
    """
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction='sum')
    kept = (labels != ignore_index).sum().clamp_min(1)
    return total / kept
