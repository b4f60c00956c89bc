"""
Procedural street scenes: layout families, the seeded builder and the moving parts.

A scene is an endless street cut into blocks of `BLOCK_LENGTH` metres along s. Each block draws
its contents from its own random stream (seed, family, block), so a longer sequence adds blocks
without changing the ones before. Moving vehicles follow lanes at constant speed; the ego car
drives one lane at constant speed.
"""

import zlib
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from mmtta_ros.synth import materials as mat
from mmtta_ros.synth.raycast import BOX, CYLINDER, ELLIPSOID, Primitives
from mmtta_ros.synth.street import Centerline, CrossSection, StreetGround

VEHICLE, MANMADE, VEGETATION = 0, 4, 5  # class indices of CLASS_NAMES
BLOCK_LENGTH = 60.0
BEND_BLOCK_LENGTH = 150.0
EGO_START_S = 150.0  # metres of street behind the ego car at t = 0 (beyond LiDAR range)
SRGB = Tuple[float, float, float]


@dataclass(frozen=True)
class LayoutFamily:
    """Ranges a city's streets are drawn from; (lo, hi) pairs are uniform ranges (metres)."""

    name: str = 'city_a'
    lanes_per_direction: Tuple[int, ...] = (1, 1, 2)
    lane_width: Tuple[float, float] = (3.2, 3.6)
    parking_prob: float = 0.85
    parking_width: Tuple[float, float] = (2.1, 2.5)
    parked_fill: Tuple[float, float] = (0.4, 0.85)
    sidewalk_width: Tuple[float, float] = (2.0, 3.8)
    verge_prob: float = 0.35
    verge_width: Tuple[float, float] = (1.0, 2.5)
    paved_yard_prob: float = 0.35
    setback: Tuple[float, float] = (0.5, 7.0)
    building_prob: float = 0.75
    building_length: Tuple[float, float] = (8.0, 24.0)
    building_depth: Tuple[float, float] = (8.0, 16.0)
    building_height: Tuple[float, float] = (5.0, 18.0)
    tall_building_prob: float = 0.1
    tall_height: Tuple[float, float] = (22.0, 40.0)
    lot_gap: Tuple[float, float] = (0.0, 6.0)
    facade_srgb: Tuple[SRGB, ...] = (
        (0.55, 0.27, 0.20), (0.45, 0.33, 0.27), (0.78, 0.70, 0.56), (0.85, 0.84, 0.80),
        (0.55, 0.55, 0.55), (0.85, 0.78, 0.55), (0.32, 0.30, 0.30), (0.45, 0.50, 0.58))
    floor_height: Tuple[float, float] = (2.9, 3.6)
    window_width: Tuple[float, float] = (0.9, 1.6)
    window_gap: Tuple[float, float] = (0.8, 2.0)
    window_height_frac: Tuple[float, float] = (0.4, 0.6)
    tree_spacing: Tuple[float, float] = (7.0, 13.0)
    tree_prob: float = 0.7
    crown_radius: Tuple[float, float] = (1.5, 3.0)
    foliage_srgb: Tuple[SRGB, ...] = (
        (0.25, 0.42, 0.15), (0.20, 0.35, 0.12), (0.32, 0.45, 0.20), (0.30, 0.38, 0.10))
    bush_density: float = 0.08
    hedge_prob: float = 0.3
    wall_prob: float = 0.4
    wall_srgb: Tuple[SRGB, ...] = (
        (0.60, 0.60, 0.58), (0.50, 0.25, 0.18), (0.20, 0.20, 0.20), (0.45, 0.33, 0.20))
    pole_srgb: SRGB = (0.25, 0.30, 0.26)
    lamp_spacing: Tuple[float, float] = (24.0, 34.0)
    sign_prob: float = 0.5
    background_prob: float = 0.6
    traffic_gap: Tuple[float, float] = (12.0, 70.0)
    lead_vehicle_prob: float = 0.5
    left_hand_traffic: bool = False
    yellow_centre: bool = True
    asphalt_srgb: SRGB = (0.36, 0.36, 0.37)
    paving_srgb: SRGB = (0.62, 0.60, 0.56)
    curb_srgb: SRGB = (0.66, 0.65, 0.62)
    grass_srgb: SRGB = (0.30, 0.45, 0.16)
    soil_srgb: SRGB = (0.45, 0.36, 0.26)
    bend_prob: float = 0.6
    max_slope: float = 0.2
    ego_speed: Tuple[float, float] = (5.0, 10.0)


