"""Tests of mic and ftd: formulas by hand, what they change, the node's path to them."""

import copy
import math

import numpy as np
import pytest
import torch

from mmtta_ros.core.checkpoint import load_model_checkpoint, save_model_checkpoint
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.tta import build_method
from mmtta_ros.tta.ftd import fused_distillation_terms
from mmtta_ros.tta.mic import (
    cell_keep_mask, mask_images, patch_keep_mask, quality_weights)
from mmtta_ros.tta.norm import configure_norm_adaptation, untracked_batch_stats
from test_tta import clone_state, FAST_LRS, make_batch, make_source_model, target_stream

F, T = False, True


# --------------------------------------------------------------------------------------
# mic: mask, quality weight, point cells
# --------------------------------------------------------------------------------------

def test_patch_mask_layout_and_ratio_by_hand():
    # Seed 0 draws v = (0.4963, 0.7682, 0.0885 | 0.1320, 0.3074, 0.6341) for the 2 x 3
    # patches of a 5 x 7 image in 3 x 3 patches; ratio 0.5 keeps v > 0.5: patches (0, 1)
    # and (1, 2). The last patch row has 2 rows, the last patch column 1 column.
    keep = patch_keep_mask(1, 5, 7, 3, 0.5, torch.Generator().manual_seed(0))
    expected = torch.tensor([[F, F, F, T, T, T, F]] * 3 + [[F, F, F, F, F, F, T]] * 2)
    assert keep.shape == (1, 5, 7) and torch.equal(keep[0], expected)
    # Over many patches the masked share is the ratio.
    many = patch_keep_mask(4, 320, 320, 8, 0.7, torch.Generator().manual_seed(1))
    assert abs((~many).float().mean().item() - 0.7) < 0.02
    assert bool(patch_keep_mask(1, 4, 4, 2, 0.0, torch.Generator()).all())


def test_masked_pixels_take_the_image_mean_colour():
    image = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2) / 12  # channels 0..2
    keep = torch.tensor([[[T, F], [F, T]]])
    masked = mask_images(image, keep)
    channel_means = image.mean(dim=(2, 3))[0]  # (1.5, 5.5, 9.5) / 12
    for channel in range(3):
        assert masked[0, channel, 0, 0] == image[0, channel, 0, 0]
        assert masked[0, channel, 1, 1] == image[0, channel, 1, 1]
        assert masked[0, channel, 0, 1] == channel_means[channel]
        assert masked[0, channel, 1, 0] == channel_means[channel]
    assert masked[0, 1, 0, 1].item() == pytest.approx(5.5 / 12)


def test_quality_weight_is_the_share_of_confident_points_per_frame():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9],   # frame 0
                          [0.4, 0.3, 0.3], [0.55, 0.4, 0.05]])                   # frame 1
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    per_point, per_frame = quality_weights(probs, batch_index, 3, threshold=0.6)
    # Frame 0: 0.7 and 0.9 exceed 0.6 -> 2/3; frame 1: none; frame 2 has no point -> 0.
    torch.testing.assert_close(per_frame, torch.tensor([2 / 3, 0.0, 0.0]))
    torch.testing.assert_close(per_point, torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]))


def test_point_cells_are_kept_or_removed_whole():
    # Cells of 2 m: frame 0 has cells (0, 0) (points 0, 1) and (1, 0) (point 2); frame 1
    # (0, 0) (point 3) and (-1, 0) (point 4). Sorted keys (frame, cx, cy): (0, 0, 0),
    # (0, 1, 0), (1, -1, 0), (1, 0, 0) draw 0.4963, 0.7682, 0.0885, 0.1320 (seed 0):
    # only (0, 1, 0) is above 0.5.
    points = torch.tensor([[0.5, 0.5, 0.0], [1.5, 0.2, 1.0], [2.5, 0.1, 0.0],
                           [0.3, 0.3, 0.0], [-0.5, 0.1, 0.0]])
    keep = cell_keep_mask(points, torch.tensor([0, 0, 0, 1, 1]), 2.0, 0.5,
                          torch.Generator().manual_seed(0))
    assert keep.tolist() == [F, F, T, F, F]


def test_untracked_batch_stats_leaves_the_buffers_alone_and_restores_the_flags():
    model = make_source_model()
    configure_norm_adaptation(model, record_batch_stats=True)
    before = clone_state(model)
    with untracked_batch_stats(model.net_2d):
        model(make_batch(3, shift=0.7))
        assert not model.net_2d[1].track_running_stats
    assert torch.equal(model.net_2d[1].running_mean, before['net_2d.1.running_mean'])
    assert model.net_2d[1].track_running_stats
    # The 3D layer outside the block recorded its batch statistics, as configured.
    assert not torch.equal(model.net_3d[1].running_mean, before['net_3d.1.running_mean'])
    model(make_batch(4, shift=0.7))
    assert not torch.equal(model.net_2d[1].running_mean, before['net_2d.1.running_mean'])


# --------------------------------------------------------------------------------------
# mic: what it changes
# --------------------------------------------------------------------------------------

def norm_state(module, branch):
    return {key: value for key, value in module.state_dict().items()
            if key.startswith(branch) and key.split('.')[1] == '1'}


