"""A 3D view of a labeled cloud rendered offscreen with open3d (for the demo's pictures)."""

from pathlib import Path

import numpy as np


def render_cloud(points_lidar: np.ndarray, colors: np.ndarray, path, size=(960, 540),
                 eye=(-6.0, 0.0, 9.0), center=(16.0, 0.0, 0.0)) -> Path:
    """
    Render <float32: N, 3> points with <uint8: N, 3> colours to a PNG, chase-camera view.

    eye / center are in the LiDAR frame (x forward, z up), metres. Needs open3d and a
    Vulkan or EGL driver (Debian: libvulkan1 mesa-vulkan-drivers).
    """
    import open3d as o3d

    renderer = o3d.visualization.rendering.OffscreenRenderer(int(size[0]), int(size[1]))
    cloud = o3d.geometry.PointCloud(
        o3d.utility.Vector3dVector(np.asarray(points_lidar, dtype=np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(np.asarray(colors, dtype=np.float64) / 255.0)
    material = o3d.visualization.rendering.MaterialRecord()
    material.shader, material.point_size = 'defaultUnlit', 2.0
    renderer.scene.add_geometry('cloud', cloud, material)
    renderer.scene.set_background([0.08, 0.08, 0.1, 1.0])
    renderer.setup_camera(60.0, list(center), list(eye), [0.0, 0.0, 1.0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    o3d.io.write_image(str(path), renderer.render_to_image())
    return path
