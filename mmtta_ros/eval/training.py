"""
Training of the dual-branch segmenter: source-only, or offline UDA.

Source-only is xMUDA's source recipe on labeled frames; offline UDA is the same recipe
plus unlabeled target frames and an objective of eval/uda.py.

Loss: CE(2D logits) + CE(3D logits) over in-view labeled points. Augmentation as xMUDA
does it, per branch: the image is flipped and colour-jittered (pixels follow the flip),
the 3D points are flipped and rotated about z; point-pixel correspondences are unchanged.

A model with a fused head (SegmenterConfig.fused_head, FtD++) adds CE(fused logits) on
the branches' detached features: FtD++ trains its fusion module on detached features
too, so the head never shapes what the branches learn. `fit_fused_head` therefore gives
an existing source checkpoint a head without touching its 2D and 3D weights.
"""

from dataclasses import asdict, dataclass, replace
import hashlib
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
from mmtta_ros.core.persist import load_weights_only, PathLike
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.frame import Frame
from mmtta_ros.models.segmenter import (
    build_segmenter, DualBranchSegmenter, SegmenterConfig, SegmenterInput)
from mmtta_ros.core.batching import frames_to_input
from mmtta_ros.eval.uda import build_objective, forward_with_image_logits, SOURCE, TARGET, \
    UdaConfig


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
    return _train(frames, None, None, model_config, train_config, checkpoint_path, device,
                  resume, progress)


def train_uda(source_frames: Sequence[Frame], target_frames: Sequence[Frame],
              model_config: SegmenterConfig, train_config: TrainConfig, uda: UdaConfig,
              checkpoint_path, device: torch.device, resume: bool = True,
              progress: bool = True) -> Dict[str, float]:
    """
    Offline UDA: the source recipe on labeled frames plus `uda`'s loss on target frames.

    Each step takes a batch of each (same size), augmented alike; the model starts as the
    source recipe's (same seed, same initialisation). Target labels are dropped on entry:
    no code path can read them. The checkpoint is a plain model checkpoint (the method's
    own modules ride along under 'uda_state' for resuming). Returns a summary.
    """
    if not target_frames:
        raise ValueError('UDA needs unlabeled target frames')
    if model_config.fused_head:
        raise ValueError('UDA trains the two branches only; give the result a fused head '
                         'afterwards (mmtta_train --fit-fused-head --init)')
    target_frames = [replace(frame, labels=None) for frame in target_frames]
    return _train(source_frames, target_frames, uda, model_config, train_config,
                  checkpoint_path, device, resume, progress)


