"""Tests of cbst and proda (issue 10): their formulas by hand, their state, the node's builder."""

import math

import numpy as np
import pytest
import torch

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta import build_method
from mmtta_ros.tta.cbst import (
    class_balanced_labels, class_thresholds, confidence_bins, new_confidence_histogram,
    update_confidence_histogram)
from mmtta_ros.tta.losses import inverse_kl_similarity
from mmtta_ros.tta.mmtta import mmtta_pseudo_labels, refined_pseudo_labels
from mmtta_ros.tta.proda import prototype_weights, rectify, update_prototypes

from test_tta import (  # noqa: I100 (a test module beside this one)
    clone_state, FAST_LRS, make_source_model, norm_tensor_keys, target_stream, TinyOutput)

IGN = IGNORE_INDEX
INF = float('inf')


# --------------------------------------------------------------------------------------
# CBST: running per-class quantile and ratio labels against hand-computed numbers
# --------------------------------------------------------------------------------------

# Histogram bins are uniform in u = -log(1 - confidence) over [0, ln 1e6]: with 6 bins,
# each spans a factor 10 of 1 - confidence, and bin b starts at confidence 1 - 10^-b.
# Class 0 at 1 - 3e-1 ... 1 - 3e-5 (bins 0-4); class 1 at 0.95 (bin 1) and 0.5 (bin 0);
# class 2 never predicted.
CBST_PROBS = torch.tensor([
    [0.7, 0.2, 0.1], [0.97, 0.02, 0.01], [0.997, 0.002, 0.001], [0.9997, 2e-4, 1e-4],
    [0.99997, 2e-5, 1e-5], [0.02, 0.95, 0.03], [0.3, 0.5, 0.2]])


def test_confidence_histogram_counts_each_point_in_its_class_and_log_doubt_bin():
    histogram = update_confidence_histogram(new_confidence_histogram(3, 6), CBST_PROBS, 1.0)
    expected = np.zeros((3, 6))
    expected[0, [0, 1, 2, 3, 4]] = 1
    expected[1, [1, 0]] = 1
    np.testing.assert_array_equal(histogram.numpy(), expected)
    # Decay: the old counts are halved before this batch's are added.
    again = update_confidence_histogram(histogram, CBST_PROBS[:1], 0.5)
    expected *= 0.5
    expected[0, 0] += 1
    np.testing.assert_array_equal(again.numpy(), expected)
    assert histogram.dtype == torch.float64
    with pytest.raises(ValueError, match='must be'):
        update_confidence_histogram(histogram, CBST_PROBS[:, :2], 1.0)


def test_confidences_near_one_are_binned_by_the_other_classes_mass():
    # 1 - p summed from the other classes is exact where 1 - p(float32) is off by ~4 %
    # (bin 971 instead of 970 for 1.5e-6); a softmax that rounds to 1.0 is in the top bin.
    doubts = (1.5e-6, 3.3e-6)
    probs = torch.cat([torch.tensor([[1 - d, 0.6 * d, 0.4 * d] for d in doubts]),
                       torch.softmax(torch.tensor([[20.0, 0.0, 0.0]]), dim=1)])
    assert probs[2, 0].item() == 1.0
    _, bins = confidence_bins(probs, 1000)
    exact = [math.floor(-math.log(d) / math.log(1e6) * 1000) for d in doubts]
    assert bins.tolist() == exact + [999] and exact == [970, 913]


def test_class_thresholds_keep_the_top_portion_of_each_class():
    histogram = update_confidence_histogram(new_confidence_histogram(3, 6), CBST_PROBS, 1.0)
    # Portion 0.4: class 0 keeps 2 of 5 (bins 4 and 3: threshold 1 - 1e-3); class 1 keeps
    # 1 of 2 (0.8 points: the top one, bin 1, 0.9); class 2 has no points.
    np.testing.assert_allclose(class_thresholds(histogram, 0.4).numpy(), [0.999, 0.9, INF],
                               rtol=1e-6)
    # Portion 0.6: 3 of 5 (bin 2, 1 - 1e-2); class 1 needs 1.2 points: both, down to 1/C.
    np.testing.assert_allclose(class_thresholds(histogram, 0.6).numpy(), [0.99, 1 / 3, INF],
                               rtol=1e-6)
    # Portion 1: everything predicted as the class; bin 0 starts at 0, and a top class
    # is never below 1/C.
    np.testing.assert_allclose(class_thresholds(histogram, 1.0).numpy(), [1 / 3, 1 / 3, INF])
    with pytest.raises(ValueError, match='portion'):
        class_thresholds(histogram, 0.0)


