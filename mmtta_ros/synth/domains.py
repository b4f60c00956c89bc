"""
Domains: parameter families a sequence's street, lighting and LiDAR are drawn from.

`day` is the source domain. `night` keeps the same city and LiDAR but lights it with lamps and
headlights, a varying colour cast, strong sensor noise and crushed blacks (and a wet-road LiDAR:
lower intensities, more lost returns on dark surfaces). `city_b` is another city by day (wider
roads, left-hand traffic, tall pastel and glass buildings, dense vegetation). `lidar16` is the
day domain seen by a 16-beam LiDAR with a narrower vertical field of view.

Variants (a harsher night, dusk, fog, ...) are declared, not patched in: `domain_variant`
derives a family from a registered one with some fields changed, `register_domain` adds
it under its own name, and `domain_fingerprint` gives every value a family holds, so a
cache keyed by it never serves one variant's frames for another.
"""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from mmtta_ros.synth.camera import Lighting
from mmtta_ros.synth.lidar import HDL32E_ELEVATIONS_DEG, LidarModel, VLP16_ELEVATIONS_DEG
from mmtta_ros.synth.scene import LayoutFamily

Range = Tuple[float, float]
SODIUM_RGB = np.array([1.0, 0.52, 0.16])
LED_RGB = np.array([0.85, 0.92, 1.0])
HALOGEN_RGB = np.array([1.0, 0.85, 0.62])


@dataclass(frozen=True)
class LightingFamily:
    """Ranges of the lighting and camera response; (lo, hi) are uniform ranges."""

    night: bool = False
    sun_elevation_deg: Range = (20.0, 65.0)
    sun_power: Range = (0.85, 1.1)
    overcast_prob: float = 0.25
    ambient_power: Range = (0.8, 1.2)
    exposure: Range = (0.85, 1.2)
    exposure_jitter: float = 0.03
    white_balance_std: float = 0.04
    shot_noise: Range = (0.0003, 0.0008)
    read_noise: Range = (0.001, 0.003)
    black_level: Range = (0.0, 0.004)
    haze_distance: Range = (400.0, 900.0)
    lamp_power: Range = (0.0, 0.0)
    lamp_on_fraction: Range = (0.55, 0.95)
    headlight_power: Range = (0.0, 0.0)
    window_light: Range = (0.0, 0.0)
    window_lit_fraction: Range = (0.1, 0.35)
    glare: Range = (0.0, 0.0)
    bloom: Range = (0.0, 0.0)


@dataclass(frozen=True)
class LidarFamily:
    """Beam pattern and ranges of the return model (see `LidarModel`)."""

    elevation_deg: Tuple[float, ...] = HDL32E_ELEVATIONS_DEG
    azimuth_steps: int = 1085
    max_range: float = 80.0
    intensity_gain: Range = (0.9, 1.1)
    weak_return: Range = (0.0012, 0.0018)
    dropout: Range = (0.005, 0.015)
    clutter: Range = (0.0, 0.0)


@dataclass(frozen=True)
class DomainFamily:
    """Everything a domain varies: its city, its lighting, its LiDAR."""

    name: str
    layout: LayoutFamily = field(default_factory=LayoutFamily)
    lighting: LightingFamily = field(default_factory=LightingFamily)
    lidar: LidarFamily = field(default_factory=LidarFamily)


NIGHT_LIGHTING = LightingFamily(
    night=True, ambient_power=(0.5, 1.5), exposure=(1.2, 2.0), exposure_jitter=0.06,
    white_balance_std=0.1, shot_noise=(0.01, 0.025), read_noise=(0.006, 0.015),
    black_level=(0.005, 0.02), haze_distance=(250.0, 500.0), lamp_power=(25.0, 50.0),
    headlight_power=(25.0, 45.0), window_light=(0.05, 0.2), glare=(0.6, 1.2), bloom=(0.2, 0.4))

