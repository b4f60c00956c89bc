"""
Materials: ids, LiDAR reflectivity, and procedural appearance evaluated at hit points.

Both sensors see the same materials: `refine_materials` turns the base material of a solid
into what lies at the exact hit point (a window in a facade, glass in a car cabin), so that the
camera sees a dark window where the LiDAR gets a weak or no return.
"""

from dataclasses import dataclass

import numpy as np

from mmtta_ros.synth.noise import fbm, hash_cells, value_noise

(ASPHALT, PAINT, PAINT_YELLOW, CURB, PAVING, GRASS, SOIL, FACADE, WINDOW, ROOF, METAL, WALL,
 SIGN, BARK, FOLIAGE, CAR_BODY, CAR_GLASS, CAR_TRIM, LAMP, CAR_CABIN) = range(20)
MATERIAL_NAMES = (
    'asphalt', 'paint', 'paint_yellow', 'curb', 'paving', 'grass', 'soil', 'facade', 'window',
    'roof', 'metal', 'wall', 'sign', 'bark', 'foliage', 'car_body', 'car_glass', 'car_trim',
    'lamp', 'car_cabin',
)
# Diffuse reflectivity at the LiDAR's 905 nm: paint and signs are retro-reflective, plants
# are bright in the near infrared, glass and dark trim return little.
REFLECTIVITY = np.array([
    0.10, 0.60, 0.50, 0.30, 0.25, 0.42, 0.22, 0.30, 0.05, 0.14, 0.35, 0.28,
    0.95, 0.30, 0.45, 0.26, 0.05, 0.06, 0.40, 0.05,
])
# Mirror-like reflectance (fraction of the environment reflected) for the camera.
SPECULAR = np.zeros(len(MATERIAL_NAMES))
SPECULAR[[WINDOW, CAR_GLASS]] = 0.1
SPECULAR[CAR_BODY] = 0.06


@dataclass
class GroundPalette:
    """Linear RGB albedos of the ground materials, <np.float64: 3> each."""

    asphalt: np.ndarray
    paving: np.ndarray
    curb: np.ndarray
    grass: np.ndarray
    soil: np.ndarray
    paint: np.ndarray
    paint_yellow: np.ndarray


def srgb_to_linear(srgb) -> np.ndarray:
    """Convert sRGB values in [0, 1] to linear, same shape."""
    srgb = np.asarray(srgb, dtype=np.float64)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear) -> np.ndarray:
    """Convert linear values (clipped to [0, 1]) to sRGB, same shape."""
    linear = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92,
                    1.055 * linear ** (1.0 / 2.4) - 0.055)


def _face_coordinates(local, half):
    """
    On a box face: its axis, coordinate along it, its length and height above the base.

    local, half: <np.float64: M, 3> point in the box frame and box half extents, metres
    returns:     <np.int64: M> axis, and <np.float64: M> along, length, height (metres)
    """
    axis = np.argmax(np.abs(local) / np.maximum(half, 1e-9), axis=1)
    along = np.where(axis == 0, local[:, 1] + half[:, 1], local[:, 0] + half[:, 0])
    length = np.where(axis == 0, 2 * half[:, 1], 2 * half[:, 0])
    return axis, along, length, local[:, 2] + half[:, 2]


def window_cells(local, half, style):
    """
    Window grid of facades: whether each point is on a window, and the window's cell ids.

    local, half: <np.float64: M, 3> hit point in the box frame and box half extents
    style:       <np.float64: M, 4> floor height, window width, window spacing, window
                 height as a fraction of the floor
    returns:     <np.bool_: M> on a window, <np.int64: M, 3> (face axis, column, floor)
    """
    axis, along, length, height = _face_coordinates(local, half)
    floor_h, win_w, spacing, win_frac = style.T
    # Centre the columns on the face so that both ends get the same margin.
    n_cols = np.maximum(np.floor((length - 1.0) / spacing), 1.0)
    margin = 0.5 * (length - n_cols * spacing)
    column = np.floor((along - margin) / spacing)
    in_col = np.abs(np.mod(along - margin, spacing) - 0.5 * spacing) < 0.5 * win_w
    floor = np.floor(height / floor_h)
    in_row = np.abs(np.mod(height, floor_h) - 0.55 * floor_h) < 0.5 * win_frac * floor_h
    on_window = (axis != 2) & in_col & in_row & (column >= 0) & (column < n_cols) & (
        height > 0.6) & (height < 2 * half[:, 2] - 0.6)
    cells = np.stack([axis, column, floor], axis=1).astype(np.int64)
    return on_window, cells


