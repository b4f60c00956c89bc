"""Deterministic lattice value noise, evaluated at world points, for procedural textures."""

import itertools

import numpy as np

# Odd 32-bit multipliers, one per lattice axis, so that neighbouring cells decorrelate.
_AXIS_PRIMES = (np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F))


def hash_cells(cells: np.ndarray, seed: int) -> np.ndarray:
    """
    Hash integer lattice cells to uniform values in [0, 1), the same for the same seed.

    cells:   <np.int64: N, D> lattice coordinates (any D: axes are mixed in turn)
    returns: <np.float64: N>
    """
    h = np.full(cells.shape[0], np.uint32((seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF))
    for axis in range(cells.shape[1]):
        # Negative cells wrap to uint32 on purpose: the hash only needs distinct bit patterns.
        h ^= cells[:, axis].astype(np.uint32) * _AXIS_PRIMES[axis % 3]
        h = (h ^ (h >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def value_noise(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """
    Smoothly interpolated lattice noise with unit cell size, in [0, 1).

    points:  <np.float64: N, D> coordinates in cell units, D in 1..3
    returns: <np.float64: N>
    """
    points = np.asarray(points, dtype=np.float64)
    base = np.floor(points)
    frac = points - base
    weight = frac * frac * (3.0 - 2.0 * frac)
    cells = base.astype(np.int64)
    dims = points.shape[1]
    corners = list(itertools.product((0, 1), repeat=dims))
    values = [hash_cells(cells + np.asarray(corner, dtype=np.int64), seed) for corner in corners]
    # Interpolate along the last axis first: corners differing only there are neighbours.
    for axis in reversed(range(dims)):
        w = weight[:, axis]
        values = [low + w * (high - low) for low, high in zip(values[0::2], values[1::2])]
    return values[0]


def fbm(points: np.ndarray, octaves: int = 3, seed: int = 0) -> np.ndarray:
    """
    Fractal sum of value-noise octaves (each twice the frequency, half the amplitude), in [0, 1).

    points:  <np.float64: N, D> coordinates in units of the coarsest cell
    returns: <np.float64: N>
    """
    total = np.zeros(np.asarray(points).shape[0])
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * value_noise(np.asarray(points) * (2.0 ** octave), seed + 101 * octave)
        norm += amplitude
        amplitude *= 0.5
    return total / norm
