"""The source branch: one branch published from the frozen source model, any method."""

import pytest
import torch

from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.params import node_params
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.synth import generate_frames, SequenceConfig
from mmtta_ros.tta import build_method
from mmtta_ros.tta.source_branch import prediction_models, source_branch_logits, SourceBranch
from test_tta import clone_state, FAST_LRS, make_source_model, target_stream


@pytest.mark.parametrize('branch', ['3d', '2d'])
def test_the_published_branch_is_the_source_models_and_the_other_the_methods(branch):
    source = make_source_model()
    reference = build_method('mmtta', make_source_model(), **FAST_LRS)
    wrapped = SourceBranch(build_method('mmtta', make_source_model(), **FAST_LRS), source,
                           branch=branch)
    other = '2d' if branch == '3d' else '3d'
    for batch in target_stream(3):
        expected = reference.step(batch)
        got = wrapped.step(batch)
        source.eval()
        with torch.no_grad():
            from_source = getattr(source(batch), f'logits_{branch}')
        torch.testing.assert_close(getattr(got, f'logits_{branch}'), from_source)
        torch.testing.assert_close(getattr(got, f'logits_{other}'),
                                   getattr(expected, f'logits_{other}'))
        # The method adapts as without the wrapper: same loss, same state.
        assert wrapped.stats['loss'] == pytest.approx(reference.stats['loss'])
        assert wrapped.stats['source_branch'] == branch
    predicted = wrapped.predict(target_stream(1, seed=9)[0])
    with torch.no_grad():
        assert torch.equal(getattr(predicted, f'logits_{branch}'),
                           getattr(source(target_stream(1, seed=9)[0]), f'logits_{branch}'))
    with pytest.raises(ValueError, match='branch'):
        SourceBranch(reference, source, branch='both')


def test_the_segmenters_branch_alone_gives_the_full_forwards_logits():
    frames = list(generate_frames(SequenceConfig(domain='night', seed=3, num_frames=1,
                                                 image_size=(64, 36), frame_stride=2,
                                                 lidar_azimuth_steps=300)))
    from mmtta_ros.core.batching import frames_to_input

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny')).eval()
    inputs, _ = frames_to_input(frames, torch.device('cpu'))
    with torch.no_grad():
        full = model(inputs)
    for branch in ('2d', '3d'):
        torch.testing.assert_close(source_branch_logits(model, inputs, branch),
                                   getattr(full, f'logits_{branch}'))


def test_the_builder_composes_it_with_the_fallback_and_reset_is_exact():
    model = make_source_model()
    source = clone_state(model)
    params = node_params({'adaptation.method': 'tent_ens', 'adaptation.fallback': True,
                          'adaptation.source_branch': '3d', 'device': 'cpu'})
    method = build_pipeline(params.pipeline, model=model).method
    assert isinstance(method, SourceBranch) and method.name == 'tent_ens'
    assert method.source_model is method.method.source_model  # one frozen copy
    for batch in target_stream(3):
        method.step(batch)
    assert 'agreement_source' in method.stats and method.stats['source_branch'] == '3d'
    state = method.state_dict()
    method.reset()
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    method.load_state_dict(state)
    assert method.method.method.steps == 3


@pytest.mark.parametrize('name', ['mmtta', 'bn_stats', 'tent_ens'])
def test_the_label_path_skips_the_branch_it_replaces_and_labels_the_same(name):
    frames = list(generate_frames(SequenceConfig(domain='night', seed=4, num_frames=3,
                                                 image_size=(64, 36), frame_stride=2,
                                                 lidar_azimuth_steps=300)))
    from mmtta_ros.core.batching import frames_to_input

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny'))
    params = node_params({'adaptation.method': name, 'adaptation.fallback': True,
                          'adaptation.source_branch': '3d', 'device': 'cpu'})
    method = build_pipeline(params.pipeline, model=model).method
    batches = [frames_to_input([frame], torch.device('cpu'))[0] for frame in frames]
    for inputs in batches[:2]:
        method.step(inputs)
    calls = {'3d': 0, '2d': 0}
    models = list(prediction_models(method))
    assert models and all(m is not method.source_model for m in models)

    def counted(branch, point_features):
        def run(*args):
            calls[branch] += 1
            return point_features(*args)
        return run
    for m in models:
        for b in calls:
            net = getattr(m, f'net_{b}')
            net.point_features = counted(b, net.point_features)
    predicted = method.predict(batches[2])
    for m in models:
        for b in calls:
            del getattr(m, f'net_{b}').point_features
    # The adapted 3D branch did not run; its logits are the source's all the same.
    assert calls == {'3d': 0, '2d': 1}
    assert all(m.skip_branch is None for m in models)
    whole = method.method.predict(batches[2])  # the wrapped method, both branches run
    torch.testing.assert_close(predicted.logits_2d, whole.logits_2d)
    torch.testing.assert_close(predicted.logits_3d,
                               source_branch_logits(method.source_model, batches[2], '3d'))
    assert not torch.equal(predicted.logits_3d, whole.logits_3d)


def test_with_the_fallback_the_source_model_runs_once_a_step():
    frames = list(generate_frames(SequenceConfig(domain='night', seed=5, num_frames=2,
                                                 image_size=(64, 36), frame_stride=2,
                                                 lidar_azimuth_steps=300)))
    from mmtta_ros.core.batching import frames_to_input

    torch.manual_seed(0)
    params = node_params({'adaptation.method': 'bn_stats', 'adaptation.fallback': True,
                          'adaptation.source_branch': '3d', 'device': 'cpu'})
    method = build_pipeline(params.pipeline,
                            model=build_segmenter(SegmenterConfig(size='tiny'))).method
    net_3d = method.source_model.net_3d
    calls = []
    forward = net_3d.point_features
    net_3d.point_features = lambda *args: calls.append(1) or forward(*args)
    for frame in frames:
        inputs = frames_to_input([frame], torch.device('cpu'))[0]
        published = method.step(inputs)
        del net_3d.point_features
        expected = source_branch_logits(method.source_model, inputs, '3d')
        net_3d.point_features = lambda *args: calls.append(1) or forward(*args)
        torch.testing.assert_close(published.logits_3d, expected)
    assert len(calls) == len(frames)  # the fallback's forward, taken over by the branch
    # Taken once: a later step on other inputs never reuses it.
    assert method.method.source_output_for(inputs) is None
