"""
The shift suite: shifts x table rows x source checkpoints, scored online, one record each.

Declared in config/shifts.yaml (variants, shifts, rows, checkpoints). Every run builds the
node's pipeline (`core.builder.build_pipeline`) from config/adapt.yaml with the row's
settings, so a number here describes the node. Records go to benchmarks/results.json,
keyed by shift, row and checkpoint; a key already there with the same settings is not
run again (resumable).
"""

from dataclasses import dataclass, field
import hashlib
import json
from pathlib import Path
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from mmtta_ros.core.classes import CLASS_NAMES
from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.core.frame import Frame
from mmtta_ros.core.params import default_params_file, node_params, read_params_file, SPECS
from mmtta_ros.eval.metrics import ConfusionMatrix
from mmtta_ros.eval.scoring import HEADS
from mmtta_ros.eval.splits import SOURCE_FRAMES, SOURCE_SEEDS, UDA_TARGET_SEEDS
from mmtta_ros.eval.uda import UDA_METHODS

PathLike = Any
SOURCE_DOMAIN = 'day'  # the labeled domain source and UDA checkpoints train on
# The simulated annotator's settings a row may give, with their defaults.
ANNOTATOR_SETTINGS = {'delay': 1, 'error_rate': 0.0, 'seed': 0}


@dataclass(frozen=True)
class Shift:
    """A stream family: segments (domain, frames) and the seeds of its streams."""

    name: str
    segments: Tuple[Tuple[str, int], ...]
    seeds: Tuple[int, ...]
    rows: Optional[Tuple[str, ...]] = None  # None: every row

    @property
    def frames(self) -> int:
        """Return the frames of one stream."""
        return sum(count for _, count in self.segments)


@dataclass(frozen=True)
class Row:
    """
    A table row: a method and node-parameter settings over config/adapt.yaml.

    annotator: with labels.mode set, the simulated annotator's settings (delay in frames,
    error_rate, seed; core/annotator.py) that answer the row's label requests from the
    frames' ground truth.
    """

    name: str
    method: Optional[str] = None  # None: the node's configured method
    settings: Mapping[str, Any] = field(default_factory=dict)
    oracle: bool = False  # source-only with a model trained on the shift's labeled domain
    # Run on `<source>_fused.pt`: each source checkpoint with a fused 2D+3D head fitted on
    # it (same 2D and 3D weights; the ftd method needs the head).
    fused_head: bool = False
    # Offline UDA reference: source-only with a model trained by `mmtta_train --uda <uda>`
    # on labeled day + unlabeled frames of the shift's first-segment domain.
    uda: Optional[str] = None
    shifts: Optional[Tuple[str, ...]] = None  # None: every shift (that admits the row)
    # A label row's simulated annotator (ANNOTATOR_SETTINGS), answering its requests.
    annotator: Mapping[str, Any] = field(default_factory=dict)

    def applies_to(self, shift: 'Shift') -> bool:
        """Return whether this row is scored on `shift` (both may restrict the pairing)."""
        if shift.rows and self.name not in shift.rows:
            return False
        if self.shifts and shift.name not in self.shifts:
            return False
        # UDA towards the source domain itself is no adaptation; an oracle needs one domain.
        if self.uda and shift.segments[0][0] == SOURCE_DOMAIN:
            return False
        return not self.oracle or len(shift.segments) == 1


@dataclass(frozen=True)
class Suite:
    """Everything config/shifts.yaml declares."""

    shifts: Dict[str, Shift]
    rows: Dict[str, Row]
    validation: str
    # More shifts defaults are chosen on (never reported as test shifts): held-out seeds
    # of a shift where adaptation can fall below source, for the safety of a default.
    more_validation: Tuple[str, ...] = ()
    # The row the label-budget rows add labels to (their point at 0 labels).
    label_baseline: str = 'default'
    image_size: Tuple[int, int] = (400, 225)
    frame_stride: int = 2
    window: int = 10
    lidar_azimuth_steps: Optional[int] = None  # None: each domain's LiDAR (tests use fewer)
    model_size: str = 'tiny'
    train_seeds: Tuple[int, ...] = (0,)
    train_steps: int = 300
    oracle_steps: int = 300
    fused_head_steps: int = 300
    uda_seeds: Tuple[int, ...] = (0,)  # as the oracles: one seed (each costs ~2 trainings)
    train_sequences: int = len(SOURCE_SEEDS)  # sequences per domain a checkpoint trains on
    train_frames: int = SOURCE_FRAMES  # frames per sequence


