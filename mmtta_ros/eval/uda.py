"""
Offline unsupervised domain adaptation objectives: labeled source + unlabeled target frames.

Three references the test-time methods are compared with, each the extra loss a training
step adds to the source cross-entropy (eval/training.py runs the loop):

- xmuda: xMUDA's cross-modal loss (Jaritz et al.): per branch a mimicry head, a second
  linear classifier on the branch's features, learns KL(other branch' || mimicry head) on
  source (weight 1.0) and target (0.1), the day/night weights of the xMUDA release.
  Departure: each mimicry head starts as a copy of its branch's main head (xMUDA draws
  it afresh). In the 300-step tiny recipe a fresh head on the 3D branch's 8 features
  left the main head behind them: night 3D mIoU -24.9 against the source model, while a
  linear probe refitted on the same frozen features scored as the source (issue 11).
- adaptsegnet: AdaptSegNet's output-space adversary (Tsai et al.), single level: a
  discriminator tells source from target softmax outputs; the segmenter learns to make
  target outputs look like source ones (weight 1e-3); discriminator Adam, lr 1e-4.
- dann: DANN's feature-level adversary (Ganin et al.): a domain classifier on each
  branch's per-point features behind a gradient reversal layer, whose coefficient follows
  DANN's schedule 2 / (1 + exp(-10 p)) - 1 over training progress p.

Domain labels follow AdaptSegNet: source 0, target 1. Nothing here reads target labels.
"""

from dataclasses import asdict, dataclass
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from mmtta_ros.models.segmenter import DualBranchSegmenter, SegmenterInput, SegmenterOutput
from mmtta_ros.tta.losses import kl_divergence

UDA_METHODS = ('xmuda', 'adaptsegnet', 'dann')
MIMIC_INITS = ('main', 'random')
SOURCE, TARGET = 0.0, 1.0


@dataclass
class UdaConfig:
    """
    Offline UDA options (plain values, checkpoint-safe); defaults are the papers'.

    method: one of UDA_METHODS
    target_domain: the generator domain of the unlabeled frames (recorded, not read here)
    xm_weight_source / xm_weight_target: xMUDA lambda_xm_src / lambda_xm_trg (day/night)
    mimic_init: xMUDA's mimicry heads start as 'main' (a copy of the branch's main head)
        or 'random' (freshly drawn, as the xMUDA release)
    adversarial_weight: AdaptSegNet lambda_adv of the single output level
    discriminator_lr: AdaptSegNet discriminator Adam lr (betas 0.9, 0.99)
    grl_weight: DANN, the gradient reversal coefficient at the end of the schedule
    """

    method: str
    target_domain: str = ''
    xm_weight_source: float = 1.0
    xm_weight_target: float = 0.1
    adversarial_weight: float = 1e-3
    discriminator_lr: float = 1e-4
    grl_weight: float = 1.0
    mimic_init: str = 'main'

    def __post_init__(self):
        if self.method not in UDA_METHODS:
            raise ValueError(f'unknown UDA method {self.method!r}; choose one of {UDA_METHODS}')
        if self.mimic_init not in MIMIC_INITS:
            raise ValueError(f'unknown mimic_init {self.mimic_init!r}; choose one of '
                             f'{MIMIC_INITS}')
        weights = {k: v for k, v in asdict(self).items()
                   if k not in ('method', 'target_domain', 'mimic_init')}
        bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad or self.discriminator_lr <= 0:
            raise ValueError(f'UDA weights must be finite and >= 0 and discriminator_lr > 0, '
                             f'got {bad or {"discriminator_lr": self.discriminator_lr}}')


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coefficient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Return x unchanged; the gradient flowing back through it is scaled by -coefficient."""
    return _GradientReversal.apply(x, coefficient)


def dann_coefficient(progress: float) -> float:
    """Return DANN's reversal schedule 2 / (1 + exp(-10 p)) - 1 at progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def domain_loss(logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Return the binary cross-entropy of domain logits <...> against one domain label."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, domain))


class PointDiscriminator(nn.Module):
    """Per-point domain classifier: <float32: M, C> -> <float32: M> logits (target > 0)."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Domain logit of each point."""
        return self.layers(x).squeeze(1)


