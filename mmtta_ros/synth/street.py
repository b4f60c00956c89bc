"""
The street: its centre line, its cross-section bands and the ground surface ray casting sees.

Street coordinates are (s, d): s is the centre line's x parameter (close to the distance
driven, since the bends are gentle) and d the signed lateral offset, positive to the left of
the driving direction +x. The ground is flat: the carriageway at z = 0, everything beside it
raised by a curb to z = `curb_height`.
"""

from dataclasses import dataclass

import numpy as np

from mmtta_ros.synth import materials as mat
from mmtta_ros.synth.noise import value_noise
from mmtta_ros.synth.raycast import RayHits

DRIVEABLE, SIDEWALK, TERRAIN = 1, 2, 3  # class indices of CLASS_NAMES


@dataclass
class Centerline:
    """
    Street centre line y = sum_k offset_k * smoothstep((x - start_k) / length_k).

    Between bends the street is straight; each bend is a smooth lateral shift (an S-curve).
    start, length, offset: <np.float64: B> metres, sorted by start, bends not overlapping
    """

    start: np.ndarray
    length: np.ndarray
    offset: np.ndarray

    def lateral(self, s: np.ndarray):
        """
        Centre line y and slope dy/dx at parameters s, two <np.float64: N>.

        Bends never overlap, so only the last bend starting before s is partly done; every
        earlier one contributes its whole offset.
        """
        s = np.asarray(s, dtype=np.float64)
        if self.start.size == 0:
            return np.zeros_like(s), np.zeros_like(s)
        done_before = np.concatenate([[0.0], np.cumsum(self.offset)])
        k = np.searchsorted(self.start, s, side='right') - 1
        active = np.maximum(k, 0)
        u = np.clip((s - self.start[active]) / self.length[active], 0.0, 1.0)
        u = np.where(k >= 0, u, 0.0)
        y = done_before[active] + self.offset[active] * u * u * (3.0 - 2.0 * u)
        slope = self.offset[active] * 6.0 * u * (1.0 - u) / self.length[active]
        return y, slope

    def to_world(self, s: np.ndarray, d: np.ndarray):
        """
        World xy and heading (radians) of street coordinates.

        s, d: <np.float64: N> metres; returns <np.float64: N, 2> and <np.float64: N>
        """
        s = np.asarray(s, dtype=np.float64)
        y, slope = self.lateral(s)
        inv = 1.0 / np.sqrt(1.0 + slope * slope)
        xy = np.stack([s - d * slope * inv, y + d * inv], axis=1)
        return xy, np.arctan(slope)

    def to_street(self, xy: np.ndarray):
        """
        Street coordinates (s, d) of world points (one Gauss-Newton step to the foot point).

        xy: <np.float64: N, 2> metres; returns two <np.float64: N>
        """
        s = xy[:, 0]
        y, slope = self.lateral(s)
        s = s + ((xy[:, 1] - y) * slope) / (1.0 + slope * slope)
        y, slope = self.lateral(s)
        inv = 1.0 / np.sqrt(1.0 + slope * slope)
        d = (xy[:, 1] - y) * inv - (xy[:, 0] - s) * slope * inv
        return s, d


