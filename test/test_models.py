"""Tests of the dual-branch segmenter: shapes, voxel map, gradients, weights, config."""

from dataclasses import replace
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
from torch import nn

from mmtta_ros.core.batching import make_segmenter_input
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.models import (
    build_segmenter, SegmenterConfig, SegmenterInput, SegmenterOutput,
)
from mmtta_ros.models.resnet_unet import load_torchvision_resnet, Net2DSeg, ResNetEncoder
from mmtta_ros.models.sparse_unet import (
    grid_shape, largest_safe_scale, MAX_GRID_VOLUME, Net3DSeg, voxelize,
)
from mmtta_ros.models.spconv_cpu import apply_cpu_conv_workaround, apply_cpu_stream_workaround

# torchvision's resnet34 has 21,797,672 parameters, 513,000 of them in the fc head.
RESNET34_ENCODER_PARAMS = 21_797_672 - 513_000


def synthetic_scan(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """LiDAR-like points in front of the sensor: a ground plane and a wall, <float32: N, 3>."""
    elevation = np.deg2rad(rng.choice(np.linspace(-30.0, 10.0, 32), num_points))
    azimuth = rng.uniform(-np.pi / 3, np.pi / 3, num_points)
    rays = np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                     np.sin(elevation)], axis=1)
    range_ground = np.where(rays[:, 2] < -1e-3, -1.8 / np.minimum(rays[:, 2], -1e-3), np.inf)
    range_wall = 25.0 / np.cos(elevation)
    ranges = np.minimum(range_ground, range_wall)
    points = rays * ranges[:, None] + rng.normal(0.0, 0.02, (num_points, 3))
    return points.astype(np.float32)


def make_batch(num_frames: int, height: int, width: int, points_per_frame: int,
               seed: int = 0) -> SegmenterInput:
    """Make a random batch: random images and pixels, LiDAR-like points."""
    rng = np.random.default_rng(seed)
    num_points = num_frames * points_per_frame
    points = np.concatenate([synthetic_scan(points_per_frame, rng) for _ in range(num_frames)])
    pixels = np.stack([rng.integers(0, width, num_points), rng.integers(0, height, num_points)], 1)
    return SegmenterInput(
        images=torch.from_numpy(rng.random((num_frames, 3, height, width), dtype=np.float32)),
        pixels=torch.from_numpy(pixels),
        batch_index=torch.arange(num_frames).repeat_interleave(points_per_frame),
        points=torch.from_numpy(points),
    )


def count_params(module: nn.Module) -> int:
    """Count the parameters of `module`."""
    return sum(p.numel() for p in module.parameters())


