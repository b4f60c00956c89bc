"""Predict and adapt apart: the predictor copy, the hand-over, reset and save."""

import os
import sys
import threading

import pytest
import torch

from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.params import node_params
from mmtta_ros.core.realtime import lower_thread_priority, SplitPipeline
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.synth import generate_frames, SequenceConfig


@pytest.fixture(scope='module')
def frames():
    config = SequenceConfig(domain='night', seed=9, num_frames=6, image_size=(64, 36),
                            frame_stride=2, lidar_azimuth_steps=300)
    return list(generate_frames(config))


def _pipeline(method='mmtta', **values):
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny'))
    # Large steps, so every update visibly moves the prediction (bn_stats takes none).
    steps = {} if method == 'bn_stats' else {f'adaptation.{method}.lr_2d': 1e-2,
                                             f'adaptation.{method}.lr_3d': 1e-2}
    params = node_params({'adaptation.method': method, 'device': 'cpu',
                          'model.image_width': 64, 'model.image_height': 36,
                          **steps, **values})
    return build_pipeline(params.pipeline, model=model)


@pytest.mark.parametrize('method,values', [
    ('mmtta', {'adaptation.mmtta.momentum': 0.5}), ('tent_ens', {}), ('bn_stats', {})])
def test_when_the_adapter_keeps_up_the_labels_are_the_papers_protocol(frames, method, values):
    reference = _pipeline(method, **values)
    split = SplitPipeline(_pipeline(method, **values))
    for frame in frames:
        expected = reference.process(frame)  # predicted before its own update
        labeled = split.predict(frame)
        split.adapt(frame)
        assert (labeled.prediction == expected.prediction).all()
        torch.testing.assert_close(torch.from_numpy(labeled.confidence),
                                   torch.from_numpy(expected.confidence))
        assert labeled.cloud is not None
    assert split.published == split.loaded + 1 == len(frames)


# The node's default composition: fallback, calibration, source 3D, product fusion.
CALIBRATED = {'adaptation.fallback': True, 'adaptation.calibrate': True,
              'adaptation.source_branch': '3d', 'output.fusion': 'product'}


@pytest.mark.parametrize('method,values', [
    ('mmtta', CALIBRATED), ('bn_stats', CALIBRATED), ('bn_stats', {'adaptation.fallback': True}),
    ('bn_stats', {**CALIBRATED, 'adaptation.fallback': False})])
def test_with_per_frame_parts_the_split_labels_as_one_copy_predicting_then_adapting(
        frames, method, values):
    # The fallback decides with the agreements up to the previous frame and the predictor
    # calibrates with the adapter's newest targets (the previous frame's source
    # confidence): not the paper's protocol, but exactly what the adapter itself would
    # predict with before its step (core/realtime.labels_apart).
    paper = _pipeline(method, **values)
    one_copy = _pipeline(method, **values)
    split = SplitPipeline(_pipeline(method, **values))
    for index, frame in enumerate(frames):
        expected = paper.process(frame)
        own = one_copy.predict(frame)
        one_copy.process(frame)
        labeled = split.predict(frame)
        split.adapt(frame)
        assert (labeled.prediction == own.prediction).all()
        torch.testing.assert_close(torch.from_numpy(labeled.confidence),
                                   torch.from_numpy(own.confidence))
        if not values['adaptation.fallback']:
            # The calibration alone never changes a branch's labels.
            assert (labeled.prediction_2d == expected.prediction_2d).all()
            assert (labeled.prediction_3d == expected.prediction_3d).all()
        if index == 0 and values.get('adaptation.calibrate'):
            # No step yet: calibrated on the frame itself, as in the paper's protocol.
            torch.testing.assert_close(torch.from_numpy(labeled.confidence),
                                       torch.from_numpy(expected.confidence))
    if values.get('adaptation.calibrate'):
        split.predict(frames[0])  # loads the last hand-over
        assert split.predictor.method.method.targets == split.adapter.method.method.targets
        assert split.adapter.method.method.targets is not None
        split.reset()
        assert split.predictor.method.method.targets is None


def test_a_state_taken_before_a_reset_is_not_handed_over_after_it(frames):
    split = SplitPipeline(_pipeline('mmtta'))
    split.adapt(frames[0])
    split.predict(frames[1])
    taking = split.adapter.prediction_state

    def taken_then_reset():
        state = taking()  # the adapted state ...
        split.reset()     # ... and a reset (the service) before it is handed over
        return state
    split.adapter.prediction_state = taken_then_reset
    split.adapt(frames[1])
    assert split._pending is None  # the old state was dropped
    split.adapter.prediction_state = taking
    fresh = _pipeline('mmtta').predict(frames[2])
    assert (split.predict(frames[2]).confidence == fresh.confidence).all()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN (a state not yet stepped holds NaN)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.slow
@pytest.mark.parametrize('values', [{}, CALIBRATED])
def test_the_predictor_never_sees_half_a_state(frames, values):
    split = SplitPipeline(_pipeline('mmtta', **{'adaptation.mmtta.momentum': 0.5}, **values))
    published = [split.predictor.method.prediction_state()]
    original_publish = split._publish

    def record():
        original_publish()
        published.append({k: v.clone() for k, v in split._pending.items()})
    split._publish = record
    done = threading.Event()

    def adapt_forever():
        for _ in range(2):
            for frame in frames:
                split.adapt(frame)
        done.set()
    thread = threading.Thread(target=adapt_forever)
    thread.start()
    checks = 0
    while not done.is_set() or checks < 3:
        split.predict(frames[0])
        state = split.predictor.method.prediction_state()
        assert any(all(_same(state[k], candidate[k]) for k in state)
                   for candidate in list(published)), 'a torn or unknown state was used'
        checks += 1
    thread.join()
    assert split.loaded >= 1 and split.published == 2 * len(frames)


