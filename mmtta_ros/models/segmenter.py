"""
The dual-branch (camera + LiDAR) segmenter of xMUDA: config, input/output types, builder.

Both branches emit logits for the same M points (the in-view points of a batch of
frames), so their predictions can be compared and averaged point by point. An optional
fused head (FtD++'s fusion branch, `SegmenterConfig.fused_head`) classifies the
concatenated per-point features of both branches.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmtta_ros.models.resnet_unet import load_torchvision_resnet, Net2DSeg
from mmtta_ros.models.sparse_unet import Net3DSeg

# Defaults of the size-dependent fields. 'xmuda' is the paper's network (ResNet34 U-Net,
# SCN U-Net m=16 with 7 levels); 'tiny' keeps the same structure but trains on a CPU: fewer
# channels and blocks, a stride-2 stem (the encoder runs at half resolution; the decoder
# still upsamples to full size) and a 5-level 3D U-Net with m=8.
SIZE_PRESETS: Dict[str, Dict[str, Any]] = {
    'xmuda': dict(channels_2d=(64, 128, 256, 512), blocks_2d=(3, 4, 6, 3), stem_stride_2d=1,
                  m_3d=16, levels_3d=7),
    'tiny': dict(channels_2d=(16, 32, 64, 128), blocks_2d=(1, 1, 1, 1), stem_stride_2d=2,
                 m_3d=8, levels_3d=5),
}


@dataclass
class SegmenterConfig:
    """
    Size and hyper-parameters of the segmenter; plain types only (checkpoint-safe).

    Fields left as None take the value of the `size` preset (SIZE_PRESETS).
    voxel_size is in metres (0.05 = xMUDA's scale 20); full_scale in voxels per axis.
    fused_head: add a 2D+3D head on the concatenated per-point features (FtD++'s fusion
    branch, used by the `ftd` adaptation method). A checkpoint written before this field
    existed has none and loads as False.
    """

    size: str = 'tiny'
    num_classes: int = 6
    voxel_size: float = 0.05
    full_scale: int = 4096
    dropout_2d: float = 0.4
    channels_2d: Optional[Tuple[int, ...]] = None
    blocks_2d: Optional[Tuple[int, ...]] = None
    stem_stride_2d: Optional[int] = None
    m_3d: Optional[int] = None
    levels_3d: Optional[int] = None
    block_reps_3d: int = 1
    residual_3d: bool = True
    fused_head: bool = False

    def __post_init__(self):
        if self.size not in SIZE_PRESETS:
            raise ValueError(f'unknown segmenter size {self.size!r}; '
                             f'choose one of {sorted(SIZE_PRESETS)}')
        for name, value in SIZE_PRESETS[self.size].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.channels_2d = tuple(int(c) for c in self.channels_2d)
        self.blocks_2d = tuple(int(b) for b in self.blocks_2d)
        if len(self.channels_2d) != 4 or len(self.blocks_2d) != 4:
            raise ValueError('channels_2d and blocks_2d need 4 entries (ResNet stages), got '
                             f'{self.channels_2d} and {self.blocks_2d}')
        if self.num_classes < 1 or self.voxel_size <= 0 or not 0 <= self.dropout_2d < 1:
            raise ValueError('need num_classes >= 1, voxel_size > 0, 0 <= dropout_2d < 1; got '
                             f'{self.num_classes}, {self.voxel_size}, {self.dropout_2d}')

    def to_dict(self) -> Dict[str, Any]:
        """All fields as plain Python types (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> 'SegmenterConfig':
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'unknown SegmenterConfig keys {unknown}; known: {sorted(known)}')
        return cls(**values)


@dataclass
class SegmenterInput:
    """
    One batch of B frames; the M points are the in-view points of all frames.

    images:      <float32: B, 3, H, W> RGB scaled to [0, 1] (the model normalises)
    pixels:      <int64: M, 2> (u = column, v = row) of each point, inside the image
    batch_index: <int64: M> frame of each point, sorted ascending
    points:      <float32: M, 3> LiDAR-frame xyz of the same points, metres
    T_odom_from_lidar: <float64 or float32: B, 4, 4> pose of each frame's LiDAR in a fixed
                 odometry frame, or None when any frame of the batch has none (the model
                 never reads it; methods that pool over time do)
    """

    images: torch.Tensor
    pixels: torch.Tensor
    batch_index: torch.Tensor
    points: torch.Tensor
    T_odom_from_lidar: Optional[torch.Tensor] = None

    @property
    def num_frames(self) -> int:
        """Return B, the number of frames (images) in the batch."""
        return int(self.images.shape[0])

    def to(self, device) -> 'SegmenterInput':
        """Return the same batch on `device`."""
        poses = self.T_odom_from_lidar
        return SegmenterInput(self.images.to(device), self.pixels.to(device),
                              self.batch_index.to(device), self.points.to(device),
                              None if poses is None else poses.to(device))


# How the 2D and 3D branches' per-point class probabilities become the 2D+3D prediction.
#   mean:    xMUDA's ensemble, the mean of the two softmaxes (how the suite scores 2D+3D)
#   product: the normalised product of the two (a sum of log-probabilities): a branch
#            that is unsure of a point leaves it to the other one, where the mean lets
#            a confident wrong branch outvote an unsure right one
FUSIONS = ('mean', 'product')


def fuse_2d3d(logits_2d: torch.Tensor, logits_3d: torch.Tensor,
              fusion: str = 'mean') -> torch.Tensor:
    """Return the 2D+3D class probabilities <float32: M, C> of two branches' logits."""
    if fusion == 'mean':
        return (logits_2d.softmax(dim=1) + logits_3d.softmax(dim=1)) / 2
    if fusion == 'product':
        return (logits_2d.log_softmax(dim=1) + logits_3d.log_softmax(dim=1)).softmax(dim=1)
    raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')


@dataclass
class SegmenterOutput:
    """
    Per-point logits of both branches, and the features their classifiers read.

    logits_2d, logits_3d: <float32: M, C>
    features_2d: <float32: M, C2d> (U-Net output at the point's pixel)
    features_3d: <float32: M, C3d> (sparse U-Net output of the point's voxel)
    logits_fused: <float32: M, C> of the fused head, None for a model without one
    """

    logits_2d: torch.Tensor
    logits_3d: torch.Tensor
    features_2d: Optional[torch.Tensor] = None
    features_3d: Optional[torch.Tensor] = None
    logits_fused: Optional[torch.Tensor] = None

    def probs_2d3d(self, fusion: str = 'mean') -> torch.Tensor:
        """Return the 2D+3D ensemble <float32: M, C> (see fuse_2d3d)."""
        return fuse_2d3d(self.logits_2d, self.logits_3d, fusion)

    def prediction_2d3d(self) -> torch.Tensor:
        """Return the class of the 2D+3D ensemble, <int64: M>."""
        return self.probs_2d3d().argmax(dim=1)


# Hidden width of the fused head's MLP.
FUSED_HIDDEN = 64


class FusedHead(nn.Module):
    """
    2D+3D head: an MLP on the concatenated per-point features of both branches.

    FtD++ fuses with attention modules; a two-layer MLP is the smallest head that can
    weigh one modality's features by the other's. No batch norm: test-time adaptation
    touches only the branches' norm layers, and this head has none to adapt.
    """

    def __init__(self, channels_2d: int, channels_3d: int, num_classes: int,
                 hidden: int = FUSED_HIDDEN):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels_2d + channels_3d, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, features_2d: torch.Tensor, features_3d: torch.Tensor) -> torch.Tensor:
        """<float32: M, C2d> and <float32: M, C3d> -> <float32: M, C> fused logits."""
        return self.mlp(torch.cat([features_2d, features_3d], dim=1))


