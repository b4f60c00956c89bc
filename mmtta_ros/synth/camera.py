"""
A pinhole camera rendering the scene with one ray per pixel, by day or by night.

Light is computed in linear RGB: albedo x (sky ambient + sun with cast shadows + headlights +
street lamps) + emission, then haze, glare and bloom, then the sensor: exposure, white
balance, shot and read noise (in linear space, before gamma), black level, sRGB encoding.
"""

import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mmtta_ros.synth import materials as mat
from mmtta_ros.synth.noise import hash_cells
from mmtta_ros.synth.raycast import cast_rays

MAX_VIEW_DISTANCE = 400.0
# nuScenes CAM_FRONT: fx ~ 1266 px at 1600 px width (about 65 degrees horizontal field of view).
NUSCENES_FOCAL_PX = 1266.4
NUSCENES_WIDTH_PX = 1600
# Headlights in the ego frame (origin at the rear axle, x forward): two lamps at the front.
HEADLIGHTS_EGO = np.array([[3.6, 0.75, 0.7], [3.6, -0.75, 0.7]])


@dataclass
class CameraModel:
    """Pinhole intrinsics; the image is `width` x `height` pixels, principal point centred."""

    width: int = 400
    height: int = 225
    focal_px: Optional[float] = None

    @property
    def K(self) -> np.ndarray:
        """Intrinsic matrix <np.float64: 3, 3> (nuScenes CAM_FRONT's focal if none given)."""
        focal = self.focal_px or NUSCENES_FOCAL_PX * self.width / NUSCENES_WIDTH_PX
        return np.array([[focal, 0.0, self.width / 2.0],
                         [0.0, focal, self.height / 2.0],
                         [0.0, 0.0, 1.0]])

    def pixel_directions(self) -> np.ndarray:
        """
        Return unit rays through the pixel centres, row-major, optical camera frame.

        returns: <np.float64: H * W, 3> (x right, y down, z forward), read-only
        """
        return _pixel_directions(self.width, self.height, float(self.K[0, 0]))


@functools.lru_cache(maxsize=8)
def _pixel_directions(width: int, height: int, focal: float) -> np.ndarray:
    """Compute CameraModel.pixel_directions, cached: they are the same for every frame."""
    v, u = np.mgrid[0:height, 0:width]
    rays = np.stack([(u.ravel() + 0.5 - width / 2.0) / focal,
                     (v.ravel() + 0.5 - height / 2.0) / focal, np.ones(u.size)], axis=1)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    rays.flags.writeable = False
    return rays


@dataclass
class Lighting:
    """
    Illumination and camera response of one sequence, linear RGB units (1 = white).

    sun_dir:           <np.float64: 3> unit vector towards the sun, world frame
    sun_rgb, ambient_rgb, sky_zenith_rgb, sky_horizon_rgb: <np.float64: 3>
    exposure:          gain from radiance to sensor signal; exposure_jitter: per-frame log std
    white_balance:     <np.float64: 3> per-channel gains (colour cast where not neutral)
    shot_noise:        signal-dependent noise variance per unit signal
    read_noise:        signal-independent noise standard deviation
    black_level:       signal clipped to black (crushes dark regions)
    haze_distance:     metres over which distant surfaces fade to the horizon colour
    shadows:           cast sun shadows
    headlight_power, lamp_power: irradiance at 1 m (0: off); *_rgb their colours
    lamp_on_fraction:  share of street lamps that are lit
    window_light:      emission of lit windows; window_lit_fraction: share of lit windows
    glare, bloom:      strength of halos around light sources and of bright-area bloom
    """

    sun_dir: np.ndarray
    sun_rgb: np.ndarray
    ambient_rgb: np.ndarray
    sky_zenith_rgb: np.ndarray
    sky_horizon_rgb: np.ndarray
    exposure: float = 1.0
    exposure_jitter: float = 0.03
    white_balance: np.ndarray = field(default_factory=lambda: np.ones(3))
    shot_noise: float = 0.0005
    read_noise: float = 0.002
    black_level: float = 0.0
    haze_distance: float = 600.0
    shadows: bool = True
    headlight_power: float = 0.0
    headlight_rgb: np.ndarray = field(default_factory=lambda: np.ones(3))
    lamp_power: float = 0.0
    lamp_rgb: np.ndarray = field(default_factory=lambda: np.ones(3))
    lamp_on_fraction: float = 0.0
    window_light: float = 0.0
    window_lit_fraction: float = 0.0
    glare: float = 0.0
    bloom: float = 0.0


