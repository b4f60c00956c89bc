"""
3D branch: a SparseConvNet-style U-Net on spconv, read out per point via the voxel map.

Follows xMUDA's `UNetSCN` (SCN `UNet(m, [m, 2m, ..., levels*m])`): points become 5 cm
voxels with constant input feature 1, a submanifold stem, pre-activation blocks at each
level, strided `SparseConv3d` down and the matching `SparseInverseConv3d` up with the skip
concatenated, a final BN + ReLU, then each point takes its voxel's features and a linear
classifier gives per-point logits. Norm layers are plain `nn.BatchNorm1d` on the voxel
features, so generic BN-collecting code finds them. On CPU the convolutions run through
`spconv_cpu` (spconv's own CPU kernels are wrong with more than one thread).
"""

import math
from typing import List, Tuple

import spconv.pytorch as spconv
import torch
from torch import nn

from mmtta_ros.models.spconv_cpu import apply_cpu_conv_workaround, apply_cpu_stream_workaround

# spconv's CPU hash gives frames of a batch overlapping keys (wrong neighbours, checked
# with spconv 2.3.8) once one frame's grid volume needs more than 31 bits; below that
# it matches dense convolution, so grids are kept under this volume.
MAX_GRID_VOLUME = 2 ** 31 - 1


def voxelize(points: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
             voxel_size: float, full_scale: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Voxel coordinates of a batch of point clouds and the point -> voxel map.

    Coordinates are floor(points / voxel_size), shifted so each frame's minimum is 0 and
    clipped to full_scale - 1, so every point keeps a voxel (and a prediction) even past
    full_scale * voxel_size metres from its frame's minimum.

    points:      <float32: M, 3> LiDAR-frame xyz, metres
    batch_index: <int64: M> frame of each point, in [0, batch_size)
    returns:     voxel coords <int32: V, 4> (batch, x, y, z), sorted, unique;
                 point_to_voxel <int64: M> row of each point's voxel
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f'points must be (M, 3), got {tuple(points.shape)}')
    if batch_index.shape != points.shape[:1]:
        raise ValueError(f'batch_index must be ({points.shape[0]},), '
                         f'got {tuple(batch_index.shape)}')
    batch_index = batch_index.long()
    coords = torch.floor(points / voxel_size).long()
    # Per-frame minimum, so frames far from the origin still fit in [0, full_scale).
    frame_min = torch.zeros(batch_size, 3, dtype=torch.long, device=points.device)
    frame_min = frame_min.scatter_reduce(0, batch_index[:, None].expand(-1, 3), coords,
                                         reduce='amin', include_self=False)
    coords = (coords - frame_min[batch_index]).clamp(max=full_scale - 1)
    # One int64 key per (batch, x, y, z): a 1D unique is much faster than unique(dim=0),
    # and sorting by the key sorts voxels by batch, then x, y, z.
    keys = ((batch_index * full_scale + coords[:, 0]) * full_scale
            + coords[:, 1]) * full_scale + coords[:, 2]
    voxel_keys, point_to_voxel = torch.unique(keys, return_inverse=True)
    voxel_coords = torch.stack([
        voxel_keys // full_scale ** 3,
        voxel_keys // full_scale ** 2 % full_scale,
        voxel_keys // full_scale % full_scale,
        voxel_keys % full_scale,
    ], dim=1)
    return voxel_coords.int(), point_to_voxel


def grid_shape(voxel_coords: torch.Tensor, multiple: int) -> List[int]:
    """
    Smallest grid holding all voxels, each side a multiple of `multiple`.

    voxel_coords: <int32: V, 4> (batch, x, y, z), all >= 0
    returns:      [X, Y, Z], voxels per axis
    """
    extent = (voxel_coords[:, 1:].amax(dim=0) + 1).tolist()
    return [int(math.ceil(e / multiple) * multiple) for e in extent]


def largest_safe_scale(shape: List[int], multiple: int, max_volume: int = MAX_GRID_VOLUME
                       ) -> int:
    """Largest clip size s (a multiple of `multiple`) with prod(min(side, s)) <= max_volume."""
    scale = max(shape)
    while scale > multiple and math.prod(min(side, scale) for side in shape) > max_volume:
        scale -= multiple
    return scale


class ResidualBlock(spconv.SparseModule):
    """Pre-activation residual block: (BN, ReLU, SubMConv3d) x 2 + shortcut (SCN style)."""

    def __init__(self, in_planes: int, out_planes: int, indice_key: str):
        super().__init__()
        # SCN's NetworkInNetwork: a bias-free linear map when the width changes.
        self.shortcut = None if in_planes == out_planes else nn.Linear(in_planes, out_planes,
                                                                       bias=False)
        self.body = spconv.SparseSequential(
            nn.BatchNorm1d(in_planes), nn.ReLU(),
            spconv.SubMConv3d(in_planes, out_planes, 3, bias=False, indice_key=indice_key),
            nn.BatchNorm1d(out_planes), nn.ReLU(),
            spconv.SubMConv3d(out_planes, out_planes, 3, bias=False, indice_key=indice_key),
        )

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """Apply the block; voxels unchanged, features <V, in_planes> -> <V, out_planes>."""
        shortcut = x.features if self.shortcut is None else self.shortcut(x.features)
        out = self.body(x)
        return out.replace_feature(out.features + shortcut)


def _plain_block(in_planes: int, out_planes: int, indice_key: str) -> spconv.SparseSequential:
    """Pre-activation plain block: BN, ReLU, SubMConv3d (SCN's non-residual block)."""
    return spconv.SparseSequential(
        nn.BatchNorm1d(in_planes), nn.ReLU(),
        spconv.SubMConv3d(in_planes, out_planes, 3, bias=False, indice_key=indice_key),
    )


