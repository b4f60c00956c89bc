"""
tta_benchmark: per-frame time of each adaptation method next to source-only (prints figures).

Every method runs on the same generated night frames through the same pipeline; the
ratio to source-only is the figure that matters (MM-TTA does a fast forward, a slow
forward and a backward per frame). Weights are freshly initialised: speed does not
depend on them.
"""

import argparse
import sys
import time
from typing import List, Tuple

import numpy as np

import torch

from mmtta_ros.core.builder import build_pipeline, configure_torch
from mmtta_ros.core.params import default_params_file, node_params, read_params_file
from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.eval.splits import IMAGE_SIZE, target_config
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.tta import METHODS

DEFAULT = 'default'  # the node's configuration (config/adapt.yaml)
ORDER = tuple(METHODS) + (DEFAULT,)


def _timed(device: torch.device, call) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_method(name: str, size: str, frames, device, warmup: int,
                precision: str = 'fp32') -> Tuple[List[float], List[float]]:
    """
    Return seconds per timed frame (after `warmup`) of a step and of a prediction alone.

    name: a method on the parameter table's defaults (collapse guard included), or
    `default`: config/adapt.yaml's values. A fresh `size` model either way.
    """
    torch.manual_seed(0)
    # ftd needs a fused 2D+3D head; the other methods ignore one, so only ftd gets it.
    model = build_segmenter(SegmenterConfig(size=size, fused_head=name == 'ftd')).to(device)
    values = read_params_file(default_params_file()) if name == DEFAULT else \
        {'adaptation.method': name}
    values = {key: value for key, value in values.items() if not key.startswith('model.')}
    params = node_params({**values, 'device': str(device), 'model.precision': precision})
    pipeline = build_pipeline(params.pipeline, model=model)
    steps, predictions = [], []
    for i, frame in enumerate(frames):
        step = _timed(device, lambda: pipeline.process(frame))
        prediction = _timed(device, lambda: pipeline.predict(frame))
        if i >= warmup:
            steps.append(step)
            predictions.append(prediction)
    return steps, predictions


def main(argv=None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--sizes', nargs='+', default=['tiny', 'xmuda'])
    parser.add_argument('--methods', nargs='+', default=list(ORDER), choices=sorted(ORDER))
    parser.add_argument('--frames', type=int, default=6, help='timed frames per method')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--image-size', type=int, nargs=2, default=IMAGE_SIZE)
    parser.add_argument('--cache-dir', default='data/cache')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=['fp32', 'bf16'],
                        help='model.precision values to time (bf16: autocast)')
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        raise SystemExit('tta_benchmark: --frames must be >= 1 and --warmup >= 0')
    device = configure_torch(args.device, args.threads)
    frames = synthetic_frames(
        [target_config('night', 100, args.image_size, args.frames + args.warmup)],
        args.cache_dir)
    points = sum(int(f.num_points) for f in frames) / len(frames)
    print(f'TTA benchmark on {device} ({torch.get_num_threads()} threads), '
          f'{args.image_size[0]}x{args.image_size[1]} images, ~{points:.0f} LiDAR points a '
          f'frame, p50 / p95 of {args.frames} frames after {args.warmup} warm-up')
    for size in args.sizes:
        for precision in args.precision:
            baseline = None
            for name in args.methods:
                steps, predictions = time_method(name, size, frames, device, args.warmup,
                                                 precision)
                p50, p95 = np.percentile(steps, [50, 95])
                predict_p50 = float(np.median(predictions))
                baseline = (p50, predict_p50) if name == 'source' else baseline
                ratio = (f'{p50 / baseline[0]:5.2f}x source, predict '
                         f'{predict_p50 * 1e3:6.1f} ms {predict_p50 / baseline[1]:5.2f}x'
                         if baseline else f'predict {predict_p50 * 1e3:6.1f} ms')
                print(f'  {size:<6} {precision:<4} {name:<9} p50 {p50 * 1e3:8.1f} ms  '
                      f'p95 {p95 * 1e3:8.1f} ms  {ratio}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
