"""Momentum (EMA) update of a slow model's norm layers from a fast model (MM-TTA Eq. 6)."""

from typing import Tuple

import torch
from torch import nn

from mmtta_ros.tta.norm import AFFINE, norm_layers, STATISTICS

EMA_TARGETS = ('affine', 'stats', 'both')


def ema_tensor_names(targets: str) -> Tuple[str, ...]:
    """Return the norm-layer tensors an EMA over `targets` covers ('affine' | 'stats' | 'both')."""
    if targets == 'affine':
        return AFFINE
    if targets == 'stats':
        return STATISTICS
    if targets == 'both':
        return AFFINE + STATISTICS
    raise ValueError(f'ema_targets must be one of {EMA_TARGETS}, got {targets!r}')


@torch.no_grad()
def ema_update(slow: nn.Module, fast: nn.Module, momentum: float, targets: str = 'both') -> None:
    """
    Apply Ω_S(t) = (1 - λ)·Ω_F(t) + λ·Ω_S(t - 1) to the norm layers of `slow`, in place.

    λ = `momentum`. `targets` picks what Ω covers: the affine weight and bias ('affine'),
    the running mean and variance ('stats'), or both. num_batches_tracked is a counter,
    not a statistic, and is left alone. `slow` and `fast` must have the same norm layers
    (the slow model is a copy of the fast one).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f'EMA momentum must be in [0, 1], got {momentum}')
    names = ema_tensor_names(targets)
    fast_layers = dict(norm_layers(fast))
    slow_layers = norm_layers(slow)
    if [name for name, _ in slow_layers] != list(fast_layers):
        raise ValueError('slow and fast models have different norm layers; the slow model '
                         'must be a copy of the fast one')
    for layer_name, slow_layer in slow_layers:
        fast_layer = fast_layers[layer_name]
        for name in names:
            slow_tensor = getattr(slow_layer, name)
            fast_tensor = getattr(fast_layer, name)
            if slow_tensor is None or fast_tensor is None:
                continue  # affine=False or no running stats: nothing to average
            slow_tensor.mul_(momentum).add_(fast_tensor, alpha=1.0 - momentum)