class DualBranchSegmenter(nn.Module):
    """Camera branch + LiDAR branch, each with its own classifier, on the same points."""

    def __init__(self, net_2d: Net2DSeg, net_3d: Net3DSeg,
                 fused_head: Optional[FusedHead] = None):
        super().__init__()
        self.net_2d = net_2d
        self.net_3d = net_3d
        # None keeps the state dict of a model without the head exactly as it was.
        self.fused_head = fused_head
        # '2d' or '3d': that branch is not run and its logits come back as zeros (no
        # features, no fused logits). Only for a caller that replaces them with another
        # model's (tta/source_branch.py); not part of the state.
        self.skip_branch: Optional[str] = None

    def forward(self, inputs: SegmenterInput) -> SegmenterOutput:
        """Per-point logits of both branches (and of the fused head, if any) for a batch."""
        _check_input(inputs)
        features_2d = features_3d = logits_2d = logits_3d = None
        if self.skip_branch != '2d':
            features_2d = self.net_2d.point_features(inputs.images, inputs.pixels,
                                                     inputs.batch_index)
            logits_2d = self.net_2d.classifier(features_2d)
        if self.skip_branch != '3d':
            features_3d = self.net_3d.point_features(inputs.points, inputs.batch_index,
                                                     inputs.num_frames)
            logits_3d = self.net_3d.classifier(features_3d)
        return SegmenterOutput(
            logits_2d=torch.zeros_like(logits_3d) if logits_2d is None else logits_2d,
            logits_3d=torch.zeros_like(logits_2d) if logits_3d is None else logits_3d,
            features_2d=features_2d,
            features_3d=features_3d,
            logits_fused=(None if self.fused_head is None or self.skip_branch
                          else self.fused_head(features_2d, features_3d)),
        )


def build_segmenter(config: SegmenterConfig,
                    resnet_weights_path: Optional[str] = None) -> DualBranchSegmenter:
    """
    Build the segmenter `config` describes, optionally with torchvision ResNet weights.

    resnet_weights_path: a torchvision-format ResNet state dict (e.g. ImageNet resnet34
    for size 'xmuda') loaded into the 2D encoder.
    """
    net_2d = Net2DSeg(num_classes=config.num_classes, channels=config.channels_2d,
                      blocks=config.blocks_2d, stem_stride=config.stem_stride_2d,
                      dropout=config.dropout_2d)
    if resnet_weights_path:
        load_torchvision_resnet(net_2d.unet.encoder, resnet_weights_path)
    net_3d = Net3DSeg(num_classes=config.num_classes, m=config.m_3d, levels=config.levels_3d,
                      block_reps=config.block_reps_3d, residual=config.residual_3d,
                      voxel_size=config.voxel_size, full_scale=config.full_scale)
    fused_head = None
    if config.fused_head:
        fused_head = FusedHead(net_2d.unet.out_channels, net_3d.out_channels,
                               config.num_classes)
    return DualBranchSegmenter(net_2d, net_3d, fused_head)


def _check_input(inputs: SegmenterInput) -> None:
    """Raise ValueError naming the field whose shape does not fit the others."""
    images, pixels = inputs.images, inputs.pixels
    num_points = inputs.points.shape[0]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'images must be (B, 3, H, W), got {tuple(images.shape)}')
    if inputs.points.shape != (num_points, 3):
        raise ValueError(f'points must be (M, 3), got {tuple(inputs.points.shape)}')
    if pixels.shape != (num_points, 2) or inputs.batch_index.shape != (num_points,):
        raise ValueError(f'pixels must be ({num_points}, 2) and batch_index ({num_points},), '
                         f'got {tuple(pixels.shape)} and {tuple(inputs.batch_index.shape)}')
