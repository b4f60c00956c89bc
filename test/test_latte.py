"""Tests of Latte (mmtta_ros.tta.latte): voxel pooling over a causal posed window, weights."""

from dataclasses import dataclass, replace
import math
from typing import Optional

import numpy as np
import pytest
import torch

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.tta import build_method
from mmtta_ros.tta.latte import (
    latte_pseudo_labels, MAX_ODOM_STEP_M, pack_voxel_keys, pool_voxel_entropy,
    voxel_consistency, VoxelWindow)
from test_tta import (
    clone_state, FAST_LRS, make_batch, make_source_model, norm_tensor_keys, numpy_kl,
    numpy_softmax)


def pose(yaw_deg: float = 0.0, x: float = 0.0, y: float = 0.0) -> torch.Tensor:
    """Return <float64: 4, 4> a yaw rotation then a translation."""
    yaw = math.radians(yaw_deg)
    T = torch.eye(4, dtype=torch.float64)
    T[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    T[0, 3], T[1, 3] = x, y
    return T


def single(points, entropy):
    """Return (points <M, 3>, batch_index <M>, entropy <M, 2>) of one frame."""
    points = torch.tensor(points, dtype=torch.float32)
    return points, torch.zeros(len(points), dtype=torch.long), torch.tensor(entropy)


# Frame A at the origin; frame B turned 90 degrees left, 5 m ahead. With 0.5 m voxels:
# A0 and A2 share voxel (0, 0, 0); B0 lands at (5.1, 0.1, 0.1) in odom, in A1's voxel
# (10, 0, 0); B1 has A1's LiDAR coordinates but lies at (4.9, 5.2, 0.1) in odom: alone.
POINTS_A = [[0.1, 0.1, 0.1], [5.2, 0.1, 0.1], [0.3, 0.2, 0.4]]
ENTROPY_A = [[1.0, 0.2], [0.5, 0.4], [0.7, 0.6]]
POSE_A = pose()
POINTS_B = [[0.1, -0.1, 0.1], [5.2, 0.1, 0.1]]
ENTROPY_B = [[0.3, 1.0], [0.9, 0.1]]
POSE_B = pose(90.0, x=5.0)
# Frame C back at the origin: C0 in A's voxel (0, 0, 0), C1 in B0's (10, 0, 0).
POINTS_C = [[0.2, 0.2, 0.2], [5.3, 0.2, 0.2]]
ENTROPY_C = [[0.1, 0.1], [0.2, 0.3]]
POSE_C = pose()


def pool(window, points, entropy, T, batch_index=None):
    points_t, index, entropy_t = single(points, entropy)
    if batch_index is not None:
        index = torch.tensor(batch_index)
    return window.pool(points_t, index, None if T is None else torch.stack(T), entropy_t)


def test_voxel_pooling_over_two_posed_frames_by_hand():
    window = VoxelWindow(window=2, voxel_size=0.5)
    first = pool(window, POINTS_A, ENTROPY_A, [POSE_A])
    torch.testing.assert_close(first.entropy, torch.tensor([[0.85, 0.4], [0.5, 0.4],
                                                            [0.85, 0.4]]))
    assert first.frames == 1 and first.posed
    assert first.point_voxel[0] == first.point_voxel[2] != first.point_voxel[1]
    (kept,) = window.past  # A, as two voxels: sums and counts only
    torch.testing.assert_close(kept.count.sort().values, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(kept.entropy_sum.sum(0), torch.tensor([2.2, 1.2]))

    second = pool(window, POINTS_B, ENTROPY_B, [POSE_B])
    # B0 shares A1's voxel: the mean of both; B1 (A1's LiDAR coordinates) is alone.
    torch.testing.assert_close(second.entropy, torch.tensor([[0.4, 0.7], [0.9, 0.1]]))
    assert second.frames == 2 and second.num_voxels == 3  # A0/A2s, A1/B0s, B1s

    # Window 2: A has left the window; C0 sits in A's old voxel and is alone there.
    third = pool(window, POINTS_C, ENTROPY_C, [POSE_C])
    torch.testing.assert_close(third.entropy, torch.tensor([[0.1, 0.1], [0.25, 0.65]]))
    assert third.frames == 2


def test_batches_of_several_frames_never_count_a_frame_twice():
    window = VoxelWindow(window=3, voxel_size=0.5)
    pool(window, POINTS_A, ENTROPY_A, [POSE_A])
    # The next batch holds A again (fresh entropies, +1) and B: A's kept record is skipped.
    fresh_a = (np.array(ENTROPY_A) + 1.0).tolist()
    second = pool(window, POINTS_A + POINTS_B, fresh_a + ENTROPY_B, [POSE_A, POSE_B],
                  batch_index=[0, 0, 0, 1, 1])
    assert second.frames == 2
    torch.testing.assert_close(second.entropy[3], torch.tensor([(1.5 + 0.3) / 2,
                                                                (1.4 + 1.0) / 2]))
    # Then [B, C]: B is in the batch, A (kept at step 1) fills the window of 3.
    third = pool(window, POINTS_B + POINTS_C, ENTROPY_B + ENTROPY_C, [POSE_B, POSE_C],
                 batch_index=[0, 0, 1, 1])
    assert third.frames == 3
    # C0 joins A0 and A2 as kept at step 1: (1.0 + 0.7 + 0.1) / 3, (0.2 + 0.6 + 0.1) / 3.
    torch.testing.assert_close(third.entropy[2], torch.tensor([0.6, 0.3]))


def test_without_poses_entropy_is_pooled_within_each_sweep_only():
    window = VoxelWindow(window=3, voxel_size=0.5)
    pool(window, POINTS_A, ENTROPY_A, [POSE_A])
    # Two frames with the same LiDAR coordinates, no poses: nothing shared across them.
    fallback = pool(window, POINTS_A + POINTS_A, ENTROPY_A + ENTROPY_C + [[0.0, 0.0]], None,
                    batch_index=[0, 0, 0, 1, 1, 1])
    assert not fallback.posed and fallback.frames == 1
    torch.testing.assert_close(fallback.entropy, torch.tensor(
        [[0.85, 0.4], [0.5, 0.4], [0.85, 0.4], [0.05, 0.05], [0.2, 0.3], [0.05, 0.05]]))
    assert len(set(fallback.point_voxel.tolist())) == 4
    # The posed step after it pools A (two steps back) but nothing of the unposed one.
    after = pool(window, POINTS_B, ENTROPY_B, [POSE_B])
    assert after.frames == 2 and list(window.past)[0] is None
    torch.testing.assert_close(after.entropy[0], torch.tensor([0.4, 0.7]))


def test_an_odometry_jump_empties_the_window():
    window = VoxelWindow(window=3, voxel_size=0.5)
    pool(window, POINTS_A, ENTROPY_A, [POSE_A])
    far = pose(x=MAX_ODOM_STEP_M + 1.0)
    points_here = (np.array(POINTS_A) - [MAX_ODOM_STEP_M + 1.0, 0.0, 0.0]).tolist()
    jumped = pool(window, points_here, ENTROPY_C + [[0.0, 0.0]], [far])  # A's voxels in odom
    assert jumped.frames == 1
    torch.testing.assert_close(jumped.entropy[1], torch.tensor([0.2, 0.3]))


def test_voxel_keys_are_one_to_one_and_range_checked():
    voxels = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [-1, -1, -1],
                           [2 ** 20 - 1, -2 ** 20 + 1, 5]])
    keys = pack_voxel_keys(voxels)
    assert len(set(keys.tolist())) == len(voxels)
    with pytest.raises(ValueError, match='key range'):
        pack_voxel_keys(torch.tensor([[2 ** 20, 0, 0]]))
    keys, entropy = torch.tensor([7, 3, 7]), torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    pooled, point_voxel, count = pool_voxel_entropy(keys, entropy)
    torch.testing.assert_close(pooled, torch.tensor([[0.5, 0.5], [2.0, 2.0], [0.5, 0.5]]))
    assert count == 2 and point_voxel.tolist() == [1, 0, 1]