def test_class_balanced_labels_by_ratio_to_the_class_threshold():
    thresholds = torch.tensor([0.9, 0.4, INF])
    probs = torch.tensor([
        [0.95, 0.03, 0.02],   # 0.95 / 0.9 = 1.06 -> 0
        [0.85, 0.10, 0.05],   # 0.94, 0.25 -> below 1 for every class: ignored
        [0.55, 0.45, 0.00],   # 0.61, 1.125 -> 1, although 0 is the argmax
        [0.30, 0.20, 0.50],   # class 2 never predicted (k = inf): 0.33, 0.5, 0 -> ignored
    ])
    labels, ratio = class_balanced_labels(probs, thresholds)
    assert labels.tolist() == [0, IGN, 1, IGN]
    np.testing.assert_allclose(ratio.numpy(), [0.95 / 0.9, 0.85 / 0.9, 1.125, 0.5], rtol=1e-6)


def test_running_quantile_over_a_stream_equals_the_exact_quantile_to_one_bin():
    generator = torch.Generator().manual_seed(4)
    bins, portion, top = 1000, 0.37, math.log(1e6)
    histogram = new_confidence_histogram(4, bins)
    seen = []
    for _ in range(3):  # three batches: the quantile is over the stream, not the batch
        probs = torch.softmax(torch.randn(500, 4, generator=generator) * 3.0, dim=1)
        histogram = update_confidence_histogram(histogram, probs, 1.0)
        seen.append(probs)
    probs = torch.cat(seen).double().numpy()
    predicted = probs.argmax(1)
    log_doubt = -np.log(probs.sum(1) - probs.max(1))
    thresholds = class_thresholds(histogram, portion).numpy()
    for c in range(4):
        ranked = np.sort(log_doubt[predicted == c])[::-1]
        kth_bin = math.floor(ranked[math.ceil(portion * len(ranked)) - 1] / top * bins)
        assert thresholds[c] == pytest.approx(1 - math.exp(-kth_bin * top / bins)), c
        # At least the portion of the class clears its threshold, at most one bin more.
        point_bins = np.floor(ranked / top * bins)
        share = (point_bins >= kth_bin).mean()
        assert portion <= share <= portion + (point_bins == kth_bin).mean()


def test_a_weakly_predicted_class_keeps_its_share_where_a_global_threshold_drops_it():
    # Class 0 predicted at 0.9-0.99, class 1 only at 0.4-0.5 (a rare, unsure class).
    confident = torch.linspace(0.9, 0.99, 20)
    unsure = torch.linspace(0.4, 0.5, 10)
    probs = torch.cat([torch.stack([confident, 1 - confident, torch.zeros(20)], 1),
                       torch.stack([(1 - unsure) / 2, unsure, (1 - unsure) / 2], 1)])
    histogram = update_confidence_histogram(new_confidence_histogram(3, 1000), probs, 1.0)
    labels, _ = class_balanced_labels(probs, class_thresholds(histogram, 0.5))
    assert (labels[:20] == 0).sum() == 10 and (labels[20:] == 1).sum() == 5
    assert (probs.max(1).values > 0.6)[20:].sum() == 0  # a global 0.6 would keep none


def crafted_outputs(logits_fast_2d, logits_slow_2d, logits_fast_3d, logits_slow_3d,
                    features_2d=None, features_3d=None):
    return (TinyOutput(logits_fast_2d, logits_fast_3d),
            TinyOutput(logits_slow_2d, logits_slow_3d, features_2d, features_3d))


def random_logits(seed, points=40, classes=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(points, classes, generator=generator) * 2 for _ in range(4)]


