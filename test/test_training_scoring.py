"""Source training (resumable checkpoints) and online scoring, on small generated frames."""

import json

import numpy as np
import pytest
import torch

from mmtta_ros.core.checkpoint import load_model_checkpoint
from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.models.segmenter import SegmenterConfig, SegmenterOutput
from mmtta_ros.core.batching import frames_to_input
from mmtta_ros.core.pipeline import Pipeline
from mmtta_ros.core.params import InputParams
from mmtta_ros.eval.scoring import format_report, score_stream
from mmtta_ros.synth import SequenceConfig
from mmtta_ros.tools import evaluate
from mmtta_ros.eval.training import train_source, TrainConfig
from mmtta_ros.tta import build_method

IMAGE_SIZE = (128, 72)


@pytest.fixture(scope='module')
def frames(tmp_path_factory):
    config = SequenceConfig(domain='day', seed=5, num_frames=3, image_size=IMAGE_SIZE,
                            frame_stride=4, lidar_azimuth_steps=400)
    return synthetic_frames([config], tmp_path_factory.mktemp('cache'))


def test_training_writes_a_resumable_weights_only_checkpoint(frames, tmp_path):
    path = tmp_path / 'source.pt'
    config = SegmenterConfig(size='tiny')
    summary = train_source(frames, config, TrainConfig(steps=4, batch_frames=2,
                                                       checkpoint_every=2),
                           path, torch.device('cpu'), progress=False)
    assert summary['resumed_from'] == 0 and np.isfinite(summary['loss_2d'])
    payload = torch.load(path, weights_only=True)
    assert payload['step'] == 4 and payload['model_config'] == config.to_dict()
    model, loaded_config, _ = load_model_checkpoint(path)
    assert loaded_config == config
    first = {k: v.clone() for k, v in model.state_dict().items()}

    summary = train_source(frames, config, TrainConfig(steps=6, batch_frames=2,
                                                       checkpoint_every=2),
                           path, torch.device('cpu'), progress=False)
    assert summary['resumed_from'] == 4
    assert torch.load(path, weights_only=True)['step'] == 6
    resumed, _, _ = load_model_checkpoint(path)
    changed = [k for k, v in resumed.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, first[k])]
    assert changed, 'resuming must keep training the loaded weights'

    with pytest.raises(ValueError, match='different model config'):
        train_source(frames, SegmenterConfig(size='tiny', m_3d=4), TrainConfig(steps=8),
                     path, torch.device('cpu'), progress=False)


