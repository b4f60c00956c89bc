"""
tta_benchmark: per-frame time of each adaptation method next to source-only (prints figures).

Every method runs on the same generated night frames through the same pipeline; the
ratio to source-only is the figure that matters (MM-TTA does a fast forward, a slow
forward and a backward per frame). Weights are freshly initialised: speed does not
depend on them.
"""

import argparse
import statistics
import sys
import time

import torch

from mmtta_ros.core.builder import build_pipeline, configure_torch
from mmtta_ros.core.params import node_params
from mmtta_ros.eval.frame_cache import synthetic_frames
from mmtta_ros.eval.splits import IMAGE_SIZE, target_config
from mmtta_ros.models.segmenter import build_segmenter, SegmenterConfig
from mmtta_ros.tta import METHODS

ORDER = tuple(METHODS)


def time_method(name: str, size: str, frames, device, warmup: int) -> float:
    """Median seconds per frame of method `name` on a fresh `size` model."""
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(size=size)).to(device)
    # The node's defaults for everything but the method (collapse guard included).
    params = node_params({'adaptation.method': name, 'device': str(device)})
    pipeline = build_pipeline(params.pipeline, model=model)
    times = []
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        pipeline.process(frame)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--sizes', nargs='+', default=['tiny', 'xmuda'])
    parser.add_argument('--methods', nargs='+', default=list(ORDER), choices=sorted(METHODS))
    parser.add_argument('--frames', type=int, default=6, help='timed frames per method')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--image-size', type=int, nargs=2, default=IMAGE_SIZE)
    parser.add_argument('--cache-dir', default='data/cache')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    args = parser.parse_args(argv)
    device = configure_torch(args.device, args.threads)
    frames = synthetic_frames(
        [target_config('night', 100, args.image_size, args.frames + args.warmup)],
        args.cache_dir)
    points = sum(int(f.num_points) for f in frames) / len(frames)
    print(f'TTA benchmark on {device} ({torch.get_num_threads()} threads), '
          f'{args.image_size[0]}x{args.image_size[1]} images, ~{points:.0f} LiDAR points a '
          f'frame, median of {args.frames} frames after {args.warmup} warm-up')
    for size in args.sizes:
        baseline = None
        for name in args.methods:
            seconds = time_method(name, size, frames, device, args.warmup)
            baseline = seconds if name == 'source' else baseline
            ratio = f'{seconds / baseline:5.2f}x source' if baseline else ''
            print(f'  {size:<6} {name:<9} {seconds * 1e3:8.1f} ms/frame  {ratio}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
