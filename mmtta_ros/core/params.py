"""
The parameters: one table (name, default, description, range), checks, typed structs.

ROS-free: the node declares every entry (`mmtta_ros.ros.params`), the offline tools read
the same names from config/adapt.yaml, and both turn the checked values into the same
frozen structs (`NodeParams`), which are all the builder and the node ever read.

Method hyperparameters are not written here: `adaptation.<method>.<name>` is generated
from each registered method's keyword-only constructor arguments (`tta.hyper`).
"""

from dataclasses import dataclass, field
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from mmtta_ros.core.classes import CLASS_NAMES, CLASS_PALETTE
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.models.segmenter import FUSIONS
from mmtta_ros.sensors.image import MAX_IMAGE_PIXELS
from mmtta_ros.sensors.projection import parse_extrinsics
from mmtta_ros.tta.hyper import hyperparameters
from mmtta_ros.tta.registry import METHODS

NODE_NAME = 'mmtta_adapt'


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


BASE_PARAMETERS: Tuple[ParamSpec, ...] = (
    # Inputs and synchronisation.
    ParamSpec('image_transport', 'compressed', 'camera input type: compressed '
              '(sensor_msgs/CompressedImage, jpeg/png) or raw (sensor_msgs/Image)',
              choices=('compressed', 'raw'), read_only=True),
    ParamSpec('inputs.reliable', False, 'subscribe the image, camera_info and points '
              'reliable (lossless from a reliable publisher: a recorder, a player with '
              '--reliable) instead of sensor-data best effort', read_only=True),
    ParamSpec('inputs.cameras', [''], 'the cameras, in order (the first is primary: its '
              'image carries the overlay): [\'\'] one camera on ~/input/image and '
              '~/input/camera_info; names (CAM_FRONT, CAM_BACK, ...) subscribe '
              '~/input/<name>/image and ~/input/<name>/camera_info each, all synchronised '
              'with the sweep; each point is labeled by the camera that sees it best',
              read_only=True),
    ParamSpec('inputs.depth', 5, 'messages kept per input subscription (keep last)', 1, 1000,
              read_only=True),
    ParamSpec('sync.slop', 0.05, 'largest stamp difference (s) between a LiDAR sweep and the '
              'image it is paired with', 0.001, 1.0),
    ParamSpec('sync.queue_size', 10, 'messages kept per input while waiting for a match', 1, 100,
              read_only=True),
    ParamSpec('sync.time_jump', 1.0, 'a stamp this many seconds older than the newest one is a '
              'backward time jump (looping bag): queues are cleared', 0.01, 3600.0),
    ParamSpec('sync.period_fraction', 0.5, 'assume no message comes sooner than this fraction '
              'of the shortest recent gap of its input, so a pair is final without waiting '
              'for the next message (0: wait, exact for any stream)', 0.0, 0.9),
    ParamSpec('worker.process_every_pair', False, 'process every matched pair in order (a '
              'queue) instead of only the newest (replays, equivalence checks)', read_only=True),
    ParamSpec('worker.split', True, 'label every pair at inference cost with the newest '
              'adapted state and adapt on another thread (false: adapt then label each pair in '
              'one step, the paper\'s protocol)', read_only=True),
    ParamSpec('worker.adapt_every', 1, 'with worker.split: hand every N-th labeled frame to '
              'the adapter (it adapts on the newest it was handed when it is free)', 1, 1000,
              read_only=True),
    ParamSpec('worker.adapter_nice', 10, 'with worker.split: the adapter thread\'s OS '
              'niceness increment (Linux), so labeling comes first on a busy CPU (0: equal)',
              0, 19, read_only=True),
    ParamSpec('worker.queue_size', 1000, 'pairs held for process_every_pair; beyond it the '
              'oldest are dropped and counted', 1, 100000, read_only=True),
    ParamSpec('max_image_pixels', MAX_IMAGE_PIXELS, 'a camera_info larger than this many '
              'pixels (width x height) is rejected, and an image must have camera_info\'s '
              'size: a bigger one is refused before decoding (decompression bombs)', 1,
              MAX_IMAGE_PIXELS, read_only=True),
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
    ParamSpec('threads', 0, 'torch CPU threads (0: torch default; with worker.split on a CPU '
              'half the cores, as the predictor and the adapter run at once)', 0, 256,
              read_only=True),
    ParamSpec('model.precision', 'fp32', 'arithmetic of the forward passes (prediction and '
              'adaptation): fp32, or bf16 autocast (the 2D branch and the heads; the sparse 3D '
              'branch stays fp32); bf16 needs no loss scaling, fp16 would',
              choices=('fp32', 'bf16'), read_only=True),
    ParamSpec('min_depth', 1.0, 'points closer to the camera than this (m) are not labeled', 0.0,
              100.0, read_only=True),
    # Adaptation (the chosen method's own parameters are generated below).
    ParamSpec('adaptation.method', 'mmtta', 'test-time adaptation method',
              choices=tuple(METHODS), read_only=True),
    ParamSpec('adaptation.batch_frames', 1, 'adapt on the last N frames (one step per frame)', 1,
              16, read_only=True),
    ParamSpec('adaptation.fallback', False, 'publish the source model\'s prediction while the '
              'adapted one\'s 2D/3D agreement is below the source\'s (one more forward a '
              'frame; see tta/fallback.py)', read_only=True),
    ParamSpec('adaptation.fallback_margin', 0.0, 'fallback: how far (share of points) the '
              'adapted agreement may lag the source\'s', 0.0, 1.0, read_only=True),
    ParamSpec('adaptation.fallback_smoothing', 0.1, 'fallback: EMA weight of the newest frame '
              'in both agreements', 0.001, 1.0, read_only=True),
    ParamSpec('adaptation.source_branch', 'none', 'publish this branch\'s prediction from the '
              'frozen source model while the method adapts both (none, 2d, 3d; see '
              'tta/source_branch.py)', choices=('none', '2d', '3d'), read_only=True),
    ParamSpec('adaptation.calibrate', False, 'publish each adapted branch at the frozen source '
              'model\'s confidence: one temperature per frame and branch, labels of each '
              'branch unchanged, only its weight in the 2D+3D fusion (the source\'s confidence '
              'on the frame itself in one step, on the adapter\'s last frame with '
              'worker.split; see tta/calibration.py)',
              read_only=True),
    # Labels only if required (LabOR): requests out, answered points in (core/labels.py).
    ParamSpec('labels.mode', 'none', 'ask for labels: none, point (LabOR PPL: within the '
              'points where 2D and 3D disagree, those nearest their class prototype), '
              'segment (LabOR SPL: the disagreement region, least confident first) or random '
              '(the control)', choices=('none', 'point', 'segment', 'random'), read_only=True),
    ParamSpec('labels.request_every', 1, 'ask on every N-th labeled frame', 1, 100000,
              read_only=True),
    ParamSpec('labels.budget', 40, 'points asked per request (at most)', 1, 1000000,
              read_only=True),
    ParamSpec('labels.lr_2d', 6e-3, 'learning rate of the step on answered points, 2D '
              'batch-norm affine parameters (AdamW; after the method\'s own step)', 1e-12, 1.0,
              read_only=True),
    ParamSpec('labels.lr_3d', 1e-2, 'learning rate of the step on answered points, 3D '
              'batch-norm affine parameters (Adam)', 1e-12, 1.0, read_only=True),
    ParamSpec('labels.replay_frames', 4, 'answered frames kept and replayed at each '
              'adaptation step (the oldest go first)', 1, 64, read_only=True),
    ParamSpec('labels.history', 20, 'requested sweeps kept to match answers with; an answer '
              'to an older one is rejected', 1, 1000, read_only=True),
    ParamSpec('labels.stamp_tolerance', 0.001, 'an answer matches a requested sweep stamped '
              'this close (s)', 0.0, 10.0, read_only=True),
    ParamSpec('labels.distance_tolerance', 0.05, 'an answered point matches the sweep\'s '
              'nearest in-view point this close (m); farther ones are rejected', 0.0, 100.0,
              read_only=True),
    ParamSpec('labels.seed', 0, 'seed of the random selection', 0, 2**31 - 1, read_only=True),
    # Calibration and classes.
    ParamSpec('calibration.T_cam_from_lidar', [0.0], 'LiDAR->camera transform: 16 numbers '
              '(4x4 row-major) or 7 (x y z qx qy qz qw)', read_only=True),
    ParamSpec('calibration.extra_T_cam_from_lidar', [0.0], 'the further cameras\' '
              'LiDAR->camera transforms, 16 numbers (4x4 row-major) each, in inputs.cameras '
              'order after the first; used where TF has none ([0.0]: unset)', read_only=True),
    ParamSpec('calibration.ego_motion', True, 'compensate the car\'s motion between the '
              'sweep\'s and the image\'s stamps (the nuScenes devkit\'s chain through the two '
              'ego poses); acts only where both poses are known (TF with tf2_ros, a bag\'s '
              'odom -> base_link on /tf, the generator), else the static transform is used',
              read_only=True),
    ParamSpec('calibration.use_tf', True, 'where tf2_ros is importable, look up camera frame '
              '<- LiDAR frame (the messages\' frame ids) and both ego poses in TF; '
              'calibration.T_cam_from_lidar is the fallback', read_only=True),
    ParamSpec('calibration.tf_timeout', 0.05, 'seconds a TF lookup waits for its transform',
              0.0, 10.0, read_only=True),
    ParamSpec('calibration.odom_frame', 'odom', 'fixed frame of the ego poses in TF '
              '(odom -> base_link)', read_only=True),
    ParamSpec('classes.names', list(CLASS_NAMES), 'class names, in the model\'s output order',
              read_only=True),
    ParamSpec('classes.palette', [int(v) for v in CLASS_PALETTE.reshape(-1)],
              'RGB per class, flattened (3 integers 0..255 per class)', read_only=True),
    # Outputs.
    ParamSpec('output.publish_overlay', True, 'publish the camera image with labeled points'),
    ParamSpec('output.fusion', 'mean', 'how the 2D and 3D branches make the published 2D+3D '
              'label: mean (xMUDA: mean of the two softmaxes) or product (sum of '
              'log-probabilities: an unsure branch leaves a point to the other)',
              choices=FUSIONS),
    ParamSpec('output.include_out_of_view', True, 'also publish points outside the camera view '
              '(label 65535, grey)'),
    ParamSpec('output.label_unseen_3d', False, 'with include_out_of_view: label the points no '
              'camera sees with the 3D branch alone (one more forward of the sparse branch a '
              'frame) instead of 65535'),
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


def method_parameter_specs() -> Tuple[ParamSpec, ...]:
    """Return `adaptation.<method>.<name>` for every hyperparameter of every method."""
    specs = []
    for method, cls in METHODS.items():
        for hyper in hyperparameters(cls):
            low, high = (hyper.range.low, hyper.range.high) if hyper.range else (None, None)
            specs.append(ParamSpec(
                f'adaptation.{method}.{hyper.name}', hyper.kind(hyper.default),
                f'{method}: {hyper.description}', low, high, hyper.choices, read_only=True))
    return tuple(specs)


PARAMETERS: Tuple[ParamSpec, ...] = BASE_PARAMETERS + method_parameter_specs()
SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


def coerce_value(name: str, value: Any) -> Any:
    """
    Return `value` in the type of parameter `name` where that is lossless, else unchanged.

    Users type `-p sync.slop:=1` for a float, and YAML reads `1e-6` (no dot) as a string:
    both are numbers for a float parameter. Sequences become lists.
    """
    spec = SPECS.get(name)
    if isinstance(value, (tuple, np.ndarray)):
        value = list(value)
    if spec is None or isinstance(spec.default, bool) or not isinstance(spec.default, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
        if not math.isfinite(value):
            return f'{name} must be finite, got {value!r}'
        if spec.low is not None and value < spec.low:
            return f'{name} must be >= {spec.low}, got {value}'
        if spec.high is not None and value > spec.high:
            return f'{name} must be <= {spec.high}, got {value}'
        return None
    if isinstance(spec.default, str) and not isinstance(value, str):
        return f'{name} must be a string, got {value!r}'
    if isinstance(spec.default, list) and not isinstance(value, list):
        return f'{name} must be a list, got {value!r}'
    if spec.choices and value not in spec.choices:
        return f'{name} must be one of {", ".join(spec.choices)}; got {value!r}'
    if name == 'calibration.T_cam_from_lidar':
        if list(value) == [0.0]:
            return None  # unset: the node then needs the transform from elsewhere
        try:
            parse_extrinsics(list(value))
        except (SensorDataError, TypeError, ValueError) as error:
            return f'{name}: {error}'
    if name == 'inputs.cameras':
        return camera_names_problem(value)
    if name == 'calibration.extra_T_cam_from_lidar' and list(value) != [0.0]:
        if len(value) % 16:
            return f'{name} needs 16 numbers per camera, got {len(value)}'
        try:
            for start in range(0, len(value), 16):
                parse_extrinsics(list(value[start:start + 16]))
        except (SensorDataError, TypeError, ValueError) as error:
            return f'{name}: {error}'

    if name == 'classes.palette':
        if len(value) % 3 or any(isinstance(v, bool) or not isinstance(v, int)
                                 or not 0 <= v <= 255 for v in value):
            return f'{name} needs 3 integers in 0..255 per class, got {value!r}'
    return None


# At most this many cameras (nuScenes has six).
MAX_CAMERAS = 12


def camera_names_problem(names: Any) -> Optional[str]:
    """Return why `names` is not a usable inputs.cameras list, or None if it is."""
    prefix = 'inputs.cameras'
    if not isinstance(names, list) or not names or len(names) > MAX_CAMERAS:
        return f'{prefix} must list 1 to {MAX_CAMERAS} camera names, got {names!r}'
    if names == ['']:
        return None
    for name in names:
        if not isinstance(name, str) or not name or not (
                name[0].isalpha() and name.replace('_', 'a').isalnum() and name.isascii()):
            return (f'{prefix}: {name!r} is not a camera name (letters, digits and _, '
                    f"starting with a letter; [''] alone means one unnamed camera)")
    if len(set(names)) != len(names):
        return f'{prefix} names a camera twice: {names!r}'
    return None


# --- typed structs: what the builder and the node read ----------------------------------

@dataclass(frozen=True)
class ModelParams:
    """The source model and where it runs."""

    checkpoint: str = ''
    size: str = 'tiny'
    device: str = 'auto'
    threads: int = 0
    image_size: Tuple[int, int] = (400, 225)  # (width, height) the 2D branch sees
    precision: str = 'fp32'  # fp32 | bf16 (autocast)
    min_depth: float = 1.0
    class_names: Tuple[str, ...] = CLASS_NAMES


@dataclass(frozen=True)
class AdaptationParams:
    """The method, its hyperparameters and the collapse guard around it."""

    method: str = 'mmtta'
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    batch_frames: int = 1
    fallback: bool = False
    fallback_margin: float = 0.0
    fallback_smoothing: float = 0.1
    source_branch: str = 'none'
    calibrate: bool = False
    collapse_guard: bool = True
    max_dominant_fraction: float = 0.95
    patience: int = 10


@dataclass(frozen=True)
class OutputParams:
    """How a labeled frame is packed for publishing (the same online and offline)."""

    palette: np.ndarray = field(default_factory=lambda: CLASS_PALETTE.copy())
    include_out_of_view: bool = True
    publish_overlay: bool = True
    fusion: str = 'mean'
    # With include_out_of_view: points no camera sees get the 3D branch's class (one more
    # forward of the sparse branch a frame) instead of 65535.
    label_unseen_3d: bool = False


@dataclass(frozen=True)
class InputParams:
    """How messages become frames."""

    raw_image: bool = False
    T_cam_from_lidar: Optional[np.ndarray] = None  # <float64: 4, 4>, None: not given
    reliable: bool = False  # subscription QoS: reliable, else best effort
    depth: int = 5          # subscription QoS: keep last this many
    ego_motion: bool = True  # compensate ego motion where a frame has both poses
    use_tf: bool = True      # extrinsics and ego poses from TF where tf2_ros is there
    tf_timeout_s: float = 0.05
    odom_frame: str = 'odom'
    # Camera names, the primary first; ('',): one unnamed camera (~/input/image).
    cameras: Tuple[str, ...] = ('',)
    # <float64: 4, 4> of each further camera where TF has none; () when not given.
    extra_T_cam_from_lidar: Tuple[np.ndarray, ...] = ()

    @property
    def num_cameras(self) -> int:
        """Return how many cameras each sweep is synchronised with."""
        return len(self.cameras)


@dataclass(frozen=True)
class LabelParams:
    """Label requests and answers (core/labels.py); mode 'none' changes nothing."""

    mode: str = 'none'
    request_every: int = 1
    budget: int = 40
    lr_2d: float = 6e-3
    lr_3d: float = 1e-2
    replay_frames: int = 4
    history: int = 20
    stamp_tolerance_s: float = 0.001
    distance_tolerance_m: float = 0.05
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Return whether labels are requested and used."""
        return self.mode != 'none'


@dataclass(frozen=True)
class PipelineParams:
    """Everything `core.builder.build_pipeline` needs."""

    model: ModelParams = ModelParams()
    adaptation: AdaptationParams = AdaptationParams()
    output: OutputParams = OutputParams()
    inputs: InputParams = InputParams()
    labels: LabelParams = LabelParams()


@dataclass(frozen=True)
class SyncParams:
    """The pairing policy (`core.pairing.ApproximateSynchronizer`), node and bag reader alike."""

    slop_s: float = 0.05
    queue_size: int = 10
    time_jump_s: float = 1.0
    period_fraction: float = 0.5


@dataclass(frozen=True)
class StateParams:
    """Saving and resuming the adapted state."""

    save_path: str = ''
    save_period_s: float = 0.0
    save_on_shutdown: bool = True
    load_on_start: bool = False


@dataclass(frozen=True)
class NodeParams:
    """Every parameter of the node, checked and typed."""

    pipeline: PipelineParams
    sync: SyncParams
    state: StateParams
    process_every_pair: bool = False
    split: bool = True
    adapt_every: int = 1
    adapter_nice: int = 10
    worker_queue_size: int = 1000
    max_stamp_skew_s: float = 0.0
    max_image_pixels: int = MAX_IMAGE_PIXELS
    diagnostics_period_s: float = 1.0
    reset_on_time_jump: bool = False


def default_values() -> Dict[str, Any]:
    """Return {name: default} of every parameter."""
    return {spec.name: spec.default for spec in PARAMETERS}


def check_values(values: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Return (every parameter's value: defaults overlaid with `values`, problems found)."""
    merged = default_values()
    problems = []
    for name, value in values.items():
        value = coerce_value(name, value)
        reason = check_value(name, value)
        if reason:
            problems.append(reason)
        else:
            merged[name] = value
    names, palette = merged['classes.names'], merged['classes.palette']
    if len(palette) != 3 * len(names):
        problems.append(
            f'classes.palette has {len(palette) // 3} colours for {len(names)} classes')
    return merged, problems


def node_params(values: Mapping[str, Any]) -> NodeParams:
    """Return the typed parameters of checked `values`; ValueError lists every problem."""
    v, problems = check_values(values)
    extra_T = list(v['calibration.extra_T_cam_from_lidar'])
    extra_T = [] if extra_T == [0.0] else extra_T
    if not problems and extra_T and len(extra_T) != 16 * (len(v['inputs.cameras']) - 1):
        problems.append(f'calibration.extra_T_cam_from_lidar has {len(extra_T) // 16} '
                        f'transforms for {len(v["inputs.cameras"]) - 1} further cameras')
    if problems:
        raise ValueError('invalid parameters: ' + '; '.join(problems))
    method = v['adaptation.method']
    prefix = f'adaptation.{method}.'
    T = list(v['calibration.T_cam_from_lidar'])
    pipeline = PipelineParams(
        model=ModelParams(
            checkpoint=v['model.checkpoint'], size=v['model.size'], device=v['device'],
            threads=v['threads'],
            image_size=(int(v['model.image_width']), int(v['model.image_height'])),
            min_depth=v['min_depth'], class_names=tuple(v['classes.names']),
            precision=v['model.precision']),
        adaptation=AdaptationParams(
            method=method, batch_frames=v['adaptation.batch_frames'],
            fallback=v['adaptation.fallback'], fallback_margin=v['adaptation.fallback_margin'],
            fallback_smoothing=v['adaptation.fallback_smoothing'],
            source_branch=v['adaptation.source_branch'],
            calibrate=v['adaptation.calibrate'],
            hyperparameters={name[len(prefix):]: value for name, value in v.items()
                             if name.startswith(prefix)},
            collapse_guard=v['reset.collapse_guard'],
            max_dominant_fraction=v['reset.max_dominant_fraction'],
            patience=v['reset.patience']),
        output=output_params(v),
        inputs=InputParams(raw_image=v['image_transport'] == 'raw',
                           T_cam_from_lidar=None if T == [0.0] else parse_extrinsics(T),
                           reliable=v['inputs.reliable'], depth=v['inputs.depth'],
                           ego_motion=v['calibration.ego_motion'],
                           use_tf=v['calibration.use_tf'],
                           tf_timeout_s=v['calibration.tf_timeout'],
                           odom_frame=v['calibration.odom_frame'],
                           cameras=tuple(v['inputs.cameras']),
                           extra_T_cam_from_lidar=tuple(
                               parse_extrinsics(extra_T[i:i + 16])
                               for i in range(0, len(extra_T), 16))),
        labels=label_params(v))
    return NodeParams(
        pipeline=pipeline,
        sync=SyncParams(slop_s=v['sync.slop'], queue_size=v['sync.queue_size'],
                        time_jump_s=v['sync.time_jump'],
                        period_fraction=v['sync.period_fraction']),
        state=StateParams(save_path=v['state.save_path'], save_period_s=v['state.save_period'],
                          save_on_shutdown=v['state.save_on_shutdown'],
                          load_on_start=v['state.load_on_start']),
        process_every_pair=v['worker.process_every_pair'],
        split=v['worker.split'], adapt_every=v['worker.adapt_every'],
        adapter_nice=v['worker.adapter_nice'],
        worker_queue_size=v['worker.queue_size'],
        max_stamp_skew_s=v['max_stamp_skew'],
        max_image_pixels=v['max_image_pixels'],
        diagnostics_period_s=v['diagnostics_period'],
        reset_on_time_jump=v['reset.on_time_jump'])


def label_params(values: Mapping[str, Any]) -> LabelParams:
    """Return the label-request settings of checked `values`."""
    return LabelParams(
        mode=values['labels.mode'], request_every=values['labels.request_every'],
        budget=values['labels.budget'], lr_2d=values['labels.lr_2d'],
        lr_3d=values['labels.lr_3d'],
        replay_frames=values['labels.replay_frames'], history=values['labels.history'],
        stamp_tolerance_s=values['labels.stamp_tolerance'],
        distance_tolerance_m=values['labels.distance_tolerance'], seed=values['labels.seed'])


def output_params(values: Mapping[str, Any]) -> OutputParams:
    """Return the output settings of checked `values` (they can change at run time)."""
    return OutputParams(
        palette=np.asarray(values['classes.palette'], dtype=np.uint8).reshape(-1, 3),
        include_out_of_view=values['output.include_out_of_view'],
        publish_overlay=values['output.publish_overlay'],
        fusion=values['output.fusion'],
        label_unseen_3d=values['output.label_unseen_3d'])


# --- the YAML file: the node's params file is also the offline tools' config ------------

def default_params_file() -> Path:
    """Return config/adapt.yaml: the installed share's, else the source checkout's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory('mmtta_ros')) / 'config' / 'adapt.yaml'
    except (ImportError, LookupError, OSError, ValueError):
        return Path(__file__).resolve().parents[2] / 'config' / 'adapt.yaml'


def flatten(nested: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    """Return {'a.b.c': value} of a nested mapping."""
    flat: Dict[str, Any] = {}
    for key, value in nested.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + '.'))
        else:
            flat[name] = value
    return flat


def read_params_file(path) -> Dict[str, Any]:
    """Return the node's flat parameter values from a ROS 2 params file (`mmtta_adapt:`)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f'cannot read the params file {path}: {error}') from None
    for node_name in (NODE_NAME, f'/{NODE_NAME}', '/**'):
        section = document.get(node_name) if isinstance(document, dict) else None
        if isinstance(section, dict) and isinstance(section.get('ros__parameters'), dict):
            return flatten(section['ros__parameters'])
    raise ValueError(f'{path} has no {NODE_NAME}: ros__parameters: section')


def yaml_parameters(specs: Sequence[ParamSpec] = PARAMETERS) -> Dict[str, Any]:
    """Return the parameter table as the nested mapping a ROS 2 params file holds."""
    nested: Dict[str, Any] = {}
    for spec in specs:
        *parents, leaf = spec.name.split('.')
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = spec.default
    return nested
