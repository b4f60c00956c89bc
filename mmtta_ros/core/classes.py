"""
The class taxonomy: names, colours and the ignore label, shared by every layer.

The six nuScenes-lidarseg classes of the xMUDA journal version (method brief section 2).
"""

from typing import Tuple

import numpy as np

# nuScenes-lidarseg classes of the xMUDA journal version (method brief section 2).
CLASS_NAMES: Tuple[str, ...] = (
    'vehicle', 'driveable_surface', 'sidewalk', 'terrain', 'manmade', 'vegetation',
)
# RGB per class, from the nuScenes-lidarseg colour map, so clouds look familiar in RViz.
CLASS_PALETTE: np.ndarray = np.array([
    [255, 158, 0],    # vehicle: orange
    [0, 207, 191],    # driveable_surface: cyan
    [75, 0, 75],      # sidewalk: purple
    [112, 180, 60],   # terrain: light green
    [222, 184, 135],  # manmade: burlywood
    [0, 175, 0],      # vegetation: green
], dtype=np.uint8)
# Label of points that have no class (outside the six, or unlabeled); torch's CE default.
IGNORE_INDEX = -100