@dataclass
class CrossSection:
    """
    Widths of the street's bands, constant within blocks of `block_length` metres of s.

    Per block and side (column 0: right, d < 0; column 1: left, d > 0):
    verge:    <np.float64: B, 2> grass strip between curb and sidewalk (0 for none)
    sidewalk: <np.float64: B, 2> sidewalk width
    paved:    <np.bool_: B, 2> yard beyond the sidewalk is paved (sidewalk) rather than terrain
    crosswalk:<np.float64: B> s of a zebra crossing in the block (NaN for none)
    """

    road_half_width: float
    lane_width: float
    lanes_per_direction: int
    parking_width: float
    block_length: float
    verge: np.ndarray
    sidewalk: np.ndarray
    paved: np.ndarray
    crosswalk: np.ndarray
    yellow_centre: bool = False

    def block_side(self, s: np.ndarray, d: np.ndarray):
        """Block row and side column of street points, two <np.int64: N>."""
        block = np.clip((s // self.block_length).astype(np.int64), 0, self.verge.shape[0] - 1)
        return block, (d > 0).astype(np.int64)

    def raised_surface(self, s: np.ndarray, d: np.ndarray, seed: int):
        """
        Class and material of the raised ground (beside the carriageway), two <np.int64: N>.

        s, d: <np.float64: N> street coordinates with |d| >= road_half_width
        """
        block, side = self.block_side(s, d)
        outward = np.abs(d) - self.road_half_width
        verge = self.verge[block, side]
        walk_end = verge + self.sidewalk[block, side]
        is_walk = ((outward >= verge) & (outward < walk_end)) | (
            (outward >= walk_end) & self.paved[block, side] & (outward < walk_end + 25.0))
        label = np.where(is_walk, SIDEWALK, TERRAIN)
        # Bare soil patches in the grass, the same for both sensors.
        soil = value_noise(np.stack([s / 7.0, d / 7.0], axis=1), seed + 11) > 0.68
        material = np.where(is_walk, mat.PAVING, np.where(soil, mat.SOIL, mat.GRASS))
        return label.astype(np.int64), material.astype(np.int64)

    def road_material(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        """
        Material of the carriageway: asphalt or lane-marking paint, <np.int64: N>.

        s, d: <np.float64: N> street coordinates with |d| < road_half_width
        """
        half_line = 0.075
        travel_half = self.lanes_per_direction * self.lane_width
        dist = np.abs(d)
        dashed = np.mod(s, 9.0) < 3.0
        # Lane separators between same-direction lanes (dashed).
        k = np.round(dist / self.lane_width)
        separator = (k >= 1) & (k < self.lanes_per_direction) & (
            np.abs(dist - k * self.lane_width) < half_line) & dashed
        # Edge line between travel lane and parking lane / curb (solid).
        edge = np.abs(dist - travel_half) < half_line
        if self.parking_width < 0.5:
            edge = np.abs(dist - (self.road_half_width - 0.3)) < half_line
        if self.yellow_centre:
            centre = np.abs(dist - 0.12) < half_line
        else:
            centre = (dist < half_line) & dashed
        block, _ = self.block_side(s, d)
        cross_s = self.crosswalk[block]
        zebra = (np.abs(s - cross_s) < 2.0) & (np.mod(d, 1.2) < 0.6) & (dist < travel_half)
        white = separator | edge | zebra | (centre & (not self.yellow_centre))
        yellow = centre & self.yellow_centre
        return np.select([yellow, white], [mat.PAINT_YELLOW, mat.PAINT], mat.ASPHALT)


class StreetGround:
    """Ground of the street for the ray caster: carriageway, curbs, sidewalks, verges, yards."""

    def __init__(self, *, centerline: Centerline, section: CrossSection,
                 curb_height: float = 0.15, seed: int = 0):
        """Ground from a centre line and cross-section; curb height in metres."""
        self.centerline = centerline
        self.section = section
        self.curb_height = float(curb_height)
        self.seed = int(seed)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray,
                  max_distance: float = np.inf) -> RayHits:
        """
        First ground hit of rays coming down from above the curb.

        A ray that meets the raised level over the carriageway but the road level beside it
        crossed the curb face in between; that point is interpolated along the lateral offset.
        origins: <np.float64: N, 3> world frame; dirs: <np.float64: N, 3> unit directions
        """
        hits = RayHits.misses(dirs.shape[0])
        half = self.section.road_half_width
        down = np.flatnonzero((dirs[:, 2] < -1e-9) & (origins[:, 2] > self.curb_height))
        o, d = origins[down], dirs[down]
        t_high = (self.curb_height - o[:, 2]) / d[:, 2]
        s_high, d_high = self.centerline.to_street(o[:, :2] + t_high[:, None] * d[:, :2])
        over_road = np.abs(d_high) < half
        t_low = -o[:, 2] / d[:, 2]
        s_low, d_low = s_high.copy(), d_high.copy()
        rows = np.flatnonzero(over_road)
        s_low[rows], d_low[rows] = self.centerline.to_street(
            o[rows, :2] + t_low[rows, None] * d[rows, :2])
        on_road = over_road & (np.abs(d_low) < half)
        on_curb = over_road & ~on_road
        frac = np.clip((half - np.abs(d_high)) /
                       np.maximum(np.abs(d_low) - np.abs(d_high), 1e-9), 0.0, 1.0)
        t = np.select([on_road, on_curb], [t_low, t_high + frac * (t_low - t_high)], t_high)
        point = o + t[:, None] * d
        s, lateral = self.centerline.to_street(point[:, :2])
        lateral = np.where(on_curb, np.sign(d_low) * (half + 1e-6), lateral)
        label = np.full(down.size, DRIVEABLE, dtype=np.int64)
        material = np.zeros(down.size, dtype=np.int64)
        road = np.flatnonzero(on_road)
        material[road] = self.section.road_material(s[road], lateral[road])
        raised = np.flatnonzero(~on_road)
        label[raised], material[raised] = self.section.raised_surface(
            s[raised], lateral[raised], self.seed)
        material[on_curb] = mat.CURB
        normal = np.zeros((down.size, 3))
        normal[:, 2] = 1.0
        # Curb face: horizontal, facing the carriageway, across the centre line's direction.
        _, slope = self.centerline.lateral(s[on_curb])
        inv = 1.0 / np.sqrt(1.0 + slope * slope)
        side = np.sign(d_low[on_curb])
        normal[on_curb] = np.stack([side * slope * inv, -side * inv, np.zeros_like(inv)], 1)
        ok = t <= max_distance
        rows = down[ok]
        hits.distance[rows] = t[ok]
        hits.point[rows] = point[ok]
        hits.normal[rows] = normal[ok]
        hits.label[rows] = label[ok]
        hits.material[rows] = material[ok]
        hits.local[rows] = np.stack([s, lateral, point[:, 2]], axis=1)[ok]
        return hits
