"""The online protocol's batch: the last N frames of the stream."""

from collections import deque
from typing import Deque, Generic, List, TypeVar

Item = TypeVar('Item')


class FrameWindow(Generic[Item]):
    """
    Hold the last `size` frames; the oldest drops out when a new one arrives.

    Frames arrive one at a time; each step adapts on the window ending with the newest
    frame, so a frame takes part in up to `size` consecutive steps. Memory stays flat.
    """

    def __init__(self, size: int):
        if int(size) < 1:
            raise ValueError(f'a frame window holds at least 1 frame, got size={size}')
        self.size = int(size)
        self._frames: Deque[Item] = deque(maxlen=self.size)

    def push(self, frame: Item) -> List[Item]:
        """Add the newest frame and return the window, oldest first."""
        self._frames.append(frame)
        return self.frames

    @property
    def frames(self) -> List[Item]:
        """Return the frames held, oldest first."""
        return list(self._frames)

    @property
    def full(self) -> bool:
        """Return whether the window holds `size` frames."""
        return len(self._frames) == self.size

    def clear(self) -> None:
        """Forget every frame (after a time jump: they belong to another stretch)."""
        self._frames.clear()

    def __len__(self) -> int:
        """Return the number of frames held."""
        return len(self._frames)
