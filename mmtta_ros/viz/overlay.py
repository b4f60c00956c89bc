"""Draw labeled points on the camera image (what the overlay topic shows)."""

import numpy as np


def draw_points(image_rgb: np.ndarray, pixels: np.ndarray, colors: np.ndarray,
                depth: np.ndarray = None, radius: int = 1) -> np.ndarray:
    """
    Return a copy of <uint8: H, W, 3> with a (2r+1)^2 square per point.

    pixels: <float32: M, 2> (u, v); colors: <uint8: M, 3>; depth: <float: M> or None.
    Far points are drawn first, so near ones stay on top (as a camera sees them).
    """
    out = np.array(image_rgb, dtype=np.uint8, copy=True)
    if len(pixels) == 0:
        return out
    height, width = out.shape[:2]
    order = np.argsort(-np.asarray(depth)) if depth is not None else np.arange(len(pixels))
    u = np.round(pixels[order, 0]).astype(np.int64)
    v = np.round(pixels[order, 1]).astype(np.int64)
    colors = np.asarray(colors, dtype=np.uint8)[order]
    offsets = np.arange(-radius, radius + 1)
    du, dv = np.meshgrid(offsets, offsets)
    # <M, S> coordinates of every square's pixels; numpy assignment keeps the last write.
    uu = np.clip(u[:, None] + du.reshape(1, -1), 0, width - 1)
    vv = np.clip(v[:, None] + dv.reshape(1, -1), 0, height - 1)
    out[vv.reshape(-1), uu.reshape(-1)] = np.repeat(colors, du.size, axis=0)
    return out


# Requested points on the overlay: magenta, a size bigger than the labeled points.
REQUEST_COLOR = (255, 0, 255)


def mark_requests(image_rgb: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Return a copy of <uint8: H, W, 3> with the label-requested pixels <M, 2> marked."""
    colors = np.tile(np.asarray(REQUEST_COLOR, dtype=np.uint8), (len(pixels), 1))
    return draw_points(image_rgb, pixels, colors, radius=2)
