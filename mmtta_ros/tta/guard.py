"""
Collapse guard: watch the predictions step by step and call for a reset when they degenerate.

Naive test-time adaptation can drift into negative transfer (TENT hurts the 2D+3D
ensemble on nuScenes day→night). The symptoms are measurable per step: one class taking
nearly every point, or the mean entropy climbing past what the source model shows.
"""

import math
from typing import Optional


class CollapseGuard:
    """
    Call for a reset when a collapse symptom holds for `patience` consecutive steps.

    max_dominant_fraction: reset when the most predicted class takes more than this
        fraction of the batch's points (0..1); None disables the check. Pick it above what
        the scene itself shows: drivable surface alone can be 40-50% of the camera's points.
    max_entropy: reset when the mean per-point entropy of the prediction (nats, at most
        ln C) exceeds this; None disables the check.
    patience: consecutive steps a symptom must hold (>= 1).
    A non-finite entropy (NaN / inf logits) calls for a reset at once.
    """

    def __init__(self, *, max_dominant_fraction: Optional[float] = 0.95,
                 max_entropy: Optional[float] = None, patience: int = 10):
        if max_dominant_fraction is not None and not 0.0 < max_dominant_fraction <= 1.0:
            raise ValueError('max_dominant_fraction must be in (0, 1], '
                             f'got {max_dominant_fraction}')
        if max_entropy is not None and not max_entropy > 0.0:
            raise ValueError(f'max_entropy must be > 0 nats, got {max_entropy}')
        if int(patience) < 1:
            raise ValueError(f'patience must be >= 1 step, got {patience}')
        self.max_dominant_fraction = max_dominant_fraction
        self.max_entropy = max_entropy
        self.patience = int(patience)
        self.dominant_steps = 0
        self.entropy_steps = 0

    def update(self, *, entropy: float, dominant_fraction: float) -> Optional[str]:
        """Record one step's measurements; return why to reset, or None to carry on."""
        if not math.isfinite(entropy):
            self.reset()
            return f'non-finite prediction (mean entropy {entropy})'
        dominant = (self.max_dominant_fraction is not None
                    and dominant_fraction > self.max_dominant_fraction)
        uncertain = self.max_entropy is not None and entropy > self.max_entropy
        self.dominant_steps = self.dominant_steps + 1 if dominant else 0
        self.entropy_steps = self.entropy_steps + 1 if uncertain else 0
        reason = None
        if self.dominant_steps >= self.patience:
            reason = (f'one class took {dominant_fraction:.1%} of the points (> '
                      f'{self.max_dominant_fraction:.1%}) for {self.dominant_steps} steps')
        elif self.entropy_steps >= self.patience:
            reason = (f'mean entropy {entropy:.3f} nats above {self.max_entropy:.3f} '
                      f'for {self.entropy_steps} steps')
        if reason is not None:
            self.reset()
        return reason

    def reset(self) -> None:
        """Forget the consecutive-step counts."""
        self.dominant_steps = 0
        self.entropy_steps = 0

    def state_dict(self) -> dict:
        """Return the counters, plain ints."""
        return {'dominant_steps': self.dominant_steps, 'entropy_steps': self.entropy_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters saved by state_dict."""
        self.dominant_steps = int(state['dominant_steps'])
        self.entropy_steps = int(state['entropy_steps'])
