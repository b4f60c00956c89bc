"""
Source training of the dual-branch segmenter on labeled frames (xMUDA source-only recipe).

Loss: CE(2D logits) + CE(3D logits) over in-view labeled points. Augmentation as xMUDA
does it, per branch: the image is flipped and colour-jittered (pixels follow the flip),
the 3D points are flipped and rotated about z; point-pixel correspondences are unchanged.
"""

from dataclasses import dataclass
import math
from pathlib import Path
import random
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmtta_ros.core.checkpoint import save_model_checkpoint
from mmtta_ros.core.persist import load_weights_only
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.frame import Frame
from mmtta_ros.models.segmenter import (
    build_segmenter, DualBranchSegmenter, SegmenterConfig, SegmenterInput)
from mmtta_ros.core.batching import frames_to_input


@dataclass
class TrainConfig:
    """Source-training hyperparameters (plain values, from the CLI or YAML)."""

    steps: int = 600
    batch_frames: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 100
    color_jitter: float = 0.4      # brightness / contrast / saturation range, as xMUDA
    flip_probability: float = 0.5
    min_depth: float = 1.0


def augment(inputs: SegmenterInput, config: TrainConfig, generator: torch.Generator
            ) -> SegmenterInput:
    """Return an augmented copy: per-image flip + colour jitter, per-frame 3D flip + z rotation."""
    images = inputs.images.clone()
    pixels = inputs.pixels.clone()
    points = inputs.points.clone()
    batch_size, _, _, width = images.shape
    for b in range(batch_size):  # a loop over frames (a handful), never over points
        in_frame = inputs.batch_index == b
        if torch.rand((), generator=generator) < config.flip_probability:
            images[b] = images[b].flip(-1)
            pixels[in_frame, 0] = width - 1 - pixels[in_frame, 0]
        if config.color_jitter > 0:
            low, high = 1 - config.color_jitter, 1 + config.color_jitter
            brightness, contrast, saturation = (
                low + (high - low) * torch.rand(3, generator=generator)).tolist()
            image = images[b] * brightness
            mean = image.mean()
            image = (image - mean) * contrast + mean
            gray = image.mean(0, keepdim=True)
            images[b] = ((image - gray) * saturation + gray).clamp(0, 1)
        angle = float(torch.rand((), generator=generator)) * 2 * math.pi
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]],
                                dtype=points.dtype, device=points.device)
        if torch.rand((), generator=generator) < config.flip_probability:
            rotation = rotation @ torch.diag(torch.tensor([1.0, -1.0, 1.0], device=points.device))
        points[in_frame] = points[in_frame] @ rotation.T
    return SegmenterInput(images=images, pixels=pixels, batch_index=inputs.batch_index,
                          points=points)


def _labels_in_view(frames: Sequence[Frame], in_view_masks, device) -> torch.Tensor:
    labels = [np.asarray(f.labels, dtype=np.int64)[mask] for f, mask in zip(frames, in_view_masks)]
    return torch.from_numpy(np.concatenate(labels)).to(device)


def train_source(frames: Sequence[Frame], model_config: SegmenterConfig,
                 train_config: TrainConfig, checkpoint_path, device: torch.device,
                 resume: bool = True, progress: bool = True) -> Dict[str, float]:
    """
    Train both branches on labeled frames and write the checkpoint; resumable.

    If `checkpoint_path` holds a checkpoint of an unfinished run with the same model
    config and `resume` is set, training continues from its step. Returns a summary.
    """
    if not frames or any(f.labels is None for f in frames):
        raise ValueError('source training needs labeled frames')
    checkpoint_path = Path(checkpoint_path)
    torch.manual_seed(train_config.seed)
    model = build_segmenter(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr,
                                  weight_decay=train_config.weight_decay)
    start_step = 0
    if resume and checkpoint_path.is_file():
        payload = load_weights_only(checkpoint_path, device)
        if payload.get('model_config') != model_config.to_dict():
            raise ValueError(f'{checkpoint_path} holds a different model config; '
                             'use another path or --no-resume')
        model.load_state_dict(payload['model'])
        if 'optimizer' in payload:
            optimizer.load_state_dict(payload['optimizer'])
        start_step = int(payload.get('step', 0))
    # Cosine decay over the whole run; a resumed run picks the curve up at its step (the
    # optimizer state it loaded keeps the run's initial lr).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(
            math.pi * min((step + start_step) / train_config.steps, 1))))

    generator = torch.Generator().manual_seed(train_config.seed + start_step)
    order = random.Random(train_config.seed + start_step)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.train()
    started = time.monotonic()
    running = {'loss_2d': float('nan'), 'loss_3d': float('nan')}
    bar = tqdm(range(start_step, train_config.steps), initial=start_step,
               total=train_config.steps, disable=not progress, desc='source training')
    step = start_step
    for step in bar:
        batch = order.sample(list(frames), min(train_config.batch_frames, len(frames)))
        inputs, in_view = frames_to_input(batch, device, train_config.min_depth)
        labels = _labels_in_view(batch, in_view, device)
        if not torch.any(labels != IGNORE_INDEX):
            continue  # nothing labeled in view: CE would be NaN and poison the weights
        output = model(augment(inputs, train_config, generator))
        loss_2d = loss_fn(output.logits_2d, labels)
        loss_3d = loss_fn(output.logits_3d, labels)
        optimizer.zero_grad(set_to_none=True)
        (loss_2d + loss_3d).backward()
        optimizer.step()
        scheduler.step()
        for key, value in (('loss_2d', loss_2d), ('loss_3d', loss_3d)):
            previous = running[key]
            value = value.item()
            running[key] = value if math.isnan(previous) else 0.9 * previous + 0.1 * value
        bar.set_postfix(loss_2d=f'{running["loss_2d"]:.3f}', loss_3d=f'{running["loss_3d"]:.3f}')
        done = step + 1
        if done % train_config.checkpoint_every == 0 or done == train_config.steps:
            save_model_checkpoint(checkpoint_path, model, model_config, step=done,
                                  optimizer=optimizer.state_dict(),
                                  train_config=vars(train_config).copy())
    bar.close()
    return {'steps': train_config.steps, 'resumed_from': start_step,
            'seconds': time.monotonic() - started, **running}


def load_trained(checkpoint_path, device: torch.device) -> Optional[DualBranchSegmenter]:
    """Return the model of a finished training run at `checkpoint_path`, or None."""
    from mmtta_ros.core.checkpoint import load_model_checkpoint

    if not Path(checkpoint_path).is_file():
        return None
    model, _, payload = load_model_checkpoint(checkpoint_path, device)
    train_config = payload.get('train_config', {})
    if payload.get('step', 0) < train_config.get('steps', 0):
        return None
    return model
