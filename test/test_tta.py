"""Tests of the test-time adaptation methods (mmtta_ros.tta) on a tiny stand-in segmenter."""

import copy
from dataclasses import dataclass
import gc
import math
import os
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.window import FrameWindow
from mmtta_ros.tta import build_method, CollapseGuard, METHODS, Prediction
from mmtta_ros.core import persist
from mmtta_ros.tta.ema import ema_update
from mmtta_ros.tta.losses import (
    cross_modal_consistency, ensemble_entropy, inverse_kl_similarity, masked_cross_entropy)
from mmtta_ros.tta.mmtta import (
    inter_modal_pseudo_labels, mmtta_pseudo_labels, modality_weights)
from mmtta_ros.tta.norm import configure_norm_adaptation, norm_layers
from mmtta_ros.tta.xmuda_pl import class_confident_pseudo_labels

NUM_CLASSES = 3
LEARNING_METHODS = ('tent', 'tent_ens', 'xmuda', 'xmuda_pl', 'mmtta', 'latte', 'cbst', 'proda',
                    'mic', 'ftd')
# Large enough that every step visibly moves the norm parameters of the tiny model.
FAST_LRS = {'lr_2d': 1e-2, 'lr_3d': 1e-2}


# --------------------------------------------------------------------------------------
# A tiny dual-branch segmenter with the real one's contract
# --------------------------------------------------------------------------------------

@dataclass
class TinyInput:
    """Same fields as SegmenterInput: images <B, 3, H, W>, pixels <M, 2> (u, v), ..."""

    images: torch.Tensor
    pixels: torch.Tensor
    batch_index: torch.Tensor
    points: torch.Tensor


@dataclass
class TinyOutput:
    """Same fields as SegmenterOutput (logits_fused: None without a fused head)."""

    logits_2d: torch.Tensor
    logits_3d: torch.Tensor
    features_2d: Optional[torch.Tensor] = None
    features_3d: Optional[torch.Tensor] = None
    logits_fused: Optional[torch.Tensor] = None

    def probs_2d3d(self) -> torch.Tensor:
        """Mean of the two softmaxes."""
        return 0.5 * (self.logits_2d.softmax(1) + self.logits_3d.softmax(1))


class TinyNet2D(nn.Sequential):
    """conv + BN2d + ReLU + dropout (features), 1x1 conv (classifier), read at the pixels."""

    def __init__(self, num_classes: int):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.4), nn.Conv2d(8, num_classes, 1))

    def point_features(self, images, pixels, batch_index):
        """<M, 8> features at the points' pixels, as Net2DSeg.point_features."""
        feature_map = images
        for layer in list(self)[:4]:
            feature_map = layer(feature_map)
        return feature_map[batch_index, :, pixels[:, 1], pixels[:, 0]]

    def classifier(self, features):
        """Apply the 1x1 conv to per-point features: <M, C>."""
        head = self[4]
        return nn.functional.linear(features, head.weight.flatten(1), head.bias)


class TinyNet3D(nn.Sequential):
    """MLP with BN1d on the points; point_features / classifier as Net3DSeg."""

    def __init__(self, num_classes: int):
        super().__init__(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))

    def point_features(self, points, batch_index, batch_size):
        """<M, 16> per-point features."""
        return self[2](self[1](self[0](points)))

    def classifier(self, features):
        """<M, C> logits."""
        return self[3](features)


class TinyDualBranch(nn.Module):
    """2D: conv+BN2d+ReLU+dropout+conv read at the pixels; 3D: MLP with BN1d on the points."""

    def __init__(self, num_classes: int = NUM_CLASSES, namespace_output: bool = False,
                 fused_head: bool = True):
        super().__init__()
        self.net_2d = TinyNet2D(num_classes)
        self.net_3d = TinyNet3D(num_classes)
        # A linear fused head on both branches' features (ftd needs one; the rest ignore it).
        self.fused_head = nn.Linear(8 + 16, num_classes) if fused_head else None
        self.namespace_output = namespace_output

    def forward(self, inputs: TinyInput):
        features_2d = self.net_2d.point_features(inputs.images, inputs.pixels,
                                                 inputs.batch_index)
        features_3d = self.net_3d.point_features(inputs.points, inputs.batch_index,
                                                 inputs.images.shape[0])
        logits_2d = self.net_2d.classifier(features_2d)
        logits_3d = self.net_3d.classifier(features_3d)
        if self.namespace_output:
            return SimpleNamespace(logits_2d=logits_2d, logits_3d=logits_3d)
        logits_fused = None
        if self.fused_head is not None:
            logits_fused = self.fused_head(torch.cat([features_2d, features_3d], dim=1))
        return TinyOutput(logits_2d, logits_3d, features_2d=features_2d,
                          features_3d=features_3d, logits_fused=logits_fused)


