"""Pictures: the overlay image and the offscreen 3D view of a labeled cloud."""