def test_cbst_labels_are_class_balanced_within_mmtta_consistency():
    method = build_method('cbst', make_source_model(), portion=0.3, portion_growth=0.1,
                          portion_max=0.45, histogram_bins=50, histogram_decay=0.8,
                          threshold=2.0)
    histogram = new_confidence_histogram(3, 50)
    for step, seed in enumerate((1, 2, 3)):
        logits = random_logits(seed)
        method.steps_since_reset = step  # what step() counts
        pseudo, extra = method.pseudo_labels(*crafted_outputs(*logits))
        mmtta = mmtta_pseudo_labels(*logits[:2], *logits[2:], threshold=2.0)
        histogram = update_confidence_histogram(histogram, mmtta.probs, 0.8)
        portion = min(0.45, 0.3 + 0.1 * step)
        balanced, _ = class_balanced_labels(mmtta.probs, class_thresholds(histogram, portion))
        expected = torch.where(mmtta.labels == IGN, IGN, balanced)
        assert pseudo.labels.tolist() == expected.tolist()
        torch.testing.assert_close(method.confidence_histogram, histogram)
        assert extra['portion'] == pytest.approx(portion)
        # Both filters bite: MM-TTA's threshold ignores some points, CBST others.
        assert (mmtta.labels == IGN).any() and ((mmtta.labels != IGN) & (expected == IGN)).any()


# --------------------------------------------------------------------------------------
# ProDA: prototype weights, rectified labels, prototype updates by hand
# --------------------------------------------------------------------------------------

# η0 = (0, 0), η1 = (3, 4), class 2 has no prototype yet.
PROTOTYPES = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
SEEN = torch.tensor([True, True, False])


def test_prototype_weights_softmax_of_distances_unseen_classes_uniform():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0]])  # distances (0, 5) and (5, 0)
    near = 1.0 / (1.0 + math.exp(-5.0))
    weights = prototype_weights(features, PROTOTYPES, SEEN, temperature=1.0)
    # Seen classes share 2/3 by softmax(-d); the unseen class keeps 1/3.
    expected = [[2 / 3 * near, 2 / 3 * (1 - near), 1 / 3],
                [2 / 3 * (1 - near), 2 / 3 * near, 1 / 3]]
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5)
    # τ = 5: softmax of (0, -1).
    weights = prototype_weights(features[:1], PROTOTYPES, SEEN, temperature=5.0)
    near = 1.0 / (1.0 + math.exp(-1.0))
    np.testing.assert_allclose(weights.numpy(), [[2 / 3 * near, 2 / 3 * (1 - near), 1 / 3]],
                               rtol=1e-5)
    # No prototype at all: uniform, the prediction stays as it is.
    none = prototype_weights(features, PROTOTYPES, torch.zeros(3, dtype=torch.bool), 1.0)
    np.testing.assert_allclose(none.numpy(), np.full((2, 3), 1 / 3))


def test_rectified_label_follows_the_nearest_prototype_when_the_prediction_is_unsure():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    weights = prototype_weights(features, PROTOTYPES, SEEN, temperature=1.0)
    rectified = rectify(probs, weights)
    # Point 1: ω ≈ (0.0045, 0.662, 0.333) · p = (0.0022, 0.199, 0.067) -> class 1.
    # Point 2: the same features, but p0 = 0.9: ω·p = (0.0081, 0.033, 0.017) -> 1 too.
    # Point 0: at η0: (0.33, 0.0013, 0.067) -> 0.
    assert rectified.argmax(1).tolist() == [0, 1, 1]
    weighted = weights * probs
    torch.testing.assert_close(rectified, weighted / weighted.sum(1, keepdim=True))
    # Far from every prototype at equal distance: the prediction decides (ω uniform on seen).
    middle = prototype_weights(torch.tensor([[1.5, 2.0]]), PROTOTYPES, SEEN, 1.0)
    np.testing.assert_allclose(middle.numpy(), [[1 / 3, 1 / 3, 1 / 3]], rtol=1e-5)


