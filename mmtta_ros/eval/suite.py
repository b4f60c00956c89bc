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

PathLike = Any


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
    """A table row: a method and node-parameter settings over config/adapt.yaml."""

    name: str
    method: Optional[str] = None  # None: the node's configured method
    settings: Mapping[str, Any] = field(default_factory=dict)
    oracle: bool = False  # source-only with a model trained on the shift's labeled domain


@dataclass(frozen=True)
class Suite:
    """Everything config/shifts.yaml declares."""

    shifts: Dict[str, Shift]
    rows: Dict[str, Row]
    validation: str
    image_size: Tuple[int, int] = (400, 225)
    frame_stride: int = 2
    window: int = 10
    lidar_azimuth_steps: Optional[int] = None  # None: each domain's LiDAR (tests use fewer)
    model_size: str = 'tiny'
    train_seeds: Tuple[int, ...] = (0,)
    train_steps: int = 300
    oracle_steps: int = 300


def load_suite(path: PathLike) -> Suite:
    """Read config/shifts.yaml and register its domain variants; ValueError says what is wrong."""
    from mmtta_ros.synth.domains import domain_variant, register_domain

    document = yaml.safe_load(Path(path).read_text()) or {}
    for name, spec in (document.get('variants') or {}).items():
        spec = dict(spec)
        register_domain(domain_variant(name, spec.pop('base'), **spec))
    protocol = document.get('protocol', {})
    rows = {name: Row(name, spec.get('method'), dict(spec.get('set') or {}),
                      bool(spec.get('oracle', False)))
            for name, spec in (document.get('rows') or {}).items()}
    shifts = {}
    for name, spec in (document.get('shifts') or {}).items():
        unknown = set(spec.get('rows') or ()) - set(rows)
        if unknown:
            raise ValueError(f'shift {name} names unknown rows {sorted(unknown)}')
        shifts[name] = Shift(name, tuple((str(d), int(n)) for d, n in spec['segments']),
                             tuple(int(s) for s in spec['seeds']),
                             tuple(spec['rows']) if spec.get('rows') else None)
    validation = document.get('validation')
    if validation not in shifts:
        raise ValueError(f'the validation shift {validation!r} is not among the shifts')
    checkpoints = document.get('checkpoints', {})
    return Suite(shifts=shifts, rows=rows, validation=validation,
                 image_size=tuple(protocol.get('image_size', (400, 225))),
                 frame_stride=int(protocol.get('frame_stride', 2)),
                 window=int(protocol.get('window', 10)),
                 lidar_azimuth_steps=protocol.get('lidar_azimuth_steps'),
                 model_size=checkpoints.get('size', 'tiny'),
                 train_seeds=tuple(checkpoints.get('train_seeds', (0,))),
                 train_steps=int(checkpoints.get('steps', 300)),
                 oracle_steps=int(checkpoints.get('oracle_steps', 300)))


def stream_frames(suite: Suite, shift: Shift, seed: int, cache_dir: PathLike) -> List[Frame]:
    """Return one stream of a shift: its segments' frames, in order (cached on disk)."""
    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.synth import SequenceConfig

    configs = [SequenceConfig(domain=domain, seed=10 * seed + k, num_frames=count,
                              image_size=suite.image_size, frame_stride=suite.frame_stride,
                              lidar_azimuth_steps=suite.lidar_azimuth_steps)
               for k, (domain, count) in enumerate(shift.segments)]
    return synthetic_frames(configs, cache_dir)


def row_values(row: Row, checkpoint: PathLike, params_file: Optional[PathLike] = None,
               threads: int = 1) -> Dict[str, Any]:
    """Return the node parameter values of a row: the params file with the row's settings."""
    values = read_params_file(params_file or default_params_file())
    if row.method or row.oracle:
        # An oracle is the model trained on the target, used as it is: source-only.
        values['adaptation.method'] = 'source' if row.oracle else row.method
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
               bounds: Sequence[int]) -> Dict[str, Any]:
    """Build the node's pipeline from `values`, run it over the stream, score it."""
    from mmtta_ros.core.builder import build_pipeline
    from mmtta_ros.core.realtime import SplitPipeline

    params = node_params(values)
    pipeline = build_pipeline(params.pipeline)
    # worker.split with adapt_every N: the node's real-time protocol, made deterministic:
    # every frame labeled by the predictor, every N-th adapted on (the adapter's pace).
    split = SplitPipeline(pipeline) if values.get('worker.split') and \
        values.get('worker.adapt_every', 1) > 1 else None
    scored, rejected, resets = [], 0, 0
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        try:
            if split is None:
                output = pipeline.process(frame)
            else:
                output = split.predict(frame)
                if index % params.adapt_every == 0:
                    output.stats = split.adapt(frame)
        except SensorDataError:
            rejected += 1
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
    return run_stream(task['values'], frames, suite.window, bounds)