def _train(frames: Sequence[Frame], target_frames: Optional[Sequence[Frame]],
           uda: Optional[UdaConfig], model_config: SegmenterConfig, train_config: TrainConfig,
           checkpoint_path, device: torch.device, resume: bool, progress: bool
           ) -> Dict[str, float]:
    """Source training, with a UDA objective on target batches when `uda` is given."""
    if not frames or any(f.labels is None for f in frames):
        raise ValueError('source training needs labeled frames')
    checkpoint_path = Path(checkpoint_path)
    torch.manual_seed(train_config.seed)
    model = build_segmenter(model_config).to(device)
    # Built after the model: the model's initialisation is the source recipe's.
    objective = build_objective(model, uda).to(device) if uda else None
    parameters = list(model.parameters()) + (objective.joint_parameters() if uda else [])
    optimizer = torch.optim.AdamW(parameters, lr=train_config.lr,
                                  weight_decay=train_config.weight_decay)
    start_step = 0
    if resume and checkpoint_path.is_file():
        payload = load_weights_only(checkpoint_path, device)
        # Compared as configs: a checkpoint from before a field existed has the default.
        if SegmenterConfig.from_dict(payload.get('model_config') or {}) != model_config:
            raise ValueError(f'{checkpoint_path} holds a different model config; '
                             'use another path or --no-resume')
        wanted = asdict(uda) if uda else None
        if payload.get('uda') != wanted:
            raise ValueError(f'{checkpoint_path} holds a run with UDA {payload.get("uda")}, '
                             f'not {wanted}; use another path or --no-resume')
        model.load_state_dict(payload['model'])
        if uda:
            objective.load_state_dict(payload['uda_state']['modules'])
            objective.load_extra_state(payload['uda_state'])
        if 'optimizer' in payload:
            optimizer.load_state_dict(payload['optimizer'])
        start_step = int(payload.get('step', 0))

    # Cosine decay over the whole run; a resumed run picks the curve up at its step (the
    # optimizer state it loaded keeps the run's initial lr).
    def lr_factor(step):
        return 0.5 * (1 + math.cos(math.pi * min((step + start_step) / train_config.steps, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    generator = torch.Generator().manual_seed(train_config.seed + start_step)
    order = random.Random(train_config.seed + start_step)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.train()
    started = time.monotonic()
    running = {'loss_2d': float('nan'), 'loss_3d': float('nan')}
    bar = tqdm(range(start_step, train_config.steps), initial=start_step,
               total=train_config.steps, disable=not progress,
               desc=f'UDA {uda.method} training' if uda else 'source training')
    step = start_step
    for step in bar:
        batch = order.sample(list(frames), min(train_config.batch_frames, len(frames)))
        if uda:
            target_batch = order.sample(list(target_frames),
                                        min(train_config.batch_frames, len(target_frames)))
        inputs, in_view = frames_to_input(batch, device, train_config.min_depth)
        labels = _labels_in_view(batch, in_view, device)
        if not torch.any(labels != IGNORE_INDEX):
            continue  # nothing labeled in view: CE would be NaN and poison the weights
        losses = {}
        if uda:
            losses = _uda_step(model, objective, optimizer, inputs, labels, target_batch,
                               train_config, generator, device, step / train_config.steps,
                               lr_factor(step - start_step))
        else:
            output = model(augment(inputs, train_config, generator))
            loss_2d = loss_fn(output.logits_2d, labels)
            loss_3d = loss_fn(output.logits_3d, labels)
            loss = loss_2d + loss_3d
            if model.fused_head is not None:
                # Detached features, as FtD++: the head learns, the branches do not from it.
                loss = loss + loss_fn(model.fused_head(output.features_2d.detach(),
                                                       output.features_3d.detach()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses = {'loss_2d': loss_2d.item(), 'loss_3d': loss_3d.item()}
        scheduler.step()
        for key, value in losses.items():
            previous = running.get(key, float('nan'))
            running[key] = value if math.isnan(previous) else 0.9 * previous + 0.1 * value
        bar.set_postfix({key: f'{value:.3f}' for key, value in running.items()})
        done = step + 1
        if done % train_config.checkpoint_every == 0 or done == train_config.steps:
            extra = {}
            if uda:
                extra = {'uda': asdict(uda),
                         'uda_state': {'modules': objective.state_dict(),
                                       **objective.extra_state()}}
            save_model_checkpoint(checkpoint_path, model, model_config, step=done,
                                  optimizer=optimizer.state_dict(),
                                  train_config=vars(train_config).copy(), **extra)
    bar.close()
    return {'steps': train_config.steps, 'resumed_from': start_step,
            'seconds': time.monotonic() - started, **running}


def _uda_step(model: DualBranchSegmenter, objective, optimizer, inputs: SegmenterInput,
              labels: torch.Tensor, target_batch: Sequence[Frame], train_config: TrainConfig,
              generator: torch.Generator, device, progress: float, lr_factor: float
              ) -> Dict[str, float]:
    """
    One UDA step: source CE + source terms, then target terms, one optimizer step.

    As xMUDA, each domain's loss is backpropagated on its own (the gradients add up), so
    only one domain's graph is held at a time; then a separate adversary, if the method
    has one, steps on the detached outputs of both.
    """
    dense = objective.needs_image_logits

    def forward(batch_inputs):
        augmented = augment(batch_inputs, train_config, generator)
        if dense:
            return forward_with_image_logits(model, augmented)
        return model(augmented), None

    optimizer.zero_grad(set_to_none=True)
    output, image_logits = forward(inputs)
    loss_2d = nn.functional.cross_entropy(output.logits_2d, labels, ignore_index=IGNORE_INDEX)
    loss_3d = nn.functional.cross_entropy(output.logits_3d, labels, ignore_index=IGNORE_INDEX)
    terms = objective.segmenter_losses(output, image_logits, SOURCE, progress)
    (loss_2d + loss_3d + sum(terms.values())).backward()
    source_probs = objective.detached_probs(output, image_logits) if dense else None

    target_inputs, _ = frames_to_input(target_batch, device, train_config.min_depth)
    output, image_logits = forward(target_inputs)
    target_terms = objective.segmenter_losses(output, image_logits, TARGET, progress)
    if target_terms:
        sum(target_terms.values()).backward()
    optimizer.step()
    terms.update(target_terms)
    losses = {'loss_2d': loss_2d.item(), 'loss_3d': loss_3d.item(),
              **{key: value.item() for key, value in terms.items()}}
    if dense:
        losses.update(objective.discriminator_step(
            source_probs, objective.detached_probs(output, image_logits), lr_factor))
    return losses


def file_sha1(path: PathLike) -> str:
    """Return the SHA-1 of a file's bytes (which source checkpoint a head was fitted on)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def fit_fused_head(frames: Sequence[Frame], init_path: PathLike, train_config: TrainConfig,
                   checkpoint_path: PathLike, device: torch.device,
                   progress: bool = True) -> Dict[str, float]:
    """
    Fit only a fused head on the frozen source model at `init_path`; write the checkpoint.

    The 2D and 3D branches keep the source's weights bit for bit and run in eval mode
    (source batch-norm statistics, no dropout) on augmented labeled frames; only the head
    trains (AdamW, cosine decay over train_config.steps). The head's initialisation, the
    batches and the augmentation follow train_config.seed, so a rerun gives the same head.
    The checkpoint records the SHA-1 of the source file (`fused_head_init_sha1`).
    """
    if not frames or any(f.labels is None for f in frames):
        raise ValueError('fitting a fused head needs labeled frames')
    payload = load_weights_only(init_path, device)
    if not isinstance(payload.get('model'), dict) or \
            not isinstance(payload.get('model_config'), dict):
        raise ValueError(f'{init_path} is not an mmtta_ros model checkpoint')
    model_config = replace(SegmenterConfig.from_dict(payload['model_config']), fused_head=True)
    torch.manual_seed(train_config.seed)
    model = build_segmenter(model_config).to(device)
    branch_state = {key: value for key, value in payload['model'].items()
                    if not key.startswith('fused_head.')}
    missing, unexpected = model.load_state_dict(branch_state, strict=False)
    if unexpected or any(not key.startswith('fused_head.') for key in missing):
        raise ValueError(f'{init_path}: the weights do not fit its model config '
                         f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    model.eval()
    model.requires_grad_(False)
    head = model.fused_head
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=train_config.lr,
                                  weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / train_config.steps,
                                                                  1))))
    generator = torch.Generator().manual_seed(train_config.seed)
    order = random.Random(train_config.seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    started = time.monotonic()
    running = float('nan')
    bar = tqdm(range(train_config.steps), disable=not progress, desc='fused head')
    for _ in bar:
        batch = order.sample(list(frames), min(train_config.batch_frames, len(frames)))
        inputs, in_view = frames_to_input(batch, device, train_config.min_depth)
        labels = _labels_in_view(batch, in_view, device)
        if not torch.any(labels != IGNORE_INDEX):
            continue
        augmented = augment(inputs, train_config, generator)
        with torch.no_grad():
            features_2d = model.net_2d.point_features(augmented.images, augmented.pixels,
                                                      augmented.batch_index)
            features_3d = model.net_3d.point_features(augmented.points,
                                                      augmented.batch_index,
                                                      augmented.num_frames)
        loss = loss_fn(head(features_2d, features_3d), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = loss.item() if math.isnan(running) else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f'{running:.3f}')
    bar.close()
    head.requires_grad_(False)
    save_model_checkpoint(checkpoint_path, model, model_config, step=train_config.steps,
                          train_config=vars(train_config).copy(),
                          fused_head_init_sha1=file_sha1(init_path))
    return {'steps': train_config.steps, 'seconds': time.monotonic() - started,
            'loss_fused': running}


def fused_head_fitted(checkpoint_path: PathLike, init_path: PathLike) -> bool:
    """Return whether `checkpoint_path` holds a fused head fitted on `init_path` as it is now."""
    if not Path(checkpoint_path).is_file() or not Path(init_path).is_file():
        return False
    payload = load_weights_only(checkpoint_path, torch.device('cpu'))
    return payload.get('fused_head_init_sha1') == file_sha1(init_path)


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