class SparseUNet(nn.Module):
    """Sparse U-Net with planes m, 2m, ..., levels*m; voxels and width m in and out."""

    def __init__(self, m: int = 16, levels: int = 7, block_reps: int = 1,
                 residual: bool = True):
        super().__init__()
        if levels < 1 or m < 1 or block_reps < 1:
            raise ValueError(f'need m, levels, block_reps >= 1, got {m}, {levels}, {block_reps}')
        block = ResidualBlock if residual else _plain_block
        planes = [m * (level + 1) for level in range(levels)]
        self.planes = tuple(planes)
        self.encoder_blocks = nn.ModuleList()
        self.decoder_blocks = nn.ModuleList()
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level, width in enumerate(planes):
            subm_key = f'subm{level}'
            self.encoder_blocks.append(spconv.SparseSequential(
                *[block(width, width, subm_key) for _ in range(block_reps)]))
            if level == levels - 1:
                break
            # Kernel 2 stride 2: each coarse voxel is a 2x2x2 cell; the inverse conv with
            # the same key restores exactly the fine voxels (in the same order).
            self.down.append(spconv.SparseSequential(
                nn.BatchNorm1d(width), nn.ReLU(),
                spconv.SparseConv3d(width, planes[level + 1], 2, stride=2, bias=False,
                                    indice_key=f'down{level}'),
            ))
            self.up.append(spconv.SparseSequential(
                nn.BatchNorm1d(planes[level + 1]), nn.ReLU(),
                spconv.SparseInverseConv3d(planes[level + 1], width, 2, bias=False,
                                           indice_key=f'down{level}'),
            ))
            self.decoder_blocks.append(spconv.SparseSequential(
                *[block(2 * width if rep == 0 else width, width, subm_key)
                  for rep in range(block_reps)]))

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """Run the U-Net; features <V, m> -> <V, m> on the same voxels."""
        skips = []
        for level, encoder_block in enumerate(self.encoder_blocks):
            x = encoder_block(x)
            if level < len(self.down):
                skips.append(x)
                x = self.down[level](x)
        for level in reversed(range(len(self.up))):
            x = self.up[level](x)
            x = x.replace_feature(torch.cat([skips[level].features, x.features], 1))
            x = self.decoder_blocks[level](x)
        return x


class Net3DSeg(nn.Module):
    """3D branch: voxelise, sparse U-Net, per-point voxel features, linear classifier."""

    def __init__(self, num_classes: int, m: int = 16, levels: int = 7, block_reps: int = 1,
                 residual: bool = True, voxel_size: float = 0.05, full_scale: int = 4096):
        super().__init__()
        if voxel_size <= 0 or full_scale < 2 ** (levels - 1):
            raise ValueError(f'need voxel_size > 0 and full_scale >= 2 ** (levels - 1), got '
                             f'{voxel_size}, {full_scale}')
        apply_cpu_stream_workaround()
        apply_cpu_conv_workaround()
        self.voxel_size = float(voxel_size)
        self.full_scale = int(full_scale)
        # Grid sides divisible by the coarsest stride, so no strided conv drops a border.
        self.grid_multiple = 2 ** (levels - 1)
        self.out_channels = m
        self.stem = spconv.SubMConv3d(1, m, 3, bias=False, indice_key='subm0')
        self.unet = SparseUNet(m, levels, block_reps, residual)
        self.output_norm = nn.Sequential(nn.BatchNorm1d(m), nn.ReLU())
        self.classifier = nn.Linear(m, num_classes)

    def point_features(self, points: torch.Tensor, batch_index: torch.Tensor,
                       batch_size: int) -> torch.Tensor:
        """
        Features of each point's voxel: <float32: M, m>.

        points:      <float32: M, 3> LiDAR-frame xyz, metres
        batch_index: <int64: M> frame of each point, in [0, batch_size)
        """
        if points.shape[0] == 0:
            # spconv cannot build an empty tensor; an empty batch still gets (0, m) features.
            return points.new_zeros((0, self.out_channels))
        # Sparse convolutions stay in float32 under a bf16 autocast (model.precision): spconv's
        # kernels are custom functions that autocast does not reach, and the 3D branch is
        # a small share of a step's arithmetic.
        with torch.autocast(device_type=points.device.type, enabled=False):
            return self._point_features(points.float(), batch_index, batch_size)

    def _point_features(self, points: torch.Tensor, batch_index: torch.Tensor,
                        batch_size: int) -> torch.Tensor:
        voxel_coords, point_to_voxel = voxelize(points, batch_index, batch_size,
                                                self.voxel_size, self.full_scale)
        # A tight grid gives the same result as the full_scale cube (every coarse voxel
        # lies inside it) and keeps spconv in its exact range.
        shape = grid_shape(voxel_coords, self.grid_multiple)
        if math.prod(shape) > MAX_GRID_VOLUME:
            # Only when a frame spans well over 100 m in both x and y at 5 cm: clip more.
            voxel_coords, point_to_voxel = voxelize(
                points, batch_index, batch_size, self.voxel_size,
                largest_safe_scale(shape, self.grid_multiple))
            shape = grid_shape(voxel_coords, self.grid_multiple)
        # xMUDA's input feature: a constant 1 per occupied voxel.
        voxel_features = points.new_ones((voxel_coords.shape[0], 1))
        x = spconv.SparseConvTensor(voxel_features, voxel_coords, shape, batch_size)
        x = self.unet(self.stem(x))
        return self.output_norm(x.features)[point_to_voxel]

    def forward(self, points: torch.Tensor, batch_index: torch.Tensor,
                batch_size: int) -> torch.Tensor:
        """Per-point 3D logits: <float32: M, num_classes>; arguments as `point_features`."""
        return self.classifier(self.point_features(points, batch_index, batch_size))
