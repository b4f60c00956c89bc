"""Source calibration and the 2D+3D fusions: formulas by hand, labels kept, composition."""

import math

import numpy as np
import pytest
import torch

from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.params import node_params
from mmtta_ros.models.segmenter import fuse_2d3d
from mmtta_ros.tta import build_method
from mmtta_ros.tta.calibration import match_confidence, mean_confidence, SourceCalibration
from mmtta_ros.tta.source_branch import SourceBranch
from test_tta import clone_state, FAST_LRS, make_source_model, target_stream


def test_the_product_fusion_is_the_normalised_product_of_the_softmaxes():
    logits_2d = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    logits_3d = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.5]])
    p2, p3 = logits_2d.softmax(dim=1), logits_3d.softmax(dim=1)
    product = p2 * p3 / (p2 * p3).sum(dim=1, keepdim=True)
    torch.testing.assert_close(fuse_2d3d(logits_2d, logits_3d, 'product'), product)
    torch.testing.assert_close(fuse_2d3d(logits_2d, logits_3d, 'mean'), (p2 + p3) / 2)
    # Point 0 by hand: 2D e^2 : 1 : 1, 3D 1 : e^3 : 1 -> product e^2 : e^3 : 1.
    by_hand = torch.tensor([math.e ** 2, math.e ** 3, 1.0])
    torch.testing.assert_close(fuse_2d3d(logits_2d, logits_3d, 'product')[0],
                               by_hand / by_hand.sum())
    with pytest.raises(ValueError, match='fusion'):
        fuse_2d3d(logits_2d, logits_3d, 'max')


def test_matching_reaches_the_target_confidence_and_keeps_every_top_class():
    torch.manual_seed(0)
    logits = torch.randn(500, 6) * 4
    for target in (0.3, 0.5, 0.9):
        matched = match_confidence(logits, torch.tensor(target))
        assert float(mean_confidence(matched)) == pytest.approx(target, abs=1e-5)
        assert torch.equal(matched.argmax(dim=1), logits.argmax(dim=1))
        # One temperature for the frame: every point scaled alike.
        ratio = matched / logits
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])))
    # Out of reach (below 1/C): the hottest temperature of the range, no failure.
    hottest = match_confidence(logits, torch.tensor(0.05))
    assert float(mean_confidence(hottest)) < float(mean_confidence(logits))
    assert match_confidence(torch.zeros(0, 6), torch.tensor(0.5)).shape == (0, 6)


def test_it_publishes_the_methods_labels_at_the_sources_confidence():
    source = make_source_model()
    reference = build_method('mmtta', make_source_model(), **FAST_LRS)
    wrapped = SourceCalibration(build_method('mmtta', make_source_model(), **FAST_LRS), source)
    for batch in target_stream(3):
        expected = reference.step(batch)
        got = wrapped.step(batch)
        with torch.no_grad():
            from_source = source(batch)
        for branch in ('2d', '3d'):
            mine = getattr(got, f'logits_{branch}')
            assert torch.equal(mine.argmax(dim=1),
                               getattr(expected, f'logits_{branch}').argmax(dim=1))
            assert float(mean_confidence(mine)) == pytest.approx(
                float(mean_confidence(getattr(from_source, f'logits_{branch}'))), abs=1e-5)
        # It adapts as the method alone does.
        assert wrapped.stats['loss'] == pytest.approx(reference.stats['loss'])
    # Predicting apart (the node's predictor) runs no source forward: a new frame is
    # labeled at the confidences of the newest step's frame...
    new_batch = target_stream(1, seed=9)[0]
    predicted = wrapped.predict(new_batch)
    assert torch.equal(predicted.logits_2d.argmax(dim=1),
                       wrapped.method.predict(new_batch).logits_2d.argmax(dim=1))
    for branch in ('2d', '3d'):
        assert float(mean_confidence(getattr(predicted, f'logits_{branch}'))) == pytest.approx(
            wrapped.stats[f'confidence_source_{branch}'], abs=1e-5)
    # ...handed over with the prediction state to another copy; before any step (and after
    # a reset), at the source's confidence on the frame itself.
    predictor = SourceCalibration(build_method('mmtta', make_source_model(), **FAST_LRS),
                                  make_source_model())
    with torch.no_grad():
        source_2d = source(new_batch).logits_2d
    assert float(mean_confidence(predictor.predict(new_batch).logits_2d)) == pytest.approx(
        float(mean_confidence(source_2d)), abs=1e-5)
    predictor.load_prediction_state(wrapped.prediction_state())
    torch.testing.assert_close(predictor.predict(new_batch).logits_2d, predicted.logits_2d)
    wrapped.reset()
    assert wrapped.targets is None
    assert float(mean_confidence(wrapped.predict(new_batch).logits_2d)) == pytest.approx(
        float(mean_confidence(source_2d)), abs=1e-5)
    predictor.load_prediction_state(wrapped.prediction_state())
    assert predictor.targets is None
    with pytest.raises(ValueError, match='branches'):
        SourceCalibration(reference, source, branches=('4d',))