def test_training_is_deterministic_by_seed_on_cpu(frames, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        states = []
        for run in ('a', 'b', 'c'):
            seed = 1 if run == 'c' else 0
            train_source(frames, SegmenterConfig(size='tiny'),
                         TrainConfig(steps=3, batch_frames=2, seed=seed),
                         tmp_path / f'{run}.pt', torch.device('cpu'), progress=False)
            states.append(load_model_checkpoint(tmp_path / f'{run}.pt')[0].state_dict())
    finally:
        torch.set_num_threads(threads)
    same, other = states[0], states[2]
    assert all(torch.equal(same[k], states[1][k]) for k in same), 'same seed, same weights'
    assert any(not torch.equal(same[k], other[k]) for k in same if same[k].is_floating_point())


def test_fit_fused_head_keeps_the_branches_and_is_deterministic(frames, tmp_path):
    from mmtta_ros.eval.training import fit_fused_head, fused_head_fitted

    source = tmp_path / 'source.pt'
    train_source(frames, SegmenterConfig(size='tiny'), TrainConfig(steps=1, batch_frames=1),
                 source, torch.device('cpu'), progress=False)
    source_state = torch.load(source, weights_only=True)['model']
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        heads = []
        for run, seed in (('a', 0), ('b', 0), ('c', 1)):
            summary = fit_fused_head(frames, source, TrainConfig(steps=3, batch_frames=2,
                                                                 seed=seed),
                                     tmp_path / f'{run}.pt', torch.device('cpu'),
                                     progress=False)
            assert summary['steps'] == 3 and np.isfinite(summary['loss_fused'])
            model, config, payload = load_model_checkpoint(tmp_path / f'{run}.pt')
            assert config.fused_head and payload['step'] == 3
            state = model.state_dict()
            # Bit for bit the source's 2D and 3D weights, batch-norm statistics included.
            assert all(torch.equal(state[key], value) for key, value in source_state.items())
            heads.append({k: v for k, v in state.items() if k.startswith('fused_head.')})
    finally:
        torch.set_num_threads(threads)
    assert heads[0] and all(torch.equal(v, heads[1][k]) for k, v in heads[0].items())
    assert any(not torch.equal(v, heads[2][k]) for k, v in heads[0].items())
    # Fitted on this source as it is now; a retrained source needs a new head.
    assert fused_head_fitted(tmp_path / 'a.pt', source)
    train_source(frames, SegmenterConfig(size='tiny'), TrainConfig(steps=2, batch_frames=1),
                 source, torch.device('cpu'), progress=False)
    assert not fused_head_fitted(tmp_path / 'a.pt', source)


def test_source_training_with_a_fused_head_trains_it(frames, tmp_path):
    from mmtta_ros.models.segmenter import build_segmenter

    config = SegmenterConfig(size='tiny', fused_head=True)
    train_source(frames, config, TrainConfig(steps=2, batch_frames=1), tmp_path / 'f.pt',
                 torch.device('cpu'), progress=False)
    model, loaded_config, _ = load_model_checkpoint(tmp_path / 'f.pt')
    torch.manual_seed(0)
    initial = build_segmenter(config).fused_head.state_dict()  # train_source seeds the same
    assert loaded_config.fused_head
    assert all(not torch.equal(v, initial[k]) for k, v in model.fused_head.state_dict().items())


def test_train_tool_fit_needs_its_source(tmp_path):
    from mmtta_ros.tools import train

    with pytest.raises(SystemExit):
        train.main(['--checkpoint', str(tmp_path / 'x.pt'), '--fit-fused-head'])
    with pytest.raises(SystemExit):
        train.main(['--checkpoint', str(tmp_path / 'x.pt'), '--init', 'a.pt', '--fused-head'])


class _Oracle:
    """A stand-in method that predicts given per-frame labels: scoring must then say 100%."""

    def __init__(self, labels_per_frame, wrong_3d=False):
        self.labels = list(labels_per_frame)
        self.wrong_3d = wrong_3d
        self.stats = {'loss': 0.5}

    def step(self, inputs):
        labels = torch.from_numpy(self.labels.pop(0))
        logits = torch.nn.functional.one_hot(labels, 6).float() * 10
        logits_3d = logits.roll(1, dims=1) if self.wrong_3d else logits
        return SegmenterOutput(logits_2d=logits, logits_3d=logits_3d)


def _in_view_labels(frames):
    labels = []
    for frame in frames:
        # Projected as a Pipeline with default inputs does (ego motion compensated).
        _, (in_view,) = frames_to_input([frame], torch.device('cpu'),
                                        ego_motion=InputParams().ego_motion)
        labels.append(np.asarray(frame.labels)[in_view])
    return labels


def test_scoring_an_oracle_gives_full_marks_and_a_wrong_branch_zero(frames):
    labels = _in_view_labels(frames)
    pipeline = Pipeline(_Oracle(labels, wrong_3d=True), torch.device('cpu'))
    report = score_stream(pipeline, frames)
    assert report['frames'] == 3
    assert report['miou']['2d'] == pytest.approx(1.0)
    assert report['miou']['3d'] == pytest.approx(0.0)
    assert report['mean_stats']['loss'] == pytest.approx(0.5)
    assert '2d3d' in format_report('oracle', report)


def test_scoring_a_real_method_online(frames):
    torch.manual_seed(0)
    from mmtta_ros.models.segmenter import build_segmenter
    model = build_segmenter(SegmenterConfig(size='tiny'))
    pipeline = Pipeline(build_method('mmtta', model), torch.device('cpu'), batch_frames=2)
    report = score_stream(pipeline, frames)
    for head in ('2d', '3d', '2d3d'):
        assert 0.0 <= report['miou'][head] <= 1.0
    assert report['per_class']['2d3d']['points'] == sum(len(v) for v in _in_view_labels(frames))


def test_evaluate_tool_end_to_end(frames, tmp_path):
    checkpoint = tmp_path / 'source.pt'
    train_source(frames, SegmenterConfig(size='tiny'), TrainConfig(steps=1, batch_frames=1),
                 checkpoint, torch.device('cpu'), progress=False)
    out = tmp_path / 'report.json'
    rc = evaluate.main(['--checkpoint', str(checkpoint), '--domain', 'night', '--seeds', '7',
                        '--frames', '2', '--image-size', '96', '54', '--method', 'tent',
                        '--set', 'lr_3d=0.0005', '--cache-dir', str(tmp_path / 'cache'),
                        '--device', 'cpu', '--json', str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report['method'] == 'tent' and report['params']['lr_3d'] == 0.0005
    # YAML reads 1e-12 (no dot) as a string: a float parameter takes it as a number.
    rc = evaluate.main(['--checkpoint', str(checkpoint), '--domain', 'night', '--seeds', '7',
                        '--frames', '2', '--image-size', '96', '54', '--method', 'mmtta',
                        '--set', 'lr_2d=1e-12', '--cache-dir', str(tmp_path / 'cache'),
                        '--device', 'cpu', '--json', str(out)])
    assert rc == 0 and json.loads(out.read_text())['params']['lr_2d'] == 1e-12
    with pytest.raises(SystemExit, match='no such parameter'):
        evaluate.main(['--checkpoint', str(checkpoint), '--set', 'nonsense=1'])
    assert report['streams'][0]['frames'] == 2
    assert set(report['miou_mean']) == {'2d', '3d', '2d3d'}


def test_evaluate_reads_a_bag_and_writes_labeled_clouds(frames, tmp_path):
    from mmtta_ros.bags.reader import read_clouds
    from mmtta_ros.bags.writer import write_demo_bag

    bag = tmp_path / 'night_bag'
    write_demo_bag(bag, domain='night', seed=2, num_sweeps=8, image_size=(192, 108),
                   render_size=(96, 54), lidar_azimuth_steps=300)
    checkpoint = tmp_path / 'source.pt'
    train_source(frames, SegmenterConfig(size='tiny'), TrainConfig(steps=1, batch_frames=1),
                 checkpoint, torch.device('cpu'), progress=False)
    out = tmp_path / 'report.json'
    rc = evaluate.main(['--checkpoint', str(checkpoint), '--bag', str(bag), '--method',
                        'mmtta', '--image-size', '96', '54', '--device', 'cpu',
                        '--output-bag', str(tmp_path / 'labeled'), '--json', str(out)])
    assert rc == 0
    stream = json.loads(out.read_text())['streams'][0]
    assert stream['frames'] >= 4 and stream['unlabeled_frames'] == 0
    assert stream['per_class']['2d3d']['points'] > 0
    clouds = list(read_clouds(tmp_path / 'labeled'))
    assert len(clouds) == stream['frames']
    stamp, frame_id, decoded = clouds[0]
    assert frame_id == 'LIDAR_TOP' and 'label' in decoded.fields