@dataclass
class Rendering:
    """
    A rendered camera image with its per-pixel ground truth.

    image:  <np.uint8: H, W, 3> RGB
    labels: <np.int64: H, W> class of the surface seen, IGNORE_INDEX for sky
    depth:  <np.float32: H, W> distance along the pixel ray, metres, inf for sky
    """

    image: np.ndarray
    labels: np.ndarray
    depth: np.ndarray


def lit_lamps(lamp_heads: np.ndarray, fraction: float) -> np.ndarray:
    """
    Which street lamps are lit: a fixed hash of their position, <np.bool_: L>.

    lamp_heads: <np.float64: L, 3> world positions, metres
    """
    cells = np.floor(lamp_heads[:, :2] * 4.0).astype(np.int64)
    return hash_cells(cells, 77) < fraction


def sky_radiance(dirs_world: np.ndarray, lighting: Lighting) -> np.ndarray:
    """Radiance of the sky along unit directions, <np.float64: N, 3>."""
    up = np.clip(dirs_world[:, 2], 0.0, 1.0) ** 0.45
    sky = (1.0 - up)[:, None] * lighting.sky_horizon_rgb + up[:, None] * lighting.sky_zenith_rgb
    cos_sun = np.clip(dirs_world @ lighting.sun_dir, 0.0, 1.0)
    glow = 0.5 * cos_sun ** 400 + 0.12 * cos_sun ** 8
    return sky + glow[:, None] * lighting.sun_rgb


def render(scene, time_s: float, T_world_from_ego: np.ndarray, T_ego_from_cam: np.ndarray,
           camera: CameraModel, lighting: Lighting, rng: np.random.Generator) -> Rendering:
    """
    Render the scene at `time_s` seconds from a camera on the ego car.

    T_world_from_ego, T_ego_from_cam: <np.float64: 4, 4> ego pose and camera mounting
    """
    T_world_from_cam = T_world_from_ego @ T_ego_from_cam
    rotation, origin = T_world_from_cam[:3, :3], T_world_from_cam[:3, 3]
    dirs = camera.pixel_directions() @ rotation.T
    primitives = scene.primitives_at(time_s)
    hits = cast_rays(origin, dirs, primitives, scene.ground, max_distance=MAX_VIEW_DISTANCE)
    material = mat.refine_materials(hits.material, hits.primitive, hits.local, primitives)
    radiance = np.empty((dirs.shape[0], 3))
    sky = ~hits.hit
    radiance[sky] = sky_radiance(dirs[sky], lighting)
    rows = np.flatnonzero(hits.hit)
    radiance[rows] = _shade_surfaces(rows, hits, material, dirs, primitives, scene, lighting,
                                     T_world_from_ego)
    fade = 1.0 - np.exp(-hits.distance[rows] / lighting.haze_distance)
    radiance[rows] += fade[:, None] * (lighting.sky_horizon_rgb - radiance[rows])
    shape = (camera.height, camera.width)
    radiance = radiance.reshape(*shape, 3)
    depth = hits.distance.reshape(shape)
    if lighting.glare > 0:
        radiance += _glare(scene, time_s, T_world_from_cam, camera, lighting, depth)
    if lighting.bloom > 0:
        sigma = 0.012 * camera.width
        radiance += lighting.bloom * _blur(np.maximum(radiance - 1.0, 0.0), sigma)
    image = _sensor_response(radiance, lighting, rng)
    return Rendering(image=image, labels=hits.label.reshape(shape),
                     depth=depth.astype(np.float32))