def torchvision_resnet34_keys():
    """State-dict keys of torchvision's resnet34 (without fc), written out independently."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    keys = ['conv1.weight'] + [f'bn1.{k}' for k in bn]
    for layer, num_blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(num_blocks):
            prefix = f'layer{layer}.{block}.'
            keys += [prefix + 'conv1.weight'] + [prefix + f'bn1.{k}' for k in bn]
            keys += [prefix + 'conv2.weight'] + [prefix + f'bn2.{k}' for k in bn]
            if block == 0 and layer > 1:
                keys += [prefix + 'downsample.0.weight']
                keys += [prefix + f'downsample.1.{k}' for k in bn]
    return keys


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize('size', ['tiny', 'xmuda'])
def test_config_round_trip_through_a_weights_only_checkpoint(size, tmp_path):
    config = SegmenterConfig(size=size, num_classes=4, voxel_size=0.1)
    values = config.to_dict()
    plain = (str, int, float, bool, list)
    assert all(isinstance(v, plain) for v in values.values()), values
    torch.save({'config': values}, tmp_path / 'c.pt')
    loaded = torch.load(tmp_path / 'c.pt', weights_only=True)['config']
    assert SegmenterConfig.from_dict(loaded) == config
    assert SegmenterConfig.from_dict(loaded).num_classes == 4


def test_config_presets_and_errors():
    assert SegmenterConfig(size='xmuda').channels_2d == (64, 128, 256, 512)
    assert SegmenterConfig(size='xmuda').m_3d == 16
    assert SegmenterConfig(size='xmuda').levels_3d == 7
    assert SegmenterConfig().size == 'tiny'
    assert SegmenterConfig(size='tiny', m_3d=12).m_3d == 12  # overrides beat the preset
    with pytest.raises(ValueError, match='unknown segmenter size'):
        SegmenterConfig(size='huge')
    with pytest.raises(ValueError, match='unknown SegmenterConfig keys'):
        SegmenterConfig.from_dict({'size': 'tiny', 'num_clases': 6})


# --------------------------------------------------------------------------- voxel map

def test_voxelize_hand_made_example():
    voxel_size = 0.5
    points = torch.tensor([
        [10.1, 20.1, -3.9],   # frame 0, voxel (20, 40, -8) -> shifted (0, 0, 0)
        [10.4, 20.4, -3.6],   # same voxel
        [11.1, 20.1, -3.9],   # x + 2 voxels
        [10.1, 20.1, -3.9],   # frame 1: same xyz as point 0, must not share its voxel
        [-5.2, 0.3, 0.3],     # frame 1, its minimum in x
    ], dtype=torch.float32)
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    coords, point_to_voxel = voxelize(points, batch_index, 2, voxel_size, full_scale=4096)
    assert coords.dtype == torch.int32 and point_to_voxel.dtype == torch.int64
    assert coords.shape == (4, 4)
    assert point_to_voxel[0] == point_to_voxel[1]
    assert len(set(point_to_voxel[[0, 2, 3, 4]].tolist())) == 4
    per_point = coords[point_to_voxel].tolist()
    assert per_point[0] == [0, 0, 0, 0]
    assert per_point[2] == [0, 2, 0, 0]
    # Frame 1 min: x from floor(-5.2 / 0.5) = -11, y from 0.3 -> 0, z from -3.9 -> -8.
    assert per_point[3] == [1, 20 + 11, 40, 0]
    assert per_point[4] == [1, 0, 0, 8]


def test_voxelize_clips_far_points_into_the_grid():
    points = torch.tensor([[0.0, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    coords, point_to_voxel = voxelize(points, torch.zeros(2, dtype=torch.long), 1, 0.05, 64)
    assert coords[point_to_voxel].tolist() == [[0, 0, 0, 0], [0, 63, 0, 0]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31), num_points=st.integers(1, 300),
       num_frames=st.integers(1, 4), voxel_size=st.sampled_from([0.05, 0.1, 0.5]))
def test_voxelize_map_matches_a_numpy_reference(seed, num_points, num_frames, voxel_size):
    rng = np.random.default_rng(seed)
    # Few distinct positions, so many points share voxels.
    points = (rng.integers(-40, 40, (num_points, 3)) * 0.37 + 0.01).astype(np.float32)
    batch_index = np.sort(rng.integers(0, num_frames, num_points))
    coords, point_to_voxel = voxelize(torch.from_numpy(points), torch.from_numpy(batch_index),
                                      num_frames, voxel_size, full_scale=4096)
    # Reference, frame by frame: floor, subtract that frame's minimum.
    expected = np.zeros((num_points, 4), dtype=np.int64)
    expected[:, 0] = batch_index
    for frame in np.unique(batch_index):
        rows = batch_index == frame
        grid = torch.floor(torch.from_numpy(points[rows]) / voxel_size).long().numpy()
        expected[rows, 1:] = grid - grid.min(axis=0)
    assert np.array_equal(coords[point_to_voxel].numpy(), expected)
    # One row per distinct voxel, so equal voxel <=> equal index.
    assert coords.shape[0] == np.unique(expected, axis=0).shape[0]
    assert point_to_voxel.max() == coords.shape[0] - 1
    # Per-voxel values gathered per point come back from the right rows.
    voxel_values = torch.arange(coords.shape[0]) * 10
    assert torch.equal(voxel_values[point_to_voxel], point_to_voxel * 10)


def test_grid_shape_and_safe_scale():
    coords = torch.tensor([[0, 0, 5, 1], [1, 40, 0, 0]], dtype=torch.int32)
    assert grid_shape(coords, 16) == [48, 16, 16]
    assert largest_safe_scale([4096, 4096, 4096], 64) ** 3 <= MAX_GRID_VOLUME
    assert (largest_safe_scale([4096, 4096, 4096], 64) + 64) ** 3 > MAX_GRID_VOLUME
    assert largest_safe_scale([4096, 4096, 128], 64) == 4096 - 64  # 4096^2 * 128 = 2^31


# --------------------------------------------------------------------------- spconv on CPU

def test_sparse_convs_match_dense_convs_forward_and_backward():
    """
    Submanifold, strided and inverse convs against torch's dense conv3d, 2 threads.

    Without apply_cpu_conv_workaround spconv's CPU kernels give wrong results with more
    than one thread; this test then fails on most runs.
    """
    apply_cpu_conv_workaround()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(1)
        size, num_voxels, num_frames = 12, 1500, 2
        flat = torch.randperm(num_frames * size ** 3, generator=generator)[:num_voxels]
        coords = torch.stack([flat // size ** 3, flat // size ** 2 % size,
                              flat // size % size, flat % size], dim=1).int()
        features = torch.randn(num_voxels, 4, generator=generator, requires_grad=True)
        subm = spconv.SubMConv3d(4, 5, 3, bias=False, indice_key='s')
        down = spconv.SparseConv3d(5, 6, 2, stride=2, bias=False, indice_key='d')
        up = spconv.SparseInverseConv3d(6, 3, 2, bias=False, indice_key='d')
        x = spconv.SparseConvTensor(features, coords, [size] * 3, num_frames)
        sparse_out = up(down(subm(x))).features
        assert torch.equal(up(down(subm(x))).features, sparse_out)  # deterministic
        grad_out = torch.randn(sparse_out.shape, generator=generator)
        (sparse_out * grad_out).sum().backward()

        dense_in = features.detach().clone().requires_grad_()
        weights = [m.weight.detach().clone().requires_grad_() for m in (subm, down, up)]
        ones = torch.ones(num_voxels, 1)
        occupied = spconv.SparseConvTensor(ones, coords, [size] * 3, num_frames).dense()
        occupied_coarse = nn.functional.max_pool3d(occupied, 2, 2)
        dense = spconv.SparseConvTensor(dense_in, coords, [size] * 3, num_frames).dense()
        # spconv weights are (C_out, k, k, k, C_in); torch's are (C_out, C_in, k, k, k).
        dense = nn.functional.conv3d(dense, weights[0].permute(0, 4, 1, 2, 3), padding=1)
        dense = nn.functional.conv3d(dense * occupied, weights[1].permute(0, 4, 1, 2, 3),
                                     stride=2) * occupied_coarse
        dense = nn.functional.conv_transpose3d(dense, weights[2].permute(4, 0, 1, 2, 3),
                                               stride=2)
        c = coords.long()
        dense_out = dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
        (dense_out * grad_out).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(sparse_out, dense_out, atol=1e-5)
    assert torch.allclose(features.grad, dense_in.grad, atol=1e-4)
    for module, weight in zip((subm, down, up), weights):
        assert torch.allclose(module.weight.grad, weight.grad, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- branches

def test_2d_features_are_read_at_column_u_row_v():
    net = Net2DSeg(3, channels=(8, 8, 16, 16), blocks=(1, 1, 1, 1)).eval()
    images = torch.rand(2, 3, 40, 72)
    pixels = torch.tensor([[71, 0], [0, 39], [35, 20], [71, 39]])
    batch_index = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        dense = net.unet(images)
        per_point = net.point_features(images, pixels, batch_index)
    assert dense.shape == (2, 8, 40, 72)
    for i, ((u, v), b) in enumerate(zip(pixels.tolist(), batch_index.tolist())):
        assert torch.equal(per_point[i], dense[b, :, v, u])


def test_points_in_one_voxel_get_the_same_3d_logits():
    rng = np.random.default_rng(1)
    points = torch.from_numpy(synthetic_scan(3000, rng))
    twins = points[:5] + 1e-4  # same 5 cm voxels as the first five points
    points = torch.cat([points, twins])
    net = Net3DSeg(6, m=8, levels=4).eval()
    with torch.no_grad():
        logits = net(points, torch.zeros(len(points), dtype=torch.long), 1)
    assert logits.shape == (3005, 6)
    assert torch.equal(logits[:5], logits[-5:])


def test_frames_spanning_kilometres_still_get_logits():
    # 2 km x 2 km x 2 km of scattered points at 5 cm: past spconv's exact grid volume.
    points = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 2000.0
    net = Net3DSeg(6, m=8, levels=4).eval()
    with torch.no_grad():
        logits = net(points, torch.arange(2).repeat_interleave(2000), 2)
    assert logits.shape == (4000, 6) and torch.isfinite(logits).all()


def test_frames_do_not_leak_into_each_other_in_eval_mode():
    model = build_segmenter(SegmenterConfig(size='tiny')).eval()
    batch = make_batch(2, 48, 80, 2000, seed=3)
    first = batch.batch_index == 0
    alone = SegmenterInput(batch.images[:1], batch.pixels[first], batch.batch_index[first],
                           batch.points[first])
    with torch.no_grad():
        together = model(batch)
        single = model(alone)
    assert torch.allclose(together.logits_2d[first], single.logits_2d, atol=1e-5)
    assert torch.allclose(together.logits_3d[first], single.logits_3d, atol=1e-5)


# --------------------------------------------------------------------------- whole model

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_tiny_output_shapes(mode):
    model = build_segmenter(SegmenterConfig(size='tiny', num_classes=6))
    model.train(mode == 'train')
    batch = make_batch(2, 56, 100, 1500)
    out = model(batch)
    assert out.logits_2d.shape == (3000, 6) and out.logits_3d.shape == (3000, 6)
    assert out.features_2d.shape == (3000, 16) and out.features_3d.shape == (3000, 8)
    assert out.logits_2d.dtype == torch.float32 and torch.isfinite(out.logits_3d).all()


def test_xmuda_output_shapes_small_input():
    model = build_segmenter(SegmenterConfig(size='xmuda', num_classes=6)).eval()
    with torch.no_grad():
        out = model(make_batch(1, 45, 80, 3000))
    assert out.logits_2d.shape == (3000, 6) and out.logits_3d.shape == (3000, 6)
    assert out.features_2d.shape == (3000, 64) and out.features_3d.shape == (3000, 16)


def test_a_frame_without_points_gives_empty_logits():
    model = build_segmenter(SegmenterConfig(size='tiny', num_classes=5)).eval()
    empty = SegmenterInput(torch.rand(1, 3, 32, 48), torch.zeros(0, 2, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, 3))
    with torch.no_grad():
        out = model(empty)
    assert out.logits_2d.shape == (0, 5) and out.logits_3d.shape == (0, 5)


def test_mismatched_input_shapes_are_rejected():
    model = build_segmenter(SegmenterConfig(size='tiny'))
    batch = make_batch(1, 32, 48, 100)
    batch.pixels = batch.pixels[:-1]
    with pytest.raises(ValueError, match='pixels must be'):
        model(batch)


def test_cpu_stream_workaround_lets_spconvs_own_backward_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('the workaround only applies to CPU-only torch')
    assert apply_cpu_stream_workaround() and apply_cpu_stream_workaround()
    assert spconv.ops.get_current_stream() == 0
    assert spconv.hash.get_current_stream() == 0
    # Bypass the torch convolutions, so spconv's own CPU backward runs.
    apply_cpu_conv_workaround()
    for name in ('indice_conv', 'indice_inverse_conv', 'indice_subm_conv'):
        wrapped = getattr(spconv.functional, name)
        monkeypatch.setattr(spconv.functional, name, wrapped.spconv_original)
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.int32)
    features = torch.ones(3, 2, requires_grad=True)
    conv = spconv.SubMConv3d(2, 3, 3, bias=False)
    out = conv(spconv.SparseConvTensor(features, coords, [2, 2, 2], 1))
    out.features.sum().backward()  # "Torch not compiled with CUDA enabled" without the patch
    assert conv.weight.grad is not None and features.grad is not None


def test_gradients_reach_every_parameter_of_both_branches_on_cpu():
    model = build_segmenter(SegmenterConfig(size='tiny')).train()
    out = model(make_batch(2, 56, 100, 3000))
    labels = torch.randint(0, 6, (out.logits_2d.shape[0],))
    loss = (nn.functional.cross_entropy(out.logits_2d, labels)
            + nn.functional.cross_entropy(out.logits_3d, labels))
    loss.backward()  # raises "Torch not compiled with CUDA enabled" without the workaround
    for branch in (model.net_2d, model.net_3d):
        for name, param in branch.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_every_norm_layer_is_a_torch_batchnorm():
    model = build_segmenter(SegmenterConfig(size='tiny'))
    norm_type = nn.modules.batchnorm._BatchNorm
    norms_2d = [m for m in model.net_2d.modules() if isinstance(m, norm_type)]
    norms_3d = [m for m in model.net_3d.modules() if isinstance(m, norm_type)]
    assert norms_2d and all(isinstance(m, nn.BatchNorm2d) for m in norms_2d)
    assert norms_3d and all(isinstance(m, nn.BatchNorm1d) for m in norms_3d)
    # 5 encoder + 4 decoder residual blocks of 2 BN, 4 down + 4 up BN, 1 output BN.
    assert len(norms_3d) == 5 * 2 + 4 * 2 + 4 + 4 + 1


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny')).eval()
    batch = make_batch(2, 56, 100, 1000)
    with torch.no_grad():
        first, second = model(batch), model(batch)
    assert torch.equal(first.logits_2d, second.logits_2d)
    assert torch.equal(first.logits_3d, second.logits_3d)


def test_parameter_counts():
    counts = {}
    for size in ('tiny', 'xmuda'):
        model = build_segmenter(SegmenterConfig(size=size))
        counts[size] = (count_params(model.net_2d), count_params(model.net_3d))
        print(f'{size}: 2D {counts[size][0]:,} 3D {counts[size][1]:,} parameters')
    xmuda_encoder = ResNetEncoder()
    assert count_params(xmuda_encoder) == RESNET34_ENCODER_PARAMS
    assert 22e6 < counts['xmuda'][0] < 25e6 and 3e6 < counts['xmuda'][1] < 6e6
    assert sum(counts['tiny']) < 1.5e6


def test_prediction_2d3d_is_argmax_of_averaged_softmaxes():
    probs_2d = torch.tensor([[0.50, 0.45, 0.05], [0.1, 0.1, 0.8]])
    probs_3d = torch.tensor([[0.05, 0.45, 0.50], [0.1, 0.6, 0.3]])
    out = SegmenterOutput(logits_2d=probs_2d.log() + 3.0, logits_3d=probs_3d.log() - 1.0)
    assert torch.allclose(out.probs_2d3d(), (probs_2d + probs_3d) / 2)
    # Point 0: the branches say 0 and 2, the ensemble says 1.
    assert out.prediction_2d3d().tolist() == [1, 2]


def test_fused_head_logits_and_checkpoint_round_trip(tmp_path):
    from mmtta_ros.core.checkpoint import load_model_checkpoint, save_model_checkpoint

    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny', num_classes=5, fused_head=True)
    model = build_segmenter(config).eval()
    batch = make_batch(2, 32, 48, 300)
    with torch.no_grad():
        out = model(batch)
        # The head reads both branches' features, concatenated per point.
        expected = model.fused_head.mlp(torch.cat([out.features_2d, out.features_3d], 1))
    assert out.logits_fused.shape == (600, 5) and torch.equal(out.logits_fused, expected)
    save_model_checkpoint(tmp_path / 'fused.pt', model, config)
    loaded, loaded_config, _ = load_model_checkpoint(tmp_path / 'fused.pt')
    assert loaded_config.fused_head and loaded_config == config
    assert any(key.startswith('fused_head.') for key in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch).logits_fused, out.logits_fused)
    plain = build_segmenter(SegmenterConfig(size='tiny', num_classes=5))
    assert plain.fused_head is None and plain(batch).logits_fused is None
    assert not any(key.startswith('fused_head.') for key in plain.state_dict())


def test_a_checkpoint_from_before_the_fused_head_loads_for_every_other_method(tmp_path):
    """A model_config without the fused_head key (old checkpoints): no head, all else runs."""
    from mmtta_ros.core.checkpoint import load_model_checkpoint
    from mmtta_ros.tta import build_method, METHODS

    torch.manual_seed(0)
    config = SegmenterConfig(size='tiny')
    old_config = config.to_dict()
    del old_config['fused_head']
    path = tmp_path / 'old.pt'
    torch.save({'model': build_segmenter(config).state_dict(), 'model_config': old_config},
               path)
    batch = make_batch(2, 32, 48, 200)
    for name in sorted(METHODS):
        model, loaded_config, _ = load_model_checkpoint(path)
        assert loaded_config.fused_head is False and model.fused_head is None
        if name == 'ftd':
            with pytest.raises(ValueError, match='fit-fused-head'):
                build_method(name, model)
            continue
        method = build_method(name, model)
        prediction = method.step(batch)
        assert prediction.logits_2d.shape == (400, 6), name
        assert np.isfinite(method.stats['entropy']), name


# --------------------------------------------------------------------------- weights

def test_torchvision_resnet34_state_dict_loads_into_the_2d_encoder(tmp_path):
    source = ResNetEncoder()
    assert list(source.state_dict()) == torchvision_resnet34_keys()
    state_dict = {k: torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v
                  for k, v in source.state_dict().items()}
    state_dict['fc.weight'] = torch.zeros(1000, 512)
    state_dict['fc.bias'] = torch.zeros(1000)
    torch.save(state_dict, tmp_path / 'resnet34.pth')

    config = SegmenterConfig(size='xmuda')
    model = build_segmenter(config, resnet_weights_path=str(tmp_path / 'resnet34.pth'))
    loaded = model.net_2d.unet.encoder.state_dict()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in loaded)

    tiny = Net2DSeg(6, channels=(16, 32, 64, 128), blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='does not match'):
        load_torchvision_resnet(tiny.unet.encoder, state_dict)


# --------------------------------------------------------------------------- batching

def make_frame(width: int, height: int, points_lidar: np.ndarray) -> Frame:
    """Make a frame with a constant grey image."""
    return Frame(image=np.full((height, width, 3), 51, dtype=np.uint8),
                 points_lidar=points_lidar.astype(np.float32), K=np.eye(3),
                 T_cam_from_lidar=np.eye(4))


def test_make_segmenter_input_keeps_in_view_points_and_rounds_pixels():
    points_a = np.arange(12, dtype=np.float32).reshape(4, 3)
    points_b = -np.arange(6, dtype=np.float32).reshape(2, 3)
    frames = [make_frame(10, 6, points_a), make_frame(10, 6, points_b)]
    masks = [np.array([True, False, True, True]), np.array([False, True])]
    pixels = [np.array([[0.4, 0.6], [50, 50], [9.4, 5.49], [9.6, 5.7]], dtype=np.float32),
              np.array([[1, 1], [-0.7, 2.5]], dtype=np.float32)]
    batch = make_segmenter_input(frames, masks, pixels, 'cpu')
    assert batch.images.shape == (2, 3, 6, 10)
    assert torch.allclose(batch.images, torch.full((2, 3, 6, 10), 0.2))
    assert batch.pixels.dtype == torch.int64
    # np.rint rounds half to even: 2.5 -> 2.
    assert batch.pixels.tolist() == [[0, 1], [9, 5], [9, 5], [0, 2]]
    assert batch.batch_index.tolist() == [0, 0, 0, 1]
    assert torch.equal(batch.points, torch.from_numpy(np.concatenate([points_a[[0, 2, 3]],
                                                                      points_b[[1]]])))


def test_make_segmenter_input_stacks_poses_only_when_every_frame_has_one():
    frames = [make_frame(10, 6, np.zeros((1, 3))), make_frame(10, 6, np.ones((1, 3)))]
    masks = [np.ones(1, dtype=bool)] * 2
    pixels = [np.zeros((1, 2), dtype=np.float32)] * 2
    assert make_segmenter_input(frames, masks, pixels, 'cpu').T_odom_from_lidar is None
    poses = np.stack([np.eye(4), np.eye(4)])
    poses[1, :3, 3] = (1234.5, -6.25, 0.125)
    posed = [replace(frame, T_odom_from_lidar=pose) for frame, pose in zip(frames, poses)]
    batch = make_segmenter_input(posed, masks, pixels, 'cpu')
    assert batch.T_odom_from_lidar.dtype == torch.float64
    assert torch.equal(batch.T_odom_from_lidar, torch.from_numpy(poses))
    assert torch.equal(batch.to('cpu').T_odom_from_lidar, batch.T_odom_from_lidar)
    # One frame without a pose: no poses for the batch.
    mixed = [posed[0], frames[1]]
    assert make_segmenter_input(mixed, masks, pixels, 'cpu').T_odom_from_lidar is None
    bad = [posed[0], replace(frames[1], T_odom_from_lidar=np.full((4, 4), np.nan))]
    with pytest.raises(SensorDataError, match='T_odom_from_lidar'):
        make_segmenter_input(bad, masks, pixels, 'cpu')


def test_make_segmenter_input_rejects_mixed_image_sizes():
    frames = [make_frame(10, 6, np.zeros((1, 3))), make_frame(12, 6, np.zeros((1, 3)))]
    masks = [np.ones(1, dtype=bool)] * 2
    pixels = [np.zeros((1, 2), dtype=np.float32)] * 2
    with pytest.raises(SensorDataError, match='one size'):
        make_segmenter_input(frames, masks, pixels, 'cpu')


# --------------------------------------------------------------------------- timing

@pytest.mark.timing
def test_tiny_training_step_is_fast():
    model = build_segmenter(SegmenterConfig(size='tiny')).train()
    batch = make_batch(2, 112, 200, 15000)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        out = model(batch)
        (out.logits_2d.sum() + out.logits_3d.sum()).backward()
        timings.append(time.perf_counter() - start)
    print(f'tiny forward+backward, 2 frames x 15k points at 200x112: {min(timings):.2f} s')
    # Generous: the cores are shared; unloaded it is well under a second.
    assert min(timings) < 5.0


@pytest.mark.slow
def test_xmuda_forward_backward_at_nuscenes_scale():
    model = build_segmenter(SegmenterConfig(size='xmuda')).train()
    batch = make_batch(1, 225, 400, 24000)
    start = time.perf_counter()
    out = model(batch)
    labels = torch.randint(0, 6, (24000,))
    loss = (nn.functional.cross_entropy(out.logits_2d, labels)
            + nn.functional.cross_entropy(out.logits_3d, labels))
    loss.backward()
    print(f'xmuda forward+backward, 1 frame, 400x225, 24k points: '
          f'{time.perf_counter() - start:.1f} s')
    assert out.logits_2d.shape == (24000, 6)
    assert model.net_2d.classifier.weight.grad.abs().sum() > 0
    assert model.net_3d.classifier.weight.grad.abs().sum() > 0


def test_tiny_model_learns_a_simple_labelling():
    """Both branches fit labels that the geometry (3D) and pixel colours (2D) reveal."""
    torch.manual_seed(0)
    batch = make_batch(1, 56, 100, 3000, seed=5)
    # Ground points are class 0, the wall class 1. As in a street image, the ground is a
    # region (the lower rows) and the wall another (the upper rows), each in its colour,
    # with the image noise kept; the points project into their class's region.
    labels = (batch.points[:, 2] > -1.5).long()
    height = batch.images.shape[2]
    rows = batch.pixels[:, 1] % (height // 2)
    batch.pixels[:, 1] = torch.where(labels == 1, rows, rows + height // 2)
    colours = torch.tensor([[0.2, 0.6, 0.2], [0.8, 0.3, 0.3]])
    region = torch.zeros(height, dtype=torch.long)
    region[:height // 2] = 1
    batch.images[0] = 0.5 * batch.images[0] + 0.5 * colours[region].T[:, :, None]
    model = build_segmenter(SegmenterConfig(size='tiny', num_classes=2)).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        out = model(batch)
        loss = (nn.functional.cross_entropy(out.logits_2d, labels)
                + nn.functional.cross_entropy(out.logits_3d, labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        out = model.eval()(batch)
    assert (out.logits_2d.argmax(1) == labels).float().mean() > 0.95
    assert (out.logits_3d.argmax(1) == labels).float().mean() > 0.95
    assert (out.prediction_2d3d() == labels).float().mean() > 0.9