def test_mic_with_zero_weight_is_mmtta_bit_for_bit():
    """The masked forward must not leak into anything (buffers, EMA, optimiser)."""
    stream = target_stream(4)
    mic = build_method('mic', make_source_model(), mic_weight=0.0, **FAST_LRS)
    mmtta = build_method('mmtta', make_source_model(), momentum=0.9, **FAST_LRS)
    for batch in stream:
        ours, theirs = mic.step(batch), mmtta.step(batch)
        assert torch.equal(ours.logits_2d, theirs.logits_2d)
        assert torch.equal(ours.logits_3d, theirs.logits_3d)
    for name in ('model', 'slow_model'):
        ours, theirs = getattr(mic, name).state_dict(), getattr(mmtta, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    assert mic.stats['mic_loss'] > 0.0 and 0.0 <= mic.stats['mic_quality'] <= 1.0


def test_mic_changes_the_2d_branch_only_unless_points_are_masked_too():
    batch = target_stream(1)[0]
    mmtta = build_method('mmtta', make_source_model(), momentum=0.9, **FAST_LRS)
    mmtta.step(batch)
    # quality_threshold 0: every point counts (q = 1), so the MIC term cannot vanish.
    mic = build_method('mic', make_source_model(), quality_threshold=0.0, **FAST_LRS)
    mic.step(batch)
    assert mic.stats['mic_quality'] == 1.0 and 0.0 < mic.stats['mic_masked_points'] < 1.0
    for branch, same in (('net_2d', False), ('net_3d', True)):
        ours, theirs = norm_state(mic.model, branch), norm_state(mmtta.model, branch)
        equal = all(torch.equal(ours[key], theirs[key]) for key in ours)
        assert equal == same, branch
    both = build_method('mic', make_source_model(), quality_threshold=0.0,
                        point_mask_ratio=0.5, point_cell_size=0.5, **FAST_LRS)
    both.step(batch)
    ours, theirs = norm_state(both.model, 'net_3d'), norm_state(mmtta.model, 'net_3d')
    assert not all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert both.stats['mic_loss_3d'] > 0.0


def test_mic_masks_follow_the_seed_and_survive_save_and_restore():
    stream = target_stream(5)
    runs = {}
    for label, seed in (('a', 3), ('b', 3), ('c', 4)):
        method = build_method('mic', make_source_model(), seed=seed, quality_threshold=0.0,
                              **FAST_LRS)
        for batch in stream[:2]:
            method.step(batch)
        runs[label] = method
    same = [torch.equal(runs['a'].model.state_dict()[k], runs['b'].model.state_dict()[k])
            for k in runs['a'].model.state_dict()]
    other = [torch.equal(runs['a'].model.state_dict()[k], runs['c'].model.state_dict()[k])
             for k in runs['a'].model.state_dict()]
    assert all(same) and not all(other)
    # The generator's state travels with the method's state.
    restored = build_method('mic', make_source_model(), seed=3, quality_threshold=0.0,
                            **FAST_LRS)
    restored.load_state_dict(runs['a'].state_dict())
    for batch in stream[2:]:
        ours, theirs = runs['a'].step(batch), restored.step(batch)
        assert torch.equal(ours.logits_2d, theirs.logits_2d)
    assert runs['a'].stats == restored.stats


def test_mic_refuses_a_model_whose_2d_branch_cannot_run_alone():
    model = make_source_model()
    model.net_2d = torch.nn.Sequential(*list(model.net_2d))  # no point_features
    with pytest.raises(ValueError, match='point_features'):
        build_method('mic', model)


# --------------------------------------------------------------------------------------
# ftd: distillation and debiased pseudo-labels
# --------------------------------------------------------------------------------------

def test_fused_distillation_terms_by_hand():
    log = torch.log
    teacher = log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    fast_2d = log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    fast_3d = log(torch.tensor([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]))
    terms = fused_distillation_terms(fast_2d, fast_3d, teacher)
    # KL(p_F || p_2D): 0 at point 0 (equal), at point 1:
    kl_2d = 0.1 * math.log(0.1 / 0.5) + 0.1 * math.log(0.1 / 0.25) + 0.8 * math.log(0.8 / 0.25)
    # KL(p_F || p_3D): at point 0, 0 at point 1 (equal):
    kl_3d = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.6) + 0.1 * math.log(0.1 / 0.2)
    assert terms.labels.tolist() == [0, 2]
    np.testing.assert_allclose(terms.weight_2d.numpy(), [1.0, math.exp(-kl_2d)], rtol=1e-5)
    np.testing.assert_allclose(terms.weight_3d.numpy(), [math.exp(-kl_3d), 1.0], rtol=1e-5)
    assert terms.distillation.item() == pytest.approx(kl_2d / 2 + kl_3d / 2, rel=1e-5)
    # CE against ŷ = (0, 2): 2D -ln 0.7, -ln 0.25; 3D -ln 0.2, -ln 0.8; weighted means.
    pseudo_2d = (-math.log(0.7) + math.exp(-kl_2d) * -math.log(0.25)) / 2
    pseudo_3d = (math.exp(-kl_3d) * -math.log(0.2) + -math.log(0.8)) / 2
    assert terms.pseudo_label.item() == pytest.approx(pseudo_2d + pseudo_3d, rel=1e-5)


