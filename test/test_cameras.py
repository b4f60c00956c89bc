"""N cameras: frames with extra views, assignment, pipeline, generator, bags, converter, params."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmtta_ros.bags.reader import BagFrameReader
from mmtta_ros.bags.topics import BagTopics, camera_topics
from mmtta_ros.bags.writer import write_demo_bag
from mmtta_ros.core.batching import project_frame, project_views
from mmtta_ros.core.builder import build_pipeline
from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.core.frame import CameraView
from mmtta_ros.core.params import node_params
from mmtta_ros.eval.coverage import coverage, coverage_table
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.synth import generate_frames, SequenceConfig, SyntheticSequence
from mmtta_ros.tools import camera_coverage

SIZE = (64, 36)
BACK = ('CAM_BACK',)
DRIVE = dict(domain='night', seed=5, image_size=SIZE, lidar_azimuth_steps=300)


@pytest.fixture(scope='module')
def two_camera_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp('ncam') / 'two_cameras'
    write_demo_bag(path, num_sweeps=10, render_size=None, with_tf=True, extra_cameras=BACK,
                   **DRIVE)
    return path


@pytest.fixture(scope='module')
def two_camera_frames(two_camera_bag):
    reader = BagFrameReader(two_camera_bag, image_size=SIZE,
                            topics=BagTopics(extra_cameras=BACK))
    frames = list(reader)
    assert reader.stats.rejected_messages == reader.stats.skipped_no_camera_info == 0
    return frames


def _pipeline(**values):
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size='tiny'))
    params = node_params({'device': 'cpu', 'model.image_width': SIZE[0],
                          'model.image_height': SIZE[1], 'adaptation.method': 'tent',
                          **values})
    return build_pipeline(params.pipeline, model=model)


def test_the_reader_gives_each_sweep_both_cameras_with_their_mounts(two_camera_bag,
                                                                    two_camera_frames):
    sequence = SyntheticSequence(SequenceConfig(extra_cameras=BACK, **DRIVE))
    assert len(two_camera_frames) >= 5
    for frame in two_camera_frames:
        (back,) = frame.extra_cameras
        assert (frame.camera_name, back.name) == ('CAM_FRONT', 'CAM_BACK')
        assert back.image.shape == frame.image.shape
        np.testing.assert_allclose(back.T_cam_from_lidar, sequence.camera_from_lidar(1),
                                   atol=1e-6)
        assert back.stamp_image_ns == frame.stamp_image_ns  # one camera clock
        assert back.T_odom_from_cam is not None
        # The back camera looks the other way: its image is not the front one.
        assert not np.array_equal(back.image, frame.image)


def test_points_are_assigned_to_one_camera_each(two_camera_frames):
    frame = two_camera_frames[0]
    front, back = project_views(frame, ego_motion=True)
    alone = [project_frame(view, ego_motion=True).in_view
             for view in (frame, replace(frame, **_primary(frame.extra_cameras[0])))]
    assert not (front.in_view & back.in_view).any()
    # Every point some camera sees is assigned, and only to a camera that sees it.
    np.testing.assert_array_equal(front.in_view | back.in_view, alone[0] | alone[1])
    assert not (front.in_view & ~alone[0]).any() and not (back.in_view & ~alone[1]).any()
    assert back.in_view.sum() > 200 and front.in_view.sum() > 200


def _primary(view: CameraView) -> dict:
    """Frame fields that make `view` a one-camera frame's own camera."""
    return dict(image=view.image, K=view.K, T_cam_from_lidar=view.T_cam_from_lidar,
                stamp_image_ns=view.stamp_image_ns, T_odom_from_cam=view.T_odom_from_cam)


def test_a_tie_goes_to_the_earlier_camera():
    frame = next(generate_frames(SequenceConfig(num_frames=1, **DRIVE)))
    twin = CameraView('TWIN', frame.image, frame.K, frame.T_cam_from_lidar,
                      frame.stamp_image_ns, frame.T_odom_from_cam)
    first, second = project_views(replace(frame, extra_cameras=(twin,)))
    np.testing.assert_array_equal(first.in_view, project_frame(frame).in_view)
    assert not second.in_view.any()


def test_the_pipeline_labels_the_points_the_second_camera_sees(two_camera_frames):
    pipeline = _pipeline(**{'adaptation.batch_frames': 2})
    one_camera = _pipeline(**{'adaptation.batch_frames': 2})
    for frame in two_camera_frames[:2]:
        output = pipeline.process(frame)
        single = one_camera.process(replace(frame, extra_cameras=()))
        labels = output.labels_full()
        views = project_views(frame, ego_motion=True)
        np.testing.assert_array_equal(output.in_view, views[0].in_view | views[1].in_view)
        back_only = views[1].in_view
        # Out of view with one camera (65535 on the wire), labeled with two.
        assert (single.labels_full()[back_only] == IGNORE_INDEX).all()
        assert ((labels[back_only] >= 0) & (labels[back_only] < 6)).all()
        # Per-point outputs follow the sweep's order; camera says whose image labeled it.
        assert output.prediction.shape == output.camera.shape == (output.in_view.sum(),)
        np.testing.assert_array_equal(output.camera == 1, back_only[output.in_view])
        in_front = output.camera == 0
        np.testing.assert_allclose(output.pixels[in_front],
                                   views[0].pixels[views[0].in_view], atol=1.0)
        assert output.cloud.width == frame.num_points
    assert single.camera is None


