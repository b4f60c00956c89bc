"""The label replay (tta/supervision.py) inside every learning method, on the tiny model."""

import copy

import pytest
import torch

from mmtta_ros.core import persist
from mmtta_ros.tta import build_method
from mmtta_ros.tta.losses import masked_cross_entropy
from mmtta_ros.tta.supervision import LabelReplay
from test_tta import (
    clone_state, FAST_LRS, LEARNING_METHODS, make_batch, make_source_model, models_of,
    target_stream, TinyInput)


def _answered(seed=50, count=12):
    """One answered frame: a target batch of one frame, `count` labeled points."""
    inputs = make_batch(seed, frames=1, shift=0.7)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(inputs.points.shape[0], generator=generator)[:count]
    labels = torch.randint(0, 3, (count,), generator=generator)
    return inputs, rows, labels


def _method(name, capacity=4, lr=0.1, **kwargs):
    method = build_method(name, make_source_model(), **FAST_LRS, **kwargs)
    method.use_supervision(LabelReplay(capacity=capacity, lr_2d=lr, lr_3d=lr,
                                       input_type=TinyInput))
    return method


@pytest.mark.parametrize('name', LEARNING_METHODS)
def test_answered_points_are_learned_by_every_learning_method(name):
    inputs, rows, labels = _answered()
    plain = build_method(name, make_source_model(), **FAST_LRS)
    method = _method(name)
    method.supervision.add(inputs, rows, labels)

    def answered_loss(model):
        """CE of both branches on the answered points, batch statistics (as replayed)."""
        model.train()
        with torch.no_grad():
            output = model(inputs)
        return float(masked_cross_entropy(output.logits_2d[rows], labels)
                     + masked_cross_entropy(output.logits_3d[rows], labels))
    first = None
    for batch in target_stream(30):
        method.step(batch)
        plain.step(batch)
        first = method.stats['supervised_loss'] if first is None else first
    assert method.stats['supervised_points'] == 12 and method.stats['supervised_frames'] == 1
    assert method.stats['updated'] and method.stats['supervised_step']
    assert method.stats['supervised_loss'] < 0.7 * first
    # Without the replay the loss there stays near the source's (ratio ~1); tent, whose
    # entropy step pulls hardest against the labels, ends at ~0.71 on this tiny model.
    assert answered_loss(method.model) < 0.8 * answered_loss(plain.model)


def test_the_oldest_answered_frame_goes_first_and_bad_input_is_refused():
    replay = LabelReplay(capacity=2)
    for seed in (1, 2, 3):
        replay.add(*_answered(seed, count=seed))
    assert len(replay) == 2 and replay.points == 2 + 3
    with pytest.raises(ValueError, match='same non-empty'):
        replay.add(make_batch(0), torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match='capacity'):
        LabelReplay(capacity=0)
    with pytest.raises(RuntimeError, match='attach'):
        replay.step(make_source_model())


def test_the_replayed_forward_leaves_the_batch_statistics_alone():
    # MM-TTA's slow model folds in the fast model's last batch statistics (ema 'stats'):
    # after one step they must be the current batch's, whatever the replay ran on.
    plain = build_method('mmtta', make_source_model(), ema_targets='stats', **FAST_LRS)
    replayed = _method('mmtta', ema_targets='stats')
    replayed.supervision.add(*_answered())
    batch = target_stream(1)[0]
    plain.step(batch)
    replayed.step(batch)
    assert replayed.stats['supervised_step']
    for (key, a), b in zip(plain.slow_model.state_dict().items(),
                           replayed.slow_model.state_dict().values()):
        assert torch.equal(a, b), key
    # An empty replay changes nothing at all.
    plain, empty = build_method('tent', make_source_model(), **FAST_LRS), _method('tent')
    for batch in target_stream(3):
        torch.testing.assert_close(empty.step(batch).logits_3d, plain.step(batch).logits_3d,
                                   rtol=0, atol=0)
    assert 'supervised_points' not in empty.stats


def test_reset_forgets_the_answers_and_restores_the_source_bit_for_bit():
    method = _method('mmtta')
    source = {key: clone_state(model) for key, model in models_of(method).items()}
    method.supervision.add(*_answered())
    for batch in target_stream(3):
        method.step(batch)
    method.reset()
    assert len(method.supervision) == 0
    for key, model in models_of(method).items():
        for k, value in model.state_dict().items():
            assert torch.equal(value, source[key][k]), (key, k)
    method.step(target_stream(1)[0])
    assert 'supervised_points' not in method.stats


def test_the_replay_is_part_of_the_state_saved_and_restored(tmp_path):
    method = _method('mmtta')
    method.supervision.add(*_answered(seed=5))
    stream = target_stream(6)
    for batch in stream[:3]:
        method.step(batch)
    path = tmp_path / 'state.pt'
    method.save_state(path)
    assert len(persist.load_weights_only(path, 'cpu')['supervision']['entries']) == 1
    twin = _method('mmtta')
    twin.load_state(path)
    assert len(twin.supervision) == 1
    copied = copy.deepcopy(method)
    for batch in stream[3:]:
        expected = method.step(batch)
        for other in (twin, copied):
            torch.testing.assert_close(other.step(batch).logits_3d, expected.logits_3d,
                                       rtol=0, atol=0)
    # A state saved without answers empties a replay that had some.
    plain = _method('mmtta')
    plain.save_state(path)
    twin.load_state(path)
    assert len(twin.supervision) == 0