CAR_SRGB = np.array([
    (0.90, 0.90, 0.90), (0.08, 0.08, 0.09), (0.70, 0.71, 0.72), (0.45, 0.45, 0.46),
    (0.65, 0.08, 0.08), (0.10, 0.20, 0.55), (0.08, 0.10, 0.25), (0.15, 0.30, 0.20),
    (0.90, 0.75, 0.10), (0.70, 0.62, 0.50)])
CAR_WEIGHTS = np.array([0.2, 0.18, 0.16, 0.14, 0.08, 0.07, 0.05, 0.04, 0.04, 0.04])
SIGN_SRGB = np.array([(0.75, 0.08, 0.08), (0.08, 0.25, 0.65), (0.9, 0.9, 0.9), (0.1, 0.45, 0.2)])


@dataclass
class EgoMotion:
    """The ego car: constant speed along one lane of the street."""

    s0: float
    speed: float
    lane_offset: float

    def pose(self, centerline: Centerline, time_s: float) -> np.ndarray:
        """T_world_from_ego at `time_s` seconds, <np.float64: 4, 4> (x forward, z up)."""
        s = np.array([self.s0 + self.speed * time_s])
        xy, heading = centerline.to_world(s, np.array([self.lane_offset]))
        return pose_matrix(xy[0, 0], xy[0, 1], 0.0, heading[0])


@dataclass
class MovingVehicles:
    """
    Vehicles driving lanes at constant speed (negative: against +s), one row each.

    s0, speed, lane_offset: <np.float64: K> position at t = 0 (m), m/s, lateral offset (m)
    dims:   <np.float64: K, 6> length, width, body top, cabin top, cabin length, cabin shift
    colour: <np.float64: K, 3> linear RGB paint
    """

    s0: np.ndarray
    speed: np.ndarray
    lane_offset: np.ndarray
    dims: np.ndarray
    colour: np.ndarray

    def placed(self, centerline: Centerline, time_s: float):
        """World xy <np.float64: K, 2> and yaw <np.float64: K> (radians) at `time_s`."""
        xy, heading = centerline.to_world(self.s0 + self.speed * time_s, self.lane_offset)
        return xy, heading + np.where(self.speed < 0, np.pi, 0.0)

    def primitives(self, centerline: Centerline, time_s: float) -> Primitives:
        """Body and cabin boxes at `time_s`."""
        xy, yaw = self.placed(centerline, time_s)
        return vehicle_primitives(xy, yaw, self.dims, self.colour)

    def lights(self, centerline: Centerline, time_s: float):
        """
        Head and tail lights at `time_s`.

        returns: positions <np.float64: 4K, 3> (world), facing <np.float64: 4K, 3> (unit,
                 world), is_head <np.bool_: 4K>
        """
        xy, yaw = self.placed(centerline, time_s)
        forward = np.stack([np.cos(yaw), np.sin(yaw), np.zeros_like(yaw)], axis=1)
        left = np.stack([-np.sin(yaw), np.cos(yaw), np.zeros_like(yaw)], axis=1)
        base = np.concatenate([xy, np.full((xy.shape[0], 1), 0.7)], axis=1)
        half_len, half_wid = self.dims[:, 0:1] / 2, self.dims[:, 1:2] / 2 - 0.3
        positions, facing, is_head = [], [], []
        for along, head in ((1.0, True), (-1.0, False)):
            for side in (1.0, -1.0):
                positions.append(base + along * half_len * forward + side * half_wid * left)
                facing.append(along * forward)
                is_head.append(np.full(xy.shape[0], head))
        return np.concatenate(positions), np.concatenate(facing), np.concatenate(is_head)


@dataclass
class Scene:
    """
    A built street: static solids, moving vehicles, lamps, ground and the ego motion.

    lamp_heads: <np.float64: L, 3> world positions of street-lamp light sources
    """

    name: str
    seed: int
    centerline: Centerline
    ground: StreetGround
    static: Primitives
    vehicles: MovingVehicles
    lamp_heads: np.ndarray
    palette: mat.GroundPalette
    ego: EgoMotion

    def primitives_at(self, time_s: float) -> Primitives:
        """All solids at `time_s` seconds (static ones and vehicles where they are then)."""
        return Primitives.concatenate([self.static,
                                       self.vehicles.primitives(self.centerline, time_s)])

    def ego_pose(self, time_s: float) -> np.ndarray:
        """T_world_from_ego at `time_s` seconds, <np.float64: 4, 4>."""
        return self.ego.pose(self.centerline, time_s)


