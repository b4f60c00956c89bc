"""Saving and resuming the adapted state by the node's state.* parameters (ROS-free)."""

import time
from typing import Optional

from mmtta_ros.core.params import StateParams
from mmtta_ros.core.pipeline import Pipeline


class StateKeeper:
    """Resume at start, save on request, periodically and at shutdown, as the parameters say."""

    def __init__(self, pipeline: Pipeline, params: StateParams):
        self.pipeline = pipeline
        self.params = params
        self._last_save = time.monotonic()

    def resume(self) -> Optional[str]:
        """Load the saved state if load_on_start asks for it; return what happened, or None."""
        path = self.params.save_path
        if not (self.params.load_on_start and path):
            return None
        try:
            self.pipeline.load_state(path)
        except FileNotFoundError:
            return f'no saved state at {path} yet: starting from source'
        return f'resumed adapted state from {path}'

    def save(self) -> str:
        """Save atomically to save_path (ValueError if unset, OSError/RuntimeError if it fails)."""
        path = self.params.save_path
        # Counted as attempted either way: a failing disk is retried a period later, not
        # every second.
        self._last_save = time.monotonic()
        if not path:
            raise ValueError('state.save_path is empty: nowhere to save')
        self.pipeline.save_state(path)
        return f'adapted state saved to {path}'

    def periodic_save_due(self) -> bool:
        """Return whether save_period has passed since the last save (0: never due)."""
        return (self.params.save_period_s > 0 and bool(self.params.save_path)
                and time.monotonic() - self._last_save >= self.params.save_period_s)

    @property
    def save_at_shutdown(self) -> bool:
        """Return whether shutdown should save."""
        return self.params.save_on_shutdown and bool(self.params.save_path)