def test_a_one_camera_frame_is_processed_as_before(two_camera_frames):
    frame = replace(two_camera_frames[0], extra_cameras=())
    (projection,) = project_views(frame, ego_motion=True)
    reference = project_frame(frame, ego_motion=True)
    np.testing.assert_array_equal(projection.in_view, reference.in_view)
    np.testing.assert_array_equal(projection.pixels, reference.pixels)
    output = _pipeline().process(frame)
    assert output.camera is None and output.unseen_prediction is None


def test_label_unseen_3d_labels_every_point_and_changes_nothing_else(two_camera_frames):
    plain = _pipeline()
    with_3d = _pipeline(**{'output.label_unseen_3d': True})
    for frame in two_camera_frames[:3]:
        a, b = plain.process(frame), with_3d.process(frame)
        # The extra 3D forward leaves the adapted state as the step left it.
        np.testing.assert_array_equal(a.prediction, b.prediction)
        np.testing.assert_array_equal(a.confidence, b.confidence)
        assert (a.labels_full()[~a.in_view] == IGNORE_INDEX).all()
        full = b.labels_full()
        assert ((full >= 0) & (full < 6)).all()
        assert b.unseen_prediction.shape == ((~b.in_view).sum(),)
        assert (b.confidence_full()[~b.in_view] > 0).all()
    state_a, state_b = plain.prediction_state(), with_3d.prediction_state()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_the_generator_keeps_the_primary_camera_bit_identical():
    one = next(generate_frames(SequenceConfig(num_frames=1, **DRIVE)))
    two = next(generate_frames(SequenceConfig(num_frames=1, extra_cameras=BACK, **DRIVE)))
    for name in ('image', 'points_lidar', 'K', 'T_cam_from_lidar', 'labels', 'intensity',
                 'T_odom_from_lidar', 'T_odom_from_cam'):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert one.extra_cameras == () and one.camera_name == ''
    with pytest.raises(ValueError, match='unknown camera'):
        SyntheticSequence(SequenceConfig(extra_cameras=('CAM_ROOF',)))
    with pytest.raises(ValueError, match='distinct'):
        SyntheticSequence(SequenceConfig(extra_cameras=('CAM_FRONT',)))


def test_a_one_camera_demo_bag_has_no_extra_topics(tmp_path):
    summary = write_demo_bag(tmp_path / 'one', num_sweeps=3, render_size=None, **DRIVE)
    assert not any(topic.startswith('/CAM_BACK') for topic in summary.message_counts)
    with pytest.raises(Exception, match='CAM_BACK'):
        list(BagFrameReader(tmp_path / 'one', image_size=SIZE,
                            topics=BagTopics(extra_cameras=BACK)))


def test_more_cameras_label_more_of_the_sweep():
    frames = list(generate_frames(SequenceConfig(
        num_frames=2, extra_cameras=('CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK',
                                     'CAM_BACK_LEFT', 'CAM_FRONT_LEFT'), **DRIVE)))
    shares = [coverage(frames, count).share for count in range(1, 7)]
    assert all(a < b for a, b in zip(shares, shares[1:]))
    assert shares[0] < 0.2 and shares[-1] > 0.5
    assert len(coverage_table(frames)) == 6


@pytest.mark.parametrize('cameras,message', [
    ([], '1 to 12'), (['CAM_FRONT', 'CAM_FRONT'], 'twice'), (['CAM FRONT'], 'not a camera'),
    (['', 'CAM_BACK'], 'not a camera'), ([3], 'not a camera'), ('CAM_FRONT', 'list')])
def test_a_bad_camera_list_is_a_one_line_error(cameras, message):
    with pytest.raises(ValueError, match=message) as error:
        node_params({'inputs.cameras': cameras})
    assert '\n' not in str(error.value)


def test_a_camera_list_becomes_the_input_params():
    assert node_params({}).pipeline.inputs.cameras == ('',)
    inputs = node_params({'inputs.cameras': ['CAM_FRONT', 'CAM_BACK']}).pipeline.inputs
    assert inputs.cameras == ('CAM_FRONT', 'CAM_BACK') and inputs.num_cameras == 2


def test_the_coverage_tool_rejects_an_unknown_camera_in_one_line(capsys):
    assert camera_coverage.main(['--synthetic', 'day', '--cameras', 'CAM_ROOF']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1


def test_camera_topics_follow_the_converters():
    assert camera_topics('CAM_BACK') == ('/CAM_BACK/image_rect_compressed',
                                         '/CAM_BACK/camera_info')
    assert camera_topics('CAM_FRONT') == (BagTopics().image, BagTopics().camera_info)


def test_further_cameras_extrinsics_parameter_is_checked_and_parsed():
    sequence = SyntheticSequence(SequenceConfig(extra_cameras=BACK, **DRIVE))
    T = [float(v) for v in sequence.camera_from_lidar(1).reshape(-1)]
    inputs = node_params({'inputs.cameras': ['CAM_FRONT', 'CAM_BACK'],
                          'calibration.extra_T_cam_from_lidar': T}).pipeline.inputs
    np.testing.assert_allclose(inputs.extra_T_cam_from_lidar[0], sequence.camera_from_lidar(1))
    for cameras, value, message in ((['CAM_FRONT', 'CAM_BACK'], T * 2, '2 transforms for 1'),
                                    (['CAM_FRONT', 'CAM_BACK'], T[:15], '16 numbers'),
                                    (['CAM_FRONT', 'CAM_BACK'], [2.0] * 16, 'extra_T')):
        with pytest.raises(ValueError, match=message) as error:
            node_params({'inputs.cameras': cameras, 'calibration.extra_T_cam_from_lidar': value})
        assert '\n' not in str(error.value)