CITY_A = LayoutFamily()
CITY_B = LayoutFamily(
    name='city_b', lanes_per_direction=(2, 2, 3), lane_width=(3.0, 3.3), parking_prob=0.2,
    sidewalk_width=(1.5, 2.5), verge_prob=0.8, verge_width=(1.5, 3.5), paved_yard_prob=0.5,
    setback=(3.0, 12.0), building_length=(15.0, 40.0), building_depth=(12.0, 25.0),
    building_height=(12.0, 30.0), tall_building_prob=0.35, tall_height=(40.0, 70.0),
    facade_srgb=((0.90, 0.72, 0.72), (0.72, 0.86, 0.76), (0.92, 0.88, 0.75), (0.92, 0.92, 0.90),
                 (0.70, 0.80, 0.90), (0.66, 0.66, 0.63), (0.30, 0.45, 0.50)),
    floor_height=(3.0, 3.4), window_width=(1.4, 2.4), window_gap=(0.2, 0.8),
    window_height_frac=(0.6, 0.85), tree_spacing=(5.0, 9.0), tree_prob=0.95,
    crown_radius=(1.8, 3.2),
    foliage_srgb=((0.15, 0.35, 0.12), (0.12, 0.30, 0.10), (0.20, 0.40, 0.15)),
    bush_density=0.2, hedge_prob=0.6, wall_prob=0.2, pole_srgb=(0.70, 0.70, 0.72),
    lamp_spacing=(30.0, 40.0), left_hand_traffic=True, yellow_centre=False,
    asphalt_srgb=(0.45, 0.41, 0.40), paving_srgb=(0.60, 0.45, 0.38),
    grass_srgb=(0.25, 0.50, 0.15), max_slope=0.15)

DOMAINS: Dict[str, DomainFamily] = {
    'day': DomainFamily('day', layout=CITY_A),
    'night': DomainFamily(
        'night', layout=CITY_A, lighting=NIGHT_LIGHTING,
        lidar=LidarFamily(intensity_gain=(0.6, 0.8), weak_return=(0.003, 0.005),
                          dropout=(0.015, 0.03))),
    'city_b': DomainFamily('city_b', layout=CITY_B,
                           lighting=LightingFamily(sun_elevation_deg=(45.0, 80.0),
                                                   haze_distance=(250.0, 500.0))),
    'lidar16': DomainFamily('lidar16', layout=CITY_A,
                            lidar=LidarFamily(elevation_deg=VLP16_ELEVATIONS_DEG,
                                              azimuth_steps=900)),
}


def get_domain(name: str) -> DomainFamily:
    """Return the domain family called `name`; a ValueError lists the known ones otherwise."""
    if name not in DOMAINS:
        raise ValueError(f'unknown domain {name!r}; known domains: {sorted(DOMAINS)}')
    return DOMAINS[name]


def _with_changes(family: Any, changes: Optional[Mapping[str, Any]], what: str) -> Any:
    """Return `family` with `changes` applied; lists become tuples; unknown names refused."""
    if not changes:
        return family
    known = {f.name for f in fields(family)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f'{what} has no field {unknown}; it has {sorted(known)}')
    return replace(family, **{name: tuple(value) if isinstance(value, list) else value
                              for name, value in changes.items()})


def domain_variant(name: str, base: str, *, layout: Optional[Mapping[str, Any]] = None,
                   lighting: Optional[Mapping[str, Any]] = None,
                   lidar: Optional[Mapping[str, Any]] = None) -> DomainFamily:
    """Return a family called `name`: registered domain `base` with some fields changed."""
    family = get_domain(base)
    return DomainFamily(
        name, layout=_with_changes(family.layout, layout, f'{base} layout'),
        lighting=_with_changes(family.lighting, lighting, f'{base} lighting'),
        lidar=_with_changes(family.lidar, lidar, f'{base} lidar'))


def register_domain(family: DomainFamily) -> None:
    """Make `family` available by its name; a different family under a taken name is refused."""
    existing = DOMAINS.get(family.name)
    if existing is not None and domain_fingerprint(family.name) != _fingerprint(family):
        raise ValueError(f'a different domain is already registered as {family.name!r}')
    DOMAINS[family.name] = family


def _fingerprint(family: DomainFamily) -> Dict[str, Any]:
    return asdict(family)