def test_update_prototypes_initialise_then_follow_by_momentum():
    prototypes, seen = torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, IGN])
    prototypes, seen = update_prototypes(prototypes, seen, features, labels, momentum=0.9)
    np.testing.assert_allclose(prototypes.numpy(), [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert seen.tolist() == [True, True, False]
    prototypes, seen = update_prototypes(prototypes, seen, torch.tensor([[4.0, 0.0]]),
                                         torch.tensor([0]), momentum=0.9)
    np.testing.assert_allclose(prototypes.numpy(), [[2.2, 0.0], [0.0, 2.0], [0.0, 0.0]],
                               rtol=1e-6)
    assert seen.tolist() == [True, True, False]


def test_proda_first_labels_are_mmtta_then_rectified_by_past_prototypes():
    method = build_method('proda', make_source_model(), temperature=0.5,
                          prototype_momentum=0.8)
    generator = torch.Generator().manual_seed(7)
    batches = []
    for seed in (11, 12, 13):
        logits = random_logits(seed)
        features = [torch.randn(40, dim, generator=generator) for dim in (5, 4)]
        batches.append((logits, features))
    prototypes = {'2d': torch.zeros(3, 5), '3d': torch.zeros(3, 4)}
    seen = {key: torch.zeros(3, dtype=torch.bool) for key in prototypes}
    for step, (logits, (features_2d, features_3d)) in enumerate(batches):
        pseudo, extra = method.pseudo_labels(*crafted_outputs(*logits, features_2d,
                                                              features_3d))
        fast_2d, slow_2d, fast_3d, slow_3d = logits
        rectified = {}
        for key, fast, slow, features in (('2d', fast_2d, slow_2d, features_2d),
                                          ('3d', fast_3d, slow_3d, features_3d)):
            weights = prototype_weights(features, prototypes[key], seen[key], 0.5)
            rectified[key] = rectify(torch.softmax((fast + slow) / 2, 1), weights)
        expected = refined_pseudo_labels(
            rectified['2d'], rectified['3d'], inverse_kl_similarity(fast_2d, slow_2d, 1e-6),
            inverse_kl_similarity(fast_3d, slow_3d, 1e-6))
        assert pseudo.labels.tolist() == expected.labels.tolist()
        if step == 0:  # no prototype yet: exactly MM-TTA's labels
            mmtta = mmtta_pseudo_labels(fast_2d, slow_2d, fast_3d, slow_3d)
            assert pseudo.labels.tolist() == mmtta.labels.tolist()
            assert extra['rectified_2d'] == 0.0
        else:
            assert extra['rectified_2d'] > 0.0  # the prototypes changed some labels
        for key, features in (('2d', features_2d), ('3d', features_3d)):
            prototypes[key], seen[key] = update_prototypes(
                prototypes[key], seen[key], features, expected.labels, 0.8)
            torch.testing.assert_close(method.prototypes[key], prototypes[key])
            assert torch.equal(method.prototype_seen[key], seen[key])


def test_proda_says_what_it_needs_from_the_model():
    method = build_method('proda', make_source_model(namespace_output=True))
    with pytest.raises(ValueError, match=r'proda needs per-point features.*features_2d'):
        method.step(target_stream(1)[0])


# --------------------------------------------------------------------------------------
# Both: what changes, reset, state round trip, the node's builder
# --------------------------------------------------------------------------------------

OWN_STATE = {'cbst': ('confidence_histogram',), 'proda': ('prototypes', 'prototype_seen')}


@pytest.mark.parametrize('name', sorted(OWN_STATE))
def test_only_norm_tensors_the_slow_model_and_own_state_change(name):
    model = make_source_model()
    source = clone_state(model)
    method = build_method(name, model, **FAST_LRS)
    mmtta_keys = set(build_method('mmtta', make_source_model()).state_dict())
    for batch in target_stream(3):
        method.step(batch)
        assert method.stats['updated'] is True
    state = method.state_dict()
    assert set(state) == mmtta_keys | set(OWN_STATE[name])
    for module in (method.model, method.slow_model):
        changed = {key for key, value in module.state_dict().items()
                   if not torch.equal(value, source[key])}
        assert changed and changed <= norm_tensor_keys(model)
    assert {n for n, p in method.model.named_parameters() if p.requires_grad} \
        <= norm_tensor_keys(model)
    assert not any(p.requires_grad for p in method.slow_model.parameters())


def own_state(method, name):
    return {key: method.state_dict()[key] for key in OWN_STATE[name]}


def assert_same(first, second):
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same(first[key], second[key])
    elif first is None:
        assert second is None
    else:
        assert torch.equal(first, second)


@pytest.mark.parametrize('name', sorted(OWN_STATE))
def test_reset_restores_the_source_and_empties_own_state(name):
    model = make_source_model()
    source = clone_state(model)
    method = build_method(name, model, **FAST_LRS)
    fresh = build_method(name, make_source_model(), **FAST_LRS)
    stream = target_stream(4)
    first_fresh = fresh.step(stream[0])
    for batch in stream:
        method.step(batch)
    assert all(value is not None for value in own_state(method, name).values())
    method.reset()
    for module in (method.model, method.slow_model):
        for key, value in module.state_dict().items():
            assert torch.equal(value, source[key]), key
    first = method.step(stream[0])
    assert torch.equal(first.logits_3d, first_fresh.logits_3d)
    assert_same(own_state(method, name), own_state(fresh, name))
    assert method.stats == {**fresh.stats, 'step': 5}


@pytest.mark.parametrize('name', sorted(OWN_STATE))
def test_state_round_trip_continues_identically(name, tmp_path):
    stream = target_stream(6)
    method = build_method(name, make_source_model(), **FAST_LRS)
    for batch in stream[:3]:
        method.step(batch)
    restored = build_method(name, make_source_model(), **FAST_LRS)
    restored.load_state_dict(method.state_dict())
    from_disk = build_method(name, make_source_model(), **FAST_LRS)
    method.save_state(tmp_path / 'state.pt')
    from_disk.load_state(tmp_path / 'state.pt')  # weights_only: plain tensors and dicts
    for batch in stream[3:]:
        ours = method.step(batch)
        for other in (restored, from_disk):
            theirs = other.step(batch)
            assert torch.equal(ours.logits_2d, theirs.logits_2d)
            assert torch.equal(ours.logits_3d, theirs.logits_3d)
            assert_same(own_state(method, name), own_state(other, name))
            assert method.stats == other.stats


def test_cbst_refuses_a_histogram_of_another_size():
    method = build_method('cbst', make_source_model(), **FAST_LRS)
    method.step(target_stream(1)[0])
    other = build_method('cbst', make_source_model(), histogram_bins=10)
    with pytest.raises(ValueError, match='histogram_bins=1000'):
        other.load_state_dict(method.state_dict())
    with pytest.raises(ValueError, match='portion'):
        build_method('cbst', make_source_model(), portion=0.6, portion_max=0.5)


@pytest.fixture(scope='module')
def frames():
    from mmtta_ros.synth import generate_frames, SequenceConfig
    config = SequenceConfig(domain='night', seed=9, num_frames=3, image_size=(64, 36),
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


@pytest.mark.parametrize('name', sorted(OWN_STATE))
def test_runs_through_the_nodes_builder_on_generated_frames(name, frames):
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny'))
    source = clone_state(model)
    params = node_params({'adaptation.method': name, 'device': 'cpu',
                          'model.image_width': 64, 'model.image_height': 36,
                          f'adaptation.{name}.lr_2d': 1e-2, f'adaptation.{name}.lr_3d': 1e-2})
    pipeline = build_pipeline(params.pipeline, model=model)
    assert pipeline.method.name == name
    for frame in frames:
        output = pipeline.process(frame)
        assert output.prediction.shape == output.prediction_3d.shape
        assert output.stats['updated'] is True and math.isfinite(output.stats['loss'])
    if name == 'cbst':
        assert output.stats['labeled_classes'] >= 1 and 0 < output.stats['portion'] < 1
    else:  # the real segmenter's features: 2D and 3D prototypes exist after a step
        assert output.stats['prototypes_2d'] >= 1 and output.stats['prototypes_3d'] >= 1
    pipeline.reset()
    for key, value in pipeline.method.model.state_dict().items():
        assert torch.equal(value, source[key]), key
