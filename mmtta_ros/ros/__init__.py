"""The rclpy shell: the node, its parameter declarations, diagnostics and message packing."""