def load_suite(path: PathLike) -> Suite:
    """Read config/shifts.yaml and register its domain variants; ValueError says what is wrong."""
    from mmtta_ros.synth.domains import domain_variant, register_domain

    document = yaml.safe_load(Path(path).read_text()) or {}
    for name, spec in (document.get('variants') or {}).items():
        spec = dict(spec)
        register_domain(domain_variant(name, spec.pop('base'), **spec))
    protocol = document.get('protocol', {})
    rows = {name: Row(name, spec.get('method'), dict(spec.get('set') or {}),
                      oracle=bool(spec.get('oracle', False)),
                      fused_head=bool(spec.get('fused_head', False)), uda=spec.get('uda'),
                      shifts=tuple(spec['shifts']) if spec.get('shifts') else None,
                      annotator=dict(spec.get('annotator') or {}))
            for name, spec in (document.get('rows') or {}).items()}
    both = [name for name, row in rows.items() if row.oracle and row.fused_head]
    if both:
        raise ValueError(f'rows {both}: an oracle row cannot also ask for a fused head')
    for row in rows.values():
        unknown = set(row.annotator) - set(ANNOTATOR_SETTINGS)
        if unknown:
            raise ValueError(f'row {row.name}: unknown annotator settings {sorted(unknown)}; '
                             f'known: {list(ANNOTATOR_SETTINGS)}')
    shifts = {}
    for name, spec in (document.get('shifts') or {}).items():
        unknown = set(spec.get('rows') or ()) - set(rows)
        if unknown:
            raise ValueError(f'shift {name} names unknown rows {sorted(unknown)}')
        shifts[name] = Shift(name, tuple((str(d), int(n)) for d, n in spec['segments']),
                             tuple(int(s) for s in spec['seeds']),
                             tuple(spec['rows']) if spec.get('rows') else None)
    validation = document.get('validation')
    more_validation = tuple(document.get('more_validation') or ())
    for name in (validation, *more_validation):
        if name not in shifts:
            raise ValueError(f'the validation shift {name!r} is not among the shifts')
    for row in rows.values():
        _check_row(row, shifts)
    checkpoints = document.get('checkpoints', {})
    sequences = int(checkpoints.get('train_sequences', len(SOURCE_SEEDS)))
    if not 1 <= sequences <= len(SOURCE_SEEDS) or checkpoints.get('train_frames', 1) < 1:
        raise ValueError(f'checkpoints: need 1 <= train_sequences <= {len(SOURCE_SEEDS)} '
                         'and train_frames >= 1')
    return Suite(shifts=shifts, rows=rows, validation=validation,
                 more_validation=more_validation,
                 label_baseline=str(document.get('label_baseline', 'default')),
                 image_size=tuple(protocol.get('image_size', (400, 225))),
                 frame_stride=int(protocol.get('frame_stride', 2)),
                 window=int(protocol.get('window', 10)),
                 lidar_azimuth_steps=protocol.get('lidar_azimuth_steps'),
                 model_size=checkpoints.get('size', 'tiny'),
                 train_seeds=tuple(checkpoints.get('train_seeds', (0,))),
                 train_steps=int(checkpoints.get('steps', 300)),
                 oracle_steps=int(checkpoints.get('oracle_steps', 300)),
                 fused_head_steps=int(checkpoints.get('fused_head_steps', 300)),
                 uda_seeds=tuple(int(s) for s in checkpoints.get('uda_seeds', (0,))),
                 train_sequences=sequences,
                 train_frames=int(checkpoints.get('train_frames', SOURCE_FRAMES)))


