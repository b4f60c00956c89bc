"""
The one builder: parameters -> device, model, method with its guard, pipeline; and the pairing.

The node, `mmtta_evaluate`, the benchmarks, the demo and the tests all build here from the
same typed parameters (`core.params`), so nothing about the object graph differs between
what runs live and what is scored offline.
"""

import copy
import logging
from typing import Callable, Optional

import torch

from mmtta_ros.core.checkpoint import load_model_checkpoint
from mmtta_ros.core.pairing import ApproximateSynchronizer
from mmtta_ros.core.params import PipelineParams, SyncParams
from mmtta_ros.core.pipeline import Pipeline
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig, SegmenterInput
from mmtta_ros.tta import build_method, CollapseGuard, METHODS, NormAdaptationMethod
from mmtta_ros.tta.calibration import SourceCalibration
from mmtta_ros.tta.fallback import SourceFallback
from mmtta_ros.tta.source_branch import SourceBranch
from mmtta_ros.tta.supervision import LabelReplay

LOGGER = logging.getLogger(__name__)


def select_device(name: str = 'auto') -> torch.device:
    """Turn 'auto' | 'cuda' | 'cpu' into a torch.device; 'cuda' without a GPU is an error."""
    name = str(name).lower()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError('device cuda requested but torch sees no CUDA device; '
                             'use auto or cpu')
        return torch.device(name)
    if name == 'cpu':
        return torch.device('cpu')
    raise ValueError(f'unknown device {name!r}; use auto, cuda or cpu')


def configure_torch(device: str = 'auto', threads: int = 0) -> torch.device:
    """Set torch's CPU threads (0 keeps torch's default) and return the selected device."""
    if threads:
        torch.set_num_threads(int(threads))
    return select_device(device)


def build_model(params: PipelineParams, device: torch.device,
                warn: Callable[[str], None] = LOGGER.warning) -> torch.nn.Module:
    """Load the source model from the checkpoint (or build a random one, with a warning)."""
    model_params = params.model
    if model_params.checkpoint:
        model, config, _ = load_model_checkpoint(model_params.checkpoint, device)
        if config.num_classes != len(model_params.class_names):
            raise ValueError(
                f'{model_params.checkpoint} predicts {config.num_classes} classes but '
                f'classes.names lists {len(model_params.class_names)}')
        return model
    warn('model.checkpoint is empty: running a randomly initialised '
         f'{model_params.size} segmenter (labels will be meaningless)')
    config = SegmenterConfig(size=model_params.size,
                             num_classes=len(model_params.class_names))
    return build_segmenter(config).to(device)


def build_pipeline(params: PipelineParams, *, model: Optional[torch.nn.Module] = None,
                   warn: Callable[[str], None] = LOGGER.warning) -> Pipeline:
    """
    Build the pipeline the parameters describe.

    model: an already built source model to wrap instead of loading the checkpoint (tests,
    benchmarks with random weights); it is taken over and configured in place.
    """
    device = configure_torch(params.model.device, params.model.threads)
    if model is None:
        model = build_model(params, device, warn)
    adaptation = params.adaptation
    guard = None
    if adaptation.collapse_guard and adaptation.method != 'source':
        guard = CollapseGuard(max_dominant_fraction=adaptation.max_dominant_fraction,
                              patience=adaptation.patience)
    source_copy = None
    wrapped = adaptation.method != 'source' and (adaptation.fallback or adaptation.calibrate
                                                 or adaptation.source_branch != 'none')
    if wrapped:
        source_copy = copy.deepcopy(model)  # before the method configures the model
    method = build_method(adaptation.method, model, collapse_guard=guard,
                          **dict(adaptation.hyperparameters))
    labels = params.labels
    if labels.enabled:
        if not isinstance(method, NormAdaptationMethod):
            learners = [name for name, cls in METHODS.items()
                        if issubclass(cls, NormAdaptationMethod)]
            raise ValueError(f'labels.mode {labels.mode} needs a method that learns by '
                             f'gradient ({", ".join(learners)}); {adaptation.method} does not')
        method.use_supervision(LabelReplay(capacity=labels.replay_frames, lr_2d=labels.lr_2d,
                                           lr_3d=labels.lr_3d, input_type=SegmenterInput))
    if adaptation.fallback and source_copy is not None:
        method = SourceFallback(method, source_copy, margin=adaptation.fallback_margin,
                                smoothing=adaptation.fallback_smoothing)
    calibrated = [b for b in ('2d', '3d') if b != adaptation.source_branch]
    if adaptation.calibrate and source_copy is not None:
        # Inside the source branch: a branch taken from the source needs no calibration.
        method = SourceCalibration(method, source_copy, branches=calibrated)
    if adaptation.source_branch != 'none' and source_copy is not None:
        # The wrappers only read the frozen copy: one copy serves them all.
        method = SourceBranch(method, source_copy, branch=adaptation.source_branch)
    return Pipeline(method, device, batch_frames=adaptation.batch_frames,
                    min_depth=params.model.min_depth, image_size=params.model.image_size,
                    inputs=params.inputs, output=params.output,
                    precision=params.model.precision, keep_features=labels.mode == 'point')


def build_synchronizer(params: SyncParams, num_cameras: int = 1) -> ApproximateSynchronizer:
    """
    Return the pairing of images (input 0) with LiDAR sweeps (input 1).

    num_cameras > 1: the further cameras' images are inputs 2, 3, ...: a set holds one
    message of every camera and the sweep.
    """
    return ApproximateSynchronizer(
        num_inputs=1 + int(num_cameras), slop_ns=int(round(params.slop_s * 1e9)),
        queue_size=params.queue_size,
        clock_jump_ns=int(round(params.time_jump_s * 1e9)),
        period_fraction=params.period_fraction)
