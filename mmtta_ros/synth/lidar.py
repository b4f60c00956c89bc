"""A spinning multi-beam LiDAR on top of the shared ray caster (HDL-32E-like by default)."""

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from mmtta_ros.core.classes import IGNORE_INDEX
from mmtta_ros.synth import materials as mat
from mmtta_ros.synth.raycast import cast_rays

# Velodyne HDL-32E (nuScenes LIDAR_TOP): 32 beams evenly from -30.67 to +10.67 degrees.
HDL32E_ELEVATIONS_DEG: Tuple[float, ...] = tuple(
    round(float(e), 3) for e in np.linspace(-30.67, 10.67, 32))
# Velodyne VLP-16: 16 beams every 2 degrees from -15 to +15.
VLP16_ELEVATIONS_DEG: Tuple[float, ...] = tuple(float(e) for e in np.linspace(-15.0, 15.0, 16))


@dataclass
class LidarScan:
    """
    One sweep's returns, in firing order (azimuth-major, then ring).

    points_lidar: <np.float32: N, 3> x forward, y left, z up, metres, LiDAR frame
    intensity:    <np.float32: N> 0..255, integer-valued like nuScenes
    ring:         <np.int32: N> beam index, 0 = lowest beam
    labels:       <np.int64: N> class index of the surface each point lies on
                  (IGNORE_INDEX for fog clutter)
    """

    points_lidar: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    labels: np.ndarray


@dataclass
class LidarModel:
    """
    Beam pattern, range and return model of a spinning LiDAR.

    elevation_deg:   beam elevations, ascending (ring 0 first)
    azimuth_steps:   firings per revolution (1085 at 20 Hz for an HDL-32E: 34,720 rays)
    max_range:       metres; nothing farther returns
    range_noise:     standard deviation of the range, metres
    dropout:         probability that any return is lost
    weak_return:     return strength (reflectivity x cos(incidence) x (10 m / range)^2) scale
                     below which returns are increasingly lost: dark surfaces at grazing angles
    glass_dropout:   extra loss probability on glass (specular: the beam goes through)
    intensity_gain:  scale from reflectivity to the 0..255 intensity
    texture_seed:    seed of the world-fixed reflectivity texture (the scene's seed)
    clutter:         share of rays answered by fog or spray within a few metres (spurious
                     near returns, labeled IGNORE_INDEX: they are no class)
    """

    elevation_deg: Tuple[float, ...] = HDL32E_ELEVATIONS_DEG
    azimuth_steps: int = 1085
    max_range: float = 80.0
    min_range: float = 0.5
    range_noise: float = 0.02
    dropout: float = 0.01
    weak_return: float = 0.0015
    glass_dropout: float = 0.5
    intensity_gain: float = 1.0
    texture_seed: int = 0
    clutter: float = 0.0

    @property
    def num_beams(self) -> int:
        """Return the number of beams (rings)."""
        return len(self.elevation_deg)

    def ray_directions(self, azimuth_offset: float = 0.0):
        """
        Return unit ray directions of one revolution in the LiDAR frame, firing order.

        azimuth_offset: radians added to every firing (sweeps do not start at the same angle)
        returns: <np.float64: R, 3> directions, <np.int32: R> ring of each ray
        """
        elevation = np.deg2rad(np.asarray(self.elevation_deg, dtype=np.float64))
        azimuth = azimuth_offset + np.arange(self.azimuth_steps) * (2 * np.pi / self.azimuth_steps)
        az, el = np.meshgrid(azimuth, elevation, indexing='ij')
        dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
        ring = np.broadcast_to(np.arange(self.num_beams, dtype=np.int32), az.shape)
        return dirs.reshape(-1, 3), ring.reshape(-1).copy()

    def scan(self, primitives, ground, T_world_from_lidar: np.ndarray,
             rng: np.random.Generator) -> LidarScan:
        """
        Cast one sweep from the pose `T_world_from_lidar` <np.float64: 4, 4>.

        The sweep is taken as instantaneous (no motion distortion over its 50 ms).
        """
        dirs_lidar, ring = self.ray_directions(rng.uniform(0.0, 2 * np.pi / self.azimuth_steps))
        rotation, origin = T_world_from_lidar[:3, :3], T_world_from_lidar[:3, 3]
        dirs_world = dirs_lidar @ rotation.T
        hits = cast_rays(origin, dirs_world, primitives, ground, max_distance=self.max_range)
        material = mat.refine_materials(hits.material, hits.primitive, hits.local, primitives)
        rows = np.flatnonzero(hits.hit & (hits.distance >= self.min_range))
        material = material[rows]
        distance = hits.distance[rows]
        reflectivity = mat.lidar_reflectivity(material, hits.point[rows], self.texture_seed)
        cos_incidence = np.abs(np.sum(hits.normal[rows] * dirs_world[rows], axis=1))
        strength = reflectivity * cos_incidence * (10.0 / np.maximum(distance, 1.0)) ** 2
        p_lost = 1.0 - (1.0 - self.dropout) * (1.0 - np.exp(-strength / self.weak_return))
        glass = np.isin(material, (mat.WINDOW, mat.CAR_GLASS))
        p_lost = np.where(glass, 1.0 - (1.0 - p_lost) * (1.0 - self.glass_dropout), p_lost)
        kept = rng.random(rows.size) >= p_lost
        rows, distance = rows[kept], distance[kept]
        reflectivity, cos_incidence = reflectivity[kept], cos_incidence[kept]
        measured = distance + rng.normal(0.0, self.range_noise, rows.size)
        points_lidar = dirs_lidar[rows] * measured[:, None]
        # Reflectivity x incidence with a soft range falloff, quantised like nuScenes' 0..255.
        raw = 255.0 * self.intensity_gain * reflectivity * (0.25 + 0.75 * cos_incidence) / (
            1.0 + (distance / 50.0) ** 2)
        intensity = np.clip(np.round(raw + rng.normal(0.0, 1.0, rows.size)), 0, 255)
        labels, ring_all, ring = hits.label[rows], ring, ring[rows]
        if self.clutter > 0.0:
            # Fog answers a share of the beams close by, weakly, before any surface.
            fogged = np.flatnonzero(rng.random(dirs_lidar.shape[0]) < self.clutter)
            near = self.min_range + rng.exponential(3.0, fogged.size)
            points_lidar = np.concatenate([points_lidar, dirs_lidar[fogged] * near[:, None]])
            intensity = np.concatenate([intensity, np.round(rng.uniform(0, 8, fogged.size))])
            ring = np.concatenate([ring, ring_all[fogged]])
            labels = np.concatenate([labels, np.full(fogged.size, IGNORE_INDEX, labels.dtype)])
        return LidarScan(points_lidar=points_lidar.astype(np.float32),
                         intensity=intensity.astype(np.float32), ring=ring, labels=labels)