def _shade_surfaces(rows, hits, material, dirs, primitives, scene, lighting, T_world_from_ego):
    """Outgoing radiance of the surfaces seen by the pixels `rows`, <np.float64: M, 3>."""
    point, normal = hits.point[rows], hits.normal[rows]
    material, primitive = material[rows], hits.primitive[rows]
    albedo = mat.surface_albedo(material, primitive, point, hits.local[rows], primitives,
                                scene.palette, scene.seed)
    # Sky light: surfaces facing up see more of the sky.
    irradiance = (0.55 + 0.45 * normal[:, 2:3]) * lighting.ambient_rgb
    if np.any(lighting.sun_rgb > 0):
        cos_sun = normal @ lighting.sun_dir
        lit = np.flatnonzero(cos_sun > 0.0)
        visible = np.zeros(rows.size)
        visible[lit] = 1.0
        if lighting.shadows and lit.size:
            near = lit[hits.distance[rows][lit] < 100.0]
            shadow = cast_rays(point[near] + 0.02 * normal[near],
                               np.broadcast_to(lighting.sun_dir, (near.size, 3)), primitives,
                               None, max_distance=120.0)
            visible[near] = np.where(shadow.hit, 0.0, 1.0)
        irradiance += (np.maximum(cos_sun, 0.0) * visible)[:, None] * lighting.sun_rgb
    if lighting.headlight_power > 0:
        irradiance += _headlight_irradiance(point, normal, lighting, T_world_from_ego)
    emission = np.zeros_like(albedo)
    if lighting.lamp_power > 0 and scene.lamp_heads.shape[0]:
        lamps = scene.lamp_heads[lit_lamps(scene.lamp_heads, lighting.lamp_on_fraction)]
        # Farther lamps add less than the sensor noise to what the camera sees.
        lamps = lamps[np.linalg.norm(lamps - T_world_from_ego[:3, 3], axis=1) < 80.0]
        irradiance += _lamp_irradiance(point, normal, lamps, lighting)
        on_head = np.flatnonzero(material == mat.LAMP)
        head_lit = lit_lamps(primitives.center[primitive[on_head]], lighting.lamp_on_fraction)
        emission[on_head[head_lit]] = 6.0 * lighting.lamp_rgb
    if lighting.window_light > 0:
        on_window = np.flatnonzero(material == mat.WINDOW)
        prim = primitive[on_window]
        _, cells = mat.window_cells(hits.local[rows][on_window], primitives.size[prim],
                                    primitives.style[prim])
        keys = np.concatenate([prim[:, None], cells], axis=1)
        glow = hash_cells(keys, 31)
        lit = glow < lighting.window_lit_fraction
        warmth = np.array([1.0, 0.75, 0.45]) + np.outer(hash_cells(keys, 32), [0, 0.2, 0.45])
        emission[on_window[lit]] = lighting.window_light * warmth[lit] * (0.5 + glow[lit, None])
    radiance = albedo * irradiance + emission
    specular = mat.SPECULAR[material]
    shiny = np.flatnonzero(specular > 0)
    if shiny.size:
        d = dirs[rows[shiny]]
        n = normal[shiny]
        mirrored = d - 2.0 * np.sum(d * n, axis=1, keepdims=True) * n
        mirrored[:, 2] = np.abs(mirrored[:, 2])
        radiance[shiny] += specular[shiny, None] * sky_radiance(mirrored, lighting)
    return radiance


def _headlight_irradiance(point, normal, lighting, T_world_from_ego) -> np.ndarray:
    """
    Irradiance from the ego car's low beams: a cone, cut off above the horizon, 1/d^2.

    point, normal: <np.float64: M, 3> world frame; returns <np.float64: M, 3>
    """
    rotation, origin = T_world_from_ego[:3, :3], T_world_from_ego[:3, 3]
    axis = rotation @ np.array([np.cos(0.05), 0.0, -np.sin(0.05)])
    total = np.zeros(point.shape[0])
    for lamp in HEADLIGHTS_EGO @ rotation.T + origin:
        to_lamp = lamp - point
        dist2 = np.sum(to_lamp * to_lamp, axis=1)
        to_lamp /= np.sqrt(dist2)[:, None]
        cos_axis = -(to_lamp @ axis)
        cone = np.clip((cos_axis - np.cos(0.55)) / (np.cos(0.15) - np.cos(0.55)), 0.0, 1.0)
        # Low beams are cut off above the lamp's height, except for a dim spill.
        upward = (point[:, 2] - lamp[2]) / np.sqrt(dist2)
        cutoff = np.where(upward > 0.03, 0.08, 1.0)
        total += cone ** 2 * cutoff * np.maximum(np.sum(normal * to_lamp, axis=1), 0.0) / (
            dist2 + 1.0)
    return lighting.headlight_power * total[:, None] * lighting.headlight_rgb


def _lamp_irradiance(point, normal, lamps, lighting) -> np.ndarray:
    """
    Irradiance from lit street lamps shining downwards (no shadows), <np.float64: M, 3>.

    point, normal: <np.float64: M, 3>; lamps: <np.float64: L, 3> world positions
    """
    total = np.zeros(point.shape[0])
    for lamp in lamps:
        to_lamp = lamp - point
        dist2 = np.sum(to_lamp * to_lamp, axis=1)
        to_lamp /= np.sqrt(dist2)[:, None]
        downward = np.clip(to_lamp[:, 2], 0.0, 1.0) ** 2.5
        total += downward * np.maximum(np.sum(normal * to_lamp, axis=1), 0.0) / (dist2 + 4.0)
    return lighting.lamp_power * total[:, None] * lighting.lamp_rgb


