"""
The node's parameters: one table (name, default, description, range), checks, plain config.

ROS-free, so the checks are unit-tested and the same table documents `config/adapt.yaml`.
The node declares every entry with a ParameterDescriptor built from it, rejects invalid
values with the reason `check_value` gives, and hands `NodeConfig` to the core.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmtta_ros.errors import SensorDataError
from mmtta_ros.frame import CLASS_NAMES, CLASS_PALETTE
from mmtta_ros.sensors.projection import parse_extrinsics


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default (its type is the parameter's type), description, limits."""

    name: str
    default: Any
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Tuple[str, ...] = ()
    read_only: bool = False


METHOD_NAMES = ('source', 'tent', 'tent_ens', 'xmuda', 'xmuda_pl', 'mmtta')

PARAMETERS: Tuple[ParamSpec, ...] = (
    # Inputs and synchronisation.
    ParamSpec('image_transport', 'compressed', 'camera input type: compressed '
              '(sensor_msgs/CompressedImage, jpeg/png) or raw (sensor_msgs/Image)',
              choices=('compressed', 'raw'), read_only=True),
    ParamSpec('sync.slop', 0.05, 'largest stamp difference (s) between a LiDAR sweep and the '
              'image it is paired with', 0.001, 1.0),
    ParamSpec('sync.queue_size', 10, 'messages kept per input while waiting for a match', 1, 100,
              read_only=True),
    ParamSpec('sync.time_jump', 1.0, 'a stamp this many seconds older than the newest one is a '
              'backward time jump (looping bag): queues are cleared', 0.01, 3600.0),
    ParamSpec('max_stamp_skew', 0.0, 'reject a pair whose stamp is this many seconds away from '
              'the node clock (0: accept any; use with use_sim_time during replay)', 0.0, 1e9),
    # Model.
    ParamSpec('model.size', 'tiny', 'segmenter size if no checkpoint is given',
              choices=('tiny', 'xmuda'), read_only=True),
    ParamSpec('model.checkpoint', '', 'source-model checkpoint (.pt from mmtta_train); empty: '
              'random weights (only useful for testing)', read_only=True),
    ParamSpec('model.image_width', 400, 'width the image is resized to for the 2D branch', 32,
              4096, read_only=True),
    ParamSpec('model.image_height', 225, 'height the image is resized to for the 2D branch', 32,
              4096, read_only=True),
    ParamSpec('device', 'auto', 'auto (CUDA when available), cuda or cpu',
              choices=('auto', 'cuda', 'cpu'), read_only=True),
    ParamSpec('min_depth', 1.0, 'points closer to the camera than this (m) are not labeled', 0.0,
              100.0, read_only=True),
    # Adaptation.
    ParamSpec('adaptation.method', 'mmtta', 'test-time adaptation method',
              choices=METHOD_NAMES, read_only=True),
    ParamSpec('adaptation.batch_frames', 1, 'adapt on the last N frames (one step per frame)', 1,
              16, read_only=True),
    ParamSpec('adaptation.momentum', 0.99, 'MM-TTA slow-model EMA momentum (lambda of Eq. 6)', 0.0,
              1.0, read_only=True),
    ParamSpec('adaptation.threshold', 0.3, 'MM-TTA: ignore points whose best fast/slow '
              'consistency is below this', 0.0, 1e6, read_only=True),
    ParamSpec('adaptation.selection', 'soft', 'MM-TTA Inter-PR selection',
              choices=('soft', 'hard'), read_only=True),
    ParamSpec('adaptation.ema_targets', 'both', 'what the slow model averages: BN affine '
              'parameters, BN statistics or both', choices=('affine', 'stats', 'both'),
              read_only=True),
    ParamSpec('adaptation.lr_2d', 6e-6, 'learning rate of the 2D BN parameters (AdamW)', 0.0, 1.0,
              read_only=True),
    ParamSpec('adaptation.lr_3d', 1e-3, 'learning rate of the 3D BN parameters (Adam)', 0.0, 1.0,
              read_only=True),
    ParamSpec('adaptation.predict_before_update', True, 'publish the prediction made before '
              'the update of that frame (the paper\'s protocol)', read_only=True),
    # Calibration and classes.
    ParamSpec('calibration.T_cam_from_lidar', [0.0], 'LiDAR->camera transform: 16 numbers '
              '(4x4 row-major) or 7 (x y z qx qy qz qw)', read_only=True),
    ParamSpec('classes.names', list(CLASS_NAMES), 'class names, in the model\'s output order',
              read_only=True),
    ParamSpec('classes.palette', [int(v) for v in CLASS_PALETTE.reshape(-1)],
              'RGB per class, flattened (3 integers 0..255 per class)', read_only=True),
    # Outputs.
    ParamSpec('output.publish_overlay', True, 'publish the camera image with labeled points'),
    ParamSpec('output.include_out_of_view', True, 'also publish points outside the camera view '
              '(label 65535, grey)'),
    ParamSpec('diagnostics_period', 1.0, 'seconds between /diagnostics messages', 0.1, 60.0,
              read_only=True),
    # Safety and state.
    ParamSpec('reset.on_time_jump', False, 'reset adaptation to the source model on a backward '
              'time jump'),
    ParamSpec('reset.collapse_guard', True, 'reset automatically when predictions collapse',
              read_only=True),
    ParamSpec('reset.max_dominant_fraction', 0.95, 'collapse: one class takes more than this '
              'fraction of the points ...', 0.0, 1.0, read_only=True),
    ParamSpec('reset.patience', 10, '... for this many frames in a row', 1, 10000,
              read_only=True),
    ParamSpec('state.save_path', '', 'where the adapted state is saved (empty: never)',
              read_only=True),
    ParamSpec('state.save_period', 0.0, 'seconds between automatic saves (0: only on request '
              'and at shutdown)', 0.0, 86400.0),
    ParamSpec('state.save_on_shutdown', True, 'save the adapted state at shutdown'),
    ParamSpec('state.load_on_start', False, 'resume from state.save_path if it exists',
              read_only=True),
)
SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