def _check_row(row: Row, shifts: Mapping[str, Shift]) -> None:
    """Raise ValueError if a row's options contradict each other or name unknown shifts."""
    unknown = set(row.shifts or ()) - set(shifts)
    if unknown:
        raise ValueError(f'row {row.name} names unknown shifts {sorted(unknown)}')
    if row.uda is None:
        return
    if row.uda not in UDA_METHODS:
        raise ValueError(f'row {row.name}: unknown UDA method {row.uda!r}; choose one of '
                         f'{UDA_METHODS}')
    if row.oracle or row.method or row.fused_head:
        raise ValueError(f'row {row.name}: a UDA row is scored source-only on its own '
                         'model; drop its `oracle` / `method` / `fused_head`')
    on_source = [name for name in row.shifts or () if shifts[name].segments[0][0] ==
                 SOURCE_DOMAIN]
    if on_source:
        raise ValueError(f'row {row.name}: shifts {on_source} start in the source domain '
                         f'{SOURCE_DOMAIN}; UDA needs another target domain')


def stream_frames(suite: Suite, shift: Shift, seed: int, cache_dir: PathLike) -> List[Frame]:
    """Return one stream of a shift: its segments' frames, in order (cached on disk)."""
    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.synth import SequenceConfig

    configs = [SequenceConfig(domain=domain, seed=10 * seed + k, num_frames=count,
                              image_size=suite.image_size, frame_stride=suite.frame_stride,
                              lidar_azimuth_steps=suite.lidar_azimuth_steps)
               for k, (domain, count) in enumerate(shift.segments)]
    return synthetic_frames(configs, cache_dir)


# The suite's protocol where it departs from the node's defaults; a row may still set these.
# calibration.ego_motion: every record was scored with the static LiDAR -> camera transform
# (the generator's frames now carry both ego poses, which the node's default compensates).
PROTOCOL_VALUES: Dict[str, Any] = {'calibration.ego_motion': False}


def row_values(row: Row, checkpoint: PathLike, params_file: Optional[PathLike] = None,
               threads: int = 1) -> Dict[str, Any]:
    """Return the node parameter values of a row: the params file with the row's settings."""
    values = read_params_file(params_file or default_params_file())
    values.update(PROTOCOL_VALUES)
    if row.method or row.oracle or row.uda:
        # An oracle (trained on the target) and a UDA model (trained offline on source and
        # target) are used as they are: source-only.
        values['adaptation.method'] = row.method or 'source'
        # A row that names a method publishes that method's own prediction; only the
        # node's configuration (`default`, rows without a method) takes a branch from the
        # source model, unless the row sets it.
        values['adaptation.source_branch'] = 'none'
        # Likewise its own branches' confidences, fused as xMUDA scores 2D+3D (the mean),
        # in the paper's protocol (each frame adapted on, then labeled: the node with
        # worker.split false); the node's own configuration rows run its split.
        values['adaptation.calibrate'] = False
        values['output.fusion'] = 'mean'
        values['worker.split'] = False
    method = values.get('adaptation.method', 'mmtta')
    for key, value in row.settings.items():
        name = key if '.' in key else f'adaptation.{method}.{key}'
        if name not in SPECS:
            raise ValueError(f'row {row.name}: no parameter {name}')
        values[name] = value
    values.update({'model.checkpoint': str(checkpoint), 'device': 'cpu', 'threads': threads})
    return values


def checkpoint_id(path: PathLike) -> str:
    """Return a short content hash of a checkpoint (records name the model they used)."""
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    return f'{Path(path).stem}@{digest[:10]}'


