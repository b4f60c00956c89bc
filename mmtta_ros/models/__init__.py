"""The dual-branch 2D + 3D segmenter (xMUDA network) and its parts."""

from mmtta_ros.models.segmenter import (
    build_segmenter,
    DualBranchSegmenter,
    SegmenterConfig,
    SegmenterInput,
    SegmenterOutput,
)

__all__ = [
    'build_segmenter',
    'DualBranchSegmenter',
    'SegmenterConfig',
    'SegmenterInput',
    'SegmenterOutput',
]
