"""
Saving and resuming the adapted state by the node's state.* parameters (ROS-free).

A state file that cannot be used at start (corrupt, hostile, another method's or another
model's) does not stop the node: it starts from the source model, as on a first start,
with a warning, and the file is moved aside to `<save_path>.rejected` so that the next
save neither destroys it nor trips over it again. A robot that restarts after a crash
keeps its perception; the operator keeps the evidence.
"""

import logging
import os
import time
from typing import Callable, Optional

from mmtta_ros.core.params import StateParams
from mmtta_ros.core.persist import remove_stale_temps
from mmtta_ros.core.pipeline import Pipeline

LOGGER = logging.getLogger(__name__)
REJECTED_SUFFIX = '.rejected'


class StateKeeper:
    """Resume at start, save on request, periodically and at shutdown, as the parameters say."""

    def __init__(self, pipeline: Pipeline, params: StateParams):
        self.pipeline = pipeline
        self.params = params
        self._last_save = time.monotonic()
        if params.save_path:
            # Saves killed midway (SIGKILL, power cut) leave their temporary files behind.
            remove_stale_temps(params.save_path)

    def resume(self, warn: Callable[[str], None] = LOGGER.warning) -> Optional[str]:
        """
        Load the saved state if load_on_start asks for it; return what happened, or None.

        An unusable file is reported through `warn`, moved aside, and the pipeline stays
        (or is put back) at the source model.
        """
        path = self.params.save_path
        if not (self.params.load_on_start and path):
            return None
        try:
            self.pipeline.load_state(path)
        except FileNotFoundError:
            return f'no saved state at {path} yet: starting from source'
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            # A half-applied state is no state at all: back to the source model.
            self.pipeline.reset()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ''
            aside = path + REJECTED_SUFFIX
            try:
                os.replace(path, aside)
                where = f'moved to {aside}'
            except OSError as move_error:
                where = f'left in place ({move_error.strerror})'
            warn(f'cannot resume from {path} ({type(error).__name__}: {reason}); starting '
                 f'from the source model, the file {where}')
            return None
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