def test_exp_entropy_weights_decide_between_the_modalities_by_hand():
    logits_2d = torch.tensor([[2.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    logits_3d = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 0.0]])
    disagree_2d, disagree_3d = torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, 5.0]])
    slow_2d = torch.cat([logits_2d[:2], disagree_2d])  # point 2: fast and slow disagree
    slow_3d = torch.cat([logits_3d[:2], disagree_3d])
    entropy = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    pseudo = latte_pseudo_labels(logits_2d, slow_2d, logits_3d, slow_3d, entropy,
                                 threshold=0.3)
    p_2d = numpy_softmax(0.5 * (logits_2d + slow_2d).numpy())
    p_3d = numpy_softmax(0.5 * (logits_3d + slow_3d).numpy())
    weights = np.exp(-entropy.numpy())
    expected = (weights[:, :1] * p_2d + weights[:, 1:] * p_3d).argmax(1)
    expected[2] = IGNORE_INDEX  # both modalities unstable: max zeta < threshold
    assert pseudo.labels.tolist() == expected.tolist() == [1, 0, IGNORE_INDEX]
    # Equal weights would give point 0 to the 2D branch: the entropy decided it.
    assert (p_2d[0] + p_3d[0]).argmax() == 0
    np.testing.assert_allclose(pseudo.weight_2d.numpy(), weights[:, 0] / weights.sum(1),
                               rtol=1e-6)