def refine_materials(material, primitive, local, primitives) -> np.ndarray:
    """
    Material at each hit point from the solid's base material and the local hit point.

    material:  <np.int64: N> base material of each hit; primitive: <np.int64: N> solid row
    local:     <np.float64: N, 3> hit point in the solid's frame; primitives: the solids
    returns:   <np.int64: N> refined material ids
    """
    material = material.copy()
    rows = np.flatnonzero(primitive >= 0)
    prim = primitive[rows]
    half = primitives.size[prim]
    loc = local[rows]
    top = loc[:, 2] > half[:, 2] - 1e-6
    base = material[rows]
    out = base.copy()
    facade = base == FACADE
    on_window, _ = window_cells(loc[facade], half[facade], primitives.style[prim[facade]])
    out[facade] = np.where(top[facade], ROOF, np.where(on_window, WINDOW, FACADE))
    body = base == CAR_BODY
    height = loc[:, 2] + half[:, 2]
    wheel_offset = np.maximum(half[:, 0] - 0.85, 0.3)
    wheel_r = primitives.style[prim, 1]
    wheel = np.hypot(np.abs(loc[:, 0]) - wheel_offset, height - 0.2) < wheel_r
    side = np.abs(loc[:, 1]) > half[:, 1] - 1e-6
    out[body] = np.where((height[body] < 0.1) | (side[body] & wheel[body]), CAR_TRIM, CAR_BODY)
    cabin = base == CAR_CABIN
    # Cabin: glass except the roof, the pillars and a frame along the edges.
    frame = 0.07
    edge = ((np.abs(loc[:, 0]) > half[:, 0] - frame) & side) | (height < frame) | (
        height > 2 * half[:, 2] - frame)
    pillar = side & (np.abs(loc[:, 0]) < 0.06)
    out[cabin] = np.where(top[cabin] | edge[cabin] | pillar[cabin], CAR_BODY, CAR_GLASS)
    material[rows] = out
    return material


def lidar_reflectivity(material, point_world, seed: int = 0) -> np.ndarray:
    """
    Near-infrared reflectivity at hit points, with texture noise, <np.float64: N>.

    material: <np.int64: N> refined material ids (>= 0); point_world: <np.float64: N, 3>
    """
    variation = 0.8 + 0.4 * value_noise(point_world * 1.7, seed + 5)
    return REFLECTIVITY[material] * variation


