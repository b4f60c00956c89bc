"""
Test-time adaptation methods behind one interface: source, bn_stats, tent, ..., mmtta.

    method = build_method('mmtta', model, selection='soft')
    prediction = method.step(inputs)   # adapt on the last N frames, predict them
    method.stats, method.reset(), method.save_state(path), method.load_state(path)
"""

from mmtta_ros.tta.base import AdaptationMethod, NormAdaptationMethod, Prediction
from mmtta_ros.tta.guard import CollapseGuard
from mmtta_ros.tta.registry import build_method, METHODS

__all__ = [
    'AdaptationMethod', 'build_method', 'CollapseGuard', 'METHODS',
    'NormAdaptationMethod', 'Prediction',
]