def check_value(name: str, value: Any) -> Optional[str]:
    """Return why `value` is not acceptable for parameter `name`, or None if it is."""
    spec = SPECS.get(name)
    if spec is None:
        return f'unknown parameter {name!r}'
    if isinstance(spec.default, bool):
        if not isinstance(value, bool):
            return f'{name} must be true or false, got {value!r}'
        return None
    if isinstance(spec.default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f'{name} must be a number, got {value!r}'
        if isinstance(spec.default, int) and not isinstance(value, int):
            return f'{name} must be an integer, got {value!r}'
        if not np.isfinite(value):
            return f'{name} must be finite, got {value!r}'
        if spec.low is not None and value < spec.low:
            return f'{name} must be >= {spec.low}, got {value}'
        if spec.high is not None and value > spec.high:
            return f'{name} must be <= {spec.high}, got {value}'
        return None
    if spec.choices and value not in spec.choices:
        return f'{name} must be one of {", ".join(spec.choices)}; got {value!r}'
    if name == 'calibration.T_cam_from_lidar':
        if list(value) == [0.0]:
            return None  # unset: the node then needs the transform from elsewhere
        try:
            parse_extrinsics(list(value))
        except SensorDataError as error:
            return f'{name}: {error}'
    if name == 'classes.palette':
        if len(value) % 3 or any(not 0 <= int(v) <= 255 for v in value):
            return f'{name} needs 3 integers in 0..255 per class, got {len(value)} values'
    return None


@dataclass
class NodeConfig:
    """Every parameter's value, checked; the node reads its settings from here only."""

    values: Dict[str, Any] = field(default_factory=lambda: {s.name: s.default for s in PARAMETERS})

    def __getitem__(self, name: str) -> Any:
        """Return the value of parameter `name`."""
        return self.values[name]

    @property
    def T_cam_from_lidar(self) -> Optional[np.ndarray]:
        """Return <np.float64: 4, 4> from the parameter, or None when unset."""
        value = list(self.values['calibration.T_cam_from_lidar'])
        return None if value == [0.0] else parse_extrinsics(value)

    @property
    def palette(self) -> np.ndarray:
        """Return <np.uint8: C, 3> class colours."""
        return np.asarray(self.values['classes.palette'], dtype=np.uint8).reshape(-1, 3)

    @property
    def image_size(self) -> Tuple[int, int]:
        """Return (width, height) the 2D branch sees."""
        return int(self.values['model.image_width']), int(self.values['model.image_height'])

    def method_hyperparameters(self) -> Dict[str, Any]:
        """Return keyword arguments for `mmtta_ros.tta.build_method` of the chosen method."""
        method = self.values['adaptation.method']
        if method == 'source':
            return {}
        params = {'lr_2d': self.values['adaptation.lr_2d'],
                  'lr_3d': self.values['adaptation.lr_3d'],
                  'predict_before_update': self.values['adaptation.predict_before_update']}
        if method == 'mmtta':
            params.update(momentum=self.values['adaptation.momentum'],
                          threshold=self.values['adaptation.threshold'],
                          selection=self.values['adaptation.selection'],
                          ema_targets=self.values['adaptation.ema_targets'])
        return params


def build_config(values: Dict[str, Any]) -> Tuple[NodeConfig, List[str]]:
    """Check parameter values; return the config and the list of problems (empty if none)."""
    config = NodeConfig()
    problems = []
    for name, value in values.items():
        reason = check_value(name, value)
        if reason:
            problems.append(reason)
        else:
            config.values[name] = value
    names, palette = config.values['classes.names'], config.values['classes.palette']
    if len(palette) != 3 * len(names):
        problems.append(
            f'classes.palette has {len(palette) // 3} colours for {len(names)} classes')
    return config, problems


def yaml_parameters(config: Sequence[ParamSpec] = PARAMETERS) -> Dict[str, Any]:
    """Return the parameter table as the nested mapping a ROS 2 params file holds."""
    nested: Dict[str, Any] = {}
    for spec in config:
        *parents, leaf = spec.name.split('.')
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = spec.default
    return nested