def test_fused_distillation_pulls_each_branch_to_the_fused_prediction():
    generator = torch.Generator().manual_seed(8)
    fast_2d = torch.randn(10, 4, generator=generator, requires_grad=True)
    fast_3d = torch.randn(10, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(10, 4, generator=generator, requires_grad=True)
    terms = fused_distillation_terms(fast_2d, fast_3d, teacher)
    terms.distillation.backward()
    # d KL(q || softmax(z)) / dz = softmax(z) - q; the teacher gets no gradient.
    target = teacher.detach().softmax(1)
    torch.testing.assert_close(fast_2d.grad, (fast_2d.detach().softmax(1) - target) / 10)
    torch.testing.assert_close(fast_3d.grad, (fast_3d.detach().softmax(1) - target) / 10)
    assert teacher.grad is None
    assert not terms.weight_2d.requires_grad and not terms.weight_3d.requires_grad


def test_ftd_learns_from_the_slow_models_fused_prediction():
    stream = target_stream(4)
    method = build_method('ftd', make_source_model(), **FAST_LRS)
    for batch in stream[:2]:
        method.step(batch)  # slow and fast models now differ
    fast, slow = copy.deepcopy(method.model), copy.deepcopy(method.slow_model)
    head_before = clone_state(method.model.fused_head)
    with torch.no_grad():
        fast_output, slow_output = fast(stream[2]), slow.eval()(stream[2])
    expected = fused_distillation_terms(fast_output.logits_2d, fast_output.logits_3d,
                                        slow_output.logits_fused)
    method.step(stream[2])
    assert method.stats['distillation'] == pytest.approx(expected.distillation.item(), rel=1e-5)
    assert method.stats['pseudo_label_loss'] == pytest.approx(expected.pseudo_label.item(),
                                                              rel=1e-5)
    assert method.stats['loss'] == pytest.approx(
        0.1 * expected.distillation.item() + expected.pseudo_label.item(), rel=1e-5)
    for key, value in method.model.fused_head.state_dict().items():
        assert torch.equal(value, head_before[key]), key  # the head never adapts


def test_ftd_refuses_a_model_without_a_fused_head_in_one_line():
    with pytest.raises(ValueError, match='--fit-fused-head') as error:
        build_method('ftd', make_source_model(fused_head=False))
    assert '\n' not in str(error.value)
    # A model that has the attribute but returns no fused logits fails at the first step.
    method = build_method('ftd', make_source_model(namespace_output=True))
    with pytest.raises(ValueError, match='fused 2D\\+3D head'):
        method.step(target_stream(1)[0])


# --------------------------------------------------------------------------------------
# Through the node's builder on generated frames, with the real segmenter
# --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def night_frames(tmp_path_factory):
    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.synth import SequenceConfig

    config = SequenceConfig(domain='night', seed=5, num_frames=3, image_size=(128, 72),
                            frame_stride=4, lidar_azimuth_steps=400)
    return synthetic_frames([config], tmp_path_factory.mktemp('cache'))


@pytest.mark.parametrize('name', ['mic', 'ftd'])
def test_methods_run_through_build_pipeline_and_reset_exactly(name, night_frames, tmp_path):
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params

    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny', fused_head=True)
    checkpoint = tmp_path / 'fused.pt'
    save_model_checkpoint(checkpoint, build_segmenter(config), config)
    source = load_model_checkpoint(checkpoint)[0].state_dict()
    params = node_params({'adaptation.method': name, 'model.checkpoint': str(checkpoint),
                          'device': 'cpu', 'model.image_width': 128,
                          'model.image_height': 72, 'adaptation.fallback': True,
                          f'adaptation.{name}.lr_2d': 1e-2})
    pipeline = build_pipeline(params.pipeline)
    assert pipeline.method_name == name
    for frame in night_frames:
        output = pipeline.process(frame)
        assert output.prediction.shape == (int(output.in_view.sum()),)
        assert output.stats['updated'] is True and math.isfinite(output.stats['loss'])
    assert ('mic_loss' if name == 'mic' else 'distillation') in output.stats
    model = pipeline.method.model
    assert any(not torch.equal(value, source[key]) for key, value in model.state_dict().items())
    pipeline.reset()
    for adapted in (model, pipeline.method.method.slow_model):
        for key, value in adapted.state_dict().items():
            assert torch.equal(value, source[key]), key


def test_ftd_on_a_checkpoint_without_a_head_stops_the_builder_with_the_fix(tmp_path):
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params

    config = SegmenterConfig(size='tiny')
    checkpoint = tmp_path / 'plain.pt'
    save_model_checkpoint(checkpoint, build_segmenter(config), config)
    params = node_params({'adaptation.method': 'ftd', 'model.checkpoint': str(checkpoint),
                          'device': 'cpu'})
    with pytest.raises(ValueError, match='mmtta_train --fit-fused-head'):
        build_pipeline(params.pipeline)