def summarise(shift: Shift, row: Row, checkpoint: str, values: Mapping[str, Any],
              streams: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Return the record of one shift x row x checkpoint from its streams' results."""
    record = {
        'shift': shift.name, 'row': row.name, 'checkpoint': checkpoint,
        'method': values.get('adaptation.method'),
        'settings': {k: v for k, v in values.items()
                     if k.startswith(f'adaptation.{values.get("adaptation.method")}.')},
        'segments': [list(segment) for segment in shift.segments],
        'seeds': list(shift.seeds), 'frames': shift.frames,
        'streams': list(streams),
        'seconds_per_frame': float(np.mean([s['seconds_per_frame'] for s in streams])),
    }
    for head in HEADS:
        per_stream = [s['miou'][head] for s in streams]
        record[f'mean_{head}'] = float(np.mean(per_stream))
        record[f'std_{head}'] = float(np.std(per_stream))
    return record


# Parameters that change what the suite scores; the rest (topics, state files, sync,
# diagnostics) do not, and changing them must not make every record run again.
_SCORED = ('adaptation.', 'model.', 'min_depth', 'classes.', 'reset.collapse_guard',
           'reset.max_dominant_fraction', 'reset.patience', 'worker.split',
           'worker.adapt_every')


def settings_hash(values: Mapping[str, Any], shift: Shift) -> str:
    """Return a hash of what a record depends on (its scored parameters and its streams)."""
    scored = {k: v for k, v in values.items() if k.startswith(_SCORED)}
    if not (scored.get('worker.split') and scored.get('worker.adapt_every', 1) > 1):
        # Split with every frame adapted labels as the paper's protocol does (tested).
        scored.pop('worker.split', None)
        scored.pop('worker.adapt_every', None)
    text = json.dumps({'values': scored, 'segments': shift.segments,
                       'seeds': shift.seeds}, sort_keys=True, default=str)
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


def train_checkpoint(args) -> str:
    """Train one checkpoint (domain, seed, steps) unless a finished one is there."""
    suite_path, path, domain, seed, steps, cache_dir = args
    import torch

    from mmtta_ros.eval.frame_cache import synthetic_frames
    from mmtta_ros.eval.splits import source_configs
    from mmtta_ros.eval.training import load_trained, train_source, TrainConfig
    from mmtta_ros.models.segmenter import SegmenterConfig

    suite = load_suite(suite_path)  # registers the variants in this process
    torch.set_num_threads(1)
    if load_trained(path, torch.device('cpu')) is None:
        # Labeled frames of the domain, seeds 0-7: never a seed of a scored stream.
        frames = synthetic_frames(source_configs(domain, suite.image_size), cache_dir)
        summary = train_source(frames, SegmenterConfig(size=suite.model_size),
                               TrainConfig(steps=steps, seed=seed), path,
                               torch.device('cpu'), progress=False)
        return (f'{Path(path).name}: {steps} steps, final loss 2D {summary["loss_2d"]:.3f} '
                f'3D {summary["loss_3d"]:.3f}')
    return f'{Path(path).name}: already trained'


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
        training += [(str(suite_path), str(path), 'day', seed, suite.train_steps,
                      str(cache_dir)) for path, seed in zip(checkpoints, suite.train_seeds)]
    oracles = {}
    if any(row.oracle and (not rows or row.name in rows) for row in suite.rows.values()):
        for shift in wanted_shifts:
            path = oracle_checkpoint(suite, shift, models_dir)
            if path is not None:
                oracles[shift.name] = path
                training.append((str(suite_path), str(path), shift.segments[0][0], 0,
                                 suite.oracle_steps, str(cache_dir)))
    with context.Pool(jobs) as pool:
        for message in pool.imap_unordered(train_checkpoint, sorted(set(training))):
            log(message)
    results_path = Path(results_path)
    results = (json.loads(results_path.read_text()) if results_path.is_file()
               else {'records': {}})
    plans = []
    for shift in wanted_shifts:
        for row in suite.rows.values():
            if (rows and row.name not in rows) or (shift.rows and row.name not in shift.rows):
                continue
            if row.oracle and shift.name not in oracles:
                continue
            for checkpoint in ([oracles[shift.name]] if row.oracle else checkpoints):
                values = row_values(row, checkpoint, params_file)
                ckpt = checkpoint_id(checkpoint)
                key = f'{shift.name}|{row.name}|{ckpt}'
                done = results['records'].get(key)
                if done and done.get('settings_hash') == settings_hash(values, shift):
                    continue
                plans.append((key, shift, row, ckpt, values))
    with context.Pool(jobs) as pool:
        streams = sorted({(shift.name, seed) for _, shift, _, _, _ in plans
                          for seed in shift.seeds})
        for _ in tqdm(pool.imap_unordered(_generate, [(str(suite_path), name, seed,
                                                       str(cache_dir))
                                                      for name, seed in streams]),
                      total=len(streams), desc='streams'):
            pass
        tasks = [dict(suite_path=str(suite_path), shift=shift.name, seed=seed,
                      cache_dir=str(cache_dir), values=values, key=key)
                 for key, shift, _, _, values in plans for seed in shift.seeds]
        by_key: Dict[str, List] = {key: [] for key, *_ in plans}
        bar = tqdm(total=len(tasks), desc='runs')
        for task, result in zip(tasks, pool.imap(run_task, tasks)):
            bar.update()
            by_key[task['key']].append(result)
            key = task['key']
            if len(by_key[key]) == len(suite.shifts[task['shift']].seeds):
                _, shift, row, ckpt, values = next(p for p in plans if p[0] == key)
                record = summarise(shift, row, ckpt, values, by_key[key])
                record['settings_hash'] = settings_hash(values, shift)
                results['records'][key] = record
                results['validation'] = suite.validation
                _write_json(results_path, results)
        bar.close()
    return results


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)