def test_entropy_zeta_fusion_multiplies_the_inter_pr_share():
    generator = torch.Generator().manual_seed(9)
    fast_2d, slow_2d, fast_3d, slow_3d = (torch.randn(200, 4, generator=generator)
                                          for _ in range(4))
    entropy = torch.rand(200, 2, generator=generator) * 2.0
    both = latte_pseudo_labels(fast_2d, slow_2d, fast_3d, slow_3d, entropy,
                               fusion='entropy_zeta', threshold=0.0)
    entropy_only = latte_pseudo_labels(fast_2d, slow_2d, fast_3d, slow_3d, entropy,
                                       threshold=0.0)

    def zeta(fast, slow):
        p, q = numpy_softmax(fast.double().numpy()), numpy_softmax(slow.double().numpy())
        return 0.5 * (1 / (numpy_kl(p, q) + 1e-6) + 1 / (numpy_kl(q, p) + 1e-6))

    zeta_2d, zeta_3d = zeta(fast_2d, slow_2d), zeta(fast_3d, slow_3d)
    weights = np.exp(-entropy.double().numpy()) * np.stack(
        [zeta_2d, zeta_3d], 1) / (zeta_2d + zeta_3d)[:, None]
    p_2d = numpy_softmax(0.5 * (fast_2d + slow_2d).double().numpy())
    p_3d = numpy_softmax(0.5 * (fast_3d + slow_3d).double().numpy())
    expected = (weights[:, :1] * p_2d + weights[:, 1:] * p_3d).argmax(1)
    np.testing.assert_array_equal(both.labels.numpy(), expected)
    assert not torch.equal(both.labels, entropy_only.labels)
    np.testing.assert_allclose(both.weight_2d.numpy(), weights[:, 0] / weights.sum(1),
                               rtol=1e-4)
    with pytest.raises(ValueError, match='fusion'):
        latte_pseudo_labels(fast_2d, slow_2d, fast_3d, slow_3d, entropy, fusion='zeta')