def score_windows(outputs_labels: Sequence[Tuple[Any, np.ndarray]], window: int,
                  bounds: Sequence[int]) -> Dict[str, Any]:
    """Return mIoU per head overall, per window of frames and per segment (bounds: starts)."""
    def miou(items, head):
        matrix = ConfusionMatrix(len(CLASS_NAMES))
        for output, labels in items:
            matrix.update(labels, getattr(output, _PREDICTION[head]))
        return 100.0 * matrix.miou()

    n = len(outputs_labels)
    thirds = [outputs_labels[i * n // 3:(i + 1) * n // 3] for i in range(3)]
    segments = [outputs_labels[a:b] for a, b in zip(bounds, list(bounds[1:]) + [n])]
    return {
        'miou': {head: miou(outputs_labels, head) for head in HEADS},
        'thirds': {head: [miou(part, head) for part in thirds] for head in HEADS},
        'segments': {head: [miou(part, head) for part in segments] for head in HEADS},
        'windows_2d3d': [miou(outputs_labels[i:i + window], '2d3d')
                         for i in range(0, n, window)],
    }


_PREDICTION = {'2d': 'prediction_2d', '3d': 'prediction_3d', '2d3d': 'prediction'}


def run_stream(values: Mapping[str, Any], frames: Sequence[Frame], window: int,
               bounds: Sequence[int], annotator_settings: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Any]:
    """
    Build the node's pipeline from `values`, run it over the stream, score it.

    With labels.mode set, the node's label requests are answered by a simulated
    annotator (`annotator_settings` over ANNOTATOR_SETTINGS) from the frames' labels, one
    tick per frame; every frame is still scored (a labeled frame's own prediction was
    made before its answer came).
    """
    from mmtta_ros.core.annotator import SimulatedAnnotator
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.labels import LabelLoop
    from mmtta_ros.core.realtime import node_protocol

    params = node_params(values)
    # worker.split: the node's real-time protocol, made deterministic: every frame
    # labeled by the predictor, every N-th adapted on (the adapter's pace).
    pipeline = node_protocol(build_pipeline(params.pipeline), params)
    loop = annotator = None
    if params.pipeline.labels.enabled:
        loop = LabelLoop(params.pipeline.labels, pipeline)
        settings = {**ANNOTATOR_SETTINGS, **(annotator_settings or {})}
        annotator = SimulatedAnnotator(delay=int(settings['delay']),
                                       error_rate=float(settings['error_rate']),
                                       seed=int(settings['seed']))
    scored, rejected, resets = [], 0, 0
    started = time.perf_counter()
    for frame in frames:
        try:
            output = pipeline.process(frame)
        except SensorDataError:
            rejected += 1
            output = None
        if loop is not None:
            request = None if output is None else loop.request(output)
            if request is not None:
                if frame.labels is None:
                    raise ValueError(f'{frame.sequence}: label requests need labeled frames')
                annotator.ask(request, frame.labels[request.point_index])
            for answer in annotator.tick():  # one tick per frame, rejected ones too
                loop.answer(answer)
        if output is None:
            continue
        resets = int(output.stats.get('resets', resets))
        labels = output.labels_in_view()
        # Only what scoring needs is kept: a 1,000-frame stream stays small.
        scored.append((_Light(output.prediction_2d, output.prediction_3d, output.prediction),
                       labels))
    seconds = time.perf_counter() - started
    result = score_windows(scored, window, bounds)
    result.update(frames=len(frames), rejected=rejected, guard_resets=resets,
                  seconds_per_frame=seconds / max(len(frames), 1))
    if loop is not None:
        counters = loop.counters()
        result['labels'] = {
            'requests': counters['label_requests'],
            'points_requested': counters['label_points_requested'],
            'points_answered': annotator.points_answered,
            'points_wrong': annotator.points_wrong,
            'points_accepted': counters['label_points_accepted'],
            'points_per_frame': counters['label_points_accepted'] / max(len(frames), 1)}
    return result


@dataclass
class _Light:
    prediction_2d: np.ndarray
    prediction_3d: np.ndarray
    prediction: np.ndarray


def run_task(task: Dict[str, Any]) -> Dict[str, Any]:
    """One (shift, row, checkpoint, seed) stream: the unit the suite parallelises over."""
    import torch

    torch.set_num_threads(1)
    suite = load_suite(task['suite_path'])
    shift = suite.shifts[task['shift']]
    frames = stream_frames(suite, shift, task['seed'], task['cache_dir'])
    bounds = list(np.cumsum([0] + [count for _, count in shift.segments[:-1]]))
    return run_stream(task['values'], frames, suite.window, bounds,
                      annotator_settings=task.get('annotator'))


def summarise(shift: Shift, row: Row, checkpoint: str, values: Mapping[str, Any],
              streams: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Return the record of one shift x row x checkpoint from its streams' results."""
    record = {
        'shift': shift.name, 'row': row.name, 'checkpoint': checkpoint,
        'method': values.get('adaptation.method'),
        'settings': {k: v for k, v in values.items()
                     if k.startswith(f'adaptation.{values.get("adaptation.method")}.')
                     or (k.startswith('labels.') and values.get('labels.mode', 'none')
                         != 'none')},
        'segments': [list(segment) for segment in shift.segments],
        'seeds': list(shift.seeds), 'frames': shift.frames,
        'streams': list(streams),
        'seconds_per_frame': float(np.mean([s['seconds_per_frame'] for s in streams])),
    }
    for head in HEADS:
        per_stream = [s['miou'][head] for s in streams]
        record[f'mean_{head}'] = float(np.mean(per_stream))
        record[f'std_{head}'] = float(np.std(per_stream))
    if values.get('labels.mode', 'none') != 'none':
        record['annotator'] = {**ANNOTATOR_SETTINGS, **row.annotator}
        record['label_points_per_frame'] = float(np.mean(
            [s['labels']['points_per_frame'] for s in streams]))
    return record


# Parameters that change what the suite scores; the rest (topics, state files, sync,
# diagnostics) do not, and changing them must not make every record run again. Of the
# `adaptation.<method>.*` hyperparameters only the chosen method's count: adding a method
# (its section in config/adapt.yaml) must not invalidate the records of the others.
_SCORED = ('adaptation.method', 'adaptation.batch_frames', 'adaptation.fallback', 'model.',
           'min_depth', 'classes.names', 'reset.collapse_guard', 'reset.max_dominant_fraction',
           'reset.patience', 'worker.split', 'worker.adapt_every', 'labels.',
           'adaptation.source_branch', 'calibration.ego_motion', 'adaptation.calibrate',
           'output.fusion')
# Parameters added after records were made: scored only away from these values (what
# every earlier record ran with), so adding one does not make every record run again.
_SCORED_UNLESS = {'model.precision': 'fp32', 'adaptation.source_branch': 'none',
                  'calibration.ego_motion': False, 'adaptation.calibrate': False,
                  'output.fusion': 'mean'}


# The version of the node's split protocol as the records scored it: 2 since the predictor
# calibrates to the adapter's last frame and the fallback decides on the previous frames.
NODE_PROTOCOL_VERSION = 2


def scored_values(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Return the parameter values a record depends on (see _SCORED), JSON-ready."""
    method_prefix = f'adaptation.{values.get("adaptation.method")}.'
    # The checkpoint is named by its content in the record's key; its path is not scored.
    scored = {k: v for k, v in values.items() if k != 'model.checkpoint'
              and (k.startswith(_SCORED) or k.startswith(method_prefix))}
    for name, value in _SCORED_UNLESS.items():
        if scored.get(name) == value:
            del scored[name]
    from mmtta_ros.core.realtime import labels_apart  # torch: only where records are keyed
    # Only the table's parameters decide the protocol (a record may name others).
    if labels_apart(node_params({k: v for k, v in values.items() if k in SPECS})):
        # The node's split protocol (core/realtime.NodeProtocol): its version is scored,
        # so a change to how the split labels makes its records run again.
        scored['worker.protocol'] = NODE_PROTOCOL_VERSION
    else:
        # Split labels as the paper's protocol does (tested): one record for both.
        scored.pop('worker.split', None)
        scored.pop('worker.adapt_every', None)
    if scored.get('labels.mode', 'none') == 'none':
        # Label settings do nothing without requests: records made before they existed
        # (and rows that do not ask) keep their hash.
        scored = {k: v for k, v in scored.items() if not k.startswith('labels.')}
    return json.loads(json.dumps(scored, sort_keys=True, default=str))


def settings_hash(values: Mapping[str, Any], shift: Shift,
                  extra: Optional[Mapping[str, Any]] = None,
                  annotator: Optional[Mapping[str, Any]] = None) -> str:
    """
    Return a hash of what a record depends on (its scored parameters and its streams).

    extra: more it depends on (a fused row: the content id of the head's checkpoint);
    annotator: a label row's simulated annotator settings (over ANNOTATOR_SETTINGS).
    """
    scored = scored_values(values)
    document = {'values': scored, 'segments': shift.segments, 'seeds': shift.seeds}
    if extra:
        document['extra'] = dict(extra)
    if scored.get('labels.mode', 'none') != 'none':
        document['annotator'] = {**ANNOTATOR_SETTINGS, **(annotator or {})}
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def source_checkpoints(suite: Suite, models_dir: PathLike) -> List[Path]:
    """Return where the source checkpoints of the suite live."""
    return [Path(models_dir) / f'source_{suite.model_size}_day_s{seed}.pt'
            for seed in suite.train_seeds]


def oracle_checkpoint(suite: Suite, shift: Shift, models_dir: PathLike) -> Optional[Path]:
    """Return where the oracle of a single-domain shift lives (None for mixed streams)."""
    if len(shift.segments) != 1:
        return None
    return Path(models_dir) / f'oracle_{suite.model_size}_{shift.segments[0][0]}_s0.pt'


def uda_checkpoint(suite: Suite, method: str, shift: Shift, seed: int,
                   models_dir: PathLike) -> Path:
    """Return where the UDA model of `method` towards a shift's first domain lives."""
    domain = shift.segments[0][0]
    return Path(models_dir) / f'uda_{method}_{suite.model_size}_{domain}_s{seed}.pt'


def fused_checkpoint(source: PathLike) -> Path:
    """Return where the fused-head version of a source checkpoint lives (next to it)."""
    source = Path(source)
    return source.with_name(f'{source.stem}_fused{source.suffix}')


def fit_fused_checkpoint(args) -> str:
    """Fit the fused head of one source checkpoint unless one fitted on it is there."""
    suite_path, source, path, steps, cache_dir = args
    import dataclasses

    import torch

    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.eval.splits import source_configs
    from mmtta_ros.eval.training import fit_fused_head, fused_head_fitted, TrainConfig

    suite = load_suite(suite_path)
    torch.set_num_threads(1)
    if fused_head_fitted(path, source):
        return f'{Path(path).name}: already fitted on {Path(source).name}'
    configs = source_configs('day', suite.image_size)
    if suite.lidar_azimuth_steps is not None:  # a miniature suite: its own small LiDAR
        configs = [dataclasses.replace(config, lidar_azimuth_steps=suite.lidar_azimuth_steps)
                   for config in configs]
    # The labeled day frames the source trained on: the head sees no target frame.
    frames = synthetic_frames(configs, cache_dir)
    summary = fit_fused_head(frames, source, TrainConfig(steps=steps), path,
                             torch.device('cpu'), progress=False)
    return (f'{Path(path).name}: fused head fitted on {Path(source).name} in {steps} steps, '
            f'final loss {summary["loss_fused"]:.3f}')


def train_checkpoint(args) -> str:
    """
    Train one checkpoint unless a finished one is there.

    args: (suite path, checkpoint path, labeled domain, seed, steps, cache dir, UDA method
    or '' for plain training, UDA target domain or '').
    """
    suite_path, path, domain, seed, steps, cache_dir, uda_method, target_domain = args
    import torch

    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.eval.splits import source_configs, uda_target_configs
    from mmtta_ros.eval.training import load_trained, train_source, train_uda, TrainConfig
    from mmtta_ros.eval.uda import UdaConfig
    from mmtta_ros.models.segmenter import SegmenterConfig

    suite = load_suite(suite_path)  # registers the variants in this process
    torch.set_num_threads(1)
    if load_trained(path, torch.device('cpu')) is not None:
        return f'{Path(path).name}: already trained'
    data = dict(image_size=suite.image_size, num_frames=suite.train_frames,
                lidar_azimuth_steps=suite.lidar_azimuth_steps)
    # Labeled frames of the domain, seeds 0-7: never a seed of a scored stream.
    frames = synthetic_frames(source_configs(
        domain, seeds=SOURCE_SEEDS[:suite.train_sequences], **data), cache_dir)
    model_config, train_config = SegmenterConfig(size=suite.model_size), \
        TrainConfig(steps=steps, seed=seed)
    if uda_method:
        # Unlabeled target frames: seeds 200-207, never a seed of a scored stream either.
        target = synthetic_frames(uda_target_configs(
            target_domain, seeds=UDA_TARGET_SEEDS[:suite.train_sequences], **data), cache_dir)
        summary = train_uda(frames, target, model_config, train_config,
                            UdaConfig(uda_method, target_domain=target_domain), path,
                            torch.device('cpu'), progress=False)
    else:
        summary = train_source(frames, model_config, train_config, path,
                               torch.device('cpu'), progress=False)
    return (f'{Path(path).name}: {steps} steps, final '
            + ', '.join(f'{key} {value:.3f}' for key, value in summary.items()
                        if key not in ('steps', 'resumed_from', 'seconds')))


def _generate(args) -> str:
    suite_path, shift_name, seed, cache_dir = args
    suite = load_suite(suite_path)
    stream_frames(suite, suite.shifts[shift_name], seed, cache_dir)
    return f'{shift_name} seed {seed}'


def run_suite(suite_path: PathLike, results_path: PathLike, *, models_dir: PathLike,
              cache_dir: PathLike, jobs: int = 2, shifts: Optional[Sequence[str]] = None,
              rows: Optional[Sequence[str]] = None, params_file: Optional[PathLike] = None,
              checkpoints: Optional[Sequence[PathLike]] = None, log=print) -> Dict[str, Any]:
    """
    Run every missing record (in `jobs` processes); save after each; return the results.

    checkpoints: source checkpoints to use instead of the suite's (trained if missing).
    """
    import multiprocessing

    from tqdm import tqdm

    suite = load_suite(suite_path)
    for name in list(shifts or []) + list(rows or []):
        if name not in suite.shifts and name not in suite.rows:
            raise ValueError(f'{name!r} is neither a shift nor a row of {suite_path}')
    context = multiprocessing.get_context('spawn')
    wanted_shifts = [s for s in suite.shifts.values() if not shifts or s.name in shifts]
    training = []
    if checkpoints is None:
        checkpoints = source_checkpoints(suite, models_dir)
        training += [(str(suite_path), str(path), SOURCE_DOMAIN, seed, suite.train_steps,
                      str(cache_dir), '', '')
                     for path, seed in zip(checkpoints, suite.train_seeds)]
    oracles = {}
    if any(row.oracle and (not rows or row.name in rows) for row in suite.rows.values()):
        for shift in wanted_shifts:
            path = oracle_checkpoint(suite, shift, models_dir)
            if path is not None:
                oracles[shift.name] = path
                training.append((str(suite_path), str(path), shift.segments[0][0], 0,
                                 suite.oracle_steps, str(cache_dir), '', ''))
    udas: Dict[Tuple[str, str], List[Tuple[int, Path]]] = {}
    for row in suite.rows.values():
        if not row.uda or (rows and row.name not in rows):
            continue
        for shift in wanted_shifts:
            if row.applies_to(shift):
                udas[row.name, shift.name] = [
                    (seed, uda_checkpoint(suite, row.uda, shift, seed, models_dir))
                    for seed in suite.uda_seeds]
                training += [(str(suite_path), str(path), SOURCE_DOMAIN, seed,
                              suite.train_steps, str(cache_dir), row.uda, shift.segments[0][0])
                             for seed, path in udas[row.name, shift.name]]
    fused = {}
    if any(row.fused_head and (not rows or row.name in rows) for row in suite.rows.values()):
        fused = {str(path): fused_checkpoint(path) for path in checkpoints}
    with context.Pool(jobs) as pool:
        for message in pool.imap_unordered(train_checkpoint, sorted(set(training))):
            log(message)
        # After training: a head is fitted on the finished source checkpoint.
        for message in pool.imap_unordered(fit_fused_checkpoint, [
                (str(suite_path), source, str(path), suite.fused_head_steps, str(cache_dir))
                for source, path in sorted(fused.items())]):
            log(message)
    # A UDA model of seed s pairs with the source model of seed s (same initialisation).
    paired = {seed: checkpoint_id(path) for seed, path in zip(suite.train_seeds, checkpoints)
              if Path(path).is_file()}
    results_path = Path(results_path)
    results = (json.loads(results_path.read_text()) if results_path.is_file()
               else {'records': {}})
    plans = []
    for shift in wanted_shifts:
        for row in suite.rows.values():
            if (rows and row.name not in rows) or not row.applies_to(shift):
                continue
            if row.oracle:
                models = [oracles[shift.name]]
            elif row.uda:
                models = [path for _, path in udas[row.name, shift.name]]
            else:
                models = checkpoints
            for checkpoint in models:
                # A fused row runs on the checkpoint with the head, but is keyed (and
                # paired in the tables) by the source checkpoint whose branches it shares.
                model_path = fused[str(checkpoint)] if row.fused_head else checkpoint
                values = row_values(row, model_path, params_file)
                ckpt = checkpoint_id(checkpoint)
                key = f'{shift.name}|{row.name}|{ckpt}'
                extra = {'fused_head_checkpoint': checkpoint_id(model_path)} \
                    if row.fused_head else {}
                done = results['records'].get(key)
                if done and done.get('settings_hash') == settings_hash(values, shift, extra,
                                                                       row.annotator):
                    continue
                plans.append((key, shift, row, ckpt, values, extra))
    with context.Pool(jobs) as pool:
        streams = sorted({(shift.name, seed) for _, shift, *_ in plans
                          for seed in shift.seeds})
        for _ in tqdm(pool.imap_unordered(_generate, [(str(suite_path), name, seed,
                                                       str(cache_dir))
                                                      for name, seed in streams]),
                      total=len(streams), desc='streams'):
            pass
        tasks = [dict(suite_path=str(suite_path), shift=shift.name, seed=seed,
                      cache_dir=str(cache_dir), values=values, key=key,
                      annotator=dict(row.annotator))
                 for key, shift, row, _, values, _ in plans for seed in shift.seeds]
        by_key: Dict[str, List] = {key: [] for key, *_ in plans}
        bar = tqdm(total=len(tasks), desc='runs')
        for task, result in zip(tasks, pool.imap(run_task, tasks)):
            bar.update()
            by_key[task['key']].append(result)
            key = task['key']
            if len(by_key[key]) == len(suite.shifts[task['shift']].seeds):
                _, shift, row, ckpt, values, extra = next(p for p in plans if p[0] == key)
                record = summarise(shift, row, ckpt, values, by_key[key])
                record.update(extra)
                record['settings_hash'] = settings_hash(values, shift, extra, row.annotator)
                # What the hash covers, so a later change can be checked against it.
                record['scored'] = scored_values(values)
                if row.uda:
                    seed = next(s for s, p in udas[row.name, shift.name]
                                if str(p) == values['model.checkpoint'])
                    record.update(uda=row.uda, target_domain=shift.segments[0][0],
                                  uda_seed=seed)
                    if seed in paired:
                        record['paired_checkpoint'] = paired[seed]
                results['records'][key] = record
                results['validation'] = suite.validation
                results['more_validation'] = list(suite.more_validation)
                results['label_baseline'] = suite.label_baseline
                _write_json(results_path, results)
        bar.close()
    return results


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)