class ImageDiscriminator(nn.Module):
    """
    AdaptSegNet's fully convolutional discriminator: <B, C, H, W> -> <B, 1, H/32, W/32>.

    Four 4x4 stride-2 convolutions (ndf, 2, 4, 8 ndf channels, leaky ReLU 0.2) and a 4x4
    stride-2 classifier, so each output cell judges a patch of the softmax map.
    """

    MIN_SIDE = 32  # five stride-2 convolutions need a 32-pixel side to keep one cell

    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        layers = []
        channels = in_channels
        for width in (ndf, 2 * ndf, 4 * ndf, 8 * ndf):
            layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = width
        layers.append(nn.Conv2d(channels, 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Domain logits of the patches of each image."""
        if min(x.shape[-2:]) < self.MIN_SIDE:
            raise ValueError(f'the image discriminator needs images of at least '
                             f'{self.MIN_SIDE} px a side, got {tuple(x.shape[-2:])}')
        return self.layers(x)


def forward_with_image_logits(model: DualBranchSegmenter, inputs: SegmenterInput
                              ) -> Tuple[SegmenterOutput, torch.Tensor]:
    """
    Run the model and also return the 2D classifier applied at every pixel.

    returns: the model's output and <float32: B, C, H, W> dense 2D logits; at the points'
    pixels they equal output.logits_2d (same forward pass: the U-Net feature map is taken
    with a hook, so no second 2D pass and no change to the model).
    """
    captured = []
    handle = model.net_2d.unet.register_forward_hook(
        lambda _module, _inputs, feature_map: captured.append(feature_map))
    try:
        output = model(inputs)
    finally:
        handle.remove()
    classifier = model.net_2d.classifier
    image_logits = torch.einsum('bfhw,cf->bchw', captured[0], classifier.weight) \
        + classifier.bias.view(1, -1, 1, 1)
    return output, image_logits


class UdaObjective(nn.Module):
    """
    The extra losses of one UDA method, and the modules they train.

    segmenter_losses(output, image_logits, domain, progress) -> {name: loss}: added to the
    segmenter's loss of that domain's batch. Modules in `joint_parameters()` join the
    segmenter's optimizer; a method with its own adversary steps it in
    `discriminator_step`.
    """

    needs_image_logits = False

    def __init__(self, config: UdaConfig):
        super().__init__()
        self.config = config

    def segmenter_losses(self, output: SegmenterOutput, image_logits: Optional[torch.Tensor],
                         domain: float, progress: float) -> Dict[str, torch.Tensor]:
        """Return the named losses this method adds for a batch of `domain`."""
        raise NotImplementedError

    def joint_parameters(self):
        """Return the parameters the segmenter's optimizer trains with it."""
        return list(self.parameters())

    def discriminator_step(self, source: Any, target: Any, lr_factor: float
                           ) -> Dict[str, float]:
        """Train a separate adversary on detached outputs (none by default)."""
        return {}

    def extra_state(self) -> Dict[str, Any]:
        """Return optimizer states to checkpoint beside the modules' weights."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""


class CrossModalObjective(UdaObjective):
    """xMUDA: mimicry heads learn the other branch's prediction, on source and target."""

    def __init__(self, model: DualBranchSegmenter, config: UdaConfig):
        super().__init__(config)
        num_classes = model.net_2d.classifier.out_features
        # xMUDA's dual heads: a second classifier per branch on the same features. They
        # only shape training; inference reads the main heads, so they are not saved in
        # the model (the checkpoint stays a plain DualBranchSegmenter).
        self.mimic_2d = nn.Linear(model.net_2d.classifier.in_features, num_classes)
        self.mimic_3d = nn.Linear(model.net_3d.classifier.in_features, num_classes)
        if config.mimic_init == 'main':
            # A copy (own parameters): on source both heads then ask the features for
            # the same classes. With 'random' the 3D main head read 38 mIoU on day
            # frames whose frozen features a refitted linear probe read at 63 (source
            # model 65); night 3D -24.9 against the source model, with 'main' -0.3.
            self.mimic_2d.load_state_dict(model.net_2d.classifier.state_dict())
            self.mimic_3d.load_state_dict(model.net_3d.classifier.state_dict())

    def segmenter_losses(self, output, image_logits, domain, progress):
        """Return xm = KL(p3D' || mimic 2D) + KL(p2D' || mimic 3D), weighted per domain."""
        weight = (self.config.xm_weight_source if domain == SOURCE
                  else self.config.xm_weight_target)
        loss = kl_divergence(output.logits_3d.detach(), self.mimic_2d(output.features_2d)) \
            + kl_divergence(output.logits_2d.detach(), self.mimic_3d(output.features_3d))
        return {'xm_source' if domain == SOURCE else 'xm_target': weight * loss.mean()}


class OutputAdversaryObjective(UdaObjective):
    """
    AdaptSegNet on both branches: a discriminator per branch on its softmax output.

    2D: AdaptSegNet's convolutional discriminator on the dense softmax map (every pixel,
    as the paper). 3D: the sparse branch has no dense map, so its discriminator judges
    each point's softmax (a PointDiscriminator).
    """

    needs_image_logits = True

    def __init__(self, model: DualBranchSegmenter, config: UdaConfig):
        super().__init__(config)
        num_classes = model.net_2d.classifier.out_features
        # AdaptSegNet's ndf = 64 beside a ResNet whose stem has 64 channels: scale with
        # the segmenter (16 for the tiny one).
        ndf = model.net_2d.classifier.in_features
        self.image_discriminator = ImageDiscriminator(num_classes, ndf)
        self.point_discriminator = PointDiscriminator(num_classes)
        # On the model's device before the optimizer takes the parameters.
        self.to(model.net_2d.classifier.weight.device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.discriminator_lr,
                                          betas=(0.9, 0.99))

    def joint_parameters(self):
        """Return nothing: the discriminators have their own optimizer."""
        return []

    @staticmethod
    def detached_probs(output: SegmenterOutput, image_logits: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (<B, C, H, W>, <M, C>) softmaxes, detached: the discriminators' inputs."""
        return image_logits.detach().softmax(1), output.logits_3d.detach().softmax(1)

    def _judge(self, image_probs, point_probs, domain: float) -> torch.Tensor:
        return domain_loss(self.image_discriminator(image_probs), domain) \
            + domain_loss(self.point_discriminator(point_probs), domain)

    def segmenter_losses(self, output, image_logits, domain, progress):
        """Return, for target batches, the loss of fooling the discriminators."""
        if domain == SOURCE:
            return {}
        # The segmenter's step must not train the discriminators.
        self.requires_grad_(False)
        try:
            loss = self._judge(image_logits.softmax(1), output.logits_3d.softmax(1), SOURCE)
        finally:
            self.requires_grad_(True)
        return {'adversarial': self.config.adversarial_weight * loss}

    def discriminator_step(self, source, target, lr_factor):
        """One Adam step of both discriminators: source outputs -> 0, target -> 1."""
        for group in self.optimizer.param_groups:
            group['lr'] = self.config.discriminator_lr * lr_factor
        loss = 0.5 * (self._judge(*source, SOURCE) + self._judge(*target, TARGET))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {'discriminator': loss.item()}

    def extra_state(self):
        """Return the discriminators' optimizer state."""
        return {'discriminator_optimizer': self.optimizer.state_dict()}

    def load_extra_state(self, state):
        """Restore the discriminators' optimizer state."""
        if 'discriminator_optimizer' in state:
            self.optimizer.load_state_dict(state['discriminator_optimizer'])


class FeatureAdversaryObjective(UdaObjective):
    """DANN on both branches: a domain classifier per branch behind gradient reversal."""

    def __init__(self, model: DualBranchSegmenter, config: UdaConfig):
        super().__init__(config)
        self.domain_2d = PointDiscriminator(model.net_2d.classifier.in_features)
        self.domain_3d = PointDiscriminator(model.net_3d.classifier.in_features)

    def segmenter_losses(self, output, image_logits, domain, progress):
        """Return the domain loss; its gradient reaches the features reversed."""
        coefficient = self.config.grl_weight * dann_coefficient(progress)
        loss = domain_loss(self.domain_2d(reverse_gradient(output.features_2d, coefficient)),
                           domain) \
            + domain_loss(self.domain_3d(reverse_gradient(output.features_3d, coefficient)),
                          domain)
        # Half per domain: the two batches weigh the same whatever their point counts.
        return {'domain_source' if domain == SOURCE else 'domain_target': 0.5 * loss}


def build_objective(model: DualBranchSegmenter, config: UdaConfig) -> UdaObjective:
    """Return the objective of `config.method` for `model` (modules freshly initialised)."""
    kind = {'xmuda': CrossModalObjective, 'adaptsegnet': OutputAdversaryObjective,
            'dann': FeatureAdversaryObjective}[config.method]
    return kind(model, config)