def test_voxel_consistency_by_hand_and_each_branch_mimics_the_other():
    generator = torch.Generator().manual_seed(5)
    logits_2d = torch.randn(3, 4, generator=generator, requires_grad=True)
    logits_3d = torch.randn(3, 4, generator=generator, requires_grad=True)
    point_voxel = torch.tensor([0, 0, 2])  # voxel 1: a past frame's, no point now
    loss = voxel_consistency(logits_2d, logits_3d, point_voxel, 3)
    p_2d = numpy_softmax(logits_2d.detach().double().numpy())
    p_3d = numpy_softmax(logits_3d.detach().double().numpy())
    q_2d = np.stack([p_2d[:2].mean(0), p_2d[2]])
    q_3d = np.stack([p_3d[:2].mean(0), p_3d[2]])
    kl = (q_3d * np.log(q_3d / q_2d)).sum(1) + (q_2d * np.log(q_2d / q_3d)).sum(1)
    assert float(loss.detach()) == pytest.approx(float((kl * [2 / 3, 1 / 3]).sum()), rel=1e-5)
    loss.backward()
    # Each branch's gradient is that of KL(fixed other || itself), written here as
    # voxel means by an assignment matrix.
    assign = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    weight = torch.tensor([2 / 3, 1 / 3])

    def mimic(learner, target):
        q, t = assign @ learner.softmax(1), (assign @ target.softmax(1)).detach()
        return ((t * (t.log() - q.log())).sum(1) * weight).sum()

    for learner, target in ((logits_2d, logits_3d), (logits_3d, logits_2d)):
        expected, = torch.autograd.grad(mimic(learner, target), learner)
        torch.testing.assert_close(learner.grad, expected)


# --------------------------------------------------------------------------------------
# The method on the tiny stand-in segmenter, with posed frames
# --------------------------------------------------------------------------------------

@dataclass
class PosedInput:
    """TinyInput with the poses SegmenterInput carries."""

    images: torch.Tensor
    pixels: torch.Tensor
    batch_index: torch.Tensor
    points: torch.Tensor
    T_odom_from_lidar: Optional[torch.Tensor] = None


def posed_stream(count: int, seed: int = 0, posed: bool = True):
    """Target batches of one frame, the ego 0.5 m further along x each frame."""
    stream = []
    for index in range(count):
        batch = make_batch(seed + index, frames=1, shift=0.7)
        stream.append(PosedInput(batch.images, batch.pixels, batch.batch_index, batch.points,
                                 pose(x=0.5 * index)[None] if posed else None))
    return stream


def test_latte_is_causal_a_later_frame_never_changes_an_earlier_step():
    stream = posed_stream(4)
    other_future = stream[:3] + posed_stream(1, seed=50)
    runs = []
    for frames in (stream, other_future):
        method = build_method('latte', make_source_model(), window=3, voxel_size=0.5,
                              **FAST_LRS)
        runs.append([(method.step(batch), dict(method.stats)) for batch in frames])
    for (ours, our_stats), (theirs, their_stats) in zip(runs[0][:3], runs[1][:3]):
        assert torch.equal(ours.logits_2d, theirs.logits_2d)
        assert torch.equal(ours.logits_3d, theirs.logits_3d)
        assert our_stats == their_stats
    assert runs[0][3][1]['loss'] != runs[1][3][1]['loss']
    assert [stats['window_frames'] for _, stats in runs[0]] == [1, 2, 3, 3]
    assert all(stats['posed'] == 1.0 for _, stats in runs[0])


def test_latte_window_pools_past_frames_and_changes_only_norm_tensors():
    stats = {}
    for window in (1, 3):
        model = make_source_model()
        before = clone_state(model)
        method = build_method('latte', model, window=window, voxel_size=2.0, **FAST_LRS)
        stats[window] = []
        for batch in posed_stream(3):
            method.step(batch)
            stats[window].append(method.stats)
        for module in (method.model, method.slow_model):
            changed = {key for key, value in module.state_dict().items()
                       if not torch.equal(value, before[key])}
            assert changed and changed <= norm_tensor_keys(model)
    assert [s['window_frames'] for s in stats[3]] == [1, 2, 3]
    assert [s['window_frames'] for s in stats[1]] == [1, 1, 1]
    # The first step has no past either way; later ones pool other frames' entropies.
    assert stats[1][0]['voxel_entropy_3d'] == stats[3][0]['voxel_entropy_3d']
    assert stats[1][1]['voxel_entropy_3d'] != stats[3][1]['voxel_entropy_3d']


def test_latte_without_poses_falls_back_and_counts_it():
    method = build_method('latte', make_source_model(), **FAST_LRS)
    for batch in posed_stream(2, posed=False):
        method.step(batch)
    assert method.stats['posed'] == 0.0 and method.stats['window_frames'] == 1
    assert method.stats['steps_without_pose'] == 2 and method.stats['updated'] is True
    method.step(posed_stream(1)[0])
    assert method.stats['posed'] == 1.0 and method.stats['steps_without_pose'] == 2