def test_the_builder_puts_it_inside_the_source_branch_and_reset_is_exact():
    model = make_source_model()
    source = clone_state(model)
    params = node_params({'adaptation.method': 'mmtta', 'adaptation.fallback': True,
                          'adaptation.source_branch': '3d', 'adaptation.calibrate': True,
                          'adaptation.mmtta.lr_2d': FAST_LRS['lr_2d'],
                          'adaptation.mmtta.lr_3d': FAST_LRS['lr_3d'], 'device': 'cpu'})
    method = build_pipeline(params.pipeline, model=model).method
    assert isinstance(method, SourceBranch) and isinstance(method.method, SourceCalibration)
    assert method.method.branches == ('2d',)  # the 3D comes from the source: nothing to match
    assert method.source_model is method.method.source_model is method.method.method.source_model
    for batch in target_stream(3):
        got = method.step(batch)
        with torch.no_grad():
            from_source = method.source_model(batch)
        torch.testing.assert_close(got.logits_3d, from_source.logits_3d)
        assert method.stats['confidence_source_2d'] == pytest.approx(
            float(mean_confidence(from_source.logits_2d)), abs=1e-6)
    state = method.state_dict()
    method.reset()
    for key, value in method.model.state_dict().items():
        assert torch.equal(value, source[key]), key
    method.load_state_dict(state)
    # Source-only never wraps; a bad fusion is refused at the edge.
    assert not isinstance(build_pipeline(node_params({
        'adaptation.method': 'source', 'adaptation.calibrate': True, 'device': 'cpu'}).pipeline,
        model=make_source_model()).method, SourceCalibration)
    with pytest.raises(ValueError, match='output.fusion'):
        node_params({'output.fusion': 'max'})


def test_the_pipeline_publishes_the_fusion_it_is_given():
    from mmtta_ros.core.batching import frames_to_input
    from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
    from mmtta_ros.synth import generate_frames, SequenceConfig

    frame = next(iter(generate_frames(SequenceConfig(domain='night', seed=3, num_frames=1,
                                                     image_size=(64, 36), frame_stride=2,
                                                     lidar_azimuth_steps=300))))
    outputs = {}
    for fusion in ('mean', 'product'):
        torch.manual_seed(0)
        model = build_segmenter(SegmenterConfig(size='tiny'))
        params = node_params({'adaptation.method': 'source', 'output.fusion': fusion,
                              'calibration.ego_motion': False, 'device': 'cpu',
                              'model.image_width': 64, 'model.image_height': 36})
        outputs[fusion] = build_pipeline(params.pipeline, model=model).process(frame)
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny')).eval()
    with torch.no_grad():
        expected = model(frames_to_input([frame], torch.device('cpu'))[0])
    for fusion, output in outputs.items():
        confidence, labels = fuse_2d3d(expected.logits_2d, expected.logits_3d, fusion).max(dim=1)
        assert (output.prediction == labels.numpy()).all()
        np.testing.assert_allclose(output.confidence, confidence.numpy(), rtol=1e-5, atol=1e-6)
    # The same branches, another fusion: the published confidences differ.
    assert not np.allclose(outputs['mean'].confidence, outputs['product'].confidence)