def make_batch(seed: int, frames: int = 2, points_per_frame: int = 48, height: int = 12,
               width: int = 16, shift: float = 0.0) -> TinyInput:
    """Random frames; `shift` moves images and points away from the 'source' distribution."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(frames, 3, height, width, generator=generator) + shift
    count = frames * points_per_frame
    pixels = torch.stack([torch.randint(0, width, (count,), generator=generator),
                          torch.randint(0, height, (count,), generator=generator)], dim=1)
    batch_index = torch.arange(frames).repeat_interleave(points_per_frame)
    points = torch.randn(count, 3, generator=generator) * (1.0 + shift) + shift
    return TinyInput(images, pixels, batch_index, points)


def make_source_model(seed: int = 0, **kwargs) -> TinyDualBranch:
    """Return a 'trained' source model: random weights, running statistics from source data."""
    torch.manual_seed(seed)
    model = TinyDualBranch(**kwargs)
    model.train()
    with torch.no_grad():
        for index in range(4):
            model(make_batch(1000 + index))
    return model.eval()


def target_stream(count: int, seed: int = 0):
    """Batches from the shifted 'target' domain."""
    return [make_batch(seed + index, shift=0.7) for index in range(count)]


def clone_state(module: nn.Module) -> dict:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def norm_tensor_keys(model: nn.Module) -> set:
    return {f'{layer_name}.{key}' for layer_name, layer in norm_layers(model)
            for key in layer.state_dict()}


def models_of(method) -> dict:
    models = {'model': method.model}
    if hasattr(method, 'slow_model'):
        models['slow_model'] = method.slow_model
    return models


# --------------------------------------------------------------------------------------
# Losses and MM-TTA pseudo-labels against hand-computed numbers
# --------------------------------------------------------------------------------------

def numpy_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_inverse_kl_similarity_matches_direct_numpy_computation():
    generator = torch.Generator().manual_seed(3)
    logits_x = torch.randn(64, 5, generator=generator) * 2
    logits_y = torch.randn(64, 5, generator=generator) * 2
    eps = 1e-3
    p = numpy_softmax(logits_x.double().numpy())
    q = numpy_softmax(logits_y.double().numpy())
    expected = 0.5 * (1 / (numpy_kl(p, q) + eps) + 1 / (numpy_kl(q, p) + eps))
    got = inverse_kl_similarity(logits_x, logits_y, eps=eps).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_inverse_kl_similarity_hand_value_and_identical_predictions():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): KL(p||q) = KL(q||p) = ln(2) / 4, Sim = 4 / ln 2.
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25]]).log()
    similarity = inverse_kl_similarity(p, q, eps=1e-9).item()
    assert similarity == pytest.approx(4 / math.log(2), rel=1e-4)
    # Identical predictions: KL = 0 exactly, Sim = 1/eps, finite.
    assert inverse_kl_similarity(p, p, eps=1e-6).item() == pytest.approx(1e6, rel=1e-4)


# Five points, C = 3; probabilities and consistencies chosen by hand.
PROBS_2D = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4],
                         [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
PROBS_3D = torch.tensor([[0.1, 0.2, 0.7], [0.0, 0.1, 0.9], [0.2, 0.5, 0.3],
                         [0.2, 0.1, 0.7], [0.3, 0.6, 0.1]])
ZETA_2D = torch.tensor([2.0, 1.0, 0.2, 0.5, 0.4])
ZETA_3D = torch.tensor([1.0, 0.8, 0.25, 0.5, 3.0])
IGN = IGNORE_INDEX


def test_inter_pr_hard_selection_by_hand():
    # Point 0, 1: ζ2D > ζ3D -> 2D label 0; point 2: max ζ = 0.25 < 0.3 -> ignored;
    # point 3: tie -> 2D (label 1, 3D would say 2); point 4: ζ3D larger -> 3D label 1.
    labels, weight_2d = inter_modal_pseudo_labels(PROBS_2D, PROBS_3D, ZETA_2D, ZETA_3D,
                                                  selection='hard', threshold=0.3)
    assert labels.tolist() == [0, 0, IGN, 1, 1]
    assert weight_2d.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_inter_pr_soft_selection_by_hand():
    # Point 0: w2D = 2/3 -> (0.433, 0.267, 0.300) -> 0.
    # Point 1: w2D = 1/1.8 -> (0.278, 0.267, 0.456) -> 2 (hard selection said 0).
    # Point 3: w2D = 1/2 -> (0.15, 0.45, 0.40) -> 1.
    # Point 4: w2D = 0.4/3.4 -> (0.371, 0.535, 0.094) -> 1.
    labels, weight_2d = inter_modal_pseudo_labels(PROBS_2D, PROBS_3D, ZETA_2D, ZETA_3D,
                                                  selection='soft', threshold=0.3)
    assert labels.tolist() == [0, 2, IGN, 1, 1]
    np.testing.assert_allclose(weight_2d.numpy(), [2 / 3, 1 / 1.8, 0.2 / 0.45, 0.5, 0.4 / 3.4],
                               rtol=1e-6)


def test_inter_pr_threshold_ignores_points_where_both_modalities_are_unstable():
    # max ζ per point: 2.0, 1.0, 0.25, 0.5, 3.0
    for threshold, expected in ((0.2, [0, 0, 1, 1, 1]), (0.6, [0, 0, IGN, IGN, 1]),
                                (5.0, [IGN] * 5)):
        labels, _ = inter_modal_pseudo_labels(PROBS_2D, PROBS_3D, ZETA_2D, ZETA_3D,
                                              selection='hard', threshold=threshold)
        assert labels.tolist() == expected, threshold
    # Point 2 with threshold 0.2: ζ3D > ζ2D -> 3D label 1.


def test_soft_selection_weights_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    zeta_2d = torch.rand(1000, generator=generator) * 10
    zeta_3d = torch.rand(1000, generator=generator) * 10
    weight_2d, weight_3d = modality_weights(zeta_2d, zeta_3d)
    torch.testing.assert_close(weight_2d + weight_3d, torch.ones(1000))
    torch.testing.assert_close(weight_2d, zeta_2d / (zeta_2d + zeta_3d))
    # Latte's normalisation (w3D / (w2D_normalised + w3D)) would not sum to 1 here.
    latte_3d = zeta_3d / (weight_2d + zeta_3d)
    assert not torch.allclose(weight_2d + latte_3d, torch.ones(1000))


def reference_mmtta_labels(fast_2d, slow_2d, fast_3d, slow_3d, selection, threshold, eps):
    """Straight numpy transcription of Intra-PG + Inter-PR, point by point semantics."""
    fast_2d, slow_2d, fast_3d, slow_3d = (x.double().numpy()
                                          for x in (fast_2d, slow_2d, fast_3d, slow_3d))

    def sim(x, y):
        p, q = numpy_softmax(x), numpy_softmax(y)
        return 0.5 * (1 / (numpy_kl(p, q) + eps) + 1 / (numpy_kl(q, p) + eps))

    zeta_2d, zeta_3d = sim(fast_2d, slow_2d), sim(fast_3d, slow_3d)
    probs_2d = numpy_softmax((fast_2d + slow_2d) / 2)
    probs_3d = numpy_softmax((fast_3d + slow_3d) / 2)
    if selection == 'hard':
        labels = np.where(zeta_2d >= zeta_3d, probs_2d.argmax(1), probs_3d.argmax(1))
    else:
        w_2d = zeta_2d / (zeta_2d + zeta_3d)
        labels = (w_2d[:, None] * probs_2d + (1 - w_2d)[:, None] * probs_3d).argmax(1)
    return np.where(np.maximum(zeta_2d, zeta_3d) < threshold, IGNORE_INDEX, labels)


def test_mmtta_pseudo_labels_use_mean_logits_and_fast_slow_consistency():
    # Point 0: 2D fast == slow (ζ2D = 1/eps) -> its mean-logit label 1 wins.
    # Point 1: 3D fast == slow -> 3D; 3D label 2.
    # Point 2: 2D fast says 0, slow says 1, 3D unstable too; 2D is steadier (smaller
    #          logit gap), the mean logits (1.5, 1.0, 0) give 0: neither fast alone (0)
    #          nor slow alone (1) decides, the average does.
    fast_2d = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    slow_2d = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    fast_3d = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    slow_3d = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 2.0], [4.0, 0.0, 0.0]])
    for selection in ('hard', 'soft'):
        pseudo = mmtta_pseudo_labels(fast_2d, slow_2d, fast_3d, slow_3d, selection=selection,
                                     threshold=0.3, eps=1e-6)
        assert pseudo.labels.tolist() == [1, 2, 0], selection
        assert pseudo.zeta_2d[0].item() == pytest.approx(1e6, rel=1e-3)
        assert pseudo.zeta_3d[1].item() == pytest.approx(1e6, rel=1e-3)
    # Random logits: same as a direct numpy transcription.
    generator = torch.Generator().manual_seed(5)
    logits = [torch.randn(500, 4, generator=generator) * 3 for _ in range(4)]
    for selection in ('hard', 'soft'):
        pseudo = mmtta_pseudo_labels(*logits, selection=selection, threshold=0.3, eps=1e-6)
        expected = reference_mmtta_labels(*logits, selection, 0.3, 1e-6)
        assert (pseudo.labels.numpy() == expected).mean() > 0.995  # float32 vs float64 ties


def test_class_confident_pseudo_labels_per_class_median_capped():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.7, 0.2, 0.1],
                          [0.2, 0.6, 0.2], [0.1, 0.8, 0.1],
                          [0.02, 0.02, 0.96], [0.03, 0.02, 0.95], [0.01, 0.01, 0.98]])
    # Class 0: confidences (.5, .7, .9), lower median .7 -> point 1 dropped.
    # Class 1: (.6, .8), lower median .6 -> both kept.
    # Class 2: (.95, .96, .98), median .96 capped at .9 -> all kept.
    labels = class_confident_pseudo_labels(probs.log(), quantile=0.5, max_threshold=0.9)
    assert labels.tolist() == [0, IGN, 0, 1, 1, 2, 2, 2]


def test_class_confident_pseudo_labels_matches_per_class_loop():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(400, 5, generator=generator) * 2
    got = class_confident_pseudo_labels(logits)
    confidence, labels = logits.softmax(1).max(1)
    expected = labels.clone()
    for cls in labels.unique():  # xMUDA's loop, as the reference
        mask = labels == cls
        threshold = min(confidence[mask].median().item(), 0.9)
        expected[mask & (confidence < threshold)] = IGNORE_INDEX
    assert torch.equal(got, expected)


def test_masked_cross_entropy_ignores_points_and_is_zero_when_none_kept():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, IGNORE_INDEX])
    expected = -torch.log_softmax(logits.detach(), 1)[0, 0]
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected.item())
    none_kept = masked_cross_entropy(logits, torch.full((2,), IGNORE_INDEX))
    assert none_kept.item() == 0.0
    none_kept.backward()  # attached to the graph, gradient zero
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_modal_consistency_each_branch_mimics_the_detached_other():
    generator = torch.Generator().manual_seed(2)
    logits_2d = torch.randn(10, 3, generator=generator, requires_grad=True)
    logits_3d = torch.randn(10, 3, generator=generator, requires_grad=True)
    cross_modal_consistency(logits_2d, logits_3d).backward()
    p_2d, p_3d = logits_2d.detach().softmax(1), logits_3d.detach().softmax(1)
    # d KL(sg(q) || softmax(z)) / dz = softmax(z) - q, averaged over the 10 points.
    torch.testing.assert_close(logits_2d.grad, (p_2d - p_3d) / 10)
    torch.testing.assert_close(logits_3d.grad, (p_3d - p_2d) / 10)


def test_ensemble_entropy_is_entropy_of_mean_softmax():
    generator = torch.Generator().manual_seed(4)
    logits_2d, logits_3d = torch.randn(20, 4, generator=generator), torch.randn(20, 4)
    mean = 0.5 * (numpy_softmax(logits_2d.double().numpy())
                  + numpy_softmax(logits_3d.double().numpy()))
    expected = -(mean * np.log(mean)).sum(1)
    np.testing.assert_allclose(ensemble_entropy(logits_2d, logits_3d).numpy(), expected,
                               rtol=1e-5)


# --------------------------------------------------------------------------------------
# Norm-layer configuration and EMA
# --------------------------------------------------------------------------------------

def test_configure_norm_adaptation_trains_only_batch_norm_affine_with_batch_stats():
    model = make_source_model()
    source = clone_state(model)
    configure_norm_adaptation(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'net_2d.1.weight', 'net_2d.1.bias', 'net_3d.1.weight', 'net_3d.1.bias'}
    for name, module in model.named_modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert module.training == is_norm, name  # dropout and the rest in eval mode
    batch = make_batch(7, shift=0.7)
    out_a, out_b = model(batch), model(batch)  # dropout off: deterministic
    torch.testing.assert_close(out_a.logits_2d, out_b.logits_2d)
    for key, value in model.state_dict().items():  # running stats neither used nor updated
        assert torch.equal(value, source[key]), key
    # Batch statistics are what normalises: the 3D BN output has zero mean over the batch.
    hidden = model.net_3d[1](model.net_3d[0](batch.points))
    bn = model.net_3d[1]
    torch.testing.assert_close(((hidden - bn.bias) / bn.weight).mean(0), torch.zeros(16),
                               atol=1e-5, rtol=0)


def test_configure_norm_adaptation_can_record_batch_statistics():
    model = make_source_model()
    configure_norm_adaptation(model, record_batch_stats=True)
    batch = make_batch(7, shift=0.7)
    model(batch)
    features = model.net_3d[0](batch.points).detach()
    bn = model.net_3d[1]
    torch.testing.assert_close(bn.running_mean, features.mean(0))
    torch.testing.assert_close(bn.running_var, features.var(0, unbiased=True))


def bn_pair(weight, bias, mean, var):
    layer = nn.BatchNorm1d(2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
        layer.running_mean.copy_(torch.tensor(mean))
        layer.running_var.copy_(torch.tensor(var))
    return nn.Sequential(nn.Linear(2, 2), layer)


@pytest.mark.parametrize('targets, weight, bias, mean, var', [
    # Ω_S = 0.1 · Ω_F + 0.9 · Ω_S; weight | bias | running mean | running var:
    # slow (1, 2 | 0, 0 | 0, 0 | 1, 1), fast (3, 4 | 1, 1 | 2, 2 | 3, 5)
    ('affine', [1.2, 2.2], [0.1, 0.1], [0.0, 0.0], [1.0, 1.0]),
    ('stats', [1.0, 2.0], [0.0, 0.0], [0.2, 0.2], [1.2, 1.4]),
    ('both', [1.2, 2.2], [0.1, 0.1], [0.2, 0.2], [1.2, 1.4]),
])
def test_ema_update_one_step_known_numbers(targets, weight, bias, mean, var):
    slow = bn_pair([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    fast = bn_pair([3.0, 4.0], [1.0, 1.0], [2.0, 2.0], [3.0, 5.0])
    linear_before = slow[0].weight.detach().clone()
    ema_update(slow, fast, momentum=0.9, targets=targets)
    layer = slow[1]
    for got, expected in ((layer.weight, weight), (layer.bias, bias),
                          (layer.running_mean, mean), (layer.running_var, var)):
        torch.testing.assert_close(got.detach(), torch.tensor(expected))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(slow[0].weight, linear_before)  # only norm layers
    with pytest.raises(ValueError, match='ema_targets'):
        ema_update(slow, fast, momentum=0.9, targets='all')


# --------------------------------------------------------------------------------------
# Methods: what they change, reset, prediction timing
# --------------------------------------------------------------------------------------

def test_source_changes_nothing_and_predicts_in_eval_mode():
    model = make_source_model()
    reference = copy.deepcopy(model).eval()
    before = clone_state(model)
    method = build_method('source', model)
    for batch in target_stream(4):
        prediction = method.step(batch)
        with torch.no_grad():
            expected = reference(batch)
        assert torch.equal(prediction.logits_2d, expected.logits_2d)
        assert torch.equal(prediction.logits_3d, expected.logits_3d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert method.stats['updated'] is False and method.stats['step'] == 4


@pytest.mark.parametrize('name', LEARNING_METHODS)
def test_learning_methods_change_only_norm_layer_tensors(name):
    model = make_source_model()
    norm_keys = norm_tensor_keys(model)
    before = clone_state(model)
    method = build_method(name, model, **FAST_LRS)
    for batch in target_stream(3):
        method.step(batch)
        assert method.stats['updated'] is True
    for model_name, module in models_of(method).items():
        after = module.state_dict()
        changed = {key for key in after if not torch.equal(after[key], before[key])}
        assert changed, f'{name}: {model_name} did not adapt at all'
        assert changed <= norm_keys, f'{name}: {model_name} changed {changed - norm_keys}'
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable <= norm_keys


@pytest.mark.parametrize('targets', ['affine', 'stats', 'both'])
def test_mmtta_slow_model_follows_what_the_ema_covers(targets):
    model = make_source_model()
    before = clone_state(model)
    method = build_method('mmtta', model, ema_targets=targets, **FAST_LRS)
    for batch in target_stream(3):
        method.step(batch)
    after = method.slow_model.state_dict()
    changed = {key.rsplit('.', 1)[1] for key in after if not torch.equal(after[key], before[key])}
    expected = {'affine': {'weight', 'bias'}, 'stats': {'running_mean', 'running_var'},
                'both': {'weight', 'bias', 'running_mean', 'running_var'}}[targets]
    assert changed == expected


@pytest.mark.parametrize('name', sorted(METHODS))
def test_reset_restores_the_source_bit_for_bit(name):
    model = make_source_model()
    source = clone_state(model)
    hyperparameters = {'source': {}, 'bn_stats': {'momentum': 0.5, 'source_weight': 0.2}
                       }.get(name, FAST_LRS)
    method = build_method(name, model, **hyperparameters)
    fresh = build_method(name, make_source_model(), **hyperparameters)
    stream = target_stream(4)
    first_fresh = fresh.step(stream[0])
    for batch in stream:
        method.step(batch)
    method.reset()
    for model_name, module in models_of(method).items():
        state = module.state_dict()
        assert state.keys() == source.keys()
        for key, value in state.items():  # includes running stats and num_batches_tracked
            assert torch.equal(value, source[key]), f'{model_name}.{key}'
    for optimizer in getattr(method, 'optimizers', {}).values():
        assert len(optimizer.state) == 0
        assert all(p.grad is None for group in optimizer.param_groups for p in group['params'])
    # After a reset the method behaves exactly as a fresh one.
    first_after_reset = method.step(stream[0])
    assert torch.equal(first_after_reset.logits_2d, first_fresh.logits_2d)
    assert torch.equal(first_after_reset.logits_3d, first_fresh.logits_3d)
    assert method.stats == {**fresh.stats, 'step': 5}


def test_bn_stats_normalises_with_the_formula_and_changes_nothing_else():
    model = make_source_model()
    source = clone_state(model)
    method = build_method('bn_stats', model, momentum=0.25, source_weight=0.4)
    stream = target_stream(3)
    bn = model.net_3d[1]
    features = [model.net_3d[0](batch.points).detach() for batch in stream]
    target = source['net_3d.1.running_mean'].clone()
    for batch, feature in zip(stream, features):
        prediction = method.step(batch)
        # Hand-computed: running target mean, then the blend with the source mean.
        target = 0.75 * target + 0.25 * feature.mean(dim=0)
        used = 0.4 * source['net_3d.1.running_mean'] + 0.6 * target
        torch.testing.assert_close(bn.running_mean, used)
    # The prediction is the model in eval mode with those statistics.
    with torch.no_grad():
        model.eval()
        expected = model(stream[-1])
    assert torch.equal(prediction.logits_3d, expected.logits_3d)
    for key, value in model.state_dict().items():
        if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            assert torch.equal(value, source[key]), key
    assert not any(p.requires_grad for p in model.parameters())


def test_bn_stats_default_is_adabn_batch_statistics():
    model = make_source_model()
    method = build_method('bn_stats', model)
    batch = target_stream(1)[0]
    reference = make_source_model()
    reference.eval()
    for module in (reference.net_2d[1], reference.net_3d[1]):
        module.train()  # batch statistics, as BatchNorm does in training
    with torch.no_grad():
        expected = reference(batch)
    prediction = method.step(batch)
    torch.testing.assert_close(prediction.logits_2d, expected.logits_2d)
    torch.testing.assert_close(prediction.logits_3d, expected.logits_3d)


def test_mmtta_returns_slow_prediction_made_before_the_update():
    method = build_method('mmtta', make_source_model(), **FAST_LRS)
    stream = target_stream(4)
    for batch in stream[:2]:  # slow model no longer equal to the source
        method.step(batch)
    slow_before = copy.deepcopy(method.slow_model)
    with torch.no_grad():
        expected = slow_before(stream[2])
    prediction = method.step(stream[2])
    assert torch.equal(prediction.logits_2d, expected.logits_2d)
    assert torch.equal(prediction.logits_3d, expected.logits_3d)
    assert isinstance(prediction, TinyOutput)  # the model's own output type, detached
    assert prediction.logits_2d.grad_fn is None and not prediction.logits_3d.requires_grad
    with torch.no_grad():
        slow_after = method.slow_model(stream[2])
    assert not torch.equal(slow_after.logits_3d, expected.logits_3d)


def test_mmtta_can_predict_after_the_update():
    method = build_method('mmtta', make_source_model(), predict_before_update=False,
                          **FAST_LRS)
    batch = target_stream(1)[0]
    with torch.no_grad():
        before = copy.deepcopy(method.slow_model)(batch)
    prediction = method.step(batch)
    with torch.no_grad():
        after = method.slow_model(batch)
    assert torch.equal(prediction.logits_3d, after.logits_3d)
    assert not torch.equal(prediction.logits_3d, before.logits_3d)


@pytest.mark.parametrize('before_update', [True, False])
def test_tent_predicts_with_the_fast_model_before_or_after_its_update(before_update):
    method = build_method('tent', make_source_model(), predict_before_update=before_update,
                          **FAST_LRS)
    batch = target_stream(1)[0]
    with torch.no_grad():
        expected_before = copy.deepcopy(method.model)(batch)
    prediction = method.step(batch)
    with torch.no_grad():
        expected_after = copy.deepcopy(method.model)(batch)
    expected = expected_before if before_update else expected_after
    torch.testing.assert_close(prediction.logits_2d, expected.logits_2d, rtol=0, atol=1e-6)
    torch.testing.assert_close(prediction.logits_3d, expected.logits_3d, rtol=0, atol=1e-6)
    assert not torch.allclose(expected_before.logits_3d, expected_after.logits_3d)


def test_models_without_dataclass_output_get_a_prediction_object():
    method = build_method('tent', make_source_model(namespace_output=True))
    prediction = method.step(target_stream(1)[0])
    assert isinstance(prediction, Prediction)
    probs = prediction.probs_2d3d()
    torch.testing.assert_close(probs.sum(1), torch.ones(probs.shape[0]))


def test_mmtta_skips_the_update_when_no_pseudo_label_is_kept():
    model = make_source_model()
    before = clone_state(model)
    # Sim is at most 1/eps = 1e6: a threshold above it ignores every point.
    method = build_method('mmtta', model, threshold=1e7, **FAST_LRS)
    method.step(target_stream(1)[0])
    assert method.stats['updated'] is False and method.stats['kept_ratio'] == 0.0
    assert 'loss' not in method.stats
    for module in models_of(method).values():
        for key, value in module.state_dict().items():
            if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
                assert torch.equal(value, before[key]), key
    for key, value in method.slow_model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('name', sorted(METHODS))
def test_stats_are_plain_numbers(name):
    method = build_method(name, make_source_model())
    method.step(target_stream(1)[0])
    stats = method.stats
    for key in ('step', 'steps_since_reset', 'resets', 'reset', 'reset_reason', 'updated',
                'entropy', 'entropy_2d', 'entropy_3d', 'dominant_fraction'):
        assert key in stats, key
    assert all(isinstance(value, (int, float, bool, str)) for value in stats.values()), stats
    assert 0.0 < stats['entropy'] <= math.log(NUM_CLASSES) + 1e-6
    if name not in ('source', 'bn_stats'):
        assert math.isfinite(stats['loss'])
    if name in ('xmuda_pl', 'mmtta', 'latte', 'cbst', 'proda'):
        assert 0.0 < stats['kept_ratio'] <= 1.0


def tensor_count() -> int:
    gc.collect()
    # type(), not isinstance: isinstance reads __class__, which warns on deprecated objects.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def rss_bytes() -> int:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='needs Linux /proc')
def test_memory_stays_flat_over_200_steps():
    method = build_method('mmtta', make_source_model(), **FAST_LRS)
    stream = target_stream(8)
    for index in range(20):
        method.step(stream[index % 8])
    tensors_early, rss_early = tensor_count(), rss_bytes()
    for index in range(200):
        prediction = method.step(stream[index % 8])
        assert prediction.logits_2d.grad_fn is None and prediction.logits_3d.grad_fn is None
    del prediction
    tensors_late, rss_late = tensor_count(), rss_bytes()
    assert tensors_late <= tensors_early + 2  # the last prediction's two tensors at most
    assert rss_late - rss_early < 32 * 2 ** 20
    assert all(not torch.is_tensor(value) for value in method.stats.values())
    assert all(p.grad is None for p in method.model.parameters())
    assert method.stats['step'] == 220


# --------------------------------------------------------------------------------------
# Collapse guard
# --------------------------------------------------------------------------------------

def test_collapse_guard_needs_consecutive_steps():
    guard = CollapseGuard(max_dominant_fraction=0.9, max_entropy=1.0, patience=3)
    assert guard.update(entropy=0.5, dominant_fraction=0.95) is None
    assert guard.update(entropy=0.5, dominant_fraction=0.95) is None
    assert guard.update(entropy=0.5, dominant_fraction=0.5) is None  # streak broken
    assert guard.update(entropy=0.5, dominant_fraction=0.95) is None
    assert guard.update(entropy=0.5, dominant_fraction=0.95) is None
    reason = guard.update(entropy=0.5, dominant_fraction=0.95)
    assert reason is not None and 'one class' in reason
    assert guard.update(entropy=1.5, dominant_fraction=0.1) is None  # counters restarted
    assert guard.update(entropy=1.5, dominant_fraction=0.1) is None
    assert 'entropy' in guard.update(entropy=1.5, dominant_fraction=0.1)
    assert 'non-finite' in guard.update(entropy=float('nan'), dominant_fraction=0.1)
    with pytest.raises(ValueError, match='patience'):
        CollapseGuard(patience=0)


def test_collapse_guard_resets_a_collapsed_method_and_counts_it():
    model = make_source_model()
    with torch.no_grad():  # a model that puts every point in class 0
        model.net_2d[4].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
        model.net_3d[3].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    source = clone_state(model)
    guard = CollapseGuard(max_dominant_fraction=0.9, patience=3)
    method = build_method('tent', model, collapse_guard=guard, **FAST_LRS)
    stream = target_stream(5)
    for batch in stream[:2]:
        method.step(batch)
        assert method.stats['resets'] == 0 and method.stats['reset'] is False
    method.step(stream[2])
    assert method.stats['resets'] == 1 and method.stats['reset'] is True
    assert method.stats['steps_since_reset'] == 0
    assert 'one class' in method.stats['reset_reason']
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    method.step(stream[3])
    assert method.stats['reset'] is False and method.stats['resets'] == 1
    assert 'one class' in method.stats['reset_reason']  # the latest reason is kept


# --------------------------------------------------------------------------------------
# State: save / restore, atomic writes
# --------------------------------------------------------------------------------------

def test_state_dict_round_trip_continues_identically():
    stream = target_stream(6)
    method = build_method('mmtta', make_source_model(), **FAST_LRS)
    for batch in stream[:3]:
        method.step(batch)
    state = method.state_dict()
    restored = build_method('mmtta', make_source_model(), **FAST_LRS)
    restored.load_state_dict(state)
    for batch in stream[3:]:
        ours, theirs = method.step(batch), restored.step(batch)
        assert torch.equal(ours.logits_2d, theirs.logits_2d)
        assert torch.equal(ours.logits_3d, theirs.logits_3d)
    assert method.stats == restored.stats
    with pytest.raises(ValueError, match="'mmtta'"):
        build_method('tent', make_source_model()).load_state_dict(state)


def test_save_and_load_state_from_disk(tmp_path):
    stream = target_stream(4)
    method = build_method('xmuda_pl', make_source_model(), **FAST_LRS)
    for batch in stream[:2]:
        method.step(batch)
    path = tmp_path / 'state.pt'
    method.save_state(path)
    restored = build_method('xmuda_pl', make_source_model(), **FAST_LRS)
    restored.load_state(path)
    assert restored.steps == 2
    ours, theirs = method.step(stream[2]), restored.step(stream[2])
    assert torch.equal(ours.logits_3d, theirs.logits_3d)
    assert os.listdir(tmp_path) == ['state.pt']


def test_interrupted_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    stream = target_stream(3)
    method = build_method('mmtta', make_source_model(), **FAST_LRS)
    method.step(stream[0])
    path = tmp_path / 'state.pt'
    method.save_state(path)
    old_bytes = path.read_bytes()
    method.step(stream[1])
    real_save = torch.save

    def crash_midway(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(len(old_bytes) // 3)  # half-written file, then the crash
        raise RuntimeError('simulated crash while saving')

    monkeypatch.setattr(persist.torch, 'save', crash_midway)
    with pytest.raises(RuntimeError, match='simulated crash'):
        method.save_state(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ['state.pt']  # no temporary file left behind
    restored = build_method('mmtta', make_source_model(), **FAST_LRS)
    restored.load_state(path)
    assert restored.steps == 1


# --------------------------------------------------------------------------------------
# Setup checks and helpers
# --------------------------------------------------------------------------------------

def test_setup_fails_early_with_messages_that_say_what_to_do():
    with pytest.raises(ValueError, match='unknown adaptation method'):
        build_method('bn_adapt', make_source_model())
    with pytest.raises(ValueError, match='needs model.net_2d'):
        build_method('tent', nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    no_norm = make_source_model()
    no_norm.net_3d = nn.Sequential(nn.Linear(3, NUM_CLASSES))
    with pytest.raises(ValueError, match='model.net_3d has no batch-norm'):
        build_method('mmtta', no_norm)
    with pytest.raises(ValueError, match='selection'):
        build_method('mmtta', make_source_model(), selection='average')
    with pytest.raises(ValueError, match='ema_targets'):
        build_method('mmtta', make_source_model(), ema_targets='all')
    with pytest.raises(TypeError, match=r"source takes no hyperparameter \['lr_2d'\]"):
        build_method('source', make_source_model(), lr_2d=1e-3)
    with pytest.raises(RuntimeError, match='inference_mode'), torch.inference_mode():
        build_method('mmtta', make_source_model()).step(make_batch(0))


def test_a_batch_without_points_is_bad_sensor_data():
    batch = make_batch(0)
    empty = TinyInput(batch.images, batch.pixels[:0], batch.batch_index[:0], batch.points[:0])
    with pytest.raises(SensorDataError, match='no point'):
        build_method('source', make_source_model()).step(empty)


def test_frame_window_keeps_the_last_n_frames():
    window = FrameWindow(3)
    for frame in range(5):
        frames = window.push(frame)
    assert frames == [2, 3, 4] and window.full and len(window) == 3
    window.clear()
    assert len(window) == 0 and not window.full
    with pytest.raises(ValueError):
        FrameWindow(0)


def test_mmtta_on_the_real_segmenter():
    segmenter = pytest.importorskip('mmtta_ros.models.segmenter')
    if not hasattr(segmenter, 'build_segmenter'):
        pytest.skip('mmtta_ros.models.segmenter has no build_segmenter yet')
    torch.manual_seed(0)
    model = segmenter.build_segmenter(segmenter.SegmenterConfig(size='tiny'))
    method = build_method('mmtta', model, **FAST_LRS)
    generator = torch.Generator().manual_seed(0)
    frames, height, width, per_frame = 2, 32, 48, 200
    count = frames * per_frame
    inputs = segmenter.SegmenterInput(
        images=torch.rand(frames, 3, height, width, generator=generator),
        pixels=torch.stack([torch.randint(0, width, (count,), generator=generator),
                            torch.randint(0, height, (count,), generator=generator)], 1),
        batch_index=torch.arange(frames).repeat_interleave(per_frame),
        points=torch.rand(count, 3, generator=generator) * 20.0,
    )
    before = clone_state(model)
    prediction = method.step(inputs)
    assert prediction.logits_2d.shape == (count, prediction.logits_3d.shape[1])
    assert method.stats['updated'] is True and math.isfinite(method.stats['loss'])
    changed = {key for key, value in model.state_dict().items()
               if not torch.equal(value, before[key])}
    assert changed and changed <= norm_tensor_keys(model)
    method.reset()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


class _Scripted:
    """A stand-in method whose predictions are given: logits (2D, 3D) per step."""

    name = 'scripted'

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.stats = {'loss': 1.0}
        self.resets = 0
        self.model = nn.Linear(1, 1)

    def step(self, inputs):
        return Prediction(*self.outputs.pop(0))

    def reset(self):
        self.resets += 1


def _logits(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), NUM_CLASSES).float() * 5


def test_fallback_publishes_the_source_while_the_adapted_branches_disagree_more():
    from mmtta_ros.tta.fallback import agreement, SourceFallback

    source = make_source_model()
    batch = target_stream(1)[0]
    with torch.no_grad():
        reference = source(batch)
    m = reference.logits_2d.shape[0]
    source_agreement = float(agreement(reference.logits_2d, reference.logits_3d))
    agree = (_logits([0] * m), _logits([0] * m))              # agreement 1
    disagree = (_logits([0] * m), _logits([1] * m))           # agreement 0
    method = SourceFallback(_Scripted([agree, disagree, disagree, agree, agree]),
                            copy.deepcopy(source), margin=0.0, smoothing=0.5)
    used = []
    for _ in range(5):
        prediction = method.step(batch)
        used.append('source' if torch.equal(prediction.logits_2d, reference.logits_2d)
                    else 'adapted')
    # EMA (w = 0.5) of the adapted agreement: 1, 0.5, 0.25, 0.625, 0.81 against the source's.
    expected_ema = [1.0, 0.5, 0.25, 0.625, 0.8125]
    assert used == ['adapted' if ema >= source_agreement else 'source' for ema in expected_ema]
    assert 'source' in used and 'adapted' in used
    assert method.stats['fallbacks'] == used.count('source')
    assert method.stats['agreement_adapted'] == pytest.approx(0.8125)
    assert method.stats['loss'] == 1.0  # the method's own numbers still come through
    method.reset()
    assert method.method.resets == 1 and method.agreement_adapted is None


def test_the_builder_wraps_any_method_in_the_fallback_and_reset_is_exact():
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params
    from mmtta_ros.tta.fallback import SourceFallback

    model = make_source_model()
    source = clone_state(model)
    params = node_params({'adaptation.method': 'tent_ens', 'adaptation.fallback': True,
                          'device': 'cpu'})
    pipeline = build_pipeline(params.pipeline, model=model)
    method = pipeline.method
    assert isinstance(method, SourceFallback) and method.name == 'tent_ens'
    for key, value in method.source_model.state_dict().items():
        assert torch.equal(value, source[key]), key  # a pristine copy of the source
    for batch in target_stream(3):
        method.step(batch)
    assert 'agreement_source' in method.stats
    method.reset()
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize('name', sorted(METHODS))
def test_a_predictor_copy_kept_in_sync_predicts_what_step_returns(name):
    """predict() on a copy loaded with prediction_state() == step()'s prediction (protocol)."""
    settings = {'source': {}, 'bn_stats': {}}.get(name, FAST_LRS)
    method = build_method(name, make_source_model(), **settings)
    predictor = copy.deepcopy(method)
    for batch in target_stream(4):
        predictor.load_prediction_state(method.prediction_state())
        predicted = predictor.predict(batch)
        stepped = method.step(batch)  # the paper's protocol: predicted before the update
        torch.testing.assert_close(predicted.logits_2d, stepped.logits_2d)
        torch.testing.assert_close(predicted.logits_3d, stepped.logits_3d)
    # predict() changes nothing: the same input twice, the same output.
    again = predictor.predict(batch)
    torch.testing.assert_close(again.logits_2d, predicted.logits_2d)
    if name != 'source':
        assert predictor.prediction_state().keys() == method.prediction_state().keys()
        assert len(method.prediction_state()) > 0