@pytest.mark.parametrize('values', [{}, CALIBRATED])
def test_reset_and_save_stay_exact(frames, tmp_path, values):
    split = SplitPipeline(_pipeline('mmtta', **values))
    source = {k: v.clone() for k, v in split.adapter.method.model.state_dict().items()}
    for frame in frames[:3]:
        split.adapt(frame)
        split.predict(frame)
    split.save_state(tmp_path / 'state.pt')
    adapted = split.predict(frames[3]).confidence
    split.reset()
    for method in (split.adapter.method, split.predictor.method):
        while hasattr(method, 'method'):  # the wrapped MM-TTA inside the reusable parts
            method = method.method
        for key, value in method.slow_model.state_dict().items():
            assert torch.equal(value, source[key]), key
    fresh = _pipeline('mmtta', **values).predict(frames[3]).confidence
    assert (split.predict(frames[3]).confidence == fresh).all()
    split.load_state(tmp_path / 'state.pt')
    assert (split.predict(frames[3]).confidence == adapted).all()


def test_bf16_autocast_stays_close_to_fp32_and_outputs_float32(frames):
    # model.precision bf16: the 2D branch and heads in bf16, the sparse 3D branch in fp32.
    # Measured on 30 night frames with a trained model (README): 98.6 % (source) and
    # 99.4 % (MM-TTA) of labels unchanged, mIoU within 0.5. Here: random weights, so only
    # closeness of the probabilities is checked, and that everything after is float32.
    reference = _pipeline('mmtta')
    autocast = _pipeline('mmtta', **{'model.precision': 'bf16'})
    for frame in frames[:2]:
        expected, got = reference.process(frame), autocast.process(frame)
        assert got.confidence.dtype == expected.confidence.dtype
        assert abs(got.confidence - expected.confidence).max() < 0.05
        assert got.stats['updated'] == expected.stats['updated']
    with pytest.raises(ValueError, match='model.precision'):
        node_params({'model.precision': 'fp16'})


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='per-thread niceness is Linux')
def test_the_adapter_thread_can_run_behind_the_others():
    main_before = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def adapter():
        thread = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, thread)
        seen['problem'] = lower_thread_priority(5)
        seen['change'] = os.getpriority(os.PRIO_PROCESS, thread) - before
        seen['unchanged'] = lower_thread_priority(0)
    worker = threading.Thread(target=adapter)
    worker.start()
    worker.join()
    assert seen['problem'] is None and seen['unchanged'] is None
    assert seen['change'] == min(5, 19 - main_before)
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_before  # only that thread


def test_the_scorers_run_the_nodes_protocol(frames):
    from mmtta_ros.core.realtime import node_protocol, NodeProtocol

    def params(**values):
        return node_params({'adaptation.method': 'bn_stats', 'device': 'cpu', **values})
    plain = _pipeline('bn_stats')
    # Split labels as the paper's protocol unless calibrated or skipping frames: one run.
    assert node_protocol(plain, params()) is plain
    assert isinstance(node_protocol(plain, params(**{'adaptation.fallback': True})),
                      NodeProtocol)  # the fallback decides on the previous frames
    assert node_protocol(plain, params(**{'worker.split': False, **CALIBRATED})) is plain
    assert node_protocol(plain, node_params({'adaptation.method': 'source', 'device': 'cpu',
                                             'adaptation.calibrate': True})) is plain
    every_other = node_protocol(_pipeline('bn_stats'), params(**{'worker.adapt_every': 2}))
    assert isinstance(every_other, NodeProtocol)
    calibrated = node_protocol(_pipeline('bn_stats', **CALIBRATED), params(**CALIBRATED))
    by_hand = SplitPipeline(_pipeline('bn_stats', **CALIBRATED))
    for frame in frames:
        expected = by_hand.predict(frame)
        by_hand.adapt(frame)
        got = calibrated.process(frame)
        assert (got.prediction == expected.prediction).all() and got.stats
        every_other.process(frame)
    assert calibrated.split.published == len(frames)
    assert every_other.split.published == (len(frames) + 1) // 2
    calibrated.reset()
    assert calibrated.split.predictor.method.method.targets is None


def test_a_split_node_gives_the_predictor_and_the_adapter_half_the_cores_each():
    from mmtta_ros.core.realtime import split_threads
    cpu = torch.device('cpu')
    assert [split_threads(0, cpu, cores) for cores in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert split_threads(3, cpu, 16) is None  # a set value is kept
    assert split_threads(0, torch.device('cuda'), 16) is None
    # Set for the node's life, given back when it lets go (torch's threads are global).
    from mmtta_ros.core.realtime import configure_split_threads, restore_threads
    found = torch.get_num_threads()
    try:
        before = configure_split_threads(0, cpu)
        assert before == found
        assert torch.get_num_threads() == split_threads(0, cpu)
        assert configure_split_threads(2, cpu) is None  # set explicitly: left alone
    finally:
        restore_threads(before)
    assert torch.get_num_threads() == found
