"""
2D branch: a U-Net on a ResNet encoder, read out at the projected pixels of the points.

Follows xMUDA's `UNetResNet34` / `Net2DSeg`: the stem conv does not downsample, so the
decoder ends at full input resolution; dropout after layer3 and layer4; per-point
features are the decoder's output at each point's pixel, followed by a linear classifier.
The encoder's module names are torchvision's `resnet34` names, so an ImageNet state dict
in torchvision format loads into it (`load_torchvision_resnet`).
"""

from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F

# torchvision's resnet34 ImageNet recipe; images arrive in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET34_CHANNELS = (64, 128, 256, 512)
RESNET34_BLOCKS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + shortcut), named as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block: <B, C_in, H, W> -> <B, C_out, H / stride, W / stride>."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNetEncoder(nn.Module):
    """
    ResNet encoder with torchvision's module names (conv1, bn1, layer1..4), no head.

    Unlike torchvision, conv1 has stride `stem_stride` (1 in xMUDA, which keeps a
    full-resolution skip for the decoder); its weight shape is unchanged, so torchvision
    weights still load.
    """

    def __init__(self, channels: Sequence[int] = RESNET34_CHANNELS,
                 blocks: Sequence[int] = RESNET34_BLOCKS, stem_stride: int = 1):
        super().__init__()
        if len(channels) != 4 or len(blocks) != 4:
            raise ValueError(f'ResNetEncoder needs 4 stages, got channels={tuple(channels)} '
                             f'blocks={tuple(blocks)}')
        self.channels = tuple(int(c) for c in channels)
        self.conv1 = nn.Conv2d(3, self.channels[0], 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.channels[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = self.channels[0]
        for stage, (out_channels, num_blocks) in enumerate(zip(self.channels, blocks)):
            stride = 1 if stage == 0 else 2
            layer = [BasicBlock(in_channels, out_channels, stride)]
            layer += [BasicBlock(out_channels, out_channels) for _ in range(int(num_blocks) - 1)]
            setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
            in_channels = out_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')


class UNetResNet(nn.Module):
    """
    U-Net on a ResNet encoder: image -> dense features at input resolution.

    Output channels = channels[0] (64 for ResNet34). Input height and width are padded
    to a multiple of the total downsampling and the output is cropped back.
    """

    def __init__(self, channels: Sequence[int] = RESNET34_CHANNELS,
                 blocks: Sequence[int] = RESNET34_BLOCKS, stem_stride: int = 1,
                 dropout: float = 0.4):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f'stem_stride must be 1 or 2, got {stem_stride}')
        self.encoder = ResNetEncoder(channels, blocks, stem_stride)
        c0, c1, c2, c3 = self.encoder.channels
        self.stem_stride = stem_stride
        # maxpool + layer2..4 halve the size 4 times, the stem maybe once more.
        self.size_multiple = 16 * stem_stride
        self.out_channels = c0
        self.dec_t_conv_stage5 = _up_block(c3, c2)
        self.dec_conv_stage4 = _conv_block(2 * c2, c2)
        self.dec_t_conv_stage4 = _up_block(c2, c1)
        self.dec_conv_stage3 = _conv_block(2 * c1, c1)
        self.dec_t_conv_stage3 = _up_block(c1, c0)
        self.dec_conv_stage2 = _conv_block(2 * c0, c0)
        self.dec_t_conv_stage2 = _up_block(c0, c0)
        # Plain conv as in xMUDA: the classifier reads these features directly.
        self.dec_conv_stage1 = nn.Conv2d(2 * c0, c0, 3, padding=1)
        self.dropout = nn.Dropout(p=dropout)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features: <float32: B, 3, H, W> RGB in [0, 1] -> <float32: B, C0, H, W>."""
        height, width = images.shape[2:]
        x = (images - self.mean) / self.std
        pad_h = -height % self.size_multiple
        pad_w = -width % self.size_multiple
        # Zero padding after normalisation = the mean colour, the least surprising border.
        x = F.pad(x, [0, pad_w, 0, pad_h])

        enc = self.encoder
        skip0 = enc.relu(enc.bn1(enc.conv1(x)))
        skip1 = enc.layer1(enc.maxpool(skip0))
        skip2 = enc.layer2(skip1)
        skip3 = self.dropout(enc.layer3(skip2))
        x = self.dropout(enc.layer4(skip3))

        x = self.dec_conv_stage4(torch.cat([skip3, self.dec_t_conv_stage5(x)], 1))
        x = self.dec_conv_stage3(torch.cat([skip2, self.dec_t_conv_stage4(x)], 1))
        x = self.dec_conv_stage2(torch.cat([skip1, self.dec_t_conv_stage3(x)], 1))
        x = self.dec_conv_stage1(torch.cat([skip0, self.dec_t_conv_stage2(x)], 1))
        if self.stem_stride != 1:
            x = F.interpolate(x, size=(height + pad_h, width + pad_w), mode='bilinear',
                              align_corners=False)
        return x[:, :, :height, :width]


class Net2DSeg(nn.Module):
    """2D branch: U-Net features at each point's pixel, then a linear classifier."""

    def __init__(self, num_classes: int, channels: Sequence[int] = RESNET34_CHANNELS,
                 blocks: Sequence[int] = RESNET34_BLOCKS, stem_stride: int = 1,
                 dropout: float = 0.4):
        super().__init__()
        self.unet = UNetResNet(channels, blocks, stem_stride, dropout)
        self.classifier = nn.Linear(self.unet.out_channels, num_classes)

    def point_features(self, images: torch.Tensor, pixels: torch.Tensor,
                       batch_index: torch.Tensor) -> torch.Tensor:
        """
        Features at the points' pixels: <float32: M, C0>.

        images:      <float32: B, 3, H, W> RGB in [0, 1]
        pixels:      <int64: M, 2> (u = column, v = row), inside the image
        batch_index: <int64: M> image of each point
        """
        features = self.unet(images)
        return features.permute(0, 2, 3, 1)[batch_index, pixels[:, 1], pixels[:, 0]]

    def forward(self, images: torch.Tensor, pixels: torch.Tensor,
                batch_index: torch.Tensor) -> torch.Tensor:
        """Per-point 2D logits: <float32: M, num_classes>; arguments as `point_features`."""
        return self.classifier(self.point_features(images, pixels, batch_index))


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Transposed conv doubling the resolution, then BN + ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv fusing the concatenated skip, then BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def load_torchvision_resnet(encoder: ResNetEncoder,
                            state_dict_or_path: Union[str, Mapping[str, torch.Tensor]]
                            ) -> Tuple[str, ...]:
    """
    Load torchvision-format ResNet weights (e.g. ImageNet resnet34) into `encoder`.

    Accepts a state dict or a path to one saved with `torch.save`; the classifier head
    (`fc.*`) is ignored. Every encoder tensor must be present with the right shape, else
    ValueError naming the offending keys. Returns the ignored keys.
    """
    if isinstance(state_dict_or_path, (str, bytes)) or hasattr(state_dict_or_path, '__fspath__'):
        state_dict = torch.load(state_dict_or_path, map_location='cpu', weights_only=True)
    else:
        state_dict = state_dict_or_path
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'expected a state dict (mapping of names to tensors), '
                         f'got {type(state_dict).__name__}')
    own: Dict[str, torch.Tensor] = encoder.state_dict()
    ignored = tuple(k for k in state_dict if k not in own)
    unexpected = [k for k in ignored if not k.startswith('fc.')]
    missing = [k for k in own if k not in state_dict]
    wrong_shape = [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
                   for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            'state dict does not match the ResNet encoder (is it a torchvision resnet of '
            f'this size?): missing={missing[:5]} unexpected={unexpected[:5]} '
            f'wrong_shape={wrong_shape[:5]}')
    encoder.load_state_dict({k: state_dict[k] for k in own})
    return ignored
