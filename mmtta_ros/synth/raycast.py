"""
The one vectorised ray caster both synthetic sensors use: rays x analytic solids + ground.

Solids are yawed boxes, yawed ellipsoids (spheres included) and vertical cylinders, stored as
one struct of arrays (`Primitives`). The ground is any object with an `intersect` method that
returns `RayHits` (a flat `PlaneGround` here, the street surface in `street.py`).

Rays are never tested against every solid: a bundle of rays that share an origin (a LiDAR
sweep, a camera image) is binned on an azimuth x elevation grid, a bundle of parallel rays
(sun shadow rays) on a grid across the common direction, and each solid only meets the rays of
the cells its bounding sphere covers. Other bundles fall back to all pairs, in chunks.
"""

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from mmtta_ros.core.classes import IGNORE_INDEX

BOX, ELLIPSOID, CYLINDER = 0, 1, 2
NO_MATERIAL = -1
# Bound on candidate (ray, solid) pairs held at once; rays are processed in chunks below it.
_MAX_RAYS_PER_CHUNK = 131072


@dataclass
class Primitives:
    """
    Analytic solids in the world frame, one row each.

    kind:     <np.int64: P> BOX, ELLIPSOID or CYLINDER
    center:   <np.float64: P, 3> centre, metres (a cylinder's centre is at half height)
    size:     <np.float64: P, 3> box half extents, ellipsoid radii, or cylinder
              (radius, radius, half height), metres, in the solid's local frame
    yaw:      <np.float64: P> rotation of the local frame about world z, radians
    label:    <np.int64: P> class index into CLASS_NAMES
    material: <np.int64: P> base material id (see `materials.py`)
    colour:   <np.float64: P, 3> linear RGB albedo of the solid
    style:    <np.float64: P, 4> material-specific texture parameters
    """

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    label: np.ndarray
    material: np.ndarray
    colour: np.ndarray
    style: np.ndarray

    @classmethod
    def build(cls, kind: int, center, size, label: int, material, yaw=0.0,
              colour=(0.5, 0.5, 0.5), style=(0.0, 0.0, 0.0, 0.0)) -> 'Primitives':
        """Solids of one kind; scalars and single rows broadcast to the P rows of `center`."""
        center = np.atleast_2d(np.asarray(center, dtype=np.float64))
        count = center.shape[0]
        return cls(
            kind=np.full(count, kind, dtype=np.int64),
            center=center,
            size=np.broadcast_to(np.asarray(size, dtype=np.float64), (count, 3)).copy(),
            yaw=np.broadcast_to(np.asarray(yaw, dtype=np.float64), (count,)).copy(),
            label=np.full(count, label, dtype=np.int64),
            material=np.broadcast_to(np.asarray(material, dtype=np.int64), (count,)).copy(),
            colour=np.broadcast_to(np.asarray(colour, dtype=np.float64), (count, 3)).copy(),
            style=np.broadcast_to(np.asarray(style, dtype=np.float64), (count, 4)).copy(),
        )

    @classmethod
    def empty(cls) -> 'Primitives':
        """No solids."""
        return cls.build(BOX, np.zeros((0, 3)), (0.0, 0.0, 0.0), 0, 0)

    @classmethod
    def concatenate(cls, parts: Sequence['Primitives']) -> 'Primitives':
        """All rows of `parts`, in order."""
        if not parts:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})

    def take(self, index: np.ndarray) -> 'Primitives':
        """Return the rows selected by an index or boolean mask."""
        return Primitives(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        """Return the number of solids."""
        return int(self.kind.shape[0])

    @property
    def bounding_radius(self) -> np.ndarray:
        """Radius of a sphere about `center` that encloses each solid, <np.float64: P>."""
        box = np.linalg.norm(self.size, axis=1)
        ellipsoid = self.size.max(axis=1)
        cylinder = np.hypot(self.size[:, 0], self.size[:, 2])
        return np.select([self.kind == BOX, self.kind == ELLIPSOID], [box, ellipsoid], cylinder)


@dataclass
class RayHits:
    """
    What each ray hit first.

    distance:  <np.float64: N> metres along the (unit) ray; inf where nothing was hit
    point:     <np.float64: N, 3> hit point in the world frame (NaN where nothing was hit)
    normal:    <np.float64: N, 3> unit surface normal, facing back along the ray
    label:     <np.int64: N> class index, IGNORE_INDEX where nothing was hit
    material:  <np.int64: N> material id, NO_MATERIAL where nothing was hit
    primitive: <np.int64: N> row in `Primitives`; -1 for the ground and for misses
    local:     <np.float64: N, 3> hit point in the solid's local frame (centre at 0); for the
               street ground (s, d, z): along-track coordinate, signed lateral offset, height
    """

    distance: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    label: np.ndarray
    material: np.ndarray
    primitive: np.ndarray
    local: np.ndarray

    @classmethod
    def misses(cls, count: int) -> 'RayHits':
        """`count` rays that hit nothing."""
        return cls(
            distance=np.full(count, np.inf),
            point=np.full((count, 3), np.nan),
            normal=np.zeros((count, 3)),
            label=np.full(count, IGNORE_INDEX, dtype=np.int64),
            material=np.full(count, NO_MATERIAL, dtype=np.int64),
            primitive=np.full(count, -1, dtype=np.int64),
            local=np.zeros((count, 3)),
        )

    @property
    def hit(self) -> np.ndarray:
        """Whether each ray hit something, <np.bool_: N>."""
        return np.isfinite(self.distance)

    def assign(self, index: np.ndarray, other: 'RayHits') -> None:
        """Overwrite the rows `index` (ints or mask) with the rows of `other`, in place."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(other, f.name)


class PlaneGround:
    """A horizontal plane seen from above, one class and material everywhere."""

    def __init__(self, *, height: float = 0.0, label: int = 1, material: int = 0):
        """Plane z = `height` (metres) with class `label` and material id `material`."""
        self.height = float(height)
        self.label = int(label)
        self.material = int(material)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray,
                  max_distance: float = np.inf) -> RayHits:
        """
        First hit of rays coming down onto the plane.

        origins: <np.float64: N, 3> world frame, metres
        dirs:    <np.float64: N, 3> unit directions, world frame
        """
        hits = RayHits.misses(dirs.shape[0])
        down = (dirs[:, 2] < -1e-12) & (origins[:, 2] > self.height)
        t = (self.height - origins[down, 2]) / dirs[down, 2]
        ok = t <= max_distance
        rows = np.flatnonzero(down)[ok]
        t = t[ok]
        hits.distance[rows] = t
        hits.point[rows] = origins[rows] + t[:, None] * dirs[rows]
        hits.normal[rows] = (0.0, 0.0, 1.0)
        hits.label[rows] = self.label
        hits.material[rows] = self.material
        hits.local[rows] = hits.point[rows]
        return hits


def cast_rays(origins_world: np.ndarray, dirs_world: np.ndarray, primitives: Primitives,
              ground=None, max_distance: float = np.inf, t_min: float = 1e-6) -> RayHits:
    """
    Cast rays against the solids and the ground; return the first hit of each ray.

    origins_world: <np.float64: 3> one origin shared by all rays, or <np.float64: N, 3>
    dirs_world:    <np.float64: N, 3> directions (normalised here), world frame
    primitives:    the solids
    ground:        object with intersect(origins, dirs, max_distance) -> RayHits, or None
    max_distance:  hits farther than this (metres) are ignored
    t_min:         hits nearer than this (metres) are ignored (rays leaving a surface)
    """
    dirs = np.asarray(dirs_world, dtype=np.float64)
    if dirs.ndim != 2 or dirs.shape[1] != 3:
        raise ValueError(f'dirs_world must be (N, 3), got {dirs.shape}')
    origins = np.asarray(origins_world, dtype=np.float64)
    if origins.shape == (3,):
        origins = np.broadcast_to(origins, dirs.shape)
    if origins.shape != dirs.shape:
        raise ValueError(f'origins_world must be (3,) or {dirs.shape}, got {origins.shape}')
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise ValueError('dirs_world contains zero-length directions')
    dirs = dirs / norms
    hits = RayHits.misses(dirs.shape[0])
    for start in range(0, dirs.shape[0], _MAX_RAYS_PER_CHUNK):
        rows = slice(start, start + _MAX_RAYS_PER_CHUNK)
        hits.assign(rows, _cast_chunk(np.ascontiguousarray(origins[rows]), dirs[rows],
                                      primitives, ground, max_distance, t_min))
    return hits


def _cast_chunk(origins, dirs, primitives, ground, max_distance, t_min) -> RayHits:
    """cast_rays on one chunk of rays (same arguments, origins already (N, 3))."""
    count = dirs.shape[0]
    if ground is not None:
        hits = ground.intersect(origins, dirs, max_distance)
    else:
        hits = RayHits.misses(count)
    if len(primitives) == 0 or count == 0:
        return hits
    # A solid must beat what the ray already hit; the candidate batches read this as it shrinks.
    best_t = np.minimum(hits.distance, max_distance)
    # A rising ray is past every solid once it climbs above the highest top.
    top = np.max(primitives.center[:, 2] + primitives.bounding_radius)
    rising = dirs[:, 2] > 1e-6
    best_t[rising] = np.minimum(best_t[rising],
                                np.maximum(top - origins[rising, 2], 0.0) / dirs[rising, 2])
    best_prim = np.full(count, -1, dtype=np.int64)
    for ray_idx, prim_idx in _candidate_batches(origins, dirs, primitives, best_t):
        t = _solid_t(origins[ray_idx], dirs[ray_idx], primitives, prim_idx, t_min)
        better = t < best_t[ray_idx]
        ray_idx, prim_idx, t = ray_idx[better], prim_idx[better], t[better]
        if t.size == 0:
            continue
        nearest = np.full(count, np.inf)
        np.minimum.at(nearest, ray_idx, t)
        winners = np.flatnonzero(t == nearest[ray_idx])
        _, first = np.unique(ray_idx[winners], return_index=True)  # ties: keep one solid
        winners = winners[first]
        best_t[ray_idx[winners]] = t[winners]
        best_prim[ray_idx[winners]] = prim_idx[winners]
    rays = np.flatnonzero(best_prim >= 0)
    prims, t = best_prim[rays], best_t[rays]
    point = origins[rays] + t[:, None] * dirs[rays]
    cos_yaw, sin_yaw = np.cos(primitives.yaw[prims]), np.sin(primitives.yaw[prims])
    point_local = _rotate_z(point - primitives.center[prims], cos_yaw, -sin_yaw)
    normal_local = _normal_local(primitives.kind[prims], primitives.size[prims], point_local)
    normal = _rotate_z(normal_local, cos_yaw, sin_yaw)
    normal *= np.where(np.sum(normal * dirs[rays], axis=1) > 0.0, -1.0, 1.0)[:, None]
    hits.distance[rays] = t
    hits.point[rays] = point
    hits.normal[rays] = normal
    hits.label[rays] = primitives.label[prims]
    hits.material[rays] = primitives.material[prims]
    hits.primitive[rays] = prims
    hits.local[rays] = point_local
    return hits


def _solid_t(origins, dirs, primitives, prim_idx, t_min) -> np.ndarray:
    """
    Distance along each ray to its paired solid (inf for a miss), <np.float64: M>.

    origins, dirs: <np.float64: M, 3> world frame; prim_idx: <np.int64: M>
    """
    cos_yaw = np.cos(primitives.yaw[prim_idx])
    sin_yaw = np.sin(primitives.yaw[prim_idx])
    # In the solid's local frame (the rotation keeps lengths, so t is the same).
    origins_local = _rotate_z(origins - primitives.center[prim_idx], cos_yaw, -sin_yaw)
    dirs_local = _rotate_z(dirs, cos_yaw, -sin_yaw)
    size = primitives.size[prim_idx]
    kind = primitives.kind[prim_idx]
    t = np.full(prim_idx.size, np.inf)
    for kind_id, solver in ((BOX, _box_t), (ELLIPSOID, _ellipsoid_t), (CYLINDER, _cylinder_t)):
        sel = np.flatnonzero(kind == kind_id)
        if sel.size:
            t[sel] = solver(origins_local[sel], dirs_local[sel], size[sel], t_min)
    return t


def _rotate_z(vectors: np.ndarray, cos_yaw: np.ndarray, sin_yaw: np.ndarray) -> np.ndarray:
    """Rotate vectors about z by the angle whose cosine/sine are given, <np.float64: N, 3>."""
    out = np.empty_like(vectors)
    out[:, 0] = cos_yaw * vectors[:, 0] - sin_yaw * vectors[:, 1]
    out[:, 1] = sin_yaw * vectors[:, 0] + cos_yaw * vectors[:, 1]
    out[:, 2] = vectors[:, 2]
    return out


def _box_t(origins, dirs, half, t_min) -> np.ndarray:
    """
    Slab test in the box frame: distance to the first face crossed after t_min, or inf.

    origins, dirs, half: <np.float64: M, 3> local ray origins, unit directions, half extents
    """
    safe = np.where(dirs >= 0.0, np.maximum(dirs, 1e-12), np.minimum(dirs, -1e-12))
    t_a = (-half - origins) / safe
    t_b = (half - origins) / safe
    t_near = np.minimum(t_a, t_b).max(axis=1)
    t_far = np.maximum(t_a, t_b).min(axis=1)
    t = np.where(t_near > t_min, t_near, t_far)
    return np.where((t_far >= t_near) & (t > t_min), t, np.inf)


def _ellipsoid_t(origins, dirs, radii, t_min) -> np.ndarray:
    """
    Ellipsoid = unit sphere after scaling by 1/radii (t is unchanged by the scaling).

    origins, dirs, radii: <np.float64: M, 3> local ray origins, unit directions, radii
    """
    o = origins / radii
    d = dirs / radii
    a = np.sum(d * d, axis=1)
    b = np.sum(o * d, axis=1)
    c = np.sum(o * o, axis=1) - 1.0
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    t_near = (-b - root) / a
    t_far = (-b + root) / a
    t = np.where(t_near > t_min, t_near, t_far)
    return np.where((disc >= 0.0) & (t > t_min), t, np.inf)


def _cylinder_t(origins, dirs, size, t_min) -> np.ndarray:
    """
    Vertical capped cylinder: nearest valid crossing of the side or of either cap.

    origins, dirs: <np.float64: M, 3> local ray origins and unit directions
    size:          <np.float64: M, 3> (radius, radius, half height)
    """
    radius, half_height = size[:, 0], size[:, 2]
    a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
    b = origins[:, 0] * dirs[:, 0] + origins[:, 1] * dirs[:, 1]
    c = origins[:, 0] ** 2 + origins[:, 1] ** 2 - radius ** 2
    disc = b * b - a * c
    safe_a = np.maximum(a, 1e-18)
    root = np.sqrt(np.maximum(disc, 0.0))
    candidates = []
    for sign in (-1.0, 1.0):
        t_side = (-b + sign * root) / safe_a
        z = origins[:, 2] + t_side * dirs[:, 2]
        ok = (disc >= 0.0) & (a > 1e-18) & (np.abs(z) <= half_height) & (t_side > t_min)
        candidates.append(np.where(ok, t_side, np.inf))
    safe_dz = np.where(dirs[:, 2] >= 0.0, np.maximum(dirs[:, 2], 1e-18),
                       np.minimum(dirs[:, 2], -1e-18))
    for sign in (-1.0, 1.0):
        t_cap = (sign * half_height - origins[:, 2]) / safe_dz
        x = origins[:, 0] + t_cap * dirs[:, 0]
        y = origins[:, 1] + t_cap * dirs[:, 1]
        ok = (x * x + y * y <= radius ** 2) & (t_cap > t_min) & (np.abs(dirs[:, 2]) > 1e-12)
        candidates.append(np.where(ok, t_cap, np.inf))
    return np.min(candidates, axis=0)


def _normal_local(kind, size, point_local) -> np.ndarray:
    """
    Outward unit normal at points on the solids' surfaces, local frame, <np.float64: M, 3>.

    kind: <np.int64: M>; size, point_local: <np.float64: M, 3>
    """
    rows = np.arange(kind.size)
    # Box: the face is the axis where the point is relatively farthest out.
    axis = np.argmax(np.abs(point_local) / np.maximum(size, 1e-9), axis=1)
    box_normal = np.zeros_like(point_local)
    box_normal[rows, axis] = np.sign(point_local[rows, axis])
    ellipsoid_normal = point_local / np.maximum(size, 1e-9) ** 2
    radial = np.hypot(point_local[:, 0], point_local[:, 1])
    on_cap = (size[:, 2] - np.abs(point_local[:, 2])) < (size[:, 0] - radial)
    cylinder_normal = np.where(
        on_cap[:, None],
        np.stack([np.zeros_like(radial), np.zeros_like(radial), np.sign(point_local[:, 2])], 1),
        np.stack([point_local[:, 0], point_local[:, 1], np.zeros_like(radial)], 1))
    normal = np.select([(kind == BOX)[:, None], (kind == ELLIPSOID)[:, None]],
                       [box_normal, ellipsoid_normal], cylinder_normal)
    return normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)


def _sphere_test(origins, dirs, center, radius, ray_idx, prim_idx, best_t) -> np.ndarray:
    """
    Whether each paired ray passes through the solid's bounding sphere before best_t.

    returns: <np.bool_: M> for the pairs (ray_idx, prim_idx)
    """
    rel = center[prim_idx] - origins[ray_idx]
    along = np.sum(rel * dirs[ray_idx], axis=1)
    perp2 = np.sum(rel * rel, axis=1) - along * along
    r = radius[prim_idx]
    return (perp2 <= r * r) & (along >= -r) & (along - r <= best_t[ray_idx])


def _candidate_batches(origins, dirs, primitives, best_t):
    """
    Yield batches of (ray, solid) index pairs worth an exact test.

    origins, dirs: <np.float64: N, 3>; best_t: <np.float64: N> current nearest hit per ray,
    updated by the caller between batches (later batches skip rays already stopped).
    """
    radius = primitives.bounding_radius * 1.001 + 1e-4  # margin against rounding at edges
    if np.all(origins == origins[0]):
        yield from _shared_origin_batches(origins, dirs, primitives, radius, best_t)
        return
    # Solids too far from every origin cannot be reached (distance to the origins' box).
    lo, hi = origins.min(axis=0), origins.max(axis=0)
    center = primitives.center
    gap = np.linalg.norm(np.maximum(lo - center, 0.0) + np.maximum(center - hi, 0.0), axis=1)
    near = np.flatnonzero(gap - radius < best_t.max())
    if np.all(dirs == dirs[0]):
        ray_idx, local_idx = _parallel_pairs(origins, dirs[0], primitives, near, radius[near])
    else:
        ray_idx = np.repeat(np.arange(dirs.shape[0]), near.size)
        local_idx = np.tile(np.arange(near.size), dirs.shape[0])
    prim_idx = near[local_idx]
    keep = _sphere_test(origins, dirs, center, radius, ray_idx, prim_idx, best_t)
    yield ray_idx[keep], prim_idx[keep]


# Solids are cast in bands of distance from the origin (metres to their bounding sphere),
# nearest first, so that rays already stopped by something near never meet what lies behind.
_BAND_EDGES = (6.0, 15.0, 35.0, 80.0, np.inf)


def _shared_origin_batches(origins, dirs, primitives, radius, best_t):
    """Batches for rays from one origin, joined on an azimuth x elevation grid, by band."""
    origin = origins[0]
    rel = primitives.center - origin
    near_distance = np.linalg.norm(rel, axis=1) - radius
    az = np.arctan2(dirs[:, 1], dirs[:, 0])
    el = np.arcsin(np.clip(dirs[:, 2], -1.0, 1.0))
    # About eight rays per cell: cells much finer than the rays only cost bookkeeping.
    az_spread = np.ptp(np.angle(np.exp(1j * (az - np.angle(np.exp(1j * az).mean())))))
    area = max(az_spread, 1e-3) * max(np.ptp(el), 1e-3)
    n_az = int(np.clip(np.ceil(2 * np.pi / np.sqrt(8.0 * area / dirs.shape[0])), 180, 720))
    cell = 2 * np.pi / n_az
    n_el = int(np.ceil(np.pi / cell))
    ray_cell = (np.clip(((az + np.pi) / cell).astype(np.int64), 0, n_az - 1) * n_el
                + np.clip(((el + np.pi / 2) / cell).astype(np.int64), 0, n_el - 1))
    az_lo, az_span, el_lo, el_hi = _angular_bounds(rel, primitives.kind, primitives.size,
                                                   primitives.yaw)
    lu = np.floor((az_lo + np.pi) / cell).astype(np.int64)
    width_u = np.floor((az_lo + az_span + np.pi) / cell).astype(np.int64) - lu + 1
    full = width_u >= n_az
    lu = np.where(full, 0, lu % n_az)
    width_u = np.where(full, n_az, width_u)
    lv = np.clip(np.floor((el_lo + np.pi / 2) / cell).astype(np.int64), 0, n_el - 1)
    hv = np.clip(np.floor((el_hi + np.pi / 2) / cell).astype(np.int64), 0, n_el - 1)
    order_all = np.argsort(ray_cell, kind='stable')
    band_lo = -np.inf
    for band_hi in _BAND_EDGES:
        in_band = np.flatnonzero((near_distance >= band_lo) & (near_distance < band_hi)
                                 & (near_distance < best_t.max()))
        is_active = best_t > max(band_lo, 0.0)
        active = np.flatnonzero(is_active)
        band_lo = band_hi
        if in_band.size == 0 or active.size == 0:
            continue
        # Active rays in cell order, as positions in `active` (filtering keeps the order).
        position = np.cumsum(is_active) - 1
        order = position[order_all[is_active[order_all]]]
        ray_sub, prim_sub = _grid_join(
            ray_cell[active], n_az, n_el, lu[in_band], width_u[in_band], lv[in_band],
            hv[in_band] - lv[in_band] + 1, wrap_u=True, order=order)
        ray_idx, prim_idx = active[ray_sub], in_band[prim_sub]
        keep = _sphere_test(origins, dirs, primitives.center, radius, ray_idx, prim_idx, best_t)
        yield ray_idx[keep], prim_idx[keep]


def _angular_bounds(rel, kind, size, yaw):
    """
    Conservative azimuth/elevation box of each solid seen from the origin.

    rel: <np.float64: P, 3> solid centres relative to the origin; kind, size, yaw as in
    Primitives. Boxes use their yawed footprint rectangle, round solids a footprint disk.
    returns: az_lo, az_span, el_lo, el_hi, each <np.float64: P> radians (span 2 pi: all round)
    """
    margin = 2e-3
    c, s = np.cos(yaw), np.sin(yaw)
    box = kind == BOX
    disk = np.where(kind == CYLINDER, size[:, 0], np.maximum(size[:, 0], size[:, 1]))
    half_x = np.where(box, size[:, 0], disk)
    half_y = np.where(box, size[:, 1], disk)
    # The origin in each solid's horizontal frame, for distances to the footprint rectangle.
    ox = np.abs(c * rel[:, 0] + s * rel[:, 1])
    oy = np.abs(-s * rel[:, 0] + c * rel[:, 1])
    d_center = np.hypot(rel[:, 0], rel[:, 1])
    d_min = np.where(box, np.hypot(np.maximum(ox - half_x, 0), np.maximum(oy - half_y, 0)),
                     np.maximum(d_center - disk, 0.0))
    d_max = np.where(box, np.hypot(ox + half_x, oy + half_y), d_center + disk)
    az_c = np.arctan2(rel[:, 1], rel[:, 0])
    # Boxes: azimuths of the footprint corners; disks: the tangent half-angle.
    deltas = []
    for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        cx = rel[:, 0] + c * sx * half_x - s * sy * half_y
        cy = rel[:, 1] + s * sx * half_x + c * sy * half_y
        deltas.append(np.angle(np.exp(1j * (np.arctan2(cy, cx) - az_c))))
    deltas = np.stack(deltas, axis=1)
    tangent = np.arcsin(np.clip(disk / np.maximum(d_center, 1e-12), 0.0, 1.0))
    az_lo = az_c + np.where(box, deltas.min(axis=1), -tangent) - margin
    az_hi = az_c + np.where(box, deltas.max(axis=1), tangent) + margin
    az_span = np.where(d_min <= 1e-6, 2 * np.pi, np.minimum(az_hi - az_lo, 2 * np.pi))
    z_lo, z_hi = rel[:, 2] - size[:, 2], rel[:, 2] + size[:, 2]
    el_lo = np.arctan2(z_lo, np.where(z_lo < 0, d_min, d_max)) - margin
    el_hi = np.arctan2(z_hi, np.where(z_hi > 0, d_min, d_max)) + margin
    return az_lo, az_span, el_lo, el_hi


def _parallel_pairs(origins, direction, primitives, near, radius, max_cells: int = 512):
    """
    Pairs for parallel rays, joined on a grid in the plane across their direction.

    origins:   <np.float64: N, 3>; direction: <np.float64: 3> unit
    near:      <np.int64: P> rows of `primitives` to consider; radius: <np.float64: P>
    returns:   ray indices and indices into `near`, two <np.int64: M>
    """
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    axis_u = np.cross(direction, helper)
    axis_u /= np.linalg.norm(axis_u)
    axis_v = np.cross(direction, axis_u)
    across = np.stack([axis_u, axis_v], axis=1)
    ray_uv = origins @ across
    center_uv = primitives.center[near] @ across
    # Boxes: the projected corners bound the box exactly; other solids: the bounding sphere.
    prim_lo = center_uv - radius[:, None]
    prim_hi = center_uv + radius[:, None]
    boxes = np.flatnonzero(primitives.kind[near] == BOX)
    if boxes.size:
        rows = near[boxes]
        c, s = np.cos(primitives.yaw[rows]), np.sin(primitives.yaw[rows])
        half = primitives.size[rows]
        # Half extents of the box along the world axes' projections: sum of |projected edges|.
        edges = np.stack([np.stack([c * half[:, 0], s * half[:, 0], 0 * c], 1),
                          np.stack([-s * half[:, 1], c * half[:, 1], 0 * c], 1),
                          np.stack([0 * c, 0 * c, half[:, 2]], 1)], axis=1)
        extent = np.abs(edges @ across).sum(axis=1)
        prim_lo[boxes] = center_uv[boxes] - extent
        prim_hi[boxes] = center_uv[boxes] + extent
    lo = ray_uv.min(axis=0)
    span = ray_uv.max(axis=0) - lo
    cell = max(float(span.max()) / max_cells, 0.05)
    n_u, n_v = (np.floor(span / cell).astype(np.int64) + 1).tolist()
    ray_cell = np.floor((ray_uv - lo) / cell).astype(np.int64)
    first = np.maximum(np.floor((prim_lo - lo) / cell).astype(np.int64), 0)
    last = np.minimum(np.floor((prim_hi - lo) / cell).astype(np.int64), [n_u - 1, n_v - 1])
    width = last - first + 1
    on_grid = np.all(width > 0, axis=1)
    ray_idx, local_idx = _grid_join(
        ray_cell[:, 0] * n_v + ray_cell[:, 1], n_u, n_v, first[on_grid, 0], width[on_grid, 0],
        first[on_grid, 1], width[on_grid, 1], wrap_u=False)
    return ray_idx, np.flatnonzero(on_grid)[local_idx]


def _ramp(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..counts[0]), [0..counts[1]), ..., <np.int64: sum(counts)>."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _grid_join(ray_cell, n_u, n_v, lu, width_u, lv, width_v, wrap_u: bool, order=None):
    """
    Pairs (ray, solid) where the ray's cell lies in the solid's rectangle of cells.

    ray_cell:          <np.int64: N> flat cell id u * n_v + v of each ray
    lu, width_u:       <np.int64: P> first column and number of columns of each solid
    lv, width_v:       <np.int64: P> first row and number of rows of each solid
    wrap_u:            columns wrap around (azimuth)
    order:             rays sorted by cell (np.argsort(ray_cell, kind='stable')), if known
    """
    if order is None:
        order = np.argsort(ray_cell, kind='stable')
    counts = np.bincount(ray_cell, minlength=n_u * n_v)
    starts = np.cumsum(counts) - counts
    entries = width_u * width_v
    prim_rep = np.repeat(np.arange(lu.size), entries)
    k = _ramp(entries)
    rows_v = width_v[prim_rep]
    iu = lu[prim_rep] + k // rows_v
    if wrap_u:
        iu %= n_u
    cells = iu * n_v + lv[prim_rep] + k % rows_v
    per_cell = counts[cells]
    occupied = per_cell > 0
    prim_rep, cells, per_cell = prim_rep[occupied], cells[occupied], per_cell[occupied]
    ray_idx = order[np.repeat(starts[cells], per_cell) + _ramp(per_cell)]
    return ray_idx, np.repeat(prim_rep, per_cell)
