"""Offline UDA (eval/uda.py, train_uda, mmtta_train --uda) on small generated frames."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmtta_ros.core.checkpoint import load_model_checkpoint
from mmtta_ros.core.batching import frames_to_input
from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.eval.splits import SOURCE_SEEDS, TARGET_SEEDS, UDA_TARGET_SEEDS
from mmtta_ros.eval.training import train_source, train_uda, TrainConfig
from mmtta_ros.eval.uda import (
    build_objective, dann_coefficient, domain_loss, forward_with_image_logits,
    ImageDiscriminator, OutputAdversaryObjective, reverse_gradient, SOURCE, TARGET,
    UDA_METHODS, UdaConfig)
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig, SegmenterOutput
from mmtta_ros.synth import SequenceConfig
from mmtta_ros.tools import train as train_tool

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (128, 72)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')


def _frames(domain, seed, cache):
    return synthetic_frames([SequenceConfig(domain=domain, seed=seed, num_frames=3,
                                            image_size=IMAGE_SIZE, frame_stride=4,
                                            lidar_azimuth_steps=400)], cache)


@pytest.fixture(scope='module')
def source(cache):
    return _frames('day', 5, cache)


@pytest.fixture(scope='module')
def target(cache):
    return _frames('night', 205, cache)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _output(num_points=50, seed=0, features=(16, 8)):
    generator = torch.Generator().manual_seed(seed)
    return SegmenterOutput(
        logits_2d=torch.randn(num_points, 6, generator=generator).requires_grad_(),
        logits_3d=torch.randn(num_points, 6, generator=generator).requires_grad_(),
        features_2d=torch.randn(num_points, features[0], generator=generator).requires_grad_(),
        features_3d=torch.randn(num_points, features[1], generator=generator).requires_grad_())


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return build_segmenter(SegmenterConfig(size='tiny'))


def test_gradient_reversal_by_hand():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([0.5, 1.0, -2.0])).sum().backward()
    # d/dx of sum(w * x) is w; reversed and scaled: -0.25 * w.
    assert torch.equal(x.grad, torch.tensor([-0.125, -0.25, 0.5]))


def test_dann_schedule_rises_from_zero_to_one():
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert 0.9999 < dann_coefficient(1.0) < 1.0


def test_dann_classifier_descends_and_features_ascend_the_domain_loss(tiny_model):
    objective = build_objective(tiny_model, UdaConfig('dann'))
    output = _output()
    loss = objective.segmenter_losses(output, None, TARGET, progress=0.5)['domain_target']
    loss.backward()
    reversed_features = output.features_2d.grad.clone()
    classifier_grad = objective.domain_2d.layers[0].weight.grad.clone()
    # The same loss without the reversal layer: the plain gradients.
    objective.zero_grad()
    plain = _output()
    half = 0.5 * (domain_loss(objective.domain_2d(plain.features_2d), TARGET)
                  + domain_loss(objective.domain_3d(plain.features_3d), TARGET))
    assert half.item() == pytest.approx(loss.item())
    half.backward()
    coefficient = dann_coefficient(0.5)
    assert torch.allclose(reversed_features, -coefficient * plain.features_2d.grad, atol=1e-7)
    assert torch.allclose(classifier_grad, objective.domain_2d.layers[0].weight.grad)
    # A descent step on the features (what the optimizer does) raises the domain loss.
    with torch.no_grad():
        stepped = plain.features_2d - 1e-2 * reversed_features
        before = domain_loss(objective.domain_2d(plain.features_2d), TARGET)
        after = domain_loss(objective.domain_2d(stepped), TARGET)
    assert after > before


def test_adaptsegnet_segmenter_fools_and_discriminator_separates(tiny_model):
    torch.manual_seed(0)
    objective = build_objective(tiny_model, UdaConfig('adaptsegnet', discriminator_lr=1e-3))
    assert isinstance(objective, OutputAdversaryObjective) and not objective.joint_parameters()
    output = _output()
    image_logits = torch.randn(2, 6, 64, 64, requires_grad=True)
    assert objective.segmenter_losses(output, image_logits, SOURCE, 0.0) == {}
    loss = objective.segmenter_losses(output, image_logits, TARGET, 0.0)['adversarial']
    loss.backward()
    # The segmenter's step must not train the discriminators ...
    assert all(p.grad is None and p.requires_grad for p in objective.parameters())

    def target_score(logits_3d, dense):
        with torch.no_grad():
            return (objective.point_discriminator(logits_3d.softmax(1)).mean()
                    + objective.image_discriminator(dense.softmax(1)).mean()).item()
    # ... and its descent makes target outputs look like source ones (label 0: lower logit).
    before = target_score(output.logits_3d, image_logits)
    after = target_score(output.logits_3d - 10 * output.logits_3d.grad,
                         image_logits - 10 * image_logits.grad)
    assert after < before
    # The discriminator step pushes target outputs towards 1 and source ones towards 0:
    # here source outputs are confident (as by day), target ones are not.
    source = ((5 * torch.randn(2, 6, 64, 64)).softmax(1), (5 * torch.randn(50, 6)).softmax(1))
    target = OutputAdversaryObjective.detached_probs(output, image_logits)

    def gap():
        return target_score(target[1].log(), target[0].log()) \
            - target_score(source[1].log(), source[0].log())
    before, losses = gap(), []
    for _ in range(5):
        losses.append(objective.discriminator_step(source, target, 1.0)['discriminator'])
    assert gap() > before and losses[-1] < losses[0]


def test_xmuda_mimicry_heads_learn_the_other_branch_never_the_reverse(tiny_model):
    objective = build_objective(tiny_model, UdaConfig('xmuda'))
    output = _output()
    source = objective.segmenter_losses(output, None, SOURCE, 0.0)['xm_source']
    target = objective.segmenter_losses(output, None, TARGET, 0.0)['xm_target']
    assert target.item() == pytest.approx(0.1 * source.item())  # xMUDA day/night weights
    source.backward()
    # The main logits are the detached teachers; the features learn through the heads.
    assert output.logits_2d.grad is None and output.logits_3d.grad is None
    assert output.features_2d.grad.abs().sum() > 0 and output.features_3d.grad.abs().sum() > 0
    assert objective.mimic_2d.weight.grad.abs().sum() > 0
    assert len(objective.joint_parameters()) == 4


def test_xmuda_mimicry_heads_start_as_copies_of_the_main_heads(tiny_model):
    # Fresh heads ('random', the xMUDA release) wrecked the 3D branch of the 300-step
    # recipe (issue 11): by default each mimicry head starts as its main head.
    objective = build_objective(tiny_model, UdaConfig('xmuda'))
    pairs = [(objective.mimic_2d, tiny_model.net_2d.classifier),
             (objective.mimic_3d, tiny_model.net_3d.classifier)]
    for mimic, main in pairs:
        assert torch.equal(mimic.weight, main.weight) and torch.equal(mimic.bias, main.bias)
        # Own parameters: the KL trains the copy, never the main head.
        assert mimic.weight.data_ptr() != main.weight.data_ptr()
    main_params = {id(p) for p in tiny_model.parameters()}
    assert not main_params & {id(p) for p in objective.joint_parameters()}
    fresh = build_objective(tiny_model, UdaConfig('xmuda', mimic_init='random'))
    assert not torch.equal(fresh.mimic_3d.weight, tiny_model.net_3d.classifier.weight)
    # Same draws either way: 'main' changes the heads' values, not the random stream.
    torch.manual_seed(3)
    build_objective(tiny_model, UdaConfig('xmuda'))
    after_main = torch.rand(1)
    torch.manual_seed(3)
    build_objective(tiny_model, UdaConfig('xmuda', mimic_init='random'))
    assert torch.equal(after_main, torch.rand(1))


def test_dense_2d_logits_equal_the_point_logits_at_their_pixels(source, tiny_model):
    inputs, _ = frames_to_input(source[:2], torch.device('cpu'))
    tiny_model.eval()
    output, image_logits = forward_with_image_logits(tiny_model, inputs)
    assert image_logits.shape == (2, 6, IMAGE_SIZE[1], IMAGE_SIZE[0])
    at_points = image_logits[inputs.batch_index, :, inputs.pixels[:, 1], inputs.pixels[:, 0]]
    assert torch.allclose(at_points, output.logits_2d, atol=1e-5)
    assert not tiny_model.net_2d.unet._forward_hooks, 'the hook must be removed'


@pytest.mark.parametrize('method', UDA_METHODS)
def test_each_uda_option_trains_deterministically_by_seed(method, source, target, tmp_path,
                                                          one_thread):
    config = SegmenterConfig(size='tiny')
    uda = UdaConfig(method, target_domain='night')
    states = []
    for run, seed in (('a', 0), ('b', 0), ('c', 1)):
        summary = train_uda(source, target, config, TrainConfig(steps=2, batch_frames=2,
                                                                seed=seed),
                            uda, tmp_path / f'{run}.pt', torch.device('cpu'), progress=False)
        assert all(math.isfinite(v) for k, v in summary.items() if k != 'seconds')
        states.append(load_model_checkpoint(tmp_path / f'{run}.pt')[0].state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), 'same seed'
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0]
               if states[0][k].is_floating_point()), 'another seed'
    payload = torch.load(tmp_path / 'a.pt', weights_only=True)
    assert payload['uda']['method'] == method and payload['step'] == 2
    # The UDA terms moved the weights: source-only training with the seed differs.
    train_source(source, config, TrainConfig(steps=2, batch_frames=2, seed=0),
                 tmp_path / 'source.pt', torch.device('cpu'), progress=False)
    plain = load_model_checkpoint(tmp_path / 'source.pt')[0].state_dict()
    assert any(not torch.equal(states[0][k], plain[k]) for k in plain
               if plain[k].is_floating_point())


def test_uda_never_reads_target_labels_and_resumes(source, target, tmp_path, one_thread):
    config, uda = SegmenterConfig(size='tiny'), UdaConfig('xmuda', target_domain='night')
    train = TrainConfig(steps=2, batch_frames=2)
    train_uda(source, target, config, train, uda, tmp_path / 'a.pt', torch.device('cpu'),
              progress=False)
    scrambled = [type(f)(**{**vars(f), 'labels': (f.labels + 1) % 6}) for f in target]
    train_uda(source, scrambled, config, train, uda, tmp_path / 'b.pt', torch.device('cpu'),
              progress=False)
    a, b = (load_model_checkpoint(tmp_path / n)[0].state_dict() for n in ('a.pt', 'b.pt'))
    assert all(torch.equal(a[k], b[k]) for k in a)

    summary = train_uda(source, target, config, TrainConfig(steps=3, batch_frames=2), uda,
                        tmp_path / 'a.pt', torch.device('cpu'), progress=False)
    assert summary['resumed_from'] == 2
    with pytest.raises(ValueError, match='holds a run with UDA'):
        train_uda(source, target, config, TrainConfig(steps=4), UdaConfig('dann'),
                  tmp_path / 'a.pt', torch.device('cpu'), progress=False)
    with pytest.raises(ValueError, match='holds a run with UDA'):
        train_source(source, config, TrainConfig(steps=4), tmp_path / 'a.pt',
                     torch.device('cpu'), progress=False)


def test_bad_uda_arguments_are_refused(source, target, tmp_path):
    with pytest.raises(ValueError, match='unknown UDA method'):
        UdaConfig('minent')
    with pytest.raises(ValueError, match='finite and >= 0'):
        UdaConfig('dann', grl_weight=-1.0)
    with pytest.raises(ValueError, match='discriminator_lr'):
        UdaConfig('adaptsegnet', discriminator_lr=0.0)
    with pytest.raises(ValueError, match='unknown mimic_init'):
        UdaConfig('xmuda', mimic_init='zeros')
    with pytest.raises(ValueError, match='unlabeled target frames'):
        train_uda(source, [], SegmenterConfig(), TrainConfig(steps=1), UdaConfig('dann'),
                  tmp_path / 'x.pt', torch.device('cpu'), progress=False)
    with pytest.raises(ValueError, match='labeled frames'):
        train_uda(target[:0], target, SegmenterConfig(), TrainConfig(steps=1),
                  UdaConfig('dann'), tmp_path / 'x.pt', torch.device('cpu'), progress=False)
    with pytest.raises(ValueError, match='two branches only'):
        train_uda(source, target, SegmenterConfig(fused_head=True), TrainConfig(steps=1),
                  UdaConfig('dann'), tmp_path / 'x.pt', torch.device('cpu'), progress=False)
    with pytest.raises(ValueError, match='at least 32 px'):
        ImageDiscriminator(6, 4)(torch.zeros(1, 6, 16, 64))
    assert not (tmp_path / 'x.pt').exists()


@pytest.mark.parametrize('argv, message', [
    (['--uda', 'dann'], 'go together'),
    (['--target-domain', 'night'], 'go together'),
    (['--uda', 'tent', '--target-domain', 'night'], 'invalid choice'),
    (['--uda', 'dann', '--target-domain', 'day'], 'is the source domain'),
    (['--uda', 'dann', '--target-domain', 'mars'], 'unknown domain'),
    (['--uda', 'xmuda', '--target-domain', 'night', '--steps', '0'], '--steps >= 1'),
    (['--uda', 'xmuda', '--target-domain', 'night', '--fused-head'], 'fit a fused head'),
])
def test_mmtta_train_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    cache = tmp_path / 'cache'
    with pytest.raises(SystemExit):
        train_tool.main(['--checkpoint', str(tmp_path / 'x.pt'), '--cache-dir', str(cache)]
                        + argv)
    assert message in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / 'x.pt').exists()


def test_mmtta_train_uda_end_to_end(tmp_path, monkeypatch, one_thread, capsys):
    # Two small sequences instead of 8 x 30 frames of each domain: the wiring is tested.
    def small(domain, image_size, seeds=(0,)):
        return [SequenceConfig(domain=domain, seed=seeds[0], num_frames=2,
                               image_size=tuple(image_size), frame_stride=4,
                               lidar_azimuth_steps=300)]
    monkeypatch.setattr(train_tool, 'source_configs', small)
    monkeypatch.setattr(train_tool, 'uda_target_configs',
                        lambda domain, image_size: small(domain, image_size, (200,)))
    checkpoint = tmp_path / 'uda.pt'
    assert train_tool.main(['--checkpoint', str(checkpoint), '--uda', 'dann',
                            '--target-domain', 'city_b', '--steps', '1', '--batch-frames',
                            '1', '--image-size', '96', '54', '--cache-dir',
                            str(tmp_path / 'cache'), '--device', 'cpu']) == 0
    assert 'domain_source' in capsys.readouterr().out
    payload = torch.load(checkpoint, weights_only=True)
    assert payload['uda']['method'] == 'dann' and payload['uda']['target_domain'] == 'city_b'
    assert sorted(p.name.split('-')[0] for p in (tmp_path / 'cache').iterdir()) == [
        'city_b', 'day']


def test_uda_target_seeds_are_no_scored_or_labeled_seed():
    document = yaml.safe_load((ROOT / 'config' / 'shifts.yaml').read_text())
    stream_seeds = {10 * seed + k for shift in document['shifts'].values()
                    for seed in shift['seeds'] for k in range(len(shift['segments']))}
    assert len(UDA_TARGET_SEEDS) == len(SOURCE_SEEDS)
    assert not set(UDA_TARGET_SEEDS) & (stream_seeds | set(SOURCE_SEEDS) | set(TARGET_SEEDS))