def _glare(scene, time_s, T_world_from_cam, camera, lighting, depth) -> np.ndarray:
    """Halos around visible light sources (lamps, other cars' lights), <np.float64: H, W, 3>."""
    positions, colours, powers = [], [], []
    if lighting.lamp_power > 0 and scene.lamp_heads.shape[0]:
        lamps = scene.lamp_heads[lit_lamps(scene.lamp_heads, lighting.lamp_on_fraction)]
        positions.append(lamps)
        colours.append(np.broadcast_to(lighting.lamp_rgb, lamps.shape))
        powers.append(np.full(lamps.shape[0], 1.0))
    light_pos, facing, is_head = scene.vehicles.lights(scene.centerline, time_s)
    cam_origin = T_world_from_cam[:3, 3]
    towards = np.sum(facing * (cam_origin - light_pos), axis=1) > 0
    positions.append(light_pos[towards])
    colours.append(np.where(is_head[towards, None], [0.9, 0.92, 1.0], [1.0, 0.05, 0.02]))
    powers.append(np.where(is_head[towards], 1.5, 0.3))
    positions = np.concatenate(positions)
    colours, powers = np.concatenate(colours), np.concatenate(powers)
    rotation = T_world_from_cam[:3, :3]
    in_cam = (positions - cam_origin) @ rotation
    ahead = in_cam[:, 2] > 0.5
    uvw = in_cam[ahead] @ camera.K.T
    uv = uvw[:, :2] / uvw[:, 2:3]
    dist = np.linalg.norm(in_cam[ahead], axis=1)
    colours, powers = colours[ahead], powers[ahead]
    px = np.floor(uv).astype(np.int64)
    inside = (px[:, 0] >= 0) & (px[:, 0] < camera.width) & (px[:, 1] >= 0) & (
        px[:, 1] < camera.height)
    # A source is seen unless something nearer covers its pixel.
    seen = np.flatnonzero(inside)
    seen = seen[depth[px[seen, 1], px[seen, 0]] > dist[seen] - 1.5]
    out = np.zeros((camera.height, camera.width, 3))
    radius = 1.5 * camera.width / 400.0
    # Halos fall off as (1 + r^2)^-1.4: beyond ~25 radii they are below a grey level.
    reach = int(np.ceil(25 * radius))
    window = np.arange(-reach, reach + 1)
    for k in seen:
        u0, v0 = px[k]
        us = window + u0
        vs = window + v0
        us, vs = us[(us >= 0) & (us < camera.width)], vs[(vs >= 0) & (vs < camera.height)]
        r2 = ((us[None, :] + 0.5 - uv[k, 0]) ** 2 + (vs[:, None] + 0.5 - uv[k, 1]) ** 2) / (
            radius ** 2)
        peak = lighting.glare * powers[k] * 60.0 / max(dist[k], 4.0) ** 2
        out[vs[0]:vs[-1] + 1, us[0]:us[-1] + 1] += (peak / (1.0 + r2) ** 1.4)[..., None] * \
            colours[k]
    return out


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur (three box passes per axis), <np.float64: H, W, C>."""
    radius = max(int(round(sigma * 0.87)), 1)
    out = image
    for axis in (0, 1):
        for _ in range(3):
            pad = [(0, 0)] * out.ndim
            pad[axis] = (radius + 1, radius)
            csum = np.cumsum(np.pad(out, pad, mode='edge'), axis=axis)
            hi = np.take(csum, np.arange(2 * radius + 1, csum.shape[axis]), axis=axis)
            lo = np.take(csum, np.arange(0, csum.shape[axis] - 2 * radius - 1), axis=axis)
            out = (hi - lo) / (2 * radius + 1)
    return out


def _sensor_response(radiance, lighting: Lighting, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance, noise in linear space, black level, sRGB: <np.uint8: H, W, 3>."""
    exposure = lighting.exposure * np.exp(rng.normal(0.0, lighting.exposure_jitter))
    signal = radiance * exposure * lighting.white_balance
    positive = np.maximum(signal, 0.0)
    signal = signal + np.sqrt(positive * lighting.shot_noise) * rng.standard_normal(signal.shape)
    signal += lighting.read_noise * rng.standard_normal(signal.shape)
    signal = (signal - lighting.black_level) / (1.0 - lighting.black_level)
    # Soft shoulder so that highlights roll off instead of clipping hard.
    knee = 0.8
    shoulder = knee + (1 - knee) * np.tanh((signal - knee) / (1 - knee))
    signal = np.where(signal < knee, signal, shoulder)
    return np.round(255.0 * mat.linear_to_srgb(signal)).astype(np.uint8)
