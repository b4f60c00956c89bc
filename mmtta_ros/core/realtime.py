"""
Predict and adapt apart: every frame labeled at inference cost, adaptation behind it.

A predictor (a copy of the method) labels each frame with `predict` as soon as it comes;
an adapter (the method itself) adapts on the frames it is handed, at its own pace, and
after each step passes the tensors the prediction depends on (`prediction_state`) over.
The predictor loads the newest of them between two frames, never during one, so a label
never mixes two states and no lock is held across a forward. When the adapter keeps up
(every frame adapted before the next is predicted) each frame is predicted by the state
before its own update, as in the paper's protocol; the reusable parts that decide per
frame (the source fallback, the calibration) then decide with the previous frame's
figures (`labels_apart`), and `NodeProtocol` scores exactly that offline.
"""

import copy
import os
import threading
from typing import Any, Dict, Optional

import torch

from mmtta_ros.core.frame import Frame
from mmtta_ros.core.persist import PathLike
from mmtta_ros.core.pipeline import FrameOutput, Pipeline


def lower_thread_priority(increment: int) -> Optional[str]:
    """
    Raise the calling thread's niceness by `increment` (Linux: per thread); None if done.

    The adapter runs behind the predictor: on a CPU with fewer cores than busy threads
    (the predictor, the executor, a bag player) the scheduler then gives the labeling
    threads the cores first and the adapter what is left. Where the OS cannot set one
    thread's priority, the reason is returned and nothing changes.
    """
    if increment <= 0:
        return None
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread,
                       min(os.getpriority(os.PRIO_PROCESS, thread) + increment, 19))
    except (AttributeError, OSError) as error:  # no per-thread priority here
        return f'adapter thread priority unchanged: {error}'
    return None