def surface_albedo(material, primitive, point_world, local, primitives,
                   ground: GroundPalette, seed: int = 0) -> np.ndarray:
    """
    Procedural linear RGB albedo at hit points, <np.float64: N, 3>.

    material:    <np.int64: N> refined material ids (>= 0)
    primitive:   <np.int64: N> solid row, -1 for the ground
    point_world: <np.float64: N, 3>; local: <np.float64: N, 3> (street s, d, z on the ground)
    """
    count = material.shape[0]
    albedo = np.zeros((count, 3))
    colour = np.where((primitive >= 0)[:, None],
                      primitives.colour[np.maximum(primitive, 0)], 0.5)

    def rows_of(*ids):
        return np.flatnonzero(np.isin(material, ids))

    r = rows_of(ASPHALT)
    xy = point_world[r, :2]
    grain = 0.7 + 0.5 * fbm(xy / 4.0, 3, seed + 1) + 0.25 * (value_noise(xy * 9.0, seed + 2) - 0.5)
    patch = np.where(value_noise(xy / 11.0, seed + 3) > 0.72, 0.72, 1.0)
    albedo[r] = ground.asphalt * (grain * patch)[:, None]
    for paint_id, paint_colour in ((PAINT, ground.paint), (PAINT_YELLOW, ground.paint_yellow)):
        r = rows_of(paint_id)
        wear = 0.65 + 0.35 * value_noise(point_world[r, :2] * 3.0, seed + 4)
        albedo[r] = paint_colour * wear[:, None]
    r = rows_of(CURB)
    albedo[r] = ground.curb * (0.85 + 0.3 * value_noise(point_world[r] * 2.0, seed + 5))[:, None]
    r = rows_of(PAVING)
    tile = 0.45
    sd = local[r, :2] / tile
    # Running bond: every other row is shifted by half a tile.
    sd[:, 0] += 0.5 * (np.floor(sd[:, 1]) % 2)
    cell = np.floor(sd).astype(np.int64)
    frac = sd - np.floor(sd)
    grout = np.min(np.minimum(frac, 1.0 - frac), axis=1) < 0.06
    shade = 0.8 + 0.35 * hash_cells(cell, seed + 6) + 0.1 * value_noise(sd * 0.3, seed + 7)
    albedo[r] = ground.paving * np.where(grout, 0.55, shade)[:, None]
    r = rows_of(GRASS)
    xy = point_world[r, :2]
    lush = fbm(xy / 2.5, 3, seed + 8)
    blades = value_noise(xy * 14.0, seed + 9)
    dry = np.array([0.20, 0.17, 0.06])
    mix = np.clip((lush - 0.35) * 1.6, 0, 1)[:, None]
    albedo[r] = (mix * ground.grass + (1 - mix) * dry) * (0.65 + 0.6 * blades)[:, None]
    r = rows_of(SOIL)
    albedo[r] = ground.soil * (0.7 + 0.6 * fbm(point_world[r, :2] * 1.5, 2, seed + 10))[:, None]
    r = rows_of(FACADE, ROOF, WALL, METAL, LAMP, SIGN, CAR_BODY)
    albedo[r] = colour[r] * (0.85 + 0.3 * value_noise(point_world[r] * 1.3, seed + 11))[:, None]
    r = rows_of(ROOF)
    albedo[r] *= 0.55
    r = rows_of(FACADE)
    # Darker slab lines at each floor and weathering streaks running down.
    prim = primitive[r]
    height = local[r, 2] + primitives.size[prim, 2]
    slab = np.abs(np.mod(height, primitives.style[prim, 0])) < 0.25
    streak = 0.85 + 0.3 * value_noise(np.stack([point_world[r, 0] * 1.5, point_world[r, 1] * 1.5,
                                                point_world[r, 2] * 0.15], 1), seed + 12)
    albedo[r] *= (np.where(slab, 0.75, 1.0) * streak)[:, None]
    r = rows_of(WINDOW, CAR_GLASS)
    albedo[r] = np.array([0.025, 0.03, 0.038]) * (
        0.7 + 0.6 * value_noise(point_world[r] * 0.7, seed + 13))[:, None]
    r = rows_of(CAR_TRIM)
    albedo[r] = 0.02
    r = rows_of(BARK)
    albedo[r] = np.array([0.07, 0.045, 0.028]) * (
        0.6 + 0.8 * value_noise(point_world[r] * np.array([6.0, 6.0, 1.0]), seed + 14))[:, None]
    r = rows_of(FOLIAGE)
    p = point_world[r]
    leaves = fbm(p * 2.2, 3, seed + 15)
    holes = value_noise(p * 6.0, seed + 16)
    albedo[r] = colour[r] * (0.25 + 1.4 * leaves * (0.6 + 0.4 * holes))[:, None]
    return albedo
