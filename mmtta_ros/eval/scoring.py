"""
Score a stream like the paper: run a method online, in order, and score its predictions.

Each frame's prediction is the one the method makes online (before or after its update,
as the method is configured), compared with the frame's labels over in-view points;
2D, 3D and 2D+3D confusion matrices accumulate over the whole stream (xMUDA protocol).
"""

import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.classes import CLASS_NAMES
from mmtta_ros.core.frame import Frame
from mmtta_ros.eval.metrics import ConfusionMatrix
from mmtta_ros.core.pipeline import FrameOutput, Pipeline

HEADS = ('2d', '3d', '2d3d')


def score_stream(pipeline: Union[Pipeline, Any], frames: Iterable[Frame],
                 class_names: Sequence[str] = CLASS_NAMES,
                 on_result: Optional[Callable[[FrameOutput], None]] = None
                 ) -> Dict[str, object]:
    """
    Run `pipeline` over `frames` in order; return mIoU per head and per-class IoU.

    pipeline: a Pipeline (the paper's protocol: every frame adapted on, then labeled), or
    core.realtime.NodeProtocol (the node's split: labeled, then adapted on). Unlabeled
    frames (a real bag between keyframes) are counted but not scored. on_result(output)
    sees every output (to record its cloud).
    """
    matrices = {head: ConfusionMatrix(len(class_names)) for head in HEADS}
    num_frames, unlabeled, started = 0, 0, time.monotonic()
    stats_sum: Dict[str, float] = {}
    rejected = 0
    for frame in frames:
        try:
            result = pipeline.process(frame)
        except SensorDataError:
            rejected += 1  # as the node does: a frame it cannot use is skipped, not fatal
            continue
        if on_result is not None:
            on_result(result)
        labels = result.labels_in_view()
        if labels is None:
            unlabeled += 1
        else:
            matrices['2d'].update(labels, result.prediction_2d)
            matrices['3d'].update(labels, result.prediction_3d)
            matrices['2d3d'].update(labels, result.prediction)
        for key, value in result.stats.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
        num_frames += 1
    seconds = time.monotonic() - started
    return {
        'frames': num_frames,
        'unlabeled_frames': unlabeled,
        'rejected_frames': rejected,
        'seconds': seconds,
        'miou': {head: matrices[head].miou() for head in HEADS},
        'per_class': {head: matrices[head].report(class_names) for head in HEADS},
        'mean_stats': {k: v / max(num_frames, 1) for k, v in stats_sum.items()},
    }


def format_report(title: str, report: Dict[str, object],
                  class_names: Sequence[str] = CLASS_NAMES) -> str:
    """Render a scoring report as a small text table (IoU in %)."""
    scored = report['frames'] - report['unlabeled_frames']
    lines = [f'{title}: {report["frames"]} frames, {scored} of them labeled and scored, '
             f'{report["seconds"]:.1f} s']
    header = f'{"head":<6}' + ''.join(f'{name[:10]:>11}' for name in class_names) + f'{"mIoU":>8}'
    lines.append(header)
    for head in HEADS:
        per_class = report['per_class'][head]['iou']
        cells = ''.join(
            f'{(100 * per_class[name]) if per_class[name] is not None else float("nan"):>11.1f}'
            for name in class_names)
        lines.append(f'{head:<6}{cells}{100 * report["miou"][head]:>8.1f}')
    return '\n'.join(lines)