def pose_matrix(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """Homogeneous transform of a yaw rotation then a translation, <np.float64: 4, 4>."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0, x], [s, c, 0.0, y], [0.0, 0.0, 1.0, z], [0.0, 0.0, 0.0, 1.0]])


def vehicle_primitives(xy, yaw, dims, colour) -> Primitives:
    """
    Body and cabin boxes of vehicles standing on the road.

    xy: <np.float64: K, 2> centre, metres; yaw: <np.float64: K> radians
    dims: <np.float64: K, 6> length, width, body top, cabin top, cabin length, cabin shift
    colour: <np.float64: K, 3> linear RGB paint
    """
    length, width, body_top, cabin_top, cabin_len, shift = dims.T
    clearance = 0.12
    body_center = np.concatenate([xy, ((clearance + body_top) / 2)[:, None]], axis=1)
    body = Primitives.build(
        BOX, body_center, np.stack([length / 2, width / 2, (body_top - clearance) / 2], 1),
        VEHICLE, mat.CAR_BODY, yaw=yaw, colour=colour,
        style=np.stack([length, np.minimum(0.33, 0.08 * length + 0.05),
                        np.zeros_like(length), np.zeros_like(length)], 1))
    cabin_xy = xy + shift[:, None] * np.stack([np.cos(yaw), np.sin(yaw)], axis=1)
    cabin_center = np.concatenate([cabin_xy, ((body_top + cabin_top) / 2)[:, None]], axis=1)
    cabin = Primitives.build(
        BOX, cabin_center, np.stack([cabin_len / 2, width / 2 - 0.06, (cabin_top - body_top) / 2],
                                    1),
        VEHICLE, mat.CAR_CABIN, yaw=yaw, colour=colour)
    return Primitives.concatenate([body, cabin])


def sample_vehicle_dims(rng: np.random.Generator, count: int, allow_large: bool = True):
    """
    Dimensions and paint of `count` vehicles (cars, vans, now and then a bus).

    returns: <np.float64: count, 6> dims (see `vehicle_primitives`), <np.float64: count, 3>
    """
    kind = rng.choice(3, size=count, p=(0.72, 0.22, 0.06) if allow_large else (0.75, 0.25, 0.0))
    u = rng.random((count, 5))
    car = np.stack([4.2 + 0.6 * u[:, 0], 1.75 + 0.15 * u[:, 1], 0.95 + 0.1 * u[:, 2],
                    1.40 + 0.15 * u[:, 3], 0.5 + 0.1 * u[:, 4], -0.05 + 0 * u[:, 0]], 1)
    van = np.stack([4.6 + 0.6 * u[:, 0], 1.9 + 0.1 * u[:, 1], 1.05 + 0.1 * u[:, 2],
                    1.75 + 0.25 * u[:, 3], 0.65 + 0.1 * u[:, 4], -0.1 + 0 * u[:, 0]], 1)
    bus = np.stack([9.0 + 3.0 * u[:, 0], 2.5 + 0 * u[:, 1], 1.1 + 0 * u[:, 2],
                    3.0 + 0.2 * u[:, 3], 0.95 + 0 * u[:, 4], 0 * u[:, 0]], 1)
    dims = np.select([(kind == 0)[:, None], (kind == 1)[:, None]], [car, van], bus)
    dims[:, 4] *= dims[:, 0]
    dims[:, 5] *= dims[:, 0]
    paint = CAR_SRGB[rng.choice(len(CAR_SRGB), size=count, p=CAR_WEIGHTS)]
    paint = np.clip(paint * rng.uniform(0.9, 1.1, (count, 1)), 0, 1)
    return dims, mat.srgb_to_linear(paint)


def _stream(seed: int, family: LayoutFamily, *keys: int) -> np.random.Generator:
    """Independent random stream for (seed, family, keys): stable across runs and Pythons."""
    return np.random.default_rng([seed, zlib.crc32(family.name.encode()), *keys])


def _uniform(rng: np.random.Generator, bounds: Tuple[float, float], size=None):
    return rng.uniform(bounds[0], bounds[1], size)


def _pick_colour(rng, choices, jitter: float = 0.08) -> np.ndarray:
    srgb = np.asarray(choices[rng.integers(len(choices))], dtype=np.float64)
    return mat.srgb_to_linear(np.clip(srgb * rng.uniform(1 - jitter, 1 + jitter, 3), 0, 1))


class _BlockBuilder:
    """Collects the solids of one block of street, in street coordinates."""

    def __init__(self, centerline: Centerline, section: CrossSection):
        self.centerline = centerline
        self.section = section
        self.parts: List[Primitives] = []

    def place(self, s, d, z_center, kind, size, label, material, colour, style=(0, 0, 0, 0),
              yaw_offset=0.0):
        """Add one solid at street coordinates (s, d), yawed with the street."""
        xy, heading = self.centerline.to_world(np.array([s]), np.array([d]))
        self.parts.append(Primitives.build(
            kind, [[xy[0, 0], xy[0, 1], z_center]], size, label, material,
            yaw=heading[0] + yaw_offset, colour=colour, style=style))

    def tree(self, rng, family: LayoutFamily, s, d, scale: float = 1.0):
        """Trunk and crown of a tree standing at (s, d)."""
        crown = _uniform(rng, family.crown_radius) * scale
        trunk_h = rng.uniform(1.8, 3.2) * scale
        trunk_r = 0.1 + 0.05 * crown
        self.place(s, d, 0.15 + trunk_h / 2, CYLINDER, (trunk_r, trunk_r, trunk_h / 2),
                   VEGETATION, mat.BARK, (0.05, 0.04, 0.03))
        radii = (crown * rng.uniform(0.85, 1.15), crown * rng.uniform(0.85, 1.15),
                 crown * rng.uniform(0.9, 1.4))
        self.place(s, d, 0.15 + trunk_h + 0.75 * radii[2], ELLIPSOID, radii, VEGETATION,
                   mat.FOLIAGE, _pick_colour(rng, family.foliage_srgb, 0.15),
                   yaw_offset=rng.uniform(0, np.pi))

    def bush(self, rng, family: LayoutFamily, s, d):
        """Add a bush on the ground at (s, d)."""
        radii = (rng.uniform(0.5, 1.3), rng.uniform(0.5, 1.3), rng.uniform(0.4, 1.0))
        self.place(s, d, 0.15 + 0.5 * radii[2], ELLIPSOID, radii, VEGETATION, mat.FOLIAGE,
                   _pick_colour(rng, family.foliage_srgb, 0.2), yaw_offset=rng.uniform(0, np.pi))

    def building(self, rng, family: LayoutFamily, s, side, d_front, length):
        """Add a building with its front at |d| = d_front, `length` metres along the street."""
        depth = _uniform(rng, family.building_depth)
        height = _uniform(rng, family.tall_height if rng.random() < family.tall_building_prob
                          else family.building_height)
        floor_h = _uniform(rng, family.floor_height)
        height = max(floor_h * 1.5, np.round(height / floor_h) * floor_h + rng.uniform(0, 1.0))
        win_w = _uniform(rng, family.window_width)
        style = (floor_h, win_w, win_w + _uniform(rng, family.window_gap),
                 _uniform(rng, family.window_height_frac))
        colour = _pick_colour(rng, family.facade_srgb)
        self.place(s, side * (d_front + depth / 2), height / 2, BOX,
                   (length / 2, depth / 2, height / 2), MANMADE, mat.FACADE, colour, style)
        if rng.random() < 0.3:
            # Rooftop structure (plant room, stair tower).
            w = rng.uniform(2, 5)
            self.place(s + rng.uniform(-1, 1) * (length / 2 - w), side * (d_front + depth / 2),
                       height + 1.2, BOX, (w / 2, min(w, depth) / 2 - 0.1, 1.2), MANMADE,
                       mat.WALL, colour * 0.8)
        return depth


def _block(family, centerline, section, block, seed, lamp_phase, lamp_spacing):
    """Build the static solids and lamp heads of one block, its parked cars included."""
    rng = _stream(seed, family, 1, block)
    b0, b1 = block * BLOCK_LENGTH, (block + 1) * BLOCK_LENGTH
    builder = _BlockBuilder(centerline, section)
    half = section.road_half_width
    lamp_heads = []
    for column, side in ((0, -1.0), (1, 1.0)):
        verge = section.verge[block, column]
        walk_end = verge + section.sidewalk[block, column]
        paved = section.paved[block, column]
        setback = _uniform(rng, family.setback)
        d_front = half + walk_end + setback
        # Lamp posts, staggered between the two sides, near the curb.
        offset = lamp_phase + (0.5 * lamp_spacing if side > 0 else 0.0)
        first = np.ceil((b0 - offset) / lamp_spacing)
        lamp_s = offset + lamp_spacing * np.arange(first, np.ceil((b1 - offset) / lamp_spacing))
        pole_h = rng.uniform(7.0, 8.5)
        for s in lamp_s:
            d = side * (half + 0.45)
            builder.place(s, d, pole_h / 2, CYLINDER, (0.09, 0.09, pole_h / 2), MANMADE,
                          mat.METAL, mat.srgb_to_linear(family.pole_srgb))
            builder.place(s, d - side * 0.8, pole_h, BOX, (0.05, 0.8, 0.04), MANMADE, mat.METAL,
                          mat.srgb_to_linear(family.pole_srgb))
            builder.place(s, d - side * 1.55, pole_h - 0.08, BOX, (0.3, 0.18, 0.08), MANMADE,
                          mat.LAMP, (0.5, 0.5, 0.48))
            xy, _ = centerline.to_world(np.array([s]), np.array([d - side * 1.55]))
            lamp_heads.append([xy[0, 0], xy[0, 1], pole_h - 0.2])
        # Street trees on the verge or in sidewalk tree pits, clear of the lamp posts.
        spacing = _uniform(rng, family.tree_spacing)
        tree_out = verge / 2 if verge > 0.8 else verge + 0.8
        prob = family.tree_prob if verge > 0.8 else 0.5 * family.tree_prob
        for s in np.arange(b0 + rng.uniform(0, spacing), b1, spacing):
            if rng.random() < prob and np.all(np.abs(lamp_s - s) > 2.5):
                builder.tree(rng, family, s + rng.uniform(-1, 1), side * (half + tree_out))
        if rng.random() < family.sign_prob:
            s = rng.uniform(b0 + 2, b1 - 2)
            if np.all(np.abs(lamp_s - s) > 1.5):
                d = side * (half + verge + 0.35)
                builder.place(s, d, 1.3, CYLINDER, (0.04, 0.04, 1.3), MANMADE, mat.METAL,
                              (0.3, 0.3, 0.3))
                colour = mat.srgb_to_linear(SIGN_SRGB[rng.integers(len(SIGN_SRGB))])
                builder.place(s, d, 2.3, BOX, (0.02, 0.35, 0.35), MANMADE, mat.SIGN, colour)
        for _ in range(rng.poisson(0.8)):
            # Bins, bollards, utility boxes on the outer edge of the sidewalk.
            size = (rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.5), rng.uniform(0.4, 0.7))
            builder.place(rng.uniform(b0, b1), side * (half + walk_end - 0.5), 0.15 + size[2],
                          BOX, size, MANMADE, mat.WALL, _pick_colour(rng, family.wall_srgb))
        # Lots along the block: buildings, gardens, walls.
        s = b0 + rng.uniform(0, 3)
        while s < b1 - 4:
            length = min(_uniform(rng, family.building_length), b1 - s)
            if length < 4:
                break
            mid = s + length / 2
            if rng.random() < family.building_prob:
                depth = builder.building(rng, family, mid, side, d_front, length)
                if rng.random() < family.background_prob:
                    back = d_front + depth + rng.uniform(3, 15)
                    builder.building(rng, family, mid + rng.uniform(-4, 4), side, back,
                                     length * rng.uniform(0.8, 1.4))
                if not paved and setback > 2.0:
                    if rng.random() < family.hedge_prob:
                        height = rng.uniform(0.8, 1.6)
                        builder.place(mid, side * (half + walk_end + 0.5), 0.15 + height / 2,
                                      BOX, (length / 2 - 0.5, 0.4, height / 2), VEGETATION,
                                      mat.FOLIAGE, _pick_colour(rng, family.foliage_srgb, 0.15))
                    for _ in range(rng.poisson(family.bush_density * length)):
                        builder.bush(rng, family, rng.uniform(s, s + length),
                                     side * (half + walk_end + rng.uniform(1.0, setback - 0.5)))
            else:
                if rng.random() < family.wall_prob:
                    height = rng.uniform(1.0, 2.4)
                    builder.place(mid, side * (half + walk_end + 0.2), 0.15 + height / 2, BOX,
                                  (length / 2, 0.12, height / 2), MANMADE, mat.WALL,
                                  _pick_colour(rng, family.wall_srgb))
                for _ in range(rng.integers(1, 4)):
                    builder.tree(rng, family, rng.uniform(s + 1, s + length - 1),
                                 side * (d_front + rng.uniform(0, 12)), scale=rng.uniform(1, 1.4))
                for _ in range(rng.poisson(2 * family.bush_density * length)):
                    builder.bush(rng, family, rng.uniform(s, s + length),
                                 side * (half + walk_end + rng.uniform(1.0, setback + 6)))
            s += length + _uniform(rng, family.lot_gap)
    parked = _parked_cars(rng, family, centerline, section, block)
    return Primitives.concatenate(builder.parts + [parked]), lamp_heads


def _parked_cars(rng, family, centerline, section, block) -> Primitives:
    """Cars parked along both curbs of one block (none near a zebra crossing)."""
    if section.parking_width < 0.5:
        return Primitives.empty()
    b0, b1 = block * BLOCK_LENGTH, (block + 1) * BLOCK_LENGTH
    fill = _uniform(rng, family.parked_fill)
    parts = []
    for side in (-1.0, 1.0):
        slots = np.arange(b0 + rng.uniform(0, 3), b1 - 3, 6.0)
        count = slots.size
        dims, colour = sample_vehicle_dims(rng, count, allow_large=False)
        s = slots + rng.uniform(-0.6, 0.6, count)
        keep = (rng.random(count) < fill) & ~(np.abs(s - section.crosswalk[block]) < 8.0)
        d = side * (section.road_half_width - section.parking_width / 2 + rng.uniform(
            -0.15, 0.15, count))
        xy, heading = centerline.to_world(s[keep], d[keep])
        # Parked cars face the traffic of their side of the street.
        faces_back = (side > 0) != family.left_hand_traffic
        yaw = heading + (np.pi if faces_back else 0.0) + rng.normal(0, 0.02, keep.sum())
        parts.append(vehicle_primitives(xy, yaw, dims[keep], colour[keep]))
    return Primitives.concatenate(parts)


def _centerline(family: LayoutFamily, seed: int, s_end: float) -> Centerline:
    """S-bends, at most one per bend block, each inside its block (so slopes never add up)."""
    start, length, offset = [], [], []
    for k in range(int(np.ceil(s_end / BEND_BLOCK_LENGTH)) + 1):
        rng = _stream(seed, family, 2, k)
        if k == 0 or rng.random() >= family.bend_prob:
            continue
        bend_len = rng.uniform(50.0, 120.0)
        start.append(k * BEND_BLOCK_LENGTH + rng.uniform(0, BEND_BLOCK_LENGTH - bend_len))
        length.append(bend_len)
        # smoothstep's steepest slope is 1.5 * offset / length.
        offset.append(rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * family.max_slope
                      * bend_len / 1.5)
    return Centerline(np.array(start), np.array(length), np.array(offset))


def _cross_section(family: LayoutFamily, seed: int, n_blocks: int) -> CrossSection:
    """Street-wide widths from the scene stream, band widths per block from block streams."""
    rng = _stream(seed, family, 0)
    lanes = int(rng.choice(family.lanes_per_direction))
    lane_width = _uniform(rng, family.lane_width)
    parking = _uniform(rng, family.parking_width) if rng.random() < family.parking_prob else 0.0
    verge = np.zeros((n_blocks, 2))
    sidewalk = np.zeros((n_blocks, 2))
    paved = np.zeros((n_blocks, 2), dtype=bool)
    crosswalk = np.full(n_blocks, np.nan)
    for block in range(n_blocks):
        block_rng = _stream(seed, family, 3, block)
        has_verge = block_rng.random(2) < family.verge_prob
        verge[block] = np.where(has_verge, _uniform(block_rng, family.verge_width, 2), 0.0)
        sidewalk[block] = _uniform(block_rng, family.sidewalk_width, 2)
        paved[block] = block_rng.random(2) < family.paved_yard_prob
        if block_rng.random() < 0.25:
            crosswalk[block] = (block + block_rng.uniform(0.3, 0.7)) * BLOCK_LENGTH
    return CrossSection(
        road_half_width=lanes * lane_width + parking, lane_width=lane_width,
        lanes_per_direction=lanes, parking_width=parking, block_length=BLOCK_LENGTH,
        verge=verge, sidewalk=sidewalk, paved=paved, crosswalk=crosswalk,
        yellow_centre=family.yellow_centre)


def _traffic(family, seed, section, ego: EgoMotion, ego_lane: int, s_end: float):
    """Vehicles in every lane but the ego's, plus maybe a lead car at the ego's speed."""
    rng = _stream(seed, family, 4)
    right_hand = -1.0 if not family.left_hand_traffic else 1.0
    rows = []
    for direction in (1.0, -1.0):
        side = right_hand * direction
        for lane in range(section.lanes_per_direction):
            if direction > 0 and lane == ego_lane:
                continue
            speed = direction * (rng.uniform(7.0, 13.0) if direction < 0 else
                                 ego.speed + rng.uniform(-3.0, 3.0))
            for block in range(int(np.ceil(s_end / BLOCK_LENGTH))):
                lane_rng = _stream(seed, family, 5, block, lane, int(direction > 0))
                s = block * BLOCK_LENGTH + _uniform(lane_rng, family.traffic_gap)
                while s < (block + 1) * BLOCK_LENGTH:
                    rows.append((s, speed, side * section.lane_width * (lane + 0.5)))
                    s += 6.0 + _uniform(lane_rng, family.traffic_gap)
    if rng.random() < family.lead_vehicle_prob:
        rows.append((ego.s0 + rng.uniform(15.0, 35.0), ego.speed, ego.lane_offset))
    rows = np.array(rows, dtype=np.float64).reshape(-1, 3)
    dims, colour = sample_vehicle_dims(rng, rows.shape[0])
    return MovingVehicles(s0=rows[:, 0], speed=rows[:, 1], lane_offset=rows[:, 2], dims=dims,
                          colour=colour)


def build_scene(family: LayoutFamily, seed: int, duration_s: float) -> Scene:
    """Street scene for a drive of `duration_s` seconds, deterministic in (family, seed)."""
    rng = _stream(seed, family, 6)
    speed = _uniform(rng, family.ego_speed)
    # Enough street ahead for the camera's view at the end and for oncoming traffic to arrive.
    s_end = EGO_START_S + speed * duration_s + 300.0 + 13.0 * duration_s
    n_blocks = int(np.ceil(s_end / BLOCK_LENGTH))
    section = _cross_section(family, seed, n_blocks)
    ego_lane = int(rng.integers(section.lanes_per_direction))
    side = -1.0 if not family.left_hand_traffic else 1.0
    ego = EgoMotion(s0=EGO_START_S, speed=speed,
                    lane_offset=side * section.lane_width * (ego_lane + 0.5))
    centerline = _centerline(family, seed, s_end)
    lamp_spacing = _uniform(rng, family.lamp_spacing)
    lamp_phase = rng.uniform(0, lamp_spacing)
    parts, lamp_heads = [], []
    for block in range(n_blocks):
        solids, lamps = _block(family, centerline, section, block, seed, lamp_phase,
                               lamp_spacing)
        parts.append(solids)
        lamp_heads.extend(lamps)
    palette = mat.GroundPalette(
        asphalt=mat.srgb_to_linear(family.asphalt_srgb) * rng.uniform(0.85, 1.15),
        paving=mat.srgb_to_linear(family.paving_srgb) * rng.uniform(0.85, 1.15),
        curb=mat.srgb_to_linear(family.curb_srgb),
        grass=mat.srgb_to_linear(family.grass_srgb) * rng.uniform(0.8, 1.2),
        soil=mat.srgb_to_linear(family.soil_srgb),
        paint=mat.srgb_to_linear((0.88, 0.88, 0.86)),
        paint_yellow=mat.srgb_to_linear((0.92, 0.72, 0.15)))
    return Scene(
        name=family.name, seed=seed, centerline=centerline,
        ground=StreetGround(centerline=centerline, section=section, seed=seed),
        static=Primitives.concatenate(parts),
        vehicles=_traffic(family, seed, section, ego, ego_lane, s_end),
        lamp_heads=np.array(lamp_heads, dtype=np.float64).reshape(-1, 3),
        palette=palette, ego=ego)