def split_threads(threads: int, device: torch.device,
                  cpu_count: Optional[int] = None) -> Optional[int]:
    """
    Return the torch CPU threads for a split node, or None to leave them as they are.

    `threads` 0 (torch's default: every core for each forward) on a CPU gives half the
    cores: the predictor and the adapter run at once, and two forwards each spreading
    over every core slow each other down (measured on 2 cores: one thread each labeled 85
    pairs of the demo bag, two threads each 49). A set `threads` is kept; a GPU needs none.
    The cores are those this process may run on (its affinity: a container's share).
    """
    if threads or device.type != 'cpu':
        return None
    if cpu_count is None:
        cpu_count = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                     else os.cpu_count()) or 2
    return max(1, cpu_count // 2)


def configure_split_threads(threads: int, device: torch.device) -> Optional[int]:
    """
    Set torch's CPU threads for a split node (split_threads); return what they were.

    None where nothing was set. The value returned goes back with torch.set_num_threads
    when the node lets go of its pipeline (torch's threads are the whole process's).
    """
    chosen = split_threads(threads, device)
    if chosen is None:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(chosen)
    return before


def torch_threads() -> int:
    """Return torch's CPU threads now."""
    return torch.get_num_threads()


def restore_threads(before: Optional[int]) -> None:
    """Give torch back the threads configure_split_threads found (None: nothing to do)."""
    if before is not None:
        torch.set_num_threads(before)


class SplitPipeline:
    """A predictor pipeline and an adapter pipeline that share the adapted state."""

    def __init__(self, adapter: Pipeline):
        self.adapter = adapter
        self.predictor = Pipeline(
            copy.deepcopy(adapter.method), adapter.device, min_depth=adapter.min_depth,
            image_size=adapter.image_size, inputs=adapter.inputs, output=adapter.output,
            keep_features=adapter.keep_features)
        self._exchange = threading.Lock()
        self._pending: Optional[Dict[str, torch.Tensor]] = None
        # Bumped by reset: a state taken before a reset is never handed over after it.
        self._generation = 0
        self.published = 0  # prediction states the adapter handed over
        self.loaded = 0     # of them loaded by the predictor (older ones are skipped)

    @property
    def method_name(self) -> str:
        """Return the adaptation method's registry name."""
        return self.adapter.method_name

    @property
    def output(self):
        """Return the output settings (shared by both sides)."""
        return self.predictor.output

    def set_output(self, **changes) -> None:
        """Change output settings at run time."""
        self.predictor.set_output(**changes)
        self.adapter.set_output(**changes)

    def frame_from_messages(self, *args, **kwargs) -> Frame:
        """Decode a matched set (see Pipeline.frame_from_messages)."""
        return self.predictor.frame_from_messages(*args, **kwargs)

    def camera_view_from_messages(self, *args, **kwargs):
        """Decode a further camera's image (see Pipeline.camera_view_from_messages)."""
        return self.predictor.camera_view_from_messages(*args, **kwargs)

    def predict(self, frame: Frame) -> FrameOutput:
        """Label a frame with the newest adapted state handed over; adapt nothing."""
        with self._exchange:
            state, self._pending = self._pending, None
        if state is not None:
            self.predictor.load_prediction_state(state)
            self.loaded += 1
        return self.predictor.predict(frame)

    def adapt(self, frame: Frame) -> dict:
        """Adapt on a frame (the adapter's thread); hand the new state over; return stats."""
        output = self.adapter.process(frame)
        self._publish()
        return output.stats

    def add_supervision(self, frame: Frame, point_index, labels) -> None:
        """Queue answered labels for the adapter (Pipeline.add_supervision)."""
        self.adapter.add_supervision(frame, point_index, labels)

    def _publish(self) -> None:
        with self._exchange:
            generation = self._generation
        state = self.adapter.prediction_state()
        with self._exchange:
            if generation != self._generation:
                return  # reset while the state was taken: it is the old one
            self._pending = state
            self.published += 1

    def reset(self) -> None:
        """Both sides back to the source model."""
        # Before and after: a hand-over that read the generation in between may have
        # taken the state just before the adapter's reset.
        for reset in (self.adapter.reset, self.predictor.reset):
            with self._exchange:
                self._generation += 1
                self._pending = None
            reset()

    def reset_window(self) -> None:
        """Forget the adapter's buffered frames."""
        self.adapter.reset_window()

    def save_state(self, path: PathLike) -> None:
        """Write the adapter's state (the adapted one) atomically."""
        self.adapter.save_state(path)

    def load_state(self, path: PathLike) -> None:
        """Restore an adapted state and hand it to the predictor."""
        self.adapter.load_state(path)
        self._publish()

    @property
    def method(self):
        """Return the adapter's adaptation method: the adapted state lives there."""
        return self.adapter.method

    @property
    def device(self) -> torch.device:
        """Return the device both sides run on."""
        return self.adapter.device


def splits(params) -> bool:
    """Return whether the node (NodeParams `params`) predicts and adapts apart."""
    return params.split and params.pipeline.adaptation.method != 'source'


def labels_apart(params) -> bool:
    """
    Return whether the node (NodeParams `params`) labels otherwise than the paper's protocol.

    With worker.split the predictor labels each frame with the state of the adapter's
    last step. That is the paper's protocol (predict, then adapt, each frame) unless the
    adapter skips frames (adapt_every > 1), or a reusable part decides per frame: the
    source fallback picks the source or the adapted prediction with the agreements up to
    the previous frame (its step counts the frame itself), and the calibration uses the
    source confidence of the adapter's last frame, not its own (tta/calibration.py).
    Source-only adapts nothing and never splits.
    """
    adaptation = params.pipeline.adaptation
    return splits(params) and bool(params.adapt_every > 1 or adaptation.calibrate
                                   or adaptation.fallback)


class NodeProtocol:
    """
    The node's split protocol offline, made deterministic: the scorers run what it runs.

    Every frame is labeled by the predictor with the newest state handed over; every
    adapt_every-th labeled frame is then adapted on, before the next frame comes (an
    adapter that keeps up; the live node's adapter may fall further behind).
    """

    def __init__(self, pipeline: Pipeline, adapt_every: int = 1):
        self.split = SplitPipeline(pipeline)
        self.adapt_every = adapt_every
        self._labeled = 0

    def process(self, frame: Frame) -> FrameOutput:
        """Label the frame (SensorDataError if it cannot be used), then adapt on it if due."""
        output = self.split.predict(frame)
        if self._labeled % self.adapt_every == 0:
            output.stats = self.split.adapt(frame)
        self._labeled += 1
        return output

    def reset(self) -> None:
        """Both sides back to the source model; the count starts again."""
        self.split.reset()
        self._labeled = 0

    def __getattr__(self, name: str):
        # Everything else (the method, output settings, supervision) as the split has it.
        if name == 'split':
            raise AttributeError(name)
        return getattr(self.split, name)


def node_protocol(pipeline: Pipeline, params) -> Any:
    """Return what labels frames as the node with NodeParams `params` does, offline."""
    return NodeProtocol(pipeline, params.adapt_every) if labels_apart(params) else pipeline