def domain_fingerprint(name: str) -> Dict[str, Any]:
    """Return every value of domain `name`'s families, plain (for cache keys)."""
    return _fingerprint(get_domain(name))


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def sample_lighting(family: LightingFamily, rng: np.random.Generator) -> Lighting:
    """Concrete lighting of one sequence."""
    exposure = _uniform(rng, family.exposure)
    noise = dict(exposure=exposure, exposure_jitter=family.exposure_jitter,
                 shot_noise=_uniform(rng, family.shot_noise),
                 read_noise=_uniform(rng, family.read_noise),
                 black_level=_uniform(rng, family.black_level),
                 haze_distance=_uniform(rng, family.haze_distance))
    cast = np.exp(rng.normal(0.0, family.white_balance_std, 3))
    if not family.night:
        elevation = np.deg2rad(_uniform(rng, family.sun_elevation_deg))
        azimuth = rng.uniform(0, 2 * np.pi)
        sun_dir = np.array([np.cos(elevation) * np.cos(azimuth),
                            np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
        sun = _uniform(rng, family.sun_power) * np.array([1.0, 0.96, 0.9])
        ambient = _uniform(rng, family.ambient_power) * np.array([0.20, 0.24, 0.32])
        zenith, horizon = np.array([0.12, 0.25, 0.60]), np.array([0.55, 0.62, 0.75])
        overcast = rng.random() < family.overcast_prob
        if overcast:
            sun = sun * 0.12
            ambient = ambient * 2.0 * np.array([1.1, 1.0, 0.85])
            zenith = horizon = np.array([0.50, 0.52, 0.55])
        return Lighting(sun_dir=sun_dir, sun_rgb=sun, ambient_rgb=ambient,
                        sky_zenith_rgb=zenith, sky_horizon_rgb=horizon,
                        white_balance=cast / cast.mean(), shadows=not overcast, **noise)
    # Night: every sequence gets its own mix of sodium and LED lamps and its own colour cast.
    sodium = rng.uniform(0.0, 1.0)
    lamp_rgb = sodium * SODIUM_RGB + (1.0 - sodium) * LED_RGB
    headlight_rgb = HALOGEN_RGB if rng.random() < 0.6 else LED_RGB
    # Auto white balance corrects the cast only partly, and differently per sequence.
    white_balance = lamp_rgb ** -rng.uniform(0.0, 0.6) * cast
    ambient = _uniform(rng, family.ambient_power) * np.array([0.008, 0.009, 0.013])
    return Lighting(
        sun_dir=np.array([0.0, 0.0, -1.0]), sun_rgb=np.zeros(3), ambient_rgb=ambient,
        sky_zenith_rgb=np.array([0.002, 0.003, 0.006]), sky_horizon_rgb=0.03 * lamp_rgb,
        white_balance=white_balance / white_balance.mean(), shadows=False,
        headlight_power=_uniform(rng, family.headlight_power), headlight_rgb=headlight_rgb,
        lamp_power=_uniform(rng, family.lamp_power), lamp_rgb=lamp_rgb,
        lamp_on_fraction=_uniform(rng, family.lamp_on_fraction),
        window_light=_uniform(rng, family.window_light),
        window_lit_fraction=_uniform(rng, family.window_lit_fraction),
        glare=_uniform(rng, family.glare), bloom=_uniform(rng, family.bloom), **noise)


def sample_lidar(family: LidarFamily, rng: np.random.Generator, *, texture_seed: int,
                 azimuth_steps=None) -> LidarModel:
    """Concrete LiDAR of one sequence; `azimuth_steps` overrides the family's (for tests)."""
    return LidarModel(
        elevation_deg=family.elevation_deg,
        azimuth_steps=int(azimuth_steps or family.azimuth_steps),
        max_range=family.max_range,
        dropout=_uniform(rng, family.dropout),
        weak_return=_uniform(rng, family.weak_return),
        intensity_gain=_uniform(rng, family.intensity_gain),
        texture_seed=texture_seed,
        # Drawn only where there is fog, so every other domain's streams stay as they were.
        clutter=_uniform(rng, family.clutter) if family.clutter[1] > 0 else 0.0)