def test_latte_reset_restores_the_source_and_empties_the_window():
    model = make_source_model()
    source = clone_state(model)
    method = build_method('latte', model, **FAST_LRS)
    fresh = build_method('latte', make_source_model(), **FAST_LRS)
    stream = posed_stream(4)
    first_fresh = fresh.step(stream[0])
    for batch in stream:
        method.step(batch)
    method.reset()
    for module in (method.model, method.slow_model):
        for key, value in module.state_dict().items():
            assert torch.equal(value, source[key]), key
    assert len(method.voxel_window.past) == 0 and method.voxel_window.anchor is None
    again = method.step(stream[0])
    assert torch.equal(again.logits_2d, first_fresh.logits_2d)
    assert method.stats == {**fresh.stats, 'step': 5}


def test_latte_state_round_trip_keeps_the_window(tmp_path):
    stream = posed_stream(6)
    method = build_method('latte', make_source_model(), **FAST_LRS)
    for batch in stream[:3]:
        method.step(batch)
    method.save_state(tmp_path / 'latte.pt')  # weights-only loadable: plain containers
    restored = build_method('latte', make_source_model(), **FAST_LRS)
    restored.load_state(tmp_path / 'latte.pt')
    assert len(restored.voxel_window.past) == 2
    for batch in stream[3:]:
        ours, theirs = method.step(batch), restored.step(batch)
        assert torch.equal(ours.logits_3d, theirs.logits_3d)
    assert method.stats == restored.stats


def test_latte_runs_through_the_pipeline_with_and_without_poses():
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.params import node_params
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
    from mmtta_ros.synth import generate_frames, SequenceConfig

    frames = list(generate_frames(SequenceConfig(
        domain='night', seed=7, num_frames=3, image_size=(64, 36), lidar_azimuth_steps=400,
        frame_stride=2)))
    assert all(frame.T_odom_from_lidar is not None for frame in frames)
    params = node_params({'adaptation.method': 'latte', 'device': 'cpu',
                          'adaptation.latte.window': 2})
    for posed in (True, False):
        torch.manual_seed(0)
        pipeline = build_pipeline(params.pipeline,
                                  model=build_segmenter(SegmenterConfig(size='tiny')))
        stats = []
        for frame in frames:
            output = pipeline.process(frame if posed else replace(frame, T_odom_from_lidar=None))
            assert output.prediction.shape == (int(output.in_view.sum()),)
            stats.append(output.stats)
        assert [s['posed'] for s in stats] == [float(posed)] * 3
        assert [s['window_frames'] for s in stats] == ([1, 2, 2] if posed else [1, 1, 1])
        assert all(s['updated'] for s in stats)


@pytest.mark.dds
def test_latte_runs_in_the_node_on_the_fallback_without_poses():
    """The live node has no tf2: its frames carry no pose, latte pools within each sweep."""
    test_node = pytest.importorskip('test_node')  # skips without rclpy
    from mmtta_ros.synth import generate_frames, SequenceConfig

    frames = list(generate_frames(SequenceConfig(
        domain='night', seed=3, num_frames=5, image_size=test_node.IMAGE_SIZE, frame_stride=2,
        lidar_azimuth_steps=300)))
    harness = test_node.Harness(frames, **{'adaptation.method': 'latte'})
    try:
        assert test_node.send_and_wait(harness, frames[:4], expected=3)
        assert harness.spin_until(
            lambda: harness.node.diagnostics_values()['adaptation_steps'] >= 2, 60.0)
        values = harness.node.diagnostics_values()
        assert harness.node.pipeline.method_name == 'latte'
        assert values['adaptation_failures'] == 0
        stats = harness.node.pipeline.method.stats
        assert stats['posed'] == 0.0 and stats['window_frames'] == 1
        assert stats['steps_without_pose'] >= 2  # every step so far
    finally:
        harness.close()
